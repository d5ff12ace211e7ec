//! The engine thread: it owns the model, the KV cache, the waiting jobs
//! and the running sequences, and loops: take commands, drop cancelled
//! sequences and jobs, admit, decode one step, sample, stream. A bug while
//! handling one sequence (admission, sampling) is caught and fails that
//! sequence alone; a batch that fails to decode is decoded again one
//! sequence at a time, so that only the sequences that fail by themselves
//! fail.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

#[cfg(feature = "fault-injection")]
use super::fault;
use super::gate::Gate;
use super::queue::{Pending, Waiting};
use super::scheduler;
use super::slots::SlotPool;
use super::{Command, EngineConfig, Event, Failure, Job, Stats};
use crate::generate::{Ended, FinishReason, Sequence};
use crate::model::{Batch, KvCache, Model, ModelError, SeqId, Slot, Tokenizer};
use crate::prefix_cache::{block_keys, PrefixCache, BLOCK};

mod loading;

/// One running sequence.
pub(super) struct Running {
    pub(super) seq: SeqId,
    pub(super) job: Box<Job>,
    pub(super) sequence: Sequence,
    /// Its adapter's SVFit slot and LoRA slot (0: none).
    pub(super) slot: Slot,
    pub(super) lora_slot: Slot,
    /// The token to decode next (after the prompt).
    pub(super) next: Option<u32>,
    started: Instant,
    first_token: Option<Duration>,
    /// When its last token was generated.
    last_token: Option<Instant>,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    /// Blocks of this sequence known to the prefix cache.
    remembered: usize,
}

/// What became of a running sequence this step (by its index in
/// `Worker::running`): finished, or failed.
type Ending = (usize, Result<FinishReason, Failure>);

/// Starts the engine thread running `worker`; `alive` turns false when the
/// thread ends.
pub(super) fn spawn(
    worker: Worker,
    alive: tokio::sync::watch::Sender<bool>,
) -> Result<(), ModelError> {
    std::thread::Builder::new()
        .name("svfit-engine".into())
        .spawn(move || {
            // Sequence-level failures are caught inside; this catches
            // the rest so that the server learns the engine is gone.
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
            if let Err(panic) = ended {
                tracing::error!(panic = panic_text(&*panic), "the engine thread stopped");
            }
            let _ = alive.send(false);
        })
        .map_err(|e| ModelError::Unsupported(format!("cannot start the engine thread: {e}")))?;
    Ok(())
}

/// Everything the engine thread owns.
pub(super) struct Worker {
    model: Model,
    cache: KvCache,
    tokenizer: Arc<Tokenizer>,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
    pending: Pending,
    running: Vec<Running>,
    slots: SlotPool,
    /// The LoRA slots, when the model has LoRA tables.
    lora_slots: SlotPool,
    next_seq: SeqId,
    context: usize,
    config: EngineConfig,
    prefix: PrefixCache,
    gate: Arc<Gate>,
}

impl Worker {
    /// The engine thread's state before its first step. The model's slots
    /// beyond `config.adapter_slots` go unused.
    pub(super) fn new(
        model: Model,
        cache: KvCache,
        tokenizer: Arc<Tokenizer>,
        rx: mpsc::Receiver<Command>,
        (stats, waiting, gate): (Arc<Stats>, Arc<Waiting>, Arc<Gate>),
        config: EngineConfig,
    ) -> Self {
        let n_slots = model.branch().map_or(0, |b| b.n_slots().saturating_sub(1));
        // Tables already attached, or those `config.lora` asks for (placed
        // at the first LoRA served).
        let n_lora_slots = model
            .lora_branch()
            .map_or(config.lora.slots, |b| b.n_slots().saturating_sub(1));
        Worker {
            context: config.context,
            model,
            cache,
            tokenizer,
            rx,
            pending: Pending::new(waiting, stats.clone()),
            stats,
            running: Vec::new(),
            slots: SlotPool::new(n_slots.min(config.adapter_slots)),
            lora_slots: SlotPool::new(n_lora_slots),
            next_seq: 0,
            prefix: PrefixCache::new(config.prefix_cache_bytes),
            config,
            gate,
        }
    }

    fn run(mut self) {
        loop {
            let idle = self.running.is_empty() && self.pending.is_empty();
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
            } else if !self.pending.is_empty() {
                // Nothing could be admitted (no slot or cells free while
                // nothing runs would be a sizing bug): avoid spinning.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Job(job) => self.pending.push(job),
            // Pins protect SVFit slots only: there are fewer LoRA slots
            // than pins allowed, and a LoRA slot must come free for any
            // LoRA (a pinned LoRA stays in the host cache).
            Command::Pin { owner, pinned } => self.slots.pin(&owner, pinned),
            Command::Forget { owner } => {
                self.slots.forget(&owner);
                self.lora_slots.forget(&owner);
            }
        }
    }

