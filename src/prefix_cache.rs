//! The prefix cache: the KV cells of prompts already seen, so that a
//! request whose prompt starts like an earlier one (a product's system
//! prompt, the previous turns of a chat) prefills only the rest.
//!
//! Cells are kept in blocks of [`BLOCK`] tokens, in host memory, under a
//! key that chains everything the cells depend on: the adapter the
//! sequence ran with (its engine key: tenant, id, version and content
//! hash, or the mix of such; or the base) and every token from the start of
//! the prompt to the end of the block (`key_n = sha256(key_{n-1}, tokens of
//! block n)`). A block is reused only under an identical key, so never
//! across adapters, versions, mixes or tenants. (Nothing of a layer's K or
//! V beyond the first can be shared between adapters, whatever the
//! targets: every layer's input carries the adapted layers below it.)
//!
//! A hit copies the blocks into the new sequence's own cell range, at the
//! same offsets from the range's page-aligned start as a cold prefill
//! writes them (all blocks in one write per layer and row); with batch invariance (ARCHITECTURE.md) the logits that
//! follow are bit-identical to a cold prefill's.
//!
//! The cache holds at most `budget` bytes; the least recently used blocks
//! go first, the deepest of a chain before its parents (a lookup or insert
//! touches a chain from its end back to its root), so what remains is
//! always reachable.

use lru::LruCache;
use sha2::{Digest, Sha256};

/// Tokens per block: small, so that little of a shared prompt is left to
/// prefill. (Any size keeps the cells at the offsets a cold prefill gives
/// them: a sequence's range starts on a page, and blocks fill it in order.)
pub const BLOCK: usize = 16;

/// A block's key: the hash of its adapter and every token up to its end.
pub type BlockKey = [u8; 32];

/// Counters of the prefix cache (read by metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct PrefixStats {
    /// Prompts looked up, and those that reused at least one block.
    pub lookups: u64,
    pub hits: u64,
    /// Prompt tokens taken from the cache instead of prefilled.
    pub cached_tokens: u64,
    pub inserted_blocks: u64,
    pub evicted_blocks: u64,
    pub blocks: usize,
    pub bytes: usize,
}

pub struct PrefixCache {
    budget: usize,
    blocks: LruCache<BlockKey, Vec<u8>>,
    /// Buffers of evicted blocks, reused for new ones (a full cache then
    /// allocates nothing).
    spare: Vec<Vec<u8>>,
    stats: PrefixStats,
}

/// Spare buffers kept at most.
const MAX_SPARE: usize = 64;

/// The keys of the whole blocks of `tokens` run with `adapter` (its engine
/// key, or "" for the base), in order.
pub fn block_keys(adapter: &str, tokens: &[u32]) -> Vec<BlockKey> {
    let mut key: BlockKey = Sha256::new()
        .chain_update(b"svfit prefix v1\0")
        .chain_update((adapter.len() as u64).to_le_bytes())
        .chain_update(adapter.as_bytes())
        .finalize()
        .into();
    tokens
        .chunks_exact(BLOCK)
        .map(|block| {
            let mut h = Sha256::new().chain_update(key);
            for t in block {
                h.update(t.to_le_bytes());
            }
            key = h.finalize().into();
            key
        })
        .collect()
}

