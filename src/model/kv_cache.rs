//! The KV cache: one K and one V tensor per layer with `size` cells; each cell
//! holds one token of one sequence. K is stored a cell per row
//! (`[n_embd_kv, size]`), V transposed (`[size, n_embd_kv]`) so that
//! attention's V product needs no copy.
//!
//! Each sequence owns one contiguous range of cells, starting on a page
//! boundary ([`PAGE`] cells), and its tokens fill it in order. Attention then
//! runs per sequence over exactly its own range: its cost does not grow with
//! the other sequences in the batch, and its arithmetic is the same as when
//! the sequence runs alone. ggml's reductions over cells are SIMD loops whose
//! rounding depends on each cell's offset modulo the vector period; a page
//! is a multiple of every such period. This makes decoding batch-invariant:
//! a sequence's logits do not depend on what shares its batch.
//!
//! A range grows in place when the pages after it are free, and otherwise
//! moves (its cells are copied) to a free stretch twice as large.

use std::collections::HashMap;

use crate::ggml::{Backend, Context, TensorId, TensorSet, Type};

use super::batch::{Batch, SeqId};
use super::{Config, ModelError};

/// Cells per page: a multiple of every SIMD reduction period in ggml's CPU
/// kernels (at most 64 f16 values per step).
pub const PAGE: usize = 64;

/// The cells `start .. start + len` of a sequence, inside `start .. start + cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: usize,
    cap: usize,
    len: usize,
}

/// Where one sequence of a batch attends: its cells and its batch tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SeqGroup {
    pub seq: SeqId,
    /// First batch token of the sequence (its tokens are contiguous).
    pub first_token: usize,
    pub n_tokens: usize,
    /// First cell of the sequence's range.
    pub start: usize,
    /// Cells attention covers: the sequence's length rounded up to a page.
    pub n_kv: usize,
}

pub struct KvCache {
    set: TensorSet,
    pub(super) k: Vec<TensorId>,
    pub(super) v: Vec<TensorId>,
    n_embd_kv: usize,
    /// Position of the token in each cell (meaningful inside a range).
    positions: Vec<i32>,
    /// Owner of each page.
    pages: Vec<Option<SeqId>>,
    seqs: HashMap<SeqId, Range>,
}

/// The cells of a cache asked for `size`: whole pages, at least one.
fn cells(size: usize) -> usize {
    size.max(1).next_multiple_of(PAGE)
}

impl KvCache {
    /// Bytes of a cache of at least `size` cells: K and V of every layer,
    /// f16.
    pub fn bytes(config: &Config, size: usize) -> u64 {
        2 * 2 * (cells(size) * config.n_layer * config.n_embd_kv()) as u64
    }

    /// A cache of at least `size` cells (rounded up to whole pages).
    pub(super) fn new(config: &Config, size: usize, backend: &Backend) -> Result<Self, ModelError> {
        let size = cells(size);
        let ctx = Context::new(2 * config.n_layer, 0)?;
        let (width, cells) = (config.n_embd_kv() as i64, size as i64);
        for l in 0..config.n_layer {
            ctx.new_tensor(Type::F16, &[width, cells])
                .set_name(&format!("cache_k_l{l}"));
            ctx.new_tensor(Type::F16, &[cells, width])
                .set_name(&format!("cache_v_l{l}"));
        }
        let set = TensorSet::allocate(ctx, backend)?;
        // Cells past a sequence's length are masked out; keep them finite.
        set.buffer().clear(0);
        let find = |kind: &str, l: usize| {
            set.find(&format!("cache_{kind}_l{l}"))
                .expect("created above")
        };
        Ok(KvCache {
            k: (0..config.n_layer).map(|l| find("k", l)).collect(),
            v: (0..config.n_layer).map(|l| find("v", l)).collect(),
            set,
            n_embd_kv: config.n_embd_kv(),
            positions: vec![0; size],
            pages: vec![None; size / PAGE],
            seqs: HashMap::new(),
        })
    }

    pub(super) fn tensors(&self) -> &TensorSet {
        &self.set
    }

    /// Number of cells (tokens) the cache holds in all.
    pub fn size(&self) -> usize {
        self.positions.len()
    }

