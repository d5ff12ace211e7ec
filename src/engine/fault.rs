//! Test-only faults (the `fault-injection` feature): a request whose stop
//! strings include one of these makes the engine fail on purpose.

/// Panics while handling this request's sequence.
pub const PANIC_SEQUENCE: &str = "\u{1}svfit-fault:panic-sequence";
/// Panics on the engine thread outside any sequence: the engine dies.
pub const KILL_ENGINE: &str = "\u{1}svfit-fault:kill-engine";
/// Decodes an invalid token after the prompt: the whole batch fails.
pub const INVALID_TOKEN: &str = "\u{1}svfit-fault:invalid-token";

/// Whether `job` asks for `fault`.
pub(super) fn asks(job: &super::Job, fault: &str) -> bool {
    job.request.stop.iter().any(|s| s == fault)
}