impl PrefixCache {
    /// A cache of at most `budget` bytes (0: it keeps nothing).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            blocks: LruCache::unbounded(),
            spare: Vec::new(),
            stats: PrefixStats::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            blocks: self.blocks.len(),
            ..self.stats
        }
    }

    /// The cached blocks that start `keys` (the longest run), touched.
    pub fn lookup(&mut self, keys: &[BlockKey]) -> Vec<&[u8]> {
        self.stats.lookups += 1;
        let n = keys.iter().take_while(|k| self.blocks.contains(*k)).count();
        if n == 0 {
            return Vec::new();
        }
        self.stats.hits += 1;
        self.stats.cached_tokens += (n * BLOCK) as u64;
        for k in keys[..n].iter().rev() {
            self.blocks.promote(k);
        }
        keys[..n]
            .iter()
            .map(|k| self.blocks.peek(k).expect("present").as_slice())
            .collect()
    }

    /// How many of `keys`, from the first, are cached already.
    #[cfg(test)]
    pub fn cached(&self, keys: &[BlockKey]) -> usize {
        keys.iter().take_while(|k| self.blocks.contains(*k)).count()
    }

    /// A buffer of `bytes` for a block's cells, to be overwritten whole
    /// (a spare one when there is).
    pub fn buffer(&mut self, bytes: usize) -> Vec<u8> {
        match self.spare.pop() {
            Some(b) if b.len() == bytes => b,
            _ => vec![0u8; bytes],
        }
    }

    /// Adds the blocks `keys[from..]` with their cells (`blocks`, in the
    /// same order), then evicts down to the budget. Blocks it has already,
    /// or larger than the whole budget, are not kept.
    pub fn insert(&mut self, keys: &[BlockKey], from: usize, blocks: Vec<Vec<u8>>) {
        for (key, bytes) in keys.iter().skip(from).zip(blocks) {
            if !self.enabled() || self.blocks.contains(key) || bytes.len() > self.budget {
                self.recycle(bytes);
                continue;
            }
            self.stats.bytes += bytes.len();
            self.stats.inserted_blocks += 1;
            self.blocks.put(*key, bytes);
        }
        for k in keys.iter().rev() {
            self.blocks.promote(k);
        }
        while self.stats.bytes > self.budget {
            let Some((_, bytes)) = self.blocks.pop_lru() else {
                break;
            };
            self.stats.bytes -= bytes.len();
            self.stats.evicted_blocks += 1;
            self.recycle(bytes);
        }
    }

    fn recycle(&mut self, bytes: Vec<u8>) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|t| t * 7 + salt).collect()
    }

    fn fill(cache: &mut PrefixCache, keys: &[BlockKey], bytes: usize) {
        let blocks = (0..keys.len()).map(|i| vec![i as u8; bytes]).collect();
        cache.insert(keys, 0, blocks);
    }

    #[test]
    fn keys_chain_the_adapter_and_every_earlier_token() {
        let a = block_keys("alice/a@1#x", &tokens(3 * BLOCK + 5, 0));
        assert_eq!(a.len(), 3, "whole blocks only");
        assert_eq!(a, block_keys("alice/a@1#x", &tokens(3 * BLOCK, 0)));
        assert_ne!(a[0], block_keys("", &tokens(BLOCK, 0))[0], "base");
        assert_ne!(a[0], block_keys("alice/a@2#y", &tokens(BLOCK, 0))[0]);
        let mut changed = tokens(3 * BLOCK, 0);
        changed[3] += 1;
        let b = block_keys("alice/a@1#x", &changed);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "a change reaches every later block"
        );
    }

    #[test]
    fn lookups_take_the_longest_cached_run() {
        let mut cache = PrefixCache::new(1 << 20);
        let keys = block_keys("", &tokens(4 * BLOCK, 0));
        fill(&mut cache, &keys[..2], 10);
        assert_eq!(cache.lookup(&keys).len(), 2);
        assert_eq!(
            cache.lookup(&block_keys("x", &tokens(4 * BLOCK, 0))).len(),
            0
        );
        let s = cache.stats();
        assert_eq!(
            (s.lookups, s.hits, s.cached_tokens),
            (2, 1, 2 * BLOCK as u64)
        );
    }

    #[test]
    fn the_budget_holds_and_chains_lose_their_ends_first() {
        let mut cache = PrefixCache::new(100);
        let old = block_keys("", &tokens(4 * BLOCK, 0));
        fill(&mut cache, &old, 20);
        let new = block_keys("", &tokens(3 * BLOCK, 1));
        fill(&mut cache, &new, 20);
        let s = cache.stats();
        assert!(s.bytes <= 100, "{s:?}");
        assert_eq!(s.evicted_blocks, 2);
        // The old chain lost its last two blocks; its start still serves.
        assert_eq!(cache.cached(&old), 2);
        assert_eq!(cache.cached(&new), 3);
        let mut tiny = PrefixCache::new(5);
        fill(&mut tiny, &new, 20);
        assert_eq!(tiny.stats().bytes, 0);
        let mut off = PrefixCache::new(0);
        fill(&mut off, &new, 1);
        assert_eq!(off.stats().blocks, 0);
    }
}