    /// Cells not reserved by any sequence.
    pub fn n_free(&self) -> usize {
        self.pages.iter().filter(|o| o.is_none()).count() * PAGE
    }

    /// Tokens of `seq` held in the cache.
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |r| r.len)
    }

    /// Frees every cell of `seq`.
    pub fn remove_seq(&mut self, seq: SeqId) {
        if let Some(r) = self.seqs.remove(&seq) {
            self.pages[r.start / PAGE..(r.start + r.cap) / PAGE].fill(None);
        }
    }

    pub fn clear(&mut self) {
        self.pages.fill(None);
        self.seqs.clear();
    }

    /// Makes room for `seq` to hold `n_tokens` in all without moving later
    /// (e.g. prompt plus the most tokens it may generate).
    pub fn reserve(&mut self, seq: SeqId, n_tokens: usize) -> Result<(), ModelError> {
        self.grow(seq, n_tokens, n_tokens)
    }

    /// Ensures `seq`'s range holds at least `needed` cells, preferring
    /// `wanted`; grows in place or moves. Fails without changes when no free
    /// stretch is large enough.
    fn grow(&mut self, seq: SeqId, needed: usize, wanted: usize) -> Result<(), ModelError> {
        let current = self.seqs.get(&seq).copied();
        let cap = current.map_or(0, |r| r.cap);
        if needed <= cap {
            return Ok(());
        }
        let full = || ModelError::CacheFull {
            needed,
            free: self.n_free() + cap,
            size: self.size(),
        };
        let needed_pages = needed.div_ceil(PAGE);
        let wanted_pages = wanted.max(needed).div_ceil(PAGE);
        if let Some(r) = current {
            // In place: the pages right after the range.
            let (first, end) = (r.start / PAGE, (r.start + r.cap) / PAGE);
            let free_after = self.pages[end..].iter().take_while(|o| o.is_none()).count();
            if end - first + free_after >= needed_pages {
                let n = (wanted_pages - (end - first))
                    .min(free_after)
                    .max(needed_pages - (end - first));
                self.pages[end..end + n].fill(Some(seq));
                self.seqs.insert(
                    seq,
                    Range {
                        cap: r.cap + n * PAGE,
                        ..r
                    },
                );
                return Ok(());
            }
        }
        // Elsewhere: the first free stretch that fits (as wanted, else as needed).
        let own = |p: usize| {
            current.is_some_and(|r| (r.start / PAGE..(r.start + r.cap) / PAGE).contains(&p))
        };
        let first = self
            .free_stretch(wanted_pages, &own)
            .map(|p| (p, wanted_pages))
            .or_else(|| {
                self.free_stretch(needed_pages, &own)
                    .map(|p| (p, needed_pages))
            });
        let Some((page, n_pages)) = first else {
            return Err(full());
        };
        let start = page * PAGE;
        if let Some(r) = current {
            self.move_cells(r.start, start, r.len)?;
            self.positions.copy_within(r.start..r.start + r.len, start);
            self.pages[r.start / PAGE..(r.start + r.cap) / PAGE].fill(None);
        }
        self.pages[page..page + n_pages].fill(Some(seq));
        let len = current.map_or(0, |r| r.len);
        self.seqs.insert(
            seq,
            Range {
                start,
                cap: n_pages * PAGE,
                len,
            },
        );
        Ok(())
    }

    /// First page of `n` consecutive pages that are free (or `own`, which
    /// the caller is about to release).
    fn free_stretch(&self, n: usize, own: &dyn Fn(usize) -> bool) -> Option<usize> {
        let mut run = 0;
        for (p, owner) in self.pages.iter().enumerate() {
            run = if owner.is_none() || own(p) {
                run + 1
            } else {
                0
            };
            if run == n {
                return Some(p + 1 - n);
            }
        }
        None
    }

    /// Copies the K and V of cells `from .. from + len` to `to .. to + len`
    /// in every layer (through a host buffer: moves are rare).
    fn move_cells(&self, from: usize, to: usize, len: usize) -> Result<(), ModelError> {
        if len == 0 {
            return Ok(());
        }
        let f16 = 2;
        let row = self.n_embd_kv * f16;
        let mut buf = vec![0u8; len * row];
        for (&k, &v) in self.k.iter().zip(&self.v) {
            let k = self.set.get(k);
            k.read_at(from * row, &mut buf)?;
            k.write_at(to * row, &buf)?;
            let v = self.set.get(v);
            let line = self.size() * f16;
            let seg = &mut buf[..len * f16];
            for e in 0..self.n_embd_kv {
                v.read_at(e * line + from * f16, seg)?;
                v.write_at(e * line + to * f16, seg)?;
            }
        }
        Ok(())
    }

    /// Bytes that [`KvCache::export`] gives for `len` cells.
    pub fn bytes_per_cells(&self, len: usize) -> usize {
        2 * self.k.len() * len * self.n_embd_kv * 2
    }

    /// The K and V of cells `from .. from + len` of `seq` (every layer), as
    /// bytes that [`KvCache::import`] takes back.
    pub fn export(&self, seq: SeqId, from: usize, len: usize) -> Result<Vec<u8>, ModelError> {
        let mut out = vec![0u8; self.bytes_per_cells(len)];
        self.export_blocks(seq, from, len, &mut [&mut out])?;
        Ok(out)
    }

    /// Fills each of `blocks` (of [`KvCache::bytes_per_cells`]`(len)`
    /// bytes) with the next `len` cells of `seq` from cell `from` on, as
    /// [`KvCache::export`] gives them, in one pass (one read per layer and
    /// row).
    pub fn export_blocks(
        &self,
        seq: SeqId,
        from: usize,
        len: usize,
        blocks: &mut [&mut [u8]],
    ) -> Result<(), ModelError> {
        let r = self.seqs.get(&seq).copied().unwrap_or(Range {
            start: 0,
            cap: 0,
            len: 0,
        });
        let total = blocks.len() * len;
        assert!(
            from + total <= r.len,
            "cells {from}..{} of a sequence of {}",
            from + total,
            r.len
        );
        let per_block = self.bytes_per_cells(len);
        assert!(blocks.iter().all(|b| b.len() == per_block), "block buffers");
        let f16 = 2;
        let row = self.n_embd_kv * f16;
        let line = self.size() * f16;
        let cell = r.start + from;
        let layer_bytes = 2 * len * row;
        let mut k_all = vec![0u8; total * row];
        let mut v_line = vec![0u8; total * f16];
        for (layer, (&k, &v)) in self.k.iter().zip(&self.v).enumerate() {
            // Each block holds, per layer, its K rows then its V by element.
            let first = layer * layer_bytes;
            self.set.get(k).read_at(cell * row, &mut k_all)?;
            for (src, block) in k_all.chunks_exact(len * row).zip(blocks.iter_mut()) {
                block[first..first + len * row].copy_from_slice(src);
            }
            let v = self.set.get(v);
            let seg = len * f16;
            for e in 0..self.n_embd_kv {
                v.read_at(e * line + cell * f16, &mut v_line)?;
                for (src, block) in v_line.chunks_exact(seg).zip(blocks.iter_mut()) {
                    let at = first + len * row + e * seg;
                    block[at..at + seg].copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// Appends the cells of `parts` (each from [`KvCache::export`] of
    /// `len` cells) to `seq`'s range, as the tokens at the next positions;
    /// the range must have room (see [`KvCache::reserve`]).
    pub fn import(&mut self, seq: SeqId, parts: &[&[u8]], len: usize) -> Result<(), ModelError> {
        let per_part = self.bytes_per_cells(len);
        assert!(parts.iter().all(|p| p.len() == per_part), "exported cells");
        let r = *self.seqs.get(&seq).expect("reserved");
        let total = parts.len() * len;
        assert!(r.len + total <= r.cap, "no room reserved");
        let f16 = 2;
        let row = self.n_embd_kv * f16;
        let line = self.size() * f16;
        let cell = r.start + r.len;
        let layer_bytes = 2 * len * row;
        let mut k_all = vec![0u8; total * row];
        let mut v_line = vec![0u8; total * f16];
        for (layer, (&k, &v)) in self.k.iter().zip(&self.v).enumerate() {
            // Each part holds, per layer, its K rows then its V by element.
            let first = layer * layer_bytes;
            for (dst, part) in k_all.chunks_exact_mut(len * row).zip(parts) {
                dst.copy_from_slice(&part[first..first + len * row]);
            }
            self.set.get(k).write_at(cell * row, &k_all)?;
            let v = self.set.get(v);
            for e in 0..self.n_embd_kv {
                let seg = len * f16;
                for (dst, part) in v_line.chunks_exact_mut(seg).zip(parts) {
                    let at = first + len * row + e * seg;
                    dst.copy_from_slice(&part[at..at + seg]);
                }
                v.write_at(e * line + cell * f16, &v_line)?;
            }
        }
        for i in 0..total {
            self.positions[cell + i] = (r.len + i) as i32;
        }
        self.seqs.get_mut(&seq).expect("reserved").len += total;
        Ok(())
    }

    /// Claims one cell per token of `batch` (whose tokens are grouped by
    /// sequence), appending to each sequence's range; returns the cell of
    /// each token and the attention groups. A failure leaves every
    /// sequence's tokens as they were.
    pub(super) fn place(&mut self, batch: &Batch) -> Result<(Vec<i64>, Vec<SeqGroup>), ModelError> {
        let mut groups: Vec<SeqGroup> = Vec::new();
        for (i, &seq) in batch.seqs.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if g.seq == seq => g.n_tokens += 1,
                _ => groups.push(SeqGroup {
                    seq,
                    first_token: i,
                    n_tokens: 1,
                    start: 0,
                    n_kv: 0,
                }),
            }
        }
        let mut new_seqs = Vec::new();
        for g in &groups {
            let len = self.seq_len(g.seq);
            if !self.seqs.contains_key(&g.seq) {
                new_seqs.push(g.seq);
            }
            // Grow by doubling so that a growing sequence moves rarely.
            if let Err(e) = self.grow(g.seq, len + g.n_tokens, (len + g.n_tokens).max(2 * len)) {
                new_seqs.iter().for_each(|&s| self.remove_seq(s));
                return Err(e);
            }
        }
        let mut cells = Vec::with_capacity(batch.len());
        for g in &mut groups {
            let r = self.seqs.get_mut(&g.seq).expect("grown above");
            for t in g.first_token..g.first_token + g.n_tokens {
                let cell = r.start + r.len;
                self.positions[cell] = batch.positions[t];
                r.len += 1;
                cells.push(cell as i64);
            }
            g.start = r.start;
            g.n_kv = r.len.next_multiple_of(PAGE);
        }
        Ok((cells, groups))
    }

    /// Undoes `place` (after a failed decode).
    pub(super) fn unplace(&mut self, groups: &[SeqGroup]) {
        for g in groups {
            let Some(r) = self.seqs.get_mut(&g.seq) else {
                continue;
            };
            r.len = r.len.saturating_sub(g.n_tokens);
            if r.len == 0 {
                self.remove_seq(g.seq);
            }
        }
    }

    /// The causal mask of one group, `[n_tokens][n_kv]`: a token sees the
    /// cells of its sequence at positions up to its own, and with a
    /// `window`, only the last `window` of them (llama.cpp's standard
    /// sliding window: a cell `window` or more positions back is masked).
    pub(super) fn mask(&self, batch: &Batch, g: &SeqGroup, window: Option<usize>) -> Vec<f32> {
        let len = self.seq_len(g.seq);
        let cells = &self.positions[g.start..g.start + len];
        let mut mask = vec![f32::NEG_INFINITY; g.n_kv * g.n_tokens];
        for (row, &pos) in mask
            .chunks_exact_mut(g.n_kv)
            .zip(&batch.positions[g.first_token..])
        {
            let first = window.map_or(i64::MIN, |w| pos as i64 - w as i64 + 1);
            for (m, &cell_pos) in row.iter_mut().zip(cells) {
                if cell_pos <= pos && cell_pos as i64 >= first {
                    *m = 0.0;
                }
            }
        }
        mask
    }

    /// Where each element of the batch's V rows goes in the transposed V
    /// cache: element `e` of token `t` lands at `e * size + cells[t]`.
    pub(super) fn v_indices(&self, cells: &[i64]) -> Vec<i64> {
        let size = self.size() as i64;
        cells
            .iter()
            .flat_map(|&cell| (0..self.n_embd_kv as i64).map(move |e| e * size + cell))
            .collect()
    }
}
