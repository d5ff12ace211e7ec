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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::mpsc::UnboundedSender;

use crate::adapter::Deltas;
use crate::generate::{FinishReason, GenerateError, Request, Sequence};
use crate::model::{Batch, KvCache, Model, ModelError, SeqId, Slot, Tokenizer};
use crate::prefix_cache::{block_keys, PrefixCache, PrefixStats, BLOCK};
pub use crate::sampling::TokenLogprob;

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
}

/// An adapter (one version of it, or a mix) as the engine sees it.
#[derive(Debug)]
pub struct AdapterDeltas {
    /// Unique per adapter version or mix of versions.
    pub key: String,
    /// The stored adapter (`tenant/id`) this is a version of; `None` for a
    /// mix. Pins belong to the owner, not to one version.
    pub owner: Option<String>,
    /// The owner's version (0 for a mix).
    pub version: u64,
    pub deltas: Deltas,
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
}

/// What a request hears back, in order: text deltas, then `Done` or
/// `Failed`.
#[derive(Debug)]
pub enum Event {
    Text {
        text: String,
        tokens: Vec<u32>,
        /// Time to the first token (on the first event only).
        first: Option<Duration>,
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
        let n_slots = model.branch().map_or(0, |b| b.n_slots().saturating_sub(1));
        let worker = Worker {
            context: config.context,
            model,
            cache,
            tokenizer,
            rx,
            stats: stats.clone(),
            waiting: waiting.clone(),
            pending: HashMap::new(),
            tenants: VecDeque::new(),
            running: Vec::new(),
            slots: SlotPool::new(n_slots.min(config.adapter_slots)),
            next_seq: 0,
            prefix: PrefixCache::new(config.prefix_cache_bytes),
            config: config.clone(),
        };
        let (alive_tx, alive) = tokio::sync::watch::channel(true);
        std::thread::Builder::new()
            .name("svfit-engine".into())
            .spawn(move || {
                // Sequence-level failures are caught inside; this catches
                // the rest so that the server learns the engine is gone.
                let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                if let Err(panic) = ended {
                    tracing::error!(panic = panic_text(&*panic), "the engine thread stopped");
                }
                let _ = alive_tx.send(false);
            })
            .map_err(|e| ModelError::Unsupported(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            tx,
            stats,
            waiting,
            config,
            alive,
            draining: Arc::default(),
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
            .join(&tenant, self.config.tenant_queue_limit)
            .map_err(SubmitError::TenantQueueFull)?;
        let queued = self.stats.queued.fetch_add(1, Relaxed);
        if queued >= self.config.queue_limit {
            self.stats.queued.fetch_sub(1, Relaxed);
            self.waiting.leave(&tenant, 1);
            return Err(SubmitError::QueueFull(queued));
        }
        self.tx.send(Command::Job(Box::new(job))).map_err(|_| {
            self.stats.queued.fetch_sub(1, Relaxed);
            self.waiting.leave(&tenant, 1);
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
}

/// Requests waiting for admission, per tenant (shared by the handles,
/// which add, and the engine thread, which removes).
#[derive(Default)]
struct Waiting(std::sync::Mutex<HashMap<String, usize>>);

impl Waiting {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Held for one map operation; a panic cannot leave it half-done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more waiting request of `tenant`, unless it has `limit`.
    fn join(&self, tenant: &str, limit: usize) -> Result<(), usize> {
        let mut counts = self.counts();
        let n = counts.entry(tenant.to_string()).or_default();
        if *n >= limit {
            return Err(*n);
        }
        *n += 1;
        Ok(())
    }

    fn leave(&self, tenant: &str, gone: usize) {
        let mut counts = self.counts();
        if let Some(n) = counts.get_mut(tenant) {
            *n = n.saturating_sub(gone);
            if *n == 0 {
                counts.remove(tenant);
            }
        }
    }
}

/// One running sequence.
struct Running {
    seq: SeqId,
    job: Box<Job>,
    sequence: Sequence,
    slot: Slot,
    /// The token to decode next (after the prompt).
    next: Option<u32>,
    started: Instant,
    first_token: Option<Duration>,
    /// When its last token was generated.
    last_token: Option<Instant>,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    /// Blocks of this sequence known to the prefix cache.
    remembered: usize,
}

impl Job {
    /// The key its cells are cached under: its adapter's ("" is the base).
    fn adapter_key(&self) -> &str {
        self.adapter.as_ref().map_or("", |a| a.key.as_str())
    }
}

struct Worker {
    model: Model,
    cache: KvCache,
    tokenizer: Arc<Tokenizer>,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
    waiting: Arc<Waiting>,
    /// Waiting jobs per tenant, and the tenants in round-robin order.
    pending: HashMap<String, VecDeque<Box<Job>>>,
    tenants: VecDeque<String>,
    running: Vec<Running>,
    slots: SlotPool,
    next_seq: SeqId,
    context: usize,
    config: EngineConfig,
    prefix: PrefixCache,
}

impl Worker {
    fn run(mut self) {
        loop {
            let idle = self.running.is_empty() && self.tenants.is_empty();
            if idle {
                match self.rx.recv() {
                    Ok(command) => self.command(command),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(command) => self.command(command),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) if idle => return,
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            } else if !self.tenants.is_empty() {
                // Nothing could be admitted (no slot or cells free while
                // nothing runs would be a sizing bug): avoid spinning.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Job(job) => {
                let tenant = job.tenant.clone();
                let queue = self.pending.entry(tenant.clone()).or_default();
                if queue.is_empty() {
                    self.tenants.push_back(tenant);
                }
                queue.push_back(job);
            }
            Command::Pin { owner, pinned } => self.slots.pin(&owner, pinned),
            Command::Forget { owner } => self.slots.forget(&owner),
        }
    }

    fn is_cancelled(job: &Job, now: Instant) -> bool {
        job.events.is_closed() || job.deadline.is_some_and(|d| now >= d)
    }

    /// Frees the sequences and waiting jobs whose client left or whose
    /// deadline passed.
    fn drop_cancelled(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            if Self::is_cancelled(&self.running[i].job, now) {
                let r = self.running.swap_remove(i);
                if !r.job.events.is_closed() {
                    let _ = r.job.events.send(Event::Failed(Failure::DeadlineExceeded));
                }
                self.release(&r);
                self.stats.requests_cancelled.fetch_add(1, Relaxed);
            } else {
                i += 1;
            }
        }
        for (tenant, queue) in self.pending.iter_mut() {
            let before = queue.len();
            queue.retain(|job| {
                let cancelled = Self::is_cancelled(job, now);
                if cancelled && !job.events.is_closed() {
                    let _ = job.events.send(Event::Failed(Failure::DeadlineExceeded));
                }
                !cancelled
            });
            let gone = before - queue.len();
            if gone > 0 {
                self.stats.queued.fetch_sub(gone, Relaxed);
                self.waiting.leave(tenant, gone);
                self.stats
                    .requests_cancelled
                    .fetch_add(gone as u64, Relaxed);
            }
        }
        self.tenants.retain(|t| !self.pending[t].is_empty());
    }

    fn release(&mut self, r: &Running) {
        self.cache.remove_seq(r.seq);
        self.slots.release(r.slot);
        self.stats.active.store(self.running.len(), Relaxed);
    }

    /// Admits waiting jobs, one per tenant in turn, while there is room.
    fn admit(&mut self) {
        let mut blocked = 0;
        while self.running.len() < self.config.max_sequences && blocked < self.tenants.len() {
            let Some(tenant) = self.tenants.pop_front() else {
                break;
            };
            let queue = self
                .pending
                .get_mut(&tenant)
                .expect("listed tenants have jobs");
            let job = queue.pop_front().expect("listed tenants have jobs");
            let events = job.events.clone();
            let started =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.start(job)))
                    .unwrap_or_else(|panic| {
                        let panic = panic_text(&*panic).to_string();
                        self.fail(&events, Failure::Panicked(panic));
                        Ok(())
                    });
            match started {
                Ok(()) => {
                    blocked = 0;
                    self.stats.queued.fetch_sub(1, Relaxed);
                    self.waiting.leave(&tenant, 1);
                    if !self.pending[&tenant].is_empty() {
                        self.tenants.push_back(tenant);
                    }
                }
                Err(job) => {
                    // No slot or cells now: it keeps its place.
                    self.pending
                        .get_mut(&tenant)
                        .expect("listed")
                        .push_front(job);
                    self.tenants.push_back(tenant);
                    blocked += 1;
                }
            }
        }
        self.stats.active.store(self.running.len(), Relaxed);
    }

    /// Starts a job when its adapter has a slot and its cells are free;
    /// gives it back otherwise. A job that can never run is failed.
    fn start(&mut self, job: Box<Job>) -> Result<(), Box<Job>> {
        let sequence = match Sequence::new(&job.request, self.context) {
            Ok(s) => s,
            Err(e) => {
                self.fail(&job.events, Failure::Invalid(e));
                return Ok(());
            }
        };
        let slot = match &job.adapter {
            None => 0,
            Some(adapter) => match self.slots.acquire(adapter) {
                Acquired::Full => return Err(job),
                Acquired::Hit(slot) => {
                    self.stats.slot_hits.fetch_add(1, Relaxed);
                    slot
                }
                Acquired::Load { slot, evicted } => {
                    if evicted {
                        self.stats.slot_evictions.fetch_add(1, Relaxed);
                    }
                    if let Err(e) = self.model.set_adapter(slot, &adapter.deltas) {
                        self.slots.unload(slot);
                        self.fail(&job.events, Failure::AdapterLoad(e));
                        return Ok(());
                    }
                    self.stats.slot_loads.fetch_add(1, Relaxed);
                    slot
                }
            },
        };
        let seq = self.next_seq;
        if self.cache.reserve(seq, sequence.reservation()).is_err() {
            self.slots.release(slot);
            return Err(job);
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut sequence = sequence;
        let cached = self.reuse_prefix(seq, &job, &mut sequence);
        self.running.push(Running {
            seq,
            job,
            sequence,
            slot,
            next: None,
            started: Instant::now(),
            first_token: None,
            last_token: None,
            cached,
            remembered: cached / BLOCK,
        });
        Ok(())
    }

    /// Copies the longest cached prefix of `job`'s prompt into `seq`'s
    /// cells (at least one prompt token is left to prefill, for the
    /// logits); returns the tokens it covers.
    fn reuse_prefix(&mut self, seq: SeqId, job: &Job, sequence: &mut Sequence) -> usize {
        if !self.prefix.enabled() {
            return 0;
        }
        let prompt = &job.request.prompt;
        let keys = block_keys(job.adapter_key(), &prompt[..prompt.len().saturating_sub(1)]);
        let blocks = self.prefix.lookup(&keys);
        let mut reused = blocks.len() * BLOCK;
        if let Err(e) = self.cache.import(seq, &blocks, BLOCK) {
            // The range is as it was: prefill all of it.
            tracing::warn!(error = %e, "copying a cached prefix failed; prefilling instead");
            reused = 0;
        }
        sequence.skip_prefill(reused);
        self.publish_prefix();
        reused
    }

    /// Adds the whole blocks of `r`'s cells (prompt, and generated tokens
    /// at the end) to the prefix cache.
    fn remember(&mut self, i: usize) {
        if !self.prefix.enabled() {
            return;
        }
        let r = &self.running[i];
        let n = self.cache.seq_len(r.seq).min(r.sequence.history().len());
        let keys = block_keys(r.job.adapter_key(), &r.sequence.history()[..n]);
        if keys.len() <= r.remembered {
            return;
        }
        // The new blocks in one read of the cells, into recycled buffers.
        let from = r.remembered;
        let size = self.cache.bytes_per_cells(BLOCK);
        let mut blocks: Vec<Vec<u8>> = (from..keys.len())
            .map(|_| self.prefix.buffer(size))
            .collect();
        let mut views: Vec<&mut [u8]> = blocks.iter_mut().map(Vec::as_mut_slice).collect();
        match self
            .cache
            .export_blocks(r.seq, from * BLOCK, BLOCK, &mut views)
        {
            Ok(()) => self.prefix.insert(&keys, from, blocks),
            Err(e) => tracing::warn!(error = %e, "caching a prefix failed"),
        }
        self.running[i].remembered = keys.len();
        self.publish_prefix();
    }

    fn publish_prefix(&self) {
        *self.stats.prefix.lock().unwrap_or_else(|e| e.into_inner()) = self.prefix.stats();
    }

    /// Tells a request it failed, over its `events`.
    fn fail(&self, events: &UnboundedSender<Event>, failure: Failure) {
        let _ = events.send(Event::Failed(failure));
        self.stats.requests_failed.fetch_add(1, Relaxed);
    }

    /// One decode step over every running sequence.
    fn step(&mut self) {
        let start = Instant::now();
        let mut batch = Batch::new();
        // Rows of the batch's outputs, in order: which running sequence.
        let mut owners = Vec::new();
        let mut budget = self.config.prefill_budget;
        for (i, r) in self.running.iter_mut().enumerate() {
            if let Some(token) = r.next {
                #[cfg(feature = "fault-injection")]
                let token = if fault::asks(&r.job, fault::INVALID_TOKEN) {
                    u32::MAX / 2
                } else {
                    token
                };
                batch.add(token, r.sequence.position(), r.seq, true);
            } else if budget > 0 || owners.is_empty() && batch.is_empty() {
                let Some((pos, chunk)) = r.sequence.next_prefill_chunk() else {
                    continue;
                };
                let chunk = chunk.to_vec();
                budget = budget.saturating_sub(chunk.len());
                self.stats
                    .prompt_tokens
                    .fetch_add(chunk.len() as u64, Relaxed);
                let last = r.sequence.prefill_done();
                for (k, &t) in chunk.iter().enumerate() {
                    batch.add(t, pos + k, r.seq, last && k + 1 == chunk.len());
                }
                if !last {
                    // No logits yet, but the adapter all the same: the
                    // chunk's keys and values depend on it.
                    batch.set_adapter(r.seq, r.slot);
                    continue;
                }
            } else {
                continue;
            }
            batch.set_adapter(r.seq, r.slot);
            owners.push(i);
        }
        if batch.is_empty() {
            return;
        }
        #[cfg(feature = "fault-injection")]
        if self
            .running
            .iter()
            .any(|r| fault::asks(&r.job, fault::KILL_ENGINE))
        {
            panic!("fault injection: the engine thread dies");
        }
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model.decode(&mut self.cache, &batch)
        }));
        // What each running sequence of the batch comes to this step.
        let mut ended: Vec<(usize, Result<FinishReason, Failure>)> = Vec::new();
        let logits = match decoded {
            Ok(Ok(logits)) => StepLogits::Batch(logits),
            Ok(Err(e)) => {
                // The cache is as it was: find the sequences that fail by
                // themselves, and go on with the others.
                tracing::warn!(error = %e, sequences = owners.len(), "a batch failed to decode; decoding its sequences alone");
                let (alone, failed) = self.decode_alone(&batch, &owners);
                for (i, r) in self.running.iter().enumerate() {
                    if let Some(reason) = failed.get(&r.seq) {
                        ended.push((i, Err(Failure::Decode(reason.clone()))));
                    }
                }
                alone
            }
            Err(panic) => {
                // A panic may leave the cache in any state: fail everything
                // in the batch.
                let reason = panic_text(&*panic).to_string();
                let seqs: HashSet<SeqId> = batch.entries().map(|(_, _, s, _)| s).collect();
                let (failed, keep) = std::mem::take(&mut self.running)
                    .into_iter()
                    .partition(|r| seqs.contains(&r.seq));
                self.running = keep;
                for r in failed {
                    self.release(&r);
                    self.fail(&r.job.events, Failure::Decode(reason.clone()));
                }
                return;
            }
        };
        for (row, &i) in owners.iter().enumerate() {
            let Some(logits) = logits.row(row) else {
                continue; // failed alone: in `ended` already
            };
            if self.running[i].next.is_none() {
                // The prompt is all in the cache now.
                self.remember(i);
            }
            let r = &mut self.running[i];
            // A bug while handling one sequence stops that sequence only.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                advance(r, logits, &self.tokenizer, &self.stats)
            }));
            match outcome {
                Ok(Ok(token)) => r.next = Some(token),
                Ok(Err(finish)) => ended.push((i, Ok(finish))),
                Err(panic) => {
                    let panic = panic_text(&*panic).to_string();
                    tracing::error!(panic, tenant = r.job.tenant, "a sequence failed");
                    ended.push((i, Err(Failure::Panicked(panic))));
                }
            }
        }
        // Remove from the back so indices stay valid.
        ended.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, outcome) in ended {
            if outcome.is_ok() {
                self.remember(i);
            }
            let r = self.running.swap_remove(i);
            match outcome {
                Ok(finish) => self.finish(r, finish),
                Err(failure) => {
                    self.release(&r);
                    self.fail(&r.job.events, failure);
                }
            }
        }
        let took = start.elapsed();
        self.stats.steps.fetch_add(1, Relaxed);
        self.stats
            .step_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
        self.stats.latency.step.observe(took.as_secs_f64());
        self.stats
            .batch_tokens
            .fetch_add(batch.len() as u64, Relaxed);
        self.stats.last_batch_sequences.store(owners.len(), Relaxed);
    }

    /// After `batch` failed to decode: each of its sequences alone, so that
    /// only those that fail by themselves fail. Batch invariance makes the
    /// logits of the others exactly those the batch would have given.
    /// Returns the logits per owner row and the reason of each failure.
    fn decode_alone(
        &mut self,
        batch: &Batch,
        owners: &[usize],
    ) -> (StepLogits, HashMap<SeqId, String>) {
        let mut seqs: Vec<SeqId> = Vec::new();
        for (_, _, seq, _) in batch.entries() {
            if !seqs.contains(&seq) {
                seqs.push(seq);
            }
        }
        let mut rows = HashMap::new();
        let mut failed = HashMap::new();
        for seq in seqs {
            let mut one = Batch::new();
            for (token, pos, _, output) in batch.entries().filter(|e| e.2 == seq) {
                one.add(token, pos, seq, output);
            }
            one.set_adapter(seq, batch.adapter(seq));
            let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.model.decode(&mut self.cache, &one)
            }));
            match decoded {
                Ok(Ok(logits)) => {
                    rows.insert(seq, logits);
                }
                Ok(Err(e)) => {
                    failed.insert(seq, e.to_string());
                }
                Err(panic) => {
                    failed.insert(seq, panic_text(&*panic).to_string());
                }
            }
        }
        let per_owner = owners
            .iter()
            .map(|&i| rows.remove(&self.running[i].seq))
            .collect();
        (StepLogits::Alone(per_owner), failed)
    }

    fn finish(&mut self, r: Running, finish: FinishReason) {
        self.release(&r);
        let Running {
            job,
            sequence,
            started,
            first_token,
            cached,
            ..
        } = r;
        let mut tail = String::new();
        let prompt_tokens = sequence.prompt_len();
        let generation = sequence.finish(finish, &mut |t| tail.push_str(t));
        if !tail.is_empty() {
            let _ = job.events.send(Event::Text {
                text: tail,
                tokens: Vec::new(),
                first: None,
                logprobs: Vec::new(),
            });
        }
        let queue = started.duration_since(job.arrived);
        let _ = job.events.send(Event::Done {
            finish: generation.finish,
            prompt_tokens,
            cached_tokens: cached,
            completion_tokens: generation.tokens.len(),
            queue,
            time_to_first_token: first_token.unwrap_or_else(|| job.arrived.elapsed()),
            total: job.arrived.elapsed(),
        });
        self.stats.requests_finished.fetch_add(1, Relaxed);
    }
}

