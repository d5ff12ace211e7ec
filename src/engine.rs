//! The serving engine (DESIGN.md §3): one thread owns the model and the KV
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

use tokio::sync::mpsc::UnboundedSender;

use crate::adapter::Deltas;
use crate::generate::{FinishReason, GenerateError, Request, Sequence};
use crate::model::{Batch, KvCache, Model, ModelError, SeqId, Slot, Tokenizer};

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
    /// Prompt tokens prefilled per step at most (one chunk always runs).
    pub prefill_budget: usize,
}

/// An adapter (one version of it, or a mix) as the engine sees it.
#[derive(Debug)]
pub struct AdapterDeltas {
    /// Unique per adapter version or mix of versions.
    pub key: String,
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
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        queue: Duration,
        time_to_first_token: Duration,
        total: Duration,
    },
    Failed(String),
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
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error(transparent)]
    Invalid(#[from] GenerateError),
}

enum Command {
    Job(Box<Job>),
    Pin { key: String, pinned: bool },
}

/// A handle to the engine thread; dropping every handle stops it.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    config: EngineConfig,
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
        let n_slots = model.branch().map_or(0, |b| b.n_slots().saturating_sub(1));
        let worker = Worker {
            context: config.context,
            model,
            cache,
            tokenizer,
            rx,
            stats: stats.clone(),
            pending: HashMap::new(),
            tenants: VecDeque::new(),
            running: Vec::new(),
            slots: SlotPool::new(n_slots.min(config.adapter_slots)),
            next_seq: 0,
            config: config.clone(),
        };
        std::thread::Builder::new()
            .name("svfit-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| ModelError::Unsupported(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine { tx, stats, config })
    }

    /// Queues a job; it is checked first (prompt length, sampling values).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        Sequence::new(&job.request, self.config.context)?;
        let queued = self.stats.queued.fetch_add(1, Relaxed);
        if queued >= self.config.queue_limit {
            self.stats.queued.fetch_sub(1, Relaxed);
            return Err(SubmitError::QueueFull(queued));
        }
        self.tx.send(Command::Job(Box::new(job))).map_err(|_| {
            self.stats.queued.fetch_sub(1, Relaxed);
            SubmitError::Stopped
        })
    }

    /// Keeps (or stops keeping) an adapter version in its slot when unused.
    pub fn pin(&self, key: &str, pinned: bool) {
        let _ = self.tx.send(Command::Pin {
            key: key.to_string(),
            pinned,
        });
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
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
}

