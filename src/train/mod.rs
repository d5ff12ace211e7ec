//! SVFit training (METHOD.md §5): the singular values of every target
//! matrix are learned by backprop through the frozen base model.
//!
//! - [`data`]: JSONL records → token sequences with a loss mask, packing;
//! - [`optim`]: AdamW, clipping, warm-up + cosine schedule;
//! - [`Trainer`]: the loop over epochs and batches, evaluation, its state
//!   (what a checkpoint restores);
//! - [`session`]: a whole `svfit train` run: files in, adapter, checkpoints,
//!   `metrics.jsonl` and the loss plot out;
//! - [`plot`]: the loss-curve SVG.
//!
//! The optimizer works on the relative shift `p = (sigma - S) / S` of each
//! singular value, so one learning rate suits matrices whose spectra differ
//! by orders of magnitude; the model sees `delta = S ⊙ p`.

mod checkpoint;
pub mod data;
pub mod eval;
mod memory;
mod metrics;
pub mod optim;
pub mod plot;
pub mod session;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::model::{Learner, ModelError};
use data::{Dataset, Example};
use optim::{AdamW, Schedule};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("{0}")]
    Invalid(String),
}

/// The default of `--weight-decay`: a pull of every shift toward the base
/// (decoupled, `p *= 1 - lr * weight_decay` a step). Chosen on the dev
/// splits of the four example tasks (docs/PERFORMANCE.md): shifts that fit
/// the training data in a few dozen steps generalise better held near S.
pub const DEFAULT_WEIGHT_DECAY: f32 = 1.0;

/// Hyper-parameters of a run (stored in checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    /// Peak learning rate (relative change of a singular value per step).
    pub lr: f32,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// The cosine decay ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f32,
    /// AdamW's decoupled weight decay (pulls sigma toward S).
    pub weight_decay: f32,
    /// Maximum L2 norm of the gradient (0: no clipping).
    pub clip: f32,
    /// Examples per optimizer step (gradients accumulated over their rows).
    pub batch: usize,
    pub epochs: usize,
    pub max_steps: Option<u64>,
    /// Tokens per packed row.
    pub ctx: usize,
    pub seed: u64,
}

impl Hyper {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |what: String| Err(TrainError::Invalid(what));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be > 0, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "--min-lr-ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return bad(format!("--clip must be >= 0, got {}", self.clip));
        }
        if self.batch == 0 || self.epochs == 0 || self.max_steps == Some(0) {
            return bad("--batch, --epochs and --max-steps must be at least 1".into());
        }
        if self.ctx < 8 {
            return bad(format!("--ctx must be at least 8 tokens, got {}", self.ctx));
        }
        Ok(())
    }

    fn steps_per_epoch(&self, n_examples: usize) -> u64 {
        n_examples.div_ceil(self.batch) as u64
    }

    /// Optimizer steps of the whole run over `n_examples` examples.
    pub fn total_steps(&self, n_examples: usize) -> u64 {
        let all = self.steps_per_epoch(n_examples) * self.epochs as u64;
        self.max_steps.map_or(all, |m| m.min(all))
    }

    fn schedule(&self, n_examples: usize) -> Schedule {
        Schedule {
            peak: self.lr,
            warmup: self.warmup,
            total: self.total_steps(n_examples),
            min_ratio: self.min_lr_ratio,
        }
    }
}

/// Where a run stands: everything a checkpoint restores.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// Relative shifts `p` of every trained singular value.
    pub shift: Vec<f32>,
    pub adam: AdamW,
    /// Optimizer steps done.
    pub step: u64,
    /// The current epoch (0-based) and its next batch.
    pub epoch: usize,
    pub next_batch: usize,
}

/// One optimizer step, as logged.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: usize,
    /// Mean cross-entropy of the batch's loss tokens.
    pub loss: f64,
    pub lr: f32,
    /// Gradient norm before clipping (of the relative shifts).
    pub grad_norm: f32,
    /// Tokens in the batch's rows.
    pub tokens: usize,
    pub tokens_per_s: f64,
}

/// An evaluation on held-out data.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: usize,
    pub eval_loss: f64,
    /// With class-label data: the share of examples whose every answer
    /// token is the model's most likely one (what greedy decoding answers).
    pub eval_accuracy: Option<f64>,
    pub eval_tokens: usize,
}