    /// Frees the sequences and waiting jobs whose client left or whose
    /// deadline passed.
    fn drop_cancelled(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.is_cancelled(now) {
                let r = self.running.swap_remove(i);
                r.job.tell_cancelled();
                self.release(&r);
                self.stats.requests_cancelled.fetch_add(1, Relaxed);
            } else {
                i += 1;
            }
        }
        self.pending.drop_cancelled(now);
    }

    fn release(&mut self, r: &Running) {
        self.cache.remove_seq(r.seq);
        self.slots.release(r.slot);
        self.lora_slots.release(r.lora_slot);
        self.stats.active.store(self.running.len(), Relaxed);
    }

    /// Admits waiting jobs, one per tenant in turn, while there is room.
    fn admit(&mut self) {
        let mut blocked = 0;
        while self.running.len() < self.config.max_sequences && blocked < self.pending.tenants() {
            let Some((tenant, job)) = self.pending.pop() else {
                break;
            };
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
                    self.pending.started(tenant);
                }
                Err(job) => {
                    // No slot or cells now: it keeps its place.
                    self.pending.put_back(tenant, job);
                    blocked += 1;
                }
            }
        }
        self.stats.active.store(self.running.len(), Relaxed);
    }

    /// Starts a job when its adapter has a slot and its cells are free;
    /// gives it back otherwise. A job that can never run is failed.
    fn start(&mut self, mut job: Box<Job>) -> Result<(), Box<Job>> {
        let sequence = match Sequence::new(&job.request, self.context) {
            Ok(s) => s,
            Err(e) => {
                self.fail(&job.events, Failure::Invalid(e));
                return Ok(());
            }
        };
        let (slot, lora_slot) = match &job.adapter {
            None => (0, 0),
            Some(adapter) => match self.acquire(adapter) {
                Ok(Some(slots)) => slots,
                Ok(None) => return Err(job),
                Err(e) => {
                    self.fail(&job.events, Failure::AdapterLoad(e));
                    return Ok(());
                }
            },
        };
        let seq = self.next_seq;
        if self.cache.reserve(seq, sequence.reservation()).is_err() {
            self.slots.release(slot);
            self.lora_slots.release(lora_slot);
            return Err(job);
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut sequence = sequence;
        sequence.constrain(job.constraint.take());
        let cached = self.reuse_prefix(seq, &job, &mut sequence);
        self.running.push(Running {
            seq,
            job,
            sequence,
            slot,
            lora_slot,
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
        let (batch, owners) =
            scheduler::next_batch(&mut self.running, self.config.prefill_budget, &self.stats);
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
        let gate = self.gate.clone();
        let turn = gate.serve();
        let Some((logits, mut ended)) = self.decode(&batch, &owners) else {
            return;
        };
        self.sample(&logits, &owners, &mut ended);
        drop(turn);
        self.end(ended);
        self.record_step(start.elapsed(), batch.len(), owners.len());
    }

    /// Decodes `batch`, whose output rows sample for `owners`: the logits,
    /// and the sequences that failed (decoded alone after the batch
    /// failed). `None` when the decoder panicked: the batch's sequences
    /// are failed and released already.
    fn decode(&mut self, batch: &Batch, owners: &[usize]) -> Option<(StepLogits, Vec<Ending>)> {
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model.decode(&mut self.cache, batch)
        }));
        let mut ended = Vec::new();
        let logits = match decoded {
            Ok(Ok(logits)) => StepLogits::Batch(logits),
            Ok(Err(e)) => {
                // The cache is as it was: find the sequences that fail by
                // themselves, and go on with the others.
                tracing::warn!(error = %e, sequences = owners.len(), "a batch failed to decode; decoding its sequences alone");
                let (alone, failed) = self.decode_alone(batch, owners);
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
                return None;
            }
        };
        Some((logits, ended))
    }

    /// Samples the next token of each sequence of `owners` from its row of
    /// `logits`, adding those that end to `ended`.
    fn sample(&mut self, logits: &StepLogits, owners: &[usize], ended: &mut Vec<Ending>) {
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
                Ok(Err(Ended::Finished(finish))) => ended.push((i, Ok(finish))),
                Ok(Err(Ended::Failed(e))) => ended.push((i, Err(Failure::Constraint(e)))),
                Err(panic) => {
                    let panic = panic_text(&*panic).to_string();
                    tracing::error!(panic, tenant = r.job.tenant, "a sequence failed");
                    ended.push((i, Err(Failure::Panicked(panic))));
                }
            }
        }
    }

    /// Removes the sequences that ended this step, telling their clients.
    fn end(&mut self, mut ended: Vec<Ending>) {
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
    }

    fn record_step(&self, took: Duration, tokens: usize, sequences: usize) {
        self.stats.steps.fetch_add(1, Relaxed);
        self.stats
            .step_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
        self.stats.latency.step.observe(took.as_secs_f64());
        self.stats.batch_tokens.fetch_add(tokens as u64, Relaxed);
        self.stats.last_batch_sequences.store(sequences, Relaxed);
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
            one.set_lora(seq, batch.lora(seq));
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
) -> Result<u32, Ended> {
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
    let masking = r.sequence.take_mask_time();
    if !masking.is_zero() {
        stats.masks.fetch_add(1, Relaxed);
        stats
            .mask_micros
            .fetch_add(masking.as_micros() as u64, Relaxed);
    }
    if r.first_token.is_none() && !tokens.is_empty() {
        let ttft = r.job.arrived.elapsed();
        r.first_token = Some(ttft);
        stats
            .latency
            .time_to_first_token
            .observe(ttft.as_secs_f64());
    }
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
