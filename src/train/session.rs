//! One `svfit train` run: the model, factors and data in; the adapter,
//! checkpoints, `metrics.jsonl` and the loss plot out. Files written beside
//! the adapter `A.safetensors`:
//!
//! - `A.ckpt` (safetensors inside; not named `.safetensors`, so training
//!   into a served adapters directory adds no bogus adapter id): the state
//!   after the last whole epoch (or the stop), which `--resume` continues
//!   exactly;
//! - `A.metrics.jsonl`: one JSON object per step and per evaluation;
//! - `A.loss.svg`: the loss curve.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint::CHECKPOINT_FORMAT;
pub use super::checkpoint::{Checkpoint, CheckpointInfo};
use super::data::Dataset;
use super::metrics::{plot_metrics, Metrics};
use super::{Event, Hyper, Outcome, Pace, State, TrainError, Trainer};
use crate::adapter::Adapter;
use crate::factors::{self, FactorsKey, RankPolicy, Targets};
use crate::model::{full_rank_pays, Learner, LoadOptions, Model, Tokenizer};

pub use super::memory::Frozen;
use super::memory::{choose_frozen, full_rank_factors};

/// Everything a run needs.
pub struct Options {
    pub model: PathBuf,
    pub load: LoadOptions,
    /// Whether the CPU's training products run through faer's GEMM
    /// (`Learner::set_gemm`; the CLI's `--train-gemm`).
    pub gemm: bool,
    /// Whether targets whose kept rank is near full train over their
    /// full-rank factors (`Learner::with_full_rank`; the CLI's
    /// `--train-full-rank`).
    pub full_rank: bool,
    pub frozen: Frozen,
    pub targets: Targets,
    pub rank: RankPolicy,
    pub data: PathBuf,
    pub eval: Option<PathBuf>,
    /// Share of the data held out for evaluation when `eval` is not given.
    pub eval_split: f64,
    pub strict: bool,
    pub out: PathBuf,
    pub hyper: Hyper,
    /// `warmup` of `hyper` when the user gave none: a tenth of the steps.
    pub default_warmup: bool,
    /// Stop (with a checkpoint) after this many steps in all.
    pub stop_after: Option<u64>,
    pub home: PathBuf,
    /// A fresh run starts from this adapter's singular values (an SVFit
    /// adapter of the same factors) instead of the base's.
    pub init: Option<Adapter>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Data(#[from] super::data::DataError),
    #[error(transparent)]
    Factors(#[from] factors::FactorError),
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    #[error(transparent)]
    Tokenizer(#[from] crate::model::tokenizer::TokenizerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// The frozen weights cannot be held as asked.
    #[error("{0}")]
    Frozen(String),
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SessionError + '_ {
    move |source| SessionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a run reports as it goes.
pub trait Observer {
    /// A line of setup information.
    fn message(&mut self, text: &str);
    /// A step or evaluation (for progress display).
    fn event(&mut self, event: &Event<'_>, total_steps: u64);
}

/// The result of a run.
#[derive(Debug)]
pub struct Summary {
    pub outcome: Outcome,
    pub steps: u64,
    pub adapter: Option<PathBuf>,
    pub checkpoint: PathBuf,
    pub metrics: PathBuf,
    pub plot: PathBuf,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub seconds: f64,
}

/// `A.safetensors` → `A.<suffix>` in the same directory.
pub fn sidecar(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    out.with_file_name(format!("{stem}.{suffix}"))
}

/// Runs (or resumes) a training session.
pub fn run(
    options: &Options,
    resume: Option<Checkpoint>,
    pace: &dyn Pace,
    observer: &mut dyn Observer,
) -> Result<Summary, SessionError> {
    let started = Instant::now();
    let resumed_at = resume.as_ref().map(|c| c.state.step);
    let (session, mut trainer, singular) = set_up(options, resume, observer)?;
    let mut metrics = Metrics::open(&session.files.metrics, resumed_at)?;
    if resumed_at.is_none() {
        session.evaluate_base(&mut trainer, &mut metrics, pace, observer)?;
    }
    let (outcome, latest) = session.train(&mut trainer, &mut metrics, pace, observer)?;
    let state = trainer.state().clone();
    session
        .checkpoint(&state)
        .write(&session.files.checkpoint)?;
    plot_metrics(&session.files.metrics, &session.files.plot)?;
    let adapter = match outcome {
        Outcome::Finished => Some(session.write_adapter(&singular, &trainer, &state, &latest)?),
        Outcome::Stopped => None,
    };
    Ok(Summary {
        outcome,
        steps: state.step,
        adapter,
        checkpoint: session.files.checkpoint,
        metrics: session.files.metrics,
        plot: session.files.plot,
        final_loss: latest.loss,
        eval_loss: latest.eval.map(|e| e.0),
        eval_accuracy: latest.eval.and_then(|e| e.1),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Everything before the first step: the factors, the data and the
/// hyper-parameters (a checkpoint's, checked against both), the model in
/// a trainer. Returns the session, the trainer and the singular values
/// it shifts.
fn set_up<'o>(
    options: &'o Options,
    resume: Option<Checkpoint>,
    observer: &mut dyn Observer,
) -> Result<(Session<'o>, Trainer, factors::SingularValues), SessionError> {
    let key = factors_key(options)?;
    if let Some(c) = &resume {
        check_factors(c, &key, &options.out)?;
    }
    let tokenizer = Tokenizer::load(&options.model)?;
    // A resumed run keeps its own hyper-parameters.
    let mut hyper = resume
        .as_ref()
        .map_or_else(|| options.hyper.clone(), |c| c.info.hyper.clone());
    let (train, eval) = read_data(options, &tokenizer, &hyper)?;
    describe_data(&train, eval.as_ref(), hyper.ctx, observer);
    if let Some(c) = &resume {
        check_data(c, &train, &options.data)?;
    }
    if resume.is_none() && options.default_warmup {
        hyper.warmup = (hyper.total_steps(train.examples.len()) / 10).max(1);
    }
    hyper.validate()?;

    let (trainer, singular) = start_trainer(options, &key, &hyper, resume, observer)?;
    let total = hyper.total_steps(train.examples.len());
    observer.message(&schedule_text(&hyper, train.examples.len(), total));
    let session = Session {
        files: Files::beside(&options.out),
        options,
        key,
        hyper,
        train,
        eval,
        total,
    };
    Ok((session, trainer, singular))
}

/// The factors this run trains. A file the engine does not fully
/// understand is refused before its factors are computed.
fn factors_key(options: &Options) -> Result<FactorsKey, SessionError> {
    let gguf = crate::ggml::gguf::GgufFile::open(&options.model)
        .map_err(crate::model::ModelError::from)?;
    crate::model::understand(&gguf)?;
    drop(gguf);
    let base_sha256 = crate::home::sha256_file(&options.model).map_err(io(&options.model))?;
    Ok(FactorsKey {
        base_sha256,
        targets: options.targets.clone(),
        policy: options.rank,
        dtype: "f16".parse()?,
    })
}

/// A checkpoint continues only the factors it was made for.
fn check_factors(
    checkpoint: &Checkpoint,
    key: &FactorsKey,
    out: &Path,
) -> Result<(), SessionError> {
    let info = &checkpoint.info;
    if info.base_sha256 != key.base_sha256 || info.factors_id != key.id() {
        return Err(SessionError::Checkpoint {
            path: out.to_path_buf(),
            reason: format!(
                "the checkpoint is for factors '{}', this run uses '{}'",
                info.factors_id,
                key.id()
            ),
        });
    }
    Ok(())
}

/// A checkpoint continues only on the data it was made with.
fn check_data(checkpoint: &Checkpoint, train: &Dataset, data: &Path) -> Result<(), SessionError> {
    if checkpoint.info.data_sha256 != train.sha256 {
        return Err(SessionError::Checkpoint {
            path: data.to_path_buf(),
            reason: "the data changed since the checkpoint (sha256 differs)".into(),
        });
    }
    Ok(())
}

/// The training data, and the evaluation data: `--eval`'s file, or a
/// share of the training data held out.
fn read_data(
    options: &Options,
    tokenizer: &Tokenizer,
    hyper: &Hyper,
) -> Result<(Dataset, Option<Dataset>), SessionError> {
    let mut train = Dataset::read(&options.data, tokenizer, hyper.ctx, options.strict)?;
    let eval = match &options.eval {
        Some(path) => Some(Dataset::read(path, tokenizer, hyper.ctx, options.strict)?),
        None if options.eval_split > 0.0 && train.examples.len() >= 2 => {
            Some(train.split_off(options.eval_split, hyper.seed))
        }
        None => None,
    };
    Ok((train, eval))
}

/// One line per data set (examples, tokens, lines skipped, prompts cut),
/// and whether accuracy is reported.
fn describe_data(train: &Dataset, eval: Option<&Dataset>, ctx: usize, observer: &mut dyn Observer) {
    for d in std::iter::once(train).chain(eval) {
        let skipped = match d.skipped.first() {
            None => String::new(),
            Some((line, why)) => format!(
                ", {} lines skipped (first: line {line}: {why})",
                d.skipped.len()
            ),
        };
        let truncated = if d.truncated > 0 {
            format!(", {} prompts cut to --ctx {ctx}", d.truncated)
        } else {
            String::new()
        };
        observer.message(&format!(
            "data {}: {} examples, {} tokens{skipped}{truncated}",
            d.path.display(),
            d.examples.len(),
            d.n_tokens(),
        ));
    }
    if let Some(labels) = eval.and_then(Dataset::labels) {
        let list: Vec<&str> = labels.iter().map(String::as_str).collect();
        observer.message(&format!(
            "eval completions are {} class labels ({}): accuracy is reported",
            list.len(),
            list.join(", ")
        ));
    }
}

/// The model with the factors to train, in a trainer (fresh, or at the
/// checkpoint's state), and the singular values it shifts.
fn start_trainer(
    options: &Options,
    key: &FactorsKey,
    hyper: &Hyper,
    resume: Option<Checkpoint>,
    observer: &mut dyn Observer,
) -> Result<(Trainer, factors::SingularValues), SessionError> {
    let (f32_weights, why) = choose_frozen(options.frozen, &options.model, &options.load.device)?;
    let factor_path = factors::ensure(&options.model, key, &options.home)?;
    let factors = factors::read_factors(&factor_path, key)?;
    let singular = factors::read_singular_values(&factor_path, key)?;
    let model = Model::load_for_training(&options.model, &options.load, f32_weights)?;
    observer.message(&format!(
        "model {} on {}, frozen weights {why}; training {} singular values of {} matrices ({}, {})",
        options.model.display(),
        model.device_name(),
        singular.iter().map(|(_, s)| s.len()).sum::<usize>(),
        singular.len(),
        key.targets,
        key.policy,
    ));
    let started = Instant::now();
    let (mut learner, wanted) = if options.full_rank {
        let full = full_rank_factors(&options.model, &model, &factors, observer)?;
        let wanted = (factors.iter().zip(&full))
            .filter(|((_, f), g)| g.is_some() || f.rank() == f.m.min(f.n))
            .filter(|((t, f), _)| full_rank_pays(model.config(), t, f.m, f.n, f.rank()))
            .count();
        (Learner::with_full_rank(model, &factors, &full)?, wanted)
    } else {
        (Learner::new(model, &factors)?, 0)
    };
    learner.set_gemm(options.gemm);
    drop(factors);
    if wanted > 0 {
        observer.message(&format!(
            "{} of {} matrices train over their full-rank factors in place of the \
             weight (fewer multiply-adds; {:.1} s to factor){}",
            learner.n_full_rank(),
            singular.len(),
            started.elapsed().as_secs_f64(),
            if learner.n_full_rank() < wanted {
                format!(
                    "; {} did not match the factor file and train as before",
                    wanted - learner.n_full_rank()
                )
            } else {
                String::new()
            }
        ));
    }
    let scale: Vec<f32> = singular
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .collect();
    let trainer = match (resume, &options.init) {
        (Some(c), _) => Trainer::resume(learner, scale, hyper.clone(), c.state)?,
        (None, Some(init)) => {
            let shift = initial_shift(init, key, &singular)?;
            Trainer::starting_at(learner, scale, hyper.clone(), shift)?
        }
        (None, None) => Trainer::new(learner, scale, hyper.clone())?,
    };
    Ok((trainer, singular))
}

/// The relative shifts `(sigma - S) / S` of the adapter a run starts from,
/// in the trainer's order (a matrix the adapter lacks starts at S).
fn initial_shift(
    init: &Adapter,
    key: &FactorsKey,
    singular: &factors::SingularValues,
) -> Result<Vec<f32>, SessionError> {
    let invalid = |why: String| SessionError::Train(TrainError::Invalid(why));
    if init.is_lora() {
        return Err(invalid(
            "a LoRA cannot be trained on as an SVFit adapter".into(),
        ));
    }
    init.check_base(Path::new("the adapter to start from"), key)?;
    let mut shift = Vec::new();
    for ((prefix, delta), (_, s)) in init.deltas(singular).iter().zip(singular.iter()) {
        if !delta.is_empty() && delta.len() != s.len() {
            return Err(invalid(format!(
                "the adapter to start from has {} values for {prefix}, the factors {}",
                delta.len(),
                s.len()
            )));
        }
        shift.extend(s.iter().enumerate().map(|(i, s)| {
            // A zero S (0/0 or d/0) starts at S.
            let p = delta.get(i).copied().unwrap_or(0.0) / s;
            if p.is_finite() {
                p
            } else {
                0.0
            }
        }));
    }
    Ok(shift)
}

/// The plan of a run, in one line.
fn schedule_text(hyper: &Hyper, n_examples: usize, total: u64) -> String {
    format!(
        "{total} steps: {} epochs x {} batches of {} examples, lr {} (warm-up {} steps, cosine to x{}), ctx {}",
        hyper.epochs,
        n_examples.div_ceil(hyper.batch),
        hyper.batch,
        hyper.lr,
        hyper.warmup,
        hyper.min_lr_ratio,
        hyper.ctx
    )
}

/// The files written beside the adapter.
struct Files {
    checkpoint: PathBuf,
    metrics: PathBuf,
    plot: PathBuf,
}

impl Files {
    fn beside(out: &Path) -> Self {
        Files {
            checkpoint: sidecar(out, "ckpt"),
            metrics: sidecar(out, "metrics.jsonl"),
            plot: sidecar(out, "loss.svg"),
        }
    }
}

/// The last losses reported.
#[derive(Default)]
struct Latest {
    loss: Option<f64>,
    /// Loss and accuracy of the last evaluation.
    eval: Option<(f64, Option<f64>)>,
}

/// A run once set up: what its checkpoints and adapter record.
struct Session<'o> {
    options: &'o Options,
    files: Files,
    key: FactorsKey,
    hyper: Hyper,
    train: Dataset,
    eval: Option<Dataset>,
    /// Optimizer steps the run plans in all.
    total: u64,
}

impl Session<'_> {
    /// The checkpoint of `state`.
    fn checkpoint(&self, state: &State) -> Checkpoint {
        let options = self.options;
        // The eval file's hash only when it is a file of its own.
        let eval_sha256 = options
            .eval
            .as_ref()
            .and(self.eval.as_ref())
            .map(|e| e.sha256.clone());
        let info = CheckpointInfo {
            format: CHECKPOINT_FORMAT.into(),
            base_sha256: self.key.base_sha256.clone(),
            factors_id: self.key.id(),
            targets: self.key.targets.to_string(),
            rank_policy: self.key.policy.to_string(),
            data: options.data.clone(),
            data_sha256: self.train.sha256.clone(),
            eval: options.eval.clone(),
            eval_sha256,
            eval_split: options.eval_split,
            strict: options.strict,
            out: options.out.clone(),
            hyper: self.hyper.clone(),
            step: state.step,
            epoch: state.epoch,
            next_batch: state.next_batch,
            adam_t: state.adam.t,
        };
        Checkpoint {
            info,
            state: state.clone(),
        }
    }

    /// The starting point of a fresh run: the base model on the eval data.
    fn evaluate_base(
        &self,
        trainer: &mut Trainer,
        metrics: &mut Metrics,
        pace: &dyn Pace,
        observer: &mut dyn Observer,
    ) -> Result<(), SessionError> {
        let Some(e) = &self.eval else {
            return Ok(());
        };
        let base = trainer.evaluate_paced(e, pace)?;
        let record = super::EvalRecord {
            step: 0,
            epoch: 0,
            eval_loss: base.loss,
            eval_accuracy: base.accuracy,
            eval_tokens: base.tokens,
        };
        observer.event(&Event::Eval(&record), self.total);
        metrics.write(&record)
    }

    /// Trains until the plan is done or `pace` (or `--stop-after`) says
    /// so, recording every step and evaluation and a checkpoint at each
    /// epoch's end (written before the observer hears of the epoch's end).
    /// A write that fails stops the run with its error.
    fn train(
        &self,
        trainer: &mut Trainer,
        metrics: &mut Metrics,
        pace: &dyn Pace,
        observer: &mut dyn Observer,
    ) -> Result<(Outcome, Latest), SessionError> {
        let mut latest = Latest::default();
        let mut write_error: Option<SessionError> = None;
        let pace = StopAfter {
            pace,
            after: self.options.stop_after,
        };
        let outcome = trainer.run(&self.train, self.eval.as_ref(), &pace, &mut |event| {
            if !matches!(event, Event::EpochEnd(_)) {
                observer.event(&event, self.total);
            }
            let result = match &event {
                Event::Step(r) => {
                    latest.loss = Some(r.loss);
                    metrics.write(*r)
                }
                Event::Eval(r) => {
                    latest.eval = Some((r.eval_loss, r.eval_accuracy));
                    metrics.write(*r)
                }
                Event::EpochEnd(state) => {
                    let written = self.checkpoint(state).write(&self.files.checkpoint);
                    if written.is_ok() {
                        observer.event(&event, self.total);
                    }
                    written
                }
            };
            result.map_err(|e| {
                let text = e.to_string();
                write_error = Some(e);
                TrainError::Invalid(text)
            })
        });
        if let Some(e) = write_error {
            return Err(e);
        }
        Ok((outcome?, latest))
    }

    /// Writes the trained adapter (the singular values shifted by the
    /// trained deltas, with how it was trained) to `--out`.
    fn write_adapter(
        &self,
        singular: &factors::SingularValues,
        trainer: &Trainer,
        state: &State,
        latest: &Latest,
    ) -> Result<PathBuf, SessionError> {
        let (options, hyper) = (self.options, &self.hyper);
        let mut adapter = Adapter::identity(&self.key, singular);
        let mut deltas = trainer.deltas().into_iter();
        for (_, sigma) in &mut adapter.sigma {
            for v in sigma.iter_mut() {
                *v += deltas.next().unwrap_or(0.0);
            }
        }
        let mut put = |k: &str, v: String| adapter.info.insert(format!("svfit.train.{k}"), v);
        put("data", options.data.display().to_string());
        put("data_sha256", self.train.sha256.clone());
        put("examples", self.train.examples.len().to_string());
        put("steps", state.step.to_string());
        put("epochs", hyper.epochs.to_string());
        put("hyper", serde_json::to_string(hyper).unwrap_or_default());
        if let Some(l) = latest.loss {
            put("final_loss", format!("{l:.6}"));
        }
        if let Some((l, a)) = latest.eval {
            put("eval_loss", format!("{l:.6}"));
            if let Some(a) = a {
                put("eval_accuracy", format!("{a:.4}"));
            }
        }
        adapter.write(&options.out)?;
        Ok(options.out.clone())
    }
}

/// A run's pace that also stops at `--stop-after`.
struct StopAfter<'a> {
    pace: &'a dyn Pace,
    after: Option<u64>,
}

impl Pace for StopAfter<'_> {
    fn stop(&self, step: u64) -> bool {
        self.pace.stop(step) || self.after.is_some_and(|s| step >= s)
    }
    fn begin(&self) {
        self.pace.begin();
    }
    fn end(&self) {
        self.pace.end();
    }
}
