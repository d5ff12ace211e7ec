//! The serving engine (METHOD.md §3): one thread owns the model and the KV
//! cache and runs continuous batching over every tenant's requests. Each
//! step it drops cancelled or expired sequences, admits waiting requests
//! (round-robin over tenants, so one tenant's flood cannot starve the
//! others), builds one batch of prompt chunks and next tokens of all running
//! sequences — each token tagged with its adapter's slot — decodes it,
//! samples, and streams text back over each request's channel.
//!
//! Adapters live in a fixed pool of device slots (the model's delta tables):
//! a slot is reference-counted by the sequences using it, an adapter already
//! in a slot is reused, and only an unused, unpinned slot is evicted (the
//! least recently used). Adapters are keyed by version, so a replaced
//! adapter's running sequences keep the slot of the version they started
//! with. Reading and validating adapter files happens before a request
//! reaches the engine; loading a slot is a copy of a few kilobytes.
//!
//! This module is the engine's API: the handle ([`Engine`]), what goes in
//! ([`Job`]) and comes back ([`Event`], [`Failure`]), and its counters
//! ([`Stats`]), and the [`gate`] through which fine-tuning jobs take turns
//! on the compute. Inside: `queue` (waiting requests and their limits),
//! `scheduler` (what one step's batch holds), `slots` (the adapter slot
//! pool) and `worker` (the engine thread's loop).

pub mod gate;
mod queue;
mod scheduler;
mod slots;
mod worker;

#[cfg(feature = "fault-injection")]
pub mod fault;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::mpsc::UnboundedSender;

use crate::adapter::AdapterDeltas;
use crate::generate::{FinishReason, GenerateError, Request, Sequence};
use crate::model::{Model, ModelError, Tokenizer};
use crate::prefix_cache::PrefixStats;
pub use crate::sampling::TokenLogprob;
use queue::Waiting;
use worker::Worker;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_sequences: usize,
    /// Tokens per sequence (prompt + generated).
    pub context: usize,
    /// KV cache cells shared by all sequences.
    pub kv_cells: usize,
    /// Adapter slots (besides the base's slot 0).
    pub adapter_slots: usize,
    /// Requests waiting for admission at most.
    pub queue_limit: usize,
    /// Requests of one tenant waiting for admission at most, so that one
    /// tenant cannot fill the queue for everyone.
    pub tenant_queue_limit: usize,
    /// Prompt tokens prefilled per step at most (one chunk always runs).
    pub prefill_budget: usize,
    /// Host memory for the prefix cache's KV blocks (0: no prefix cache).
    pub prefix_cache_bytes: usize,
    /// The LoRA slot tables the server attaches.
    pub lora: LoraConfig,
}

/// LoRA serving: how many LoRAs are resident on the compute device at once,
/// up to which rank, on which target kinds.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    /// LoRA slots (besides slot 0, no LoRA); 0 serves no LoRAs.
    pub slots: usize,
    /// The largest rank served (a mix's ranks add up).
    pub rank: usize,
    /// Target kinds with tables ("attn_q", ...).
    pub kinds: Vec<&'static str>,
    /// Host memory for validated LoRAs (the adapter store's LRU holds
    /// them beside SVFit adapters, each kind in its own budget).
    pub cache_bytes: usize,
}

impl Default for LoraConfig {
    /// 4 slots of rank up to 16 on every linear matrix of the blocks, and
    /// 256 MB of host cache.
    fn default() -> Self {
        LoraConfig {
            slots: 4,
            rank: 16,
            kinds: crate::factors::KINDS.iter().map(|k| k.1).collect(),
            cache_bytes: 256 << 20,
        }
    }
}

/// One request for the engine.
pub struct Job {
    pub request: Request,
    pub tenant: String,
    /// `None` runs the base model.
    pub adapter: Option<Arc<AdapterDeltas>>,
    pub events: UnboundedSender<Event>,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// Report each generated token's log-probability and this many of the
    /// most likely alternatives (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// What the answer must match (compiled before submission).
    pub constraint: Option<crate::constraint::Constraint>,
}

impl Job {
    /// The key its cells are cached under: its adapter's ("" is the base).
    fn adapter_key(&self) -> &str {
        self.adapter.as_ref().map_or("", |a| a.key.as_str())
    }

    /// Whether its client left or its deadline passed.
    fn is_cancelled(&self, now: Instant) -> bool {
        self.events.is_closed() || self.deadline.is_some_and(|d| now >= d)
    }

    /// Tells a cancelled job's client, if it is still listening (then its
    /// deadline is what passed).
    fn tell_cancelled(&self) {
        if !self.events.is_closed() {
            let _ = self.events.send(Event::Failed(Failure::DeadlineExceeded));
        }
    }
}

/// What a request hears back, in order: text deltas, then `Done` or
/// `Failed`.
#[derive(Debug)]
pub enum Event {
    Text {
        text: String,
        tokens: Vec<u32>,
        /// One per token of `tokens` when the job asked for them.
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose cells came from the prefix cache.
        cached_tokens: usize,
        completion_tokens: usize,
        queue: Duration,
        time_to_first_token: Duration,
        total: Duration,
    },
    Failed(Failure),
}

/// Why a request stopped without finishing. Each kind maps to one gRPC
/// code (`server::inference`), never through the text of a message.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The request cannot run as given (checked again at admission).
    #[error(transparent)]
    Invalid(GenerateError),
    /// Writing the adapter into a device slot failed.
    #[error("loading the adapter into a slot failed: {0}")]
    AdapterLoad(ModelError),
    /// Decoding this sequence failed (alone, after its batch failed; or
    /// with its whole batch, after a panic in the decoder).
    #[error("decoding failed: {0}")]
    Decode(String),
    /// A bug while handling this sequence; the engine went on without it.
    #[error("internal error while generating ({0}); the request was stopped")]
    Panicked(String),
    /// Its constraint reached a limit of the matcher mid-answer.
    #[error(transparent)]
    Constraint(crate::constraint::ConstraintError),
}

