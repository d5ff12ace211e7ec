//! What one step decodes: the next token of every sequence past its
//! prompt, and prompt chunks of the others while the step's prefill budget
//! lasts (one chunk always runs, so that a long prompt cannot stall). Each
//! token is tagged with its sequence's adapter slot.

use std::sync::atomic::Ordering::Relaxed;

#[cfg(feature = "fault-injection")]
use super::fault;
use super::worker::Running;
use super::Stats;
use crate::model::Batch;

/// The batch of one step over `running`, and its output rows in order:
/// the index in `running` of the sequence each row samples for.
pub(super) fn next_batch(
    running: &mut [Running],
    prefill_budget: usize,
    stats: &Stats,
) -> (Batch, Vec<usize>) {
    let mut batch = Batch::new();
    let mut owners = Vec::new();
    let mut budget = prefill_budget;
    for (i, r) in running.iter_mut().enumerate() {
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
            stats.prompt_tokens.fetch_add(chunk.len() as u64, Relaxed);
            let last = r.sequence.prefill_done();
            for (k, &t) in chunk.iter().enumerate() {
                batch.add(t, pos + k, r.seq, last && k + 1 == chunk.len());
            }
            if !last {
                // No logits yet, but the adapter all the same: the
                // chunk's keys and values depend on it.
                batch.set_adapter(r.seq, r.slot);
                batch.set_lora(r.seq, r.lora_slot);
                continue;
            }
        } else {
            continue;
        }
        batch.set_adapter(r.seq, r.slot);
        batch.set_lora(r.seq, r.lora_slot);
        owners.push(i);
    }
    (batch, owners)
}
