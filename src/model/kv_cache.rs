//! The KV cache: one K and one V tensor per layer with `size` cells; each cell
//! holds one token of one sequence. Sequences share the cells, so prefill and
//! decode tokens of many sequences go into one batch (as llama.cpp's unified
//! cache). K is stored a cell per row (`[n_embd_kv, size]`), V transposed
//! (`[size, n_embd_kv]`) so that attention's V product needs no copy.
//!
//! Batch invariance: a sequence's logits do not depend on what else shares
//! its batch. ggml's reductions over cells (softmax sums, the V product) are
//! SIMD loops whose rounding depends on each cell's index modulo the vector
//! period, and one flipped rounding is amplified by the quantized matmuls
//! downstream. So cells are handed out in pages of [`PAGE`] cells, a page
//! belongs to one sequence, and position `p` of a sequence sits at offset
//! `p % PAGE` of its page: the cell indices a sequence sees are congruent to
//! those it would have alone, where other sequences' cells add exact zeros.

use crate::ggml::{Backend, Context, TensorId, TensorSet, Type};

use super::batch::{Batch, SeqId};
use super::{Config, ModelError};

/// Attention runs over the first `n_kv` cells, rounded up to this many, so
/// that the graph shape changes rarely.
const N_KV_PAD: usize = 256;

/// Cells per page: a multiple of every SIMD reduction period in ggml's CPU
/// kernels (at most 64 f16 values per step).
pub const PAGE: usize = 64;

/// The pages a sequence holds, in order, and how many cells it fills.
#[derive(Clone, Debug, Default)]
struct SeqPages {
    pages: Vec<usize>,
    len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cell {
    seq: SeqId,
    pos: i32,
}

pub struct KvCache {
    set: TensorSet,
    pub(super) k: Vec<TensorId>,
    pub(super) v: Vec<TensorId>,
    cells: Vec<Option<Cell>>,
    /// Owner of each page.
    page_owner: Vec<Option<SeqId>>,
    seqs: std::collections::HashMap<SeqId, SeqPages>,
}

impl KvCache {
    /// A cache of at least `size` cells (rounded up to whole pages).
    pub(super) fn new(config: &Config, size: usize, backend: &Backend) -> Result<Self, ModelError> {
        let size = size.max(1).next_multiple_of(PAGE);
        let ctx = Context::new(2 * config.n_layer, 0)?;
        let (width, cells) = (config.n_embd_kv() as i64, size as i64);
        for l in 0..config.n_layer {
            ctx.new_tensor(Type::F16, &[width, cells])
                .set_name(&format!("cache_k_l{l}"));
            ctx.new_tensor(Type::F16, &[cells, width])
                .set_name(&format!("cache_v_l{l}"));
        }
        let set = TensorSet::allocate(ctx, backend)?;
        // Unused cells are masked out, but keep them finite all the same.
        set.buffer().clear(0);
        let find = |kind: &str, l: usize| {
            set.find(&format!("cache_{kind}_l{l}"))
                .expect("created above")
        };
        Ok(KvCache {
            k: (0..config.n_layer).map(|l| find("k", l)).collect(),
            v: (0..config.n_layer).map(|l| find("v", l)).collect(),
            set,
            cells: vec![None; size],
            page_owner: vec![None; size / PAGE],
            seqs: Default::default(),
        })
    }

    pub(super) fn tensors(&self) -> &TensorSet {
        &self.set
    }

    /// Number of cells (tokens) the cache holds in all.
    pub fn size(&self) -> usize {
        self.cells.len()
    }

    /// Cells not held by any sequence (whole free pages).
    pub fn n_free(&self) -> usize {
        self.page_owner.iter().filter(|o| o.is_none()).count() * PAGE
    }

    /// Tokens of `seq` held in the cache.
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// Frees every cell of `seq`.
    pub fn remove_seq(&mut self, seq: SeqId) {
        if let Some(held) = self.seqs.remove(&seq) {
            for page in held.pages {
                self.page_owner[page] = None;
                self.cells[page * PAGE..(page + 1) * PAGE].fill(None);
            }
        }
    }