struct Worker {
    model: Model,
    cache: KvCache,
    tokenizer: Arc<Tokenizer>,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
    /// Waiting jobs per tenant, and the tenants in round-robin order.
    pending: HashMap<String, VecDeque<Box<Job>>>,
    tenants: VecDeque<String>,
    running: Vec<Running>,
    slots: SlotPool,
    next_seq: SeqId,
    context: usize,
    config: EngineConfig,
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
            Command::Pin { key, pinned } => self.slots.pin(&key, pinned),
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
                    let _ = r.job.events.send(Event::Failed("deadline exceeded".into()));
                }
                self.release(&r);
                self.stats.requests_cancelled.fetch_add(1, Relaxed);
            } else {
                i += 1;
            }
        }
        for queue in self.pending.values_mut() {
            let before = queue.len();
            queue.retain(|job| !Self::is_cancelled(job, now));
            let gone = before - queue.len();
            if gone > 0 {
                self.stats.queued.fetch_sub(gone, Relaxed);
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
            match self.start(job) {
                Ok(()) => {
                    blocked = 0;
                    self.stats.queued.fetch_sub(1, Relaxed);
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
                let _ = job.events.send(Event::Failed(e.to_string()));
                self.stats.requests_failed.fetch_add(1, Relaxed);
                return Ok(());
            }
        };
        let slot = match &job.adapter {
            None => 0,
            Some(adapter) => match self.slots.acquire(&mut self.model, adapter, &self.stats) {
                Ok(Some(slot)) => slot,
                Ok(None) => return Err(job),
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.to_string()));
                    self.stats.requests_failed.fetch_add(1, Relaxed);
                    return Ok(());
                }
            },
        };
        let seq = self.next_seq;
        if self.cache.reserve(seq, sequence.reservation()).is_err() {
            self.slots.release(slot);
            return Err(job);
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        self.running.push(Running {
            seq,
            job,
            sequence,
            slot,
            next: None,
            started: Instant::now(),
            first_token: None,
        });
        Ok(())
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
        let result = self.model.decode(&mut self.cache, &batch);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Fail everything in the batch (their cells are unchanged
                // but their state is no longer consistent).
                let seqs: HashSet<SeqId> = batch.entries().map(|(_, _, s, _)| s).collect();
                let failed: Vec<Running> = {
                    let (out, keep) = std::mem::take(&mut self.running)
                        .into_iter()
                        .partition(|r| seqs.contains(&r.seq));
                    self.running = keep;
                    out
                };
                for r in failed {
                    let _ = r.job.events.send(Event::Failed(e.to_string()));
                    self.release(&r);
                    self.stats.requests_failed.fetch_add(1, Relaxed);
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (row, &i) in owners.iter().enumerate() {
            let r = &mut self.running[i];
            let mut text = String::new();
            let before = r.sequence.generated().len();
            let outcome = r
                .sequence
                .advance(logits.row(row), &self.tokenizer, &mut |t| text.push_str(t));
            let tokens = r.sequence.generated()[before..].to_vec();
            let first = if r.first_token.is_none() && !tokens.is_empty() {
                let ttft = r.job.arrived.elapsed();
                r.first_token = Some(ttft);
                Some(ttft)
            } else {
                None
            };
            self.stats
                .tokens_generated
                .fetch_add(tokens.len() as u64, Relaxed);
            if !text.is_empty() || !tokens.is_empty() {
                let _ = r.job.events.send(Event::Text {
                    text,
                    tokens,
                    first,
                });
            }
            match outcome {
                Ok(token) => r.next = Some(token),
                Err(finish) => finished.push((i, finish)),
            }
        }
        // Remove from the back so indices stay valid.
        finished.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, finish) in finished {
            let r = self.running.swap_remove(i);
            self.finish(r, finish);
        }
        self.stats.steps.fetch_add(1, Relaxed);
        self.stats
            .step_micros
            .fetch_add(start.elapsed().as_micros() as u64, Relaxed);
        self.stats
            .batch_tokens
            .fetch_add(batch.len() as u64, Relaxed);
        self.stats.last_batch_sequences.store(owners.len(), Relaxed);
    }

    fn finish(&mut self, r: Running, finish: FinishReason) {
        self.release(&r);
        let Running {
            job,
            sequence,
            started,
            first_token,
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
            });
        }
        let queue = started.duration_since(job.arrived);
        let _ = job.events.send(Event::Done {
            finish: generation.finish,
            prompt_tokens,
            completion_tokens: generation.tokens.len(),
            queue,
            time_to_first_token: first_token.unwrap_or_else(|| job.arrived.elapsed()),
            total: job.arrived.elapsed(),
        });
        self.stats.requests_finished.fetch_add(1, Relaxed);
    }
}

/// The device slots 1..=n of the model's delta tables.
struct SlotPool {
    /// Per slot (index 0 unused): the adapter key it holds, its users, and
    /// when it was last released.
    keys: Vec<Option<String>>,
    users: Vec<usize>,
    last_used: Vec<u64>,
    by_key: HashMap<String, Slot>,
    pinned: HashSet<String>,
    clock: u64,
}

impl SlotPool {
    fn new(n: usize) -> Self {
        SlotPool {
            keys: vec![None; n + 1],
            users: vec![0; n + 1],
            last_used: vec![0; n + 1],
            by_key: HashMap::new(),
            pinned: HashSet::new(),
            clock: 0,
        }
    }

    /// A slot holding `adapter` (loaded now if needed), or `None` when
    /// every slot is in use or pinned.
    fn acquire(
        &mut self,
        model: &mut Model,
        adapter: &AdapterDeltas,
        stats: &Stats,
    ) -> Result<Option<Slot>, ModelError> {
        if let Some(&slot) = self.by_key.get(&adapter.key) {
            self.users[slot as usize] += 1;
            stats.slot_hits.fetch_add(1, Relaxed);
            return Ok(Some(slot));
        }
        let free = (1..self.keys.len())
            .filter(|&s| self.users[s] == 0)
            .filter(|&s| {
                self.keys[s]
                    .as_ref()
                    .is_none_or(|k| !self.pinned.contains(k))
            })
            .min_by_key(|&s| (self.keys[s].is_some(), self.last_used[s]));
        let Some(slot) = free else {
            return Ok(None);
        };
        if let Some(old) = self.keys[slot].take() {
            self.by_key.remove(&old);
            stats.slot_evictions.fetch_add(1, Relaxed);
        }
        model.set_adapter(slot as Slot, &adapter.deltas)?;
        stats.slot_loads.fetch_add(1, Relaxed);
        self.keys[slot] = Some(adapter.key.clone());
        self.by_key.insert(adapter.key.clone(), slot as Slot);
        self.users[slot] = 1;
        Ok(Some(slot as Slot))
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

    fn pin(&mut self, key: &str, pinned: bool) {
        if pinned {
            self.pinned.insert(key.to_string());
        } else {
            self.pinned.remove(key);
        }
    }
}
