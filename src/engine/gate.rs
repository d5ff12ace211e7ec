//! Turns on the compute between serving and fine-tuning jobs in one
//! process. ggml's worker threads spin at barriers, so an engine step and a
//! training step running side by side each slow to a few percent of their
//! speed: they take turns instead. The engine takes a turn for each decode
//! step ([`Gate::serve`]); a training job takes one for each packed row's
//! forward and backward (or evaluation) through a [`Pacer`], which while
//! requests are in flight takes no more than its share of the time
//! (`--train-share`), and while none are takes all it wants. A request
//! that arrives during a training turn waits for that turn (at most one)
//! to end.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Who computes now.
#[derive(Default)]
pub struct Gate {
    turns: Mutex<Turns>,
    changed: Condvar,
}

#[derive(Default)]
struct Turns {
    serving: bool,
    training: bool,
    /// The engine waits for a turn: a trainer lets it go first.
    serve_waiting: bool,
}

/// The engine's turn; the gate opens again when it drops.
pub struct ServeTurn<'a>(&'a Gate);

impl Drop for ServeTurn<'_> {
    fn drop(&mut self) {
        self.0.turns().serving = false;
        self.0.changed.notify_all();
    }
}

impl Gate {
    fn turns(&self) -> MutexGuard<'_, Turns> {
        // The state is two flags, consistent after any panic.
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's turn for one step, once the training turn that holds
    /// the compute (if any) has ended.
    pub fn serve(&self) -> ServeTurn<'_> {
        let mut turns = self.turns();
        turns.serve_waiting = true;
        while turns.training {
            turns = self.changed.wait(turns).unwrap_or_else(|e| e.into_inner());
        }
        turns.serve_waiting = false;
        turns.serving = true;
        ServeTurn(self)
    }

    /// A training turn: waits until neither the engine steps nor waits.
    fn enter_training(&self) {
        let mut turns = self.turns();
        while turns.serving || turns.serve_waiting || turns.training {
            turns = self.changed.wait(turns).unwrap_or_else(|e| e.into_inner());
        }
        turns.training = true;
    }

    fn leave_training(&self) {
        self.turns().training = false;
        self.changed.notify_all();
    }
}

/// How long a trainer sleeps between looks at its share.
const TICK: Duration = Duration::from_millis(2);

/// A trainer's side of the gate: turns for its steps, at most `share` of
/// the time while `busy` says requests are in flight.
pub struct Pacer {
    gate: Arc<Gate>,
    share: f64,
    busy: Box<dyn Fn() -> bool + Send + Sync>,
    /// Seconds of turn the trainer may still take (it earns `share` of
    /// every busy second and spends every second it computes while busy).
    state: Mutex<PaceState>,
}

struct PaceState {
    credit: f64,
    since: Instant,
    began: Option<(Instant, bool)>,
}

impl Pacer {
    /// `share` in (0, 1]; 1 takes turns as soon as the engine is between
    /// steps.
    pub fn new(gate: Arc<Gate>, share: f64, busy: Box<dyn Fn() -> bool + Send + Sync>) -> Self {
        Pacer {
            gate,
            share: share.clamp(1e-3, 1.0),
            busy,
            state: Mutex::new(PaceState {
                credit: 0.0,
                since: Instant::now(),
                began: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, PaceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the trainer's share, then for the compute.
    pub fn begin(&self) {
        loop {
            let busy = (self.busy)();
            let mut state = self.state();
            let now = Instant::now();
            if busy {
                let earned = self.share * (now - state.since).as_secs_f64();
                // No saving up: an idle spell does not buy a burst later.
                state.credit = (state.credit + earned).min(0.0);
            } else {
                state.credit = 0.0;
            }
            state.since = now;
            if !busy || state.credit >= 0.0 || self.share >= 1.0 {
                drop(state);
                self.gate.enter_training();
                self.state().began = Some((Instant::now(), busy));
                return;
            }
            drop(state);
            std::thread::sleep(TICK);
        }
    }

    /// The compute is the engine's again; the turn is paid for.
    pub fn end(&self) {
        self.gate.leave_training();
        let mut state = self.state();
        if let Some((began, busy)) = state.began.take() {
            let now = Instant::now();
            if busy || (self.busy)() {
                let took = (now - began).as_secs_f64();
                state.credit += self.share * (now - state.since).as_secs_f64() - took;
            }
            state.since = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    /// While the engine is busy, a trainer with share 0.25 computes about
    /// a quarter of the time; the engine never steps inside a training
    /// turn.
    #[test]
    fn a_busy_engine_leaves_the_trainer_its_share() {
        let gate = Arc::new(Gate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let engine = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let _turn = gate.serve();
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let pacer = Pacer::new(gate.clone(), 0.25, Box::new(|| true));
        let started = Instant::now();
        let mut trained = Duration::ZERO;
        while started.elapsed() < Duration::from_millis(800) {
            pacer.begin();
            assert!(
                !gate.turns().serving,
                "the engine stepped in a training turn"
            );
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(10));
            trained += t.elapsed();
            pacer.end();
        }
        stop.store(true, SeqCst);
        engine.join().unwrap();
        let share = trained.as_secs_f64() / started.elapsed().as_secs_f64();
        // Loose bounds: the machine may be loaded; the order is the point.
        assert!(
            (0.05..0.6).contains(&share),
            "trained {share:.2} of the time"
        );
    }

    /// With no request in flight the trainer does not wait for a share:
    /// each turn looks at the engine once to begin and once to end.
    #[test]
    fn an_idle_engine_leaves_the_trainer_everything() {
        let looks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = looks.clone();
        let busy = Box::new(move || {
            counted.fetch_add(1, SeqCst);
            false
        });
        let pacer = Pacer::new(Arc::new(Gate::default()), 0.01, busy);
        for _ in 0..20 {
            pacer.begin();
            std::thread::sleep(Duration::from_millis(1));
            pacer.end();
        }
        assert_eq!(looks.load(SeqCst), 40);
    }
}
