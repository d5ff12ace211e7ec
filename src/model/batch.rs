//! A batch of tokens to decode together: prefill and decode tokens of several
//! sequences, each with its own position and sequence id (as `llama_batch`).

use super::svfit::Slot;

/// Identifies one sequence in the KV cache.
pub type SeqId = u32;

/// A sequence's slots: its SVFit adapter's and its LoRA's (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    pub svfit: Slot,
    pub lora: Slot,
}

impl From<Slot> for Slots {
    /// An SVFit slot, no LoRA.
    fn from(svfit: Slot) -> Self {
        Slots { svfit, lora: 0 }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub(super) tokens: Vec<u32>,
    pub(super) positions: Vec<i32>,
    pub(super) seqs: Vec<SeqId>,
    pub(super) outputs: Vec<bool>,
    /// The adapter slot of each sequence that is not on the base (slot 0).
    pub(super) adapters: Vec<(SeqId, Slot)>,
    /// The LoRA slot of each sequence that has a LoRA (slot 0: none).
    pub(super) loras: Vec<(SeqId, Slot)>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token` at `pos` of sequence `seq`; `output` asks for its logits.
    pub fn add(&mut self, token: u32, pos: usize, seq: SeqId, output: bool) {
        self.tokens.push(token);
        self.positions.push(pos as i32);
        self.seqs.push(seq);
        self.outputs.push(output);
    }

    /// Adds `tokens` of `seq` starting at `start_pos`; logits for the last one
    /// only, or for all when `all_logits`.
    pub fn add_sequence(&mut self, tokens: &[u32], start_pos: usize, seq: SeqId, all_logits: bool) {
        for (i, &t) in tokens.iter().enumerate() {
            self.add(t, start_pos + i, seq, all_logits || i + 1 == tokens.len());
        }
    }

    /// Runs every token of `seq` in this batch with the adapter in `slot`
    /// (0, the default, is the base model).
    pub fn set_adapter(&mut self, seq: SeqId, slot: Slot) {
        self.adapters.retain(|&(s, _)| s != seq);
        if slot != 0 {
            self.adapters.push((seq, slot));
        }
    }

    /// The adapter slot of `seq`.
    pub fn adapter(&self, seq: SeqId) -> Slot {
        self.adapters
            .iter()
            .find(|&&(s, _)| s == seq)
            .map_or(0, |&(_, slot)| slot)
    }

    /// The adapter slot of each token, in batch order.
    pub(super) fn token_slots(&self) -> Vec<i32> {
        self.seqs.iter().map(|&s| self.adapter(s) as i32).collect()
    }

    /// Runs every token of `seq` in this batch with the LoRA in LoRA slot
    /// `slot` (0: none), beside its adapter slot's SVFit deltas.
    pub fn set_lora(&mut self, seq: SeqId, slot: Slot) {
        self.loras.retain(|&(s, _)| s != seq);
        if slot != 0 {
            self.loras.push((seq, slot));
        }
    }

    /// Runs every token of `seq` in this batch with the SVFit slot and the
    /// LoRA slot of `slots`.
    pub fn set_slots(&mut self, seq: SeqId, slots: Slots) {
        self.set_adapter(seq, slots.svfit);
        self.set_lora(seq, slots.lora);
    }

    /// The LoRA slot of `seq`.
    pub fn lora(&self, seq: SeqId) -> Slot {
        self.loras
            .iter()
            .find(|&&(s, _)| s == seq)
            .map_or(0, |&(_, slot)| slot)
    }

    /// The LoRA slot of each token, in batch order.
    pub(super) fn token_lora_slots(&self) -> Vec<i32> {
        self.seqs.iter().map(|&s| self.lora(s) as i32).collect()
    }

    /// (token, position, sequence, wants logits) of each entry, in order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, usize, SeqId, bool)> + '_ {
        (0..self.len()).map(|i| {
            (
                self.tokens[i],
                self.positions[i] as usize,
                self.seqs[i],
                self.outputs[i],
            )
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// When tokens of one sequence are not contiguous, the order (indices
    /// into this batch) that groups them, sequences in order of first
    /// appearance and each sequence's tokens in batch order.
    pub(super) fn order_by_sequence(&self) -> Option<Vec<usize>> {
        // Each entry's sequence, numbered by first appearance: the batch is
        // grouped exactly when these numbers never go down.
        let mut first_seen = std::collections::HashMap::new();
        let group: Vec<usize> = self
            .seqs
            .iter()
            .map(|&s| {
                let next = first_seen.len();
                *first_seen.entry(s).or_insert(next)
            })
            .collect();
        if group.windows(2).all(|w| w[0] <= w[1]) {
            return None;
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| group[i]);
        Some(order)
    }

    /// This batch with its entries in `order`.
    pub(super) fn permuted(&self, order: &[usize]) -> Batch {
        Batch {
            tokens: order.iter().map(|&i| self.tokens[i]).collect(),
            positions: order.iter().map(|&i| self.positions[i]).collect(),
            seqs: order.iter().map(|&i| self.seqs[i]).collect(),
            outputs: order.iter().map(|&i| self.outputs[i]).collect(),
            adapters: self.adapters.clone(),
            loras: self.loras.clone(),
        }
    }

    pub fn clear(&mut self) {
        self.tokens.clear();
        self.positions.clear();
        self.seqs.clear();
        self.outputs.clear();
        self.adapters.clear();
        self.loras.clear();
    }
}
