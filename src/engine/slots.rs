//! The adapter slot pool: the device slots 1..=n of the model's delta
//! tables (slot 0 is the base model's). A slot is reference-counted by the
//! sequences using it, an adapter already in a slot is reused, and only an
//! unused, unprotected slot is taken for another adapter, the least
//! recently used first. Adapters are keyed by version (or mix), so a
//! replaced adapter's running sequences keep the slot of the version they
//! started with.

use std::collections::{HashMap, HashSet};

use crate::adapter::AdapterDeltas;
use crate::model::Slot;

/// What [`SlotPool::acquire`] found.
#[derive(Debug, PartialEq)]
pub(super) enum Acquired {
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
pub(super) struct SlotPool {
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
    pub(super) fn new(n: usize) -> Self {
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

    /// Whether the pool has no slot at all.
    pub(super) fn is_empty(&self) -> bool {
        self.held.len() <= 1
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
    pub(super) fn acquire(&mut self, adapter: &AdapterDeltas) -> Acquired {
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
    pub(super) fn unload(&mut self, slot: Slot) {
        let s = slot as usize;
        if let Some(old) = self.held[s].take() {
            self.by_key.remove(&old.key);
        }
        self.users[s] = 0;
    }

    pub(super) fn release(&mut self, slot: Slot) {
        let s = slot as usize;
        if s == 0 || s >= self.users.len() {
            return;
        }
        self.users[s] = self.users[s].saturating_sub(1);
        self.clock += 1;
        self.last_used[s] = self.clock;
    }

    pub(super) fn pin(&mut self, owner: &str, pinned: bool) {
        if pinned {
            self.pinned.insert(owner.to_string());
        } else {
            self.pinned.remove(owner);
        }
    }

    /// The adapter is gone: no pin, and its unused slots are free now.
    pub(super) fn forget(&mut self, owner: &str) {
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
            lora: Vec::new(),
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
            let mix = AdapterDeltas { key: "mix:x".into(), owner: None, version: 0, deltas: Vec::new(), lora: Vec::new() };
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