/// Counters the engine keeps (read by metrics and `ModelInfo`).
#[derive(Default)]
pub struct Stats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub steps: AtomicU64,
    pub step_micros: AtomicU64,
    pub batch_tokens: AtomicU64,
    pub last_batch_sequences: AtomicUsize,
    pub tokens_generated: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_failed: AtomicU64,
    pub slot_hits: AtomicU64,
    pub slot_loads: AtomicU64,
    pub slot_evictions: AtomicU64,
    /// Constrained sequences' masks computed, and the time they took (on
    /// the engine thread, within the steps' time).
    pub masks: AtomicU64,
    pub mask_micros: AtomicU64,
    /// The prefix cache's counters, as of the last change.
    pub prefix: std::sync::Mutex<PrefixStats>,
    pub latency: Latencies,
}

/// Distributions of the engine's latencies, in seconds (Prometheus
/// histograms, exported as such by the server's metrics).
pub struct Latencies {
    /// From a request's arrival to its first generated token.
    pub time_to_first_token: Histogram,
    /// Between two generated tokens of one request.
    pub inter_token: Histogram,
    /// One step of the engine (a batch decoded).
    pub step: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        // 1 ms to about 33 s (TTFT), 1 ms to about 4 s (tokens, steps).
        let buckets = |count| Histogram::new(exponential_buckets(1e-3, 2.0, count));
        Latencies {
            time_to_first_token: buckets(16),
            inter_token: buckets(13),
            step: buckets(13),
        }
    }
}

impl Stats {
    /// The prefix cache's counters.
    pub fn prefix(&self) -> PrefixStats {
        *self.prefix.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("this tenant has {0} requests waiting, its limit; retry later")]
    TenantQueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("the server is shutting down; retry on another replica")]
    Draining,
    #[error(transparent)]
    Invalid(#[from] GenerateError),
}

enum Command {
    Job(Box<Job>),
    Pin {
        owner: String,
        pinned: bool,
    },
    /// The adapter was deleted: its versions' slots are free once unused.
    Forget {
        owner: String,
    },
}

/// A handle to the engine thread; dropping every handle stops it.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    waiting: Arc<Waiting>,
    config: EngineConfig,
    /// Turns false when the engine thread ends (it only ends early by a bug).
    alive: tokio::sync::watch::Receiver<bool>,
    /// Set by [`Engine::drain`]: new requests are refused.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Each step takes a turn here; training jobs take theirs between.
    gate: Arc<gate::Gate>,
}

impl Engine {
    /// Starts the engine thread. The model must have factors attached
    /// with `config.adapter_slots + 1` slots when adapters are to be served.
    pub fn start(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        mut config: EngineConfig,
    ) -> Result<Self, ModelError> {
        config.context = config.context.min(model.config().n_ctx_train);
        let cache = model.new_cache(config.kv_cells)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let waiting = Arc::new(Waiting::default());
        let gate = Arc::new(gate::Gate::default());
        let worker = Worker::new(
            model,
            cache,
            tokenizer,
            rx,
            (stats.clone(), waiting.clone(), gate.clone()),
            config.clone(),
        );
        let (alive_tx, alive) = tokio::sync::watch::channel(true);
        worker::spawn(worker, alive_tx)?;
        Ok(Engine {
            tx,
            stats,
            waiting,
            config,
            alive,
            draining: Arc::default(),
            gate,
        })
    }

    /// Refuses new requests from now on; queued and running ones go on.
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Whether new requests are taken: the engine runs and is not draining.
    pub fn accepting(&self) -> bool {
        *self.alive.borrow() && !self.draining.load(Relaxed)
    }

    /// Requests queued or running.
    pub fn load(&self) -> usize {
        self.stats.queued.load(Relaxed) + self.stats.active.load(Relaxed)
    }

    /// Resolves when the engine thread has ended.
    pub async fn stopped(&self) {
        let mut alive = self.alive.clone();
        let _ = alive.wait_for(|alive| !alive).await;
    }

    /// Queues a job; it is checked first (prompt length, sampling values).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.draining.load(Relaxed) {
            return Err(SubmitError::Draining);
        }
        Sequence::new(&job.request, self.config.context)?;
        let tenant = job.tenant.clone();
        self.waiting
            .enter(&tenant, &self.config, &self.stats.queued)?;
        self.tx.send(Command::Job(Box::new(job))).map_err(|_| {
            self.waiting.withdraw(&tenant, &self.stats.queued);
            SubmitError::Stopped
        })
    }

    /// Keeps (or stops keeping) the current version of the adapter `owner`
    /// (`tenant/id`) in its slot when unused; older versions are never kept.
    pub fn pin(&self, owner: &str, pinned: bool) {
        let _ = self.tx.send(Command::Pin {
            owner: owner.to_string(),
            pinned,
        });
    }

    /// The adapter `owner` was deleted: unpins it, and its slots become
    /// free as soon as no sequence uses them.
    pub fn forget(&self, owner: &str) {
        let _ = self.tx.send(Command::Forget {
            owner: owner.to_string(),
        });
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The gate the engine's steps take turns at.
    pub fn gate(&self) -> Arc<gate::Gate> {
        self.gate.clone()
    }
}
