//! Adapters into slots: an adapter's SVFit deltas into an SVFit slot, its
//! LoRA into a LoRA slot (the LoRA tables placed at the first LoRA).

use std::sync::atomic::Ordering::Relaxed;

use super::Worker;
use crate::adapter::AdapterDeltas;
use crate::engine::slots::{Acquired, SlotPool};
use crate::model::{ModelError, Slot};

impl Worker {
    /// The SVFit slot (for its deltas) and the LoRA slot (for its LoRA) of
    /// `adapter`, each loaded when it was not there; `None` while a slot it
    /// needs is taken.
    pub(super) fn acquire(
        &mut self,
        adapter: &AdapterDeltas,
    ) -> Result<Option<(Slot, Slot)>, ModelError> {
        let slot = if adapter.deltas.is_empty() && !adapter.lora.is_empty() {
            0
        } else {
            match self.take_slot(false, adapter)? {
                Some(slot) => slot,
                None => return Ok(None),
            }
        };
        if adapter.lora.is_empty() {
            return Ok(Some((slot, 0)));
        }
        if self.lora_slots.is_empty() {
            self.slots.release(slot);
            return Err(ModelError::Unsupported(
                "a LoRA, and this server serves none (--lora-slots 0)".into(),
            ));
        }
        let lora_slot = self.take_slot(true, adapter);
        if !matches!(lora_slot, Ok(Some(_))) {
            self.slots.release(slot);
        }
        Ok(lora_slot?.map(|lora_slot| (slot, lora_slot)))
    }

    /// A slot of the SVFit pool (or the LoRA pool, `lora`) for `adapter`.
    fn take_slot(
        &mut self,
        lora: bool,
        adapter: &AdapterDeltas,
    ) -> Result<Option<Slot>, ModelError> {
        match self.pool(lora).acquire(adapter) {
            Acquired::Full => Ok(None),
            Acquired::Hit(slot) => {
                self.stats.slot_hits.fetch_add(1, Relaxed);
                Ok(Some(slot))
            }
            Acquired::Load { slot, evicted } => {
                if evicted {
                    self.stats.slot_evictions.fetch_add(1, Relaxed);
                }
                let loaded = if lora {
                    self.place_lora_tables()
                        .and_then(|()| self.model.set_lora(slot, &adapter.lora))
                } else {
                    self.model.set_adapter(slot, &adapter.deltas)
                };
                if let Err(e) = loaded {
                    self.pool(lora).unload(slot);
                    return Err(e);
                }
                self.stats.slot_loads.fetch_add(1, Relaxed);
                Ok(Some(slot))
            }
        }
    }

    /// The LoRA slot pool, or the SVFit one.
    fn pool(&mut self, lora: bool) -> &mut SlotPool {
        if lora {
            &mut self.lora_slots
        } else {
            &mut self.slots
        }
    }

    /// The LoRA slot tables of `config.lora`, placed at the first LoRA.
    fn place_lora_tables(&mut self) -> Result<(), ModelError> {
        if self.model.lora_branch().is_some() {
            return Ok(());
        }
        let lora = &self.config.lora;
        tracing::info!(
            slots = lora.slots,
            rank = lora.rank,
            "placing the LoRA slot tables for the first LoRA"
        );
        self.model
            .attach_lora(&lora.kinds, lora.rank, lora.slots + 1)
    }
}