/// The logits of one step, one row per sequence that samples.
enum StepLogits {
    /// From the whole batch.
    Batch(crate::model::Logits),
    /// From each sequence alone (after the batch failed); `None` where the
    /// sequence failed.
    Alone(Vec<Option<crate::model::Logits>>),
}

impl StepLogits {
    fn row(&self, row: usize) -> Option<&[f32]> {
        match self {
            StepLogits::Batch(logits) => Some(logits.row(row)),
            StepLogits::Alone(rows) => rows[row].as_ref().map(|logits| logits.row(0)),
        }
    }
}

/// Samples a sequence's next token from its logits and sends the new
/// text. `Ok(token)`: decode it next; `Err(reason)`: it is finished.
fn advance(
    r: &mut Running,
    logits: &[f32],
    tokenizer: &Tokenizer,
    stats: &Stats,
) -> Result<u32, FinishReason> {
    #[cfg(feature = "fault-injection")]
    if fault::asks(&r.job, fault::PANIC_SEQUENCE) {
        panic!("fault injection: a bug in one sequence");
    }
    let mut text = String::new();
    let before = r.sequence.generated().len();
    let outcome = r
        .sequence
        .advance(logits, tokenizer, &mut |t| text.push_str(t));
    let tokens = r.sequence.generated()[before..].to_vec();
    let first = if r.first_token.is_none() && !tokens.is_empty() {
        let ttft = r.job.arrived.elapsed();
        r.first_token = Some(ttft);
        stats
            .latency
            .time_to_first_token
            .observe(ttft.as_secs_f64());
        Some(ttft)
    } else {
        None
    };
    if !tokens.is_empty() {
        let now = Instant::now();
        if let Some(last) = r.last_token.replace(now) {
            stats
                .latency
                .inter_token
                .observe((now - last).as_secs_f64());
        }
    }
    stats
        .tokens_generated
        .fetch_add(tokens.len() as u64, Relaxed);
    let logprobs = match r.job.logprobs {
        Some(top) => tokens
            .iter()
            .map(|&t| crate::sampling::logprob(logits, t, top))
            .collect(),
        None => Vec::new(),
    };
    if !text.is_empty() || !tokens.is_empty() {
        let _ = r.job.events.send(Event::Text {
            text,
            tokens,
            first,
            logprobs,
        });
    }
    outcome
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

/// Test-only faults (the `fault-injection` feature): a request whose stop
/// strings include one of these makes the engine fail on purpose.
#[cfg(feature = "fault-injection")]
pub mod fault {
    /// Panics while handling this request's sequence.
    pub const PANIC_SEQUENCE: &str = "\u{1}svfit-fault:panic-sequence";
    /// Panics on the engine thread outside any sequence: the engine dies.
    pub const KILL_ENGINE: &str = "\u{1}svfit-fault:kill-engine";
    /// Decodes an invalid token after the prompt: the whole batch fails.
    pub const INVALID_TOKEN: &str = "\u{1}svfit-fault:invalid-token";

    pub(super) fn asks(job: &super::Job, fault: &str) -> bool {
        job.request.stop.iter().any(|s| s == fault)
    }
}

/// What [`SlotPool::acquire`] found.
#[derive(Debug, PartialEq)]
enum Acquired {
    /// The adapter is already in this slot.
    Hit(Slot),
    /// This slot is now the adapter's: write its deltas there (`evicted`:
    /// it held another adapter).
    Load { slot: Slot, evicted: bool },
    /// Every slot is in use or protected by a pin.
    Full,
}

/// What one slot holds.
#[derive(Clone, Debug)]
struct Held {
    key: String,
    owner: Option<String>,
}

/// The device slots 1..=n of the model's delta tables.
///
/// Pins belong to an adapter (`tenant/id`), and protect only its newest
/// version seen here: a replaced version's slot is reused as soon as its
/// last sequence ends. So protected slots never outnumber pinned adapters,
/// and with fewer pinned adapters than slots (the store's pin limit) a
/// request for any other adapter gets a slot once one is unused.
struct SlotPool {
    /// Per slot (index 0 unused): what it holds, its users, and when it
    /// was last released.
    held: Vec<Option<Held>>,
    users: Vec<usize>,
    last_used: Vec<u64>,
    by_key: HashMap<String, Slot>,
    pinned: HashSet<String>,
    /// Per owner, the newest version seen and its key.
    newest: HashMap<String, (u64, String)>,
    clock: u64,
}

impl SlotPool {
    fn new(n: usize) -> Self {
        SlotPool {
            held: vec![None; n + 1],
            users: vec![0; n + 1],
            last_used: vec![0; n + 1],
            by_key: HashMap::new(),
            pinned: HashSet::new(),
            newest: HashMap::new(),
            clock: 0,
        }
    }

    /// Whether slot `s` must keep its adapter even when unused: it holds
    /// the newest version of a pinned adapter.
    fn protected(&self, s: usize) -> bool {
        let Some(Held {
            key,
            owner: Some(owner),
        }) = &self.held[s]
        else {
            return false;
        };
        self.pinned.contains(owner) && self.newest.get(owner).is_some_and(|(_, k)| k == key)
    }

    /// A slot for `adapter`, taking a user of it.
    fn acquire(&mut self, adapter: &AdapterDeltas) -> Acquired {
        if let Some(&slot) = self.by_key.get(&adapter.key) {
            self.users[slot as usize] += 1;
            return Acquired::Hit(slot);
        }
        if let Some(owner) = &adapter.owner {
            let newer = self
                .newest
                .get(owner)
                .is_none_or(|(v, _)| adapter.version >= *v);
            if newer {
                self.newest
                    .insert(owner.clone(), (adapter.version, adapter.key.clone()));
            }
        }
        let free = (1..self.held.len())
            .filter(|&s| self.users[s] == 0 && !self.protected(s))
            .min_by_key(|&s| (self.held[s].is_some(), self.last_used[s]));
        let Some(slot) = free else {
            return Acquired::Full;
        };
        let evicted = match self.held[slot].take() {
            Some(old) => {
                self.by_key.remove(&old.key);
                true
            }
            None => false,
        };
        self.held[slot] = Some(Held {
            key: adapter.key.clone(),
            owner: adapter.owner.clone(),
        });
        self.by_key.insert(adapter.key.clone(), slot as Slot);
        self.users[slot] = 1;
        Acquired::Load {
            slot: slot as Slot,
            evicted,
        }
    }

    /// Gives back a slot whose load failed: it holds nothing.
    fn unload(&mut self, slot: Slot) {
        let s = slot as usize;
        if let Some(old) = self.held[s].take() {
            self.by_key.remove(&old.key);
        }
        self.users[s] = 0;
    }

    fn release(&mut self, slot: Slot) {
        let s = slot as usize;
        if s == 0 || s >= self.users.len() {
            return;
        }
        self.users[s] = self.users[s].saturating_sub(1);
        self.clock += 1;
        self.last_used[s] = self.clock;
    }

    fn pin(&mut self, owner: &str, pinned: bool) {
        if pinned {
            self.pinned.insert(owner.to_string());
        } else {
            self.pinned.remove(owner);
        }
    }

    /// The adapter is gone: no pin, and its unused slots are free now.
    fn forget(&mut self, owner: &str) {
        self.pinned.remove(owner);
        self.newest.remove(owner);
        for s in 1..self.held.len() {
            let owned = self.held[s]
                .as_ref()
                .is_some_and(|h| h.owner.as_deref() == Some(owner));
            if owned && self.users[s] == 0 {
                self.unload(s as Slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn adapter(owner: u8, version: u64) -> AdapterDeltas {
        AdapterDeltas {
            key: format!("t/a{owner}@v{version}"),
            owner: Some(format!("t/a{owner}")),
            version,
            deltas: Vec::new(),
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Use { owner: u8, version: u64 },
        Finish(usize),
        Pin(u8),
        Unpin(u8),
        Delete(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..6, 1u64..4).prop_map(|(owner, version)| Op::Use { owner, version }),
            3 => (0usize..8).prop_map(Op::Finish),
            2 => (0u8..6).prop_map(Op::Pin),
            1 => (0u8..6).prop_map(Op::Unpin),
            1 => (0u8..6).prop_map(Op::Delete),
        ]
    }

    const SLOTS: usize = 3;

    proptest! {
        /// With any sequence of pin, upload (a newer version in use),
        /// delete and use: protected slots never outnumber pins, a request
        /// waits only while every slot is in use or protected, and once the
        /// running sequences end any unpinned adapter gets a slot.
        #[test]
        fn pins_never_block_unpinned_adapters(ops in proptest::collection::vec(op(), 1..80)) {
            let mut pool = SlotPool::new(SLOTS);
            let mut running: Vec<Slot> = Vec::new();
            for op in ops {
                match op {
                    Op::Use { owner, version } => match pool.acquire(&adapter(owner, version)) {
                        Acquired::Hit(slot) | Acquired::Load { slot, .. } => running.push(slot),
                        Acquired::Full => prop_assert!((1..=SLOTS)
                            .all(|s| pool.users[s] > 0 || pool.protected(s))),
                    },
                    Op::Finish(i) if !running.is_empty() => {
                        let slot = running.swap_remove(i % running.len());
                        pool.release(slot);
                    }
                    Op::Finish(_) => {}
                    // The store allows one pin less than there are slots.
                    Op::Pin(owner) if pool.pinned.len() + 1 < SLOTS => {
                        pool.pin(&format!("t/a{owner}"), true)
                    }
                    Op::Pin(_) => {}
                    Op::Unpin(owner) => pool.pin(&format!("t/a{owner}"), false),
                    Op::Delete(owner) => pool.forget(&format!("t/a{owner}")),
                }
                let protected = (1..=SLOTS).filter(|&s| pool.protected(s)).count();
                prop_assert!(protected <= pool.pinned.len());
                for (key, &slot) in &pool.by_key {
                    prop_assert_eq!(&pool.held[slot as usize].as_ref().unwrap().key, key);
                }
            }
            for slot in running.drain(..) {
                pool.release(slot);
            }
            let mix = AdapterDeltas { key: "mix:x".into(), owner: None, version: 0, deltas: Vec::new() };
            prop_assert_ne!(pool.acquire(&mix), Acquired::Full);
        }
    }

    #[test]
    fn a_replaced_pinned_version_frees_its_slot() {
        let mut pool = SlotPool::new(2);
        let Acquired::Load { slot: v1, .. } = pool.acquire(&adapter(0, 1)) else {
            panic!("a free pool loads");
        };
        pool.pin("t/a0", true);
        pool.release(v1);
        assert!(pool.protected(v1 as usize));
        // Version 2 in use: version 1's slot is no longer protected.
        let Acquired::Load { slot: v2, .. } = pool.acquire(&adapter(0, 2)) else {
            panic!("one slot is free");
        };
        assert!(!pool.protected(v1 as usize));
        assert!(
            matches!(pool.acquire(&adapter(1, 1)), Acquired::Load { slot, evicted: true } if slot == v1)
        );
        pool.release(v2);
        assert!(pool.protected(v2 as usize));
    }
}