/// What the loop reports.
pub enum Event<'a> {
    Step(&'a StepRecord),
    Eval(&'a EvalRecord),
    /// An epoch ended (after its evaluation); the state is a clean point to
    /// checkpoint.
    EpochEnd(&'a State),
}

/// When a run stops, and how it shares the machine: `stop` is asked
/// before each step; `begin` and `end` bracket the gradient of each packed
/// row and each evaluation (a fine-tuning job in the server takes a turn
/// on the compute there).
pub trait Pace {
    fn stop(&self, step: u64) -> bool;
    fn begin(&self) {}
    fn end(&self) {}
}

/// A plain stop condition (`svfit train`) takes the machine as it is.
impl<F: Fn(u64) -> bool> Pace for F {
    fn stop(&self, step: u64) -> bool {
        self(step)
    }
}

/// Holds a [`Pace`]'s turn until dropped.
pub struct Turn<'a>(&'a dyn Pace);

impl<'a> Turn<'a> {
    pub fn take(pace: &'a dyn Pace) -> Self {
        pace.begin();
        Turn(pace)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// `stop` asked to end early; the state is consistent.
    Stopped,
}

/// Loss and accuracy over a data set.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub tokens: usize,
}

/// The training loop over a [`Learner`].
pub struct Trainer {
    learner: Learner,
    hyper: Hyper,
    /// `S` of every trained value, in parameter order.
    scale: Vec<f32>,
    state: State,
}

impl Trainer {
    /// A fresh run from sigma = S. `singular` holds S in the learner's
    /// parameter order.
    pub fn new(learner: Learner, singular: Vec<f32>, hyper: Hyper) -> Result<Self, TrainError> {
        let n = learner.n_params();
        Self::starting_at(learner, singular, hyper, vec![0.0; n])
    }

    /// A fresh run from sigma = S (1 + `shift`): an adapter trained before,
    /// trained on (the optimizer's moments start at zero).
    pub fn starting_at(
        learner: Learner,
        singular: Vec<f32>,
        hyper: Hyper,
        shift: Vec<f32>,
    ) -> Result<Self, TrainError> {
        let state = State {
            adam: AdamW::new(shift.len(), hyper.weight_decay),
            shift,
            step: 0,
            epoch: 0,
            next_batch: 0,
        };
        Self::resume(learner, singular, hyper, state)
    }

    /// Continues a run from `state`.
    pub fn resume(
        mut learner: Learner,
        singular: Vec<f32>,
        hyper: Hyper,
        state: State,
    ) -> Result<Self, TrainError> {
        hyper.validate()?;
        let n = learner.n_params();
        if singular.len() != n || state.shift.len() != n || state.adam.m.len() != n {
            return Err(TrainError::Invalid(format!(
                "the state holds {} values, the factors {n}",
                state.shift.len()
            )));
        }
        let deltas: Vec<f32> = state
            .shift
            .iter()
            .zip(&singular)
            .map(|(p, s)| p * s)
            .collect();
        learner.set_deltas(&deltas)?;
        Ok(Trainer {
            learner,
            hyper,
            scale: singular,
            state,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// `sigma - S` of every trained value, in parameter order.
    pub fn deltas(&self) -> Vec<f32> {
        self.state
            .shift
            .iter()
            .zip(&self.scale)
            .map(|(p, s)| p * s)
            .collect()
    }

    /// Mean loss over `data` (and accuracy, for class-label data).
    pub fn evaluate(&mut self, data: &Dataset) -> Result<Evaluation, TrainError> {
        self.evaluate_paced(data, &|_| false)
    }

    /// [`Trainer::evaluate`], each packed row in a turn of `pace`.
    pub fn evaluate_paced(
        &mut self,
        data: &Dataset,
        pace: &dyn Pace,
    ) -> Result<Evaluation, TrainError> {
        let classes = data.labels().is_some();
        let (mut loss, mut n_targets, mut tokens, mut correct) = (0f64, 0usize, 0usize, 0usize);
        for packed in data::pack(&data.examples, self.hyper.ctx) {
            let result = {
                let _turn = Turn::take(pace);
                self.learner.evaluate(&packed.row)?
            };
            loss += result.loss as f64 * result.n_targets as f64;
            n_targets += result.n_targets;
            tokens += packed.row.len();
            let mut hits = result.hits.iter();
            for &e in &packed.examples {
                let n = data.examples[e].n_targets();
                correct += hits.by_ref().take(n).all(|&h| h) as usize;
            }
        }
        Ok(Evaluation {
            loss: loss / n_targets.max(1) as f64,
            accuracy: classes.then(|| correct as f64 / data.examples.len().max(1) as f64),
            tokens,
        })
    }

    fn eval_record(&mut self, eval: &Dataset, pace: &dyn Pace) -> Result<EvalRecord, TrainError> {
        let e = self.evaluate_paced(eval, pace)?;
        Ok(EvalRecord {
            step: self.state.step,
            epoch: self.state.epoch + 1,
            eval_loss: e.loss,
            eval_accuracy: e.accuracy,
            eval_tokens: e.tokens,
        })
    }

    /// Trains on `train` until the planned steps are done or `pace` says
    /// to stop (asked before each step), evaluating on `eval` after each
    /// epoch and at the end; each packed row takes a turn of `pace`.
    pub fn run(
        &mut self,
        train: &Dataset,
        eval: Option<&Dataset>,
        pace: &dyn Pace,
        on_event: &mut dyn FnMut(Event<'_>) -> Result<(), TrainError>,
    ) -> Result<Outcome, TrainError> {
        let n = train.examples.len();
        let total = self.hyper.total_steps(n);
        let per_epoch = self.hyper.steps_per_epoch(n) as usize;
        let schedule = self.hyper.schedule(n);
        let mut order: Option<(usize, Vec<usize>)> = None;
        let mut grad = vec![0f32; self.learner.n_params()];
        let mut sum = vec![0f32; grad.len()];
        while self.state.step < total {
            if pace.stop(self.state.step) {
                return Ok(Outcome::Stopped);
            }
            let epoch = self.state.epoch;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, epoch_order(n, self.hyper.seed, epoch)));
            }
            let (_, order) = order.as_ref().expect("set above");
            let b = self.state.next_batch;
            let batch = &order[b * self.hyper.batch..((b + 1) * self.hyper.batch).min(n)];
            let started = Instant::now();
            let examples = batch.iter().map(|&i| &train.examples[i]);
            let (loss, tokens) = self.accumulate(examples, &mut grad, &mut sum, pace)?;
            // To the relative shifts: d loss / d p = S * d loss / d delta.
            sum.iter_mut().zip(&self.scale).for_each(|(g, s)| *g *= s);
            let grad_norm = optim::clip(&mut sum, self.hyper.clip);
            let lr = schedule.lr(self.state.step);
            self.state.adam.step(&mut self.state.shift, &sum, lr);
            let deltas = self.deltas();
            self.learner.set_deltas(&deltas)?;
            self.state.step += 1;
            self.state.next_batch += 1;
            let record = StepRecord {
                step: self.state.step,
                epoch: epoch + 1,
                loss,
                lr,
                grad_norm,
                tokens,
                tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            };
            on_event(Event::Step(&record))?;
            if self.state.next_batch >= per_epoch {
                if let Some(eval) = eval {
                    let record = self.eval_record(eval, pace)?;
                    on_event(Event::Eval(&record))?;
                }
                self.state.epoch += 1;
                self.state.next_batch = 0;
                on_event(Event::EpochEnd(&self.state))?;
            }
        }
        // A run cut short by --max-steps ends mid-epoch: evaluate there too.
        if self.state.next_batch != 0 {
            if let Some(eval) = eval {
                let record = self.eval_record(eval, pace)?;
                on_event(Event::Eval(&record))?;
            }
        }
        Ok(Outcome::Finished)
    }

    /// The batch's gradient (w.r.t. the deltas) into `sum`, weighted by loss
    /// tokens; returns the batch's mean loss and token count. Each packed
    /// row takes its own turn of `pace` (the unit a request may wait for).
    fn accumulate<'e>(
        &mut self,
        examples: impl Iterator<Item = &'e Example>,
        grad: &mut [f32],
        sum: &mut [f32],
        pace: &dyn Pace,
    ) -> Result<(f64, usize), TrainError> {
        sum.fill(0.0);
        let (mut loss, mut n_targets, mut tokens) = (0f64, 0usize, 0usize);
        for packed in data::pack(examples, self.hyper.ctx) {
            let row_loss = {
                let _turn = Turn::take(pace);
                self.learner.gradient(&packed.row, grad)?
            };
            let w = packed.row.targets.len() as f32;
            sum.iter_mut()
                .zip(grad.iter())
                .for_each(|(s, g)| *s += w * g);
            loss += row_loss as f64 * w as f64;
            n_targets += packed.row.targets.len();
            tokens += packed.row.len();
        }
        let inv = 1.0 / n_targets.max(1) as f32;
        sum.iter_mut().for_each(|s| *s *= inv);
        Ok((loss / n_targets.max(1) as f64, tokens))
    }
}

/// The order of the examples in epoch `epoch` (a seeded shuffle).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    data::shuffle(
        &mut order,
        seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order
}