    pub fn clear(&mut self) {
        self.cells.fill(None);
        self.page_owner.fill(None);
        self.seqs.clear();
    }

    /// Claims one cell per batch token, in its sequence's pages (new pages
    /// as needed), and returns the cell indices; nothing changes when they
    /// do not all fit.
    pub(super) fn place(&mut self, batch: &Batch) -> Result<Vec<i64>, ModelError> {
        let mut added: std::collections::HashMap<SeqId, usize> = Default::default();
        for &seq in &batch.seqs {
            *added.entry(seq).or_default() += 1;
        }
        let pages_needed: usize = added
            .iter()
            .map(|(seq, n)| {
                let len = self.seq_len(*seq);
                (len + n).div_ceil(PAGE) - len.div_ceil(PAGE)
            })
            .sum();
        let free_pages = self.n_free() / PAGE;
        if pages_needed > free_pages {
            return Err(ModelError::CacheFull {
                needed: batch.len(),
                free: self.n_free(),
                size: self.size(),
            });
        }
        let mut cells = Vec::with_capacity(batch.len());
        for (&seq, &pos) in batch.seqs.iter().zip(&batch.positions) {
            let held = self.seqs.entry(seq).or_default();
            if held.len == held.pages.len() * PAGE {
                // Prefer a page after the sequence's last one, so that its
                // cells stay in position order.
                let after = held.pages.last().map_or(0, |&p| p + 1);
                let free = |p: &usize| self.page_owner[*p].is_none();
                let page = (after..self.page_owner.len())
                    .find(free)
                    .or_else(|| (0..after).find(free))
                    .expect("pages counted above");
                self.page_owner[page] = Some(seq);
                held.pages.push(page);
            }
            let cell = held.pages[held.len / PAGE] * PAGE + held.len % PAGE;
            held.len += 1;
            self.cells[cell] = Some(Cell { seq, pos });
            cells.push(cell as i64);
        }
        Ok(cells)
    }

    /// Undoes `place` (after a failed decode): drops the batch's cells and
    /// any page they left empty.
    pub(super) fn unplace(&mut self, batch: &Batch, cells: &[i64]) {
        for (&seq, &cell) in batch.seqs.iter().zip(cells).rev() {
            self.cells[cell as usize] = None;
            let Some(held) = self.seqs.get_mut(&seq) else {
                continue;
            };
            held.len -= 1;
            if held.len == (held.pages.len() - 1) * PAGE {
                if let Some(page) = held.pages.pop() {
                    self.page_owner[page] = None;
                }
            }
            if held.pages.is_empty() {
                self.seqs.remove(&seq);
            }
        }
    }

    /// Cells attention must look at: up to the last used one, padded.
    pub(super) fn n_kv(&self) -> usize {
        let last = self
            .cells
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1);
        last.div_ceil(N_KV_PAD)
            .max(1)
            .saturating_mul(N_KV_PAD)
            .min(self.size())
    }

    /// Where each element of the batch's V rows goes in the transposed V
    /// cache: element `e` of token `t` lands at `e * size + cells[t]`.
    pub(super) fn v_indices(&self, cells: &[i64], n_embd_kv: usize) -> Vec<i64> {
        let size = self.size() as i64;
        cells
            .iter()
            .flat_map(|&cell| (0..n_embd_kv as i64).map(move |e| e * size + cell))
            .collect()
    }

    /// The causal, per-sequence mask `[n_tokens][n_kv]`: a token sees the
    /// cells of its own sequence at positions up to its own.
    pub(super) fn mask(&self, batch: &Batch, n_kv: usize) -> Vec<f32> {
        let mut mask = vec![f32::NEG_INFINITY; n_kv * batch.len()];
        for (row, (&seq, &pos)) in mask
            .chunks_exact_mut(n_kv)
            .zip(batch.seqs.iter().zip(&batch.positions))
        {
            for (m, cell) in row.iter_mut().zip(&self.cells) {
                if matches!(cell, Some(c) if c.seq == seq && c.pos <= pos) {
                    *m = 0.0;
                }
            }
        }
        mask
    }
}
