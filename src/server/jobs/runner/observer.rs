//! A running job's observer: the session's steps and evaluations become
//! the job's events (in the store every few seconds), and each epoch's
//! checkpoint goes to the store after the events up to it.

use std::path::PathBuf;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use serde_json::{json, Value};
use tonic::Status;

use super::super::event;
use super::{Running, FLUSH};
use crate::store::unix_now;
use crate::train::session::Observer;
use crate::train::Event;

/// Turns the session's reports into job events (and checkpoints).
pub(super) struct JobObserver<'a> {
    pub(super) running: &'a Running<'a>,
    pub(super) checkpoint: PathBuf,
    pub(super) total: u64,
    pub(super) pending: Vec<Value>,
    pub(super) flushed: Instant,
    pub(super) last_loss: Option<f64>,
}

impl JobObserver<'_> {
    pub(super) fn flush(&mut self) {
        let r = self.running;
        self.flushed = Instant::now();
        if self.pending.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.pending);
        let appended = r.jobs().append_events(r.tenant, r.id, events, None);
        if let Err(e) = r.handle.block_on(appended) {
            tracing::warn!(job = r.id, error = %e.message(), "storing a job's events");
        }
    }

    /// The epoch's checkpoint into the store, after the events up to it.
    fn checkpoint(&mut self, step: u64) {
        self.flush();
        let r = self.running;
        let stored = std::fs::read(&self.checkpoint)
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|bytes| {
                r.handle
                    .block_on(r.jobs().put_checkpoint(r.tenant, r.id, bytes))
            });
        if let Err(e) = stored {
            tracing::warn!(job = r.id, error = %e.message(), "storing a job's checkpoint");
            return;
        }
        let object = json!({
            "object": "fine_tuning.job.checkpoint", "id": super::super::new_id("ftckpt"),
            "created_at": unix_now(), "fine_tuning_job_id": r.id,
            "fine_tuned_model_checkpoint": null, "step_number": step,
            "metrics": {"step": step, "train_loss": self.last_loss},
        });
        let mut record = |job: &mut Value| {
            let list = &mut job["svfit"]["checkpoints"];
            if let Some(list) = list.as_array_mut() {
                list.retain(|c| c["step_number"].as_u64().is_some_and(|s| s < step));
                list.push(object.clone());
            }
            Ok(())
        };
        let _ = r
            .handle
            .block_on(r.jobs().update(r.tenant, r.id, &mut record));
        let saved = format!("Checkpoint saved at step {step}");
        self.pending.push(event(&saved, "info", None));
        self.flush();
    }
}

impl Observer for JobObserver<'_> {
    fn message(&mut self, text: &str) {
        self.pending.push(event(text, "info", None));
    }

    fn event(&mut self, event: &Event<'_>, _total_steps: u64) {
        match event {
            Event::Step(r) => {
                self.running.step.store(r.step, SeqCst);
                self.running
                    .jobs()
                    .set_progress(self.running.id, Some(r.step));
                self.last_loss = Some(r.loss);
                let text = format!(
                    "Step {}/{}: training loss={:.4}",
                    r.step, self.total, r.loss
                );
                let data = json!({
                    "step": r.step, "total_steps": self.total, "epoch": r.epoch,
                    "train_loss": r.loss, "learning_rate": r.lr, "grad_norm": r.grad_norm,
                    "tokens": r.tokens, "tokens_per_second": r.tokens_per_s,
                });
                self.pending
                    .push(super::super::event(&text, "info", Some(data)));
            }
            Event::Eval(r) => {
                let text = format!("Step {}: validation loss={:.4}", r.step, r.eval_loss);
                let data = json!({
                    "step": r.step, "epoch": r.epoch, "valid_loss": r.eval_loss,
                    "valid_accuracy": r.eval_accuracy, "valid_tokens": r.eval_tokens,
                });
                self.pending
                    .push(super::super::event(&text, "info", Some(data)));
            }
            Event::EpochEnd(state) => return self.checkpoint(state.step),
        }
        if self.flushed.elapsed() >= FLUSH {
            self.flush();
        }
    }
}
