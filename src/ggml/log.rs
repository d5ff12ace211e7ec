//! Routes ggml's and llama.cpp's log output: quiet by default (kept so that a
//! failed call can report ggml's own reason), printed with `SVFIT_LOG=debug`.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use super::sys;

static VERBOSE: AtomicBool = AtomicBool::new(false);
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());
static INSTALL: Once = Once::new();

/// Installs the log callback once per process. `SVFIT_LOG=debug` (or
/// `verbose`) prints every ggml/llama.cpp message to stderr.
pub fn install() {
    INSTALL.call_once(|| {
        let verbose = std::env::var("SVFIT_LOG")
            .map(|v| v == "debug" || v == "verbose")
            .unwrap_or(false);
        VERBOSE.store(verbose, Ordering::Relaxed);
        // SAFETY: `callback` is a valid `extern "C"` function for the whole
        // process lifetime and ignores its user data.
        unsafe {
            sys::ggml_log_set(Some(callback), std::ptr::null_mut());
            sys::llama_log_set(Some(callback), std::ptr::null_mut());
        }
    });
}

/// The last error line ggml logged since the previous call, if any.
pub fn take_last_error() -> Option<String> {
    let mut last = LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    let msg = std::mem::take(&mut *last);
    let msg = msg.trim().to_string();
    (!msg.is_empty()).then_some(msg)
}

unsafe extern "C" fn callback(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated message valid during the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    if level == sys::GGML_LOG_LEVEL_ERROR {
        let mut last = LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner());
        *last = msg.to_string();
    }
    if VERBOSE.load(Ordering::Relaxed) {
        eprint!("{msg}");
    }
}
