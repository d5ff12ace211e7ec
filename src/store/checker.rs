//! The checks of adapter files against what is served (the factors, the
//! LoRA tables), and what the engine gets of a checked file.

use std::path::Path;
use std::sync::Arc;

use sha2::Digest;

use super::{version_of, StoreError, Stored};
use crate::adapter::{Adapter, AdapterDeltas, Deltas};
use crate::factors::{FactorsKey, SingularValues};
use crate::lora::LoraLimits;

/// Checks adapter files against the served factors and makes what the
/// engine gets of them.
pub(super) struct Checker {
    pub(super) key: FactorsKey,
    pub(super) singular: SingularValues,
    /// What LoRAs the engine can serve (none: LoRAs are refused).
    pub(super) lora: Option<LoraLimits>,
}

impl Checker {
    /// Checks a file's bytes completely against the served factors.
    pub(super) fn validate(
        &self,
        tenant: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<Stored, StoreError> {
        let adapter = self.check(id, bytes)?;
        Ok(self.stored(tenant, id, adapter, bytes))
    }

    /// The adapter in `bytes`, if it is one for the served factors.
    pub(super) fn check(&self, id: &str, bytes: &[u8]) -> Result<Adapter, StoreError> {
        let shown = Path::new(id);
        let adapter = Adapter::parse(bytes, shown).map_err(StoreError::Invalid)?;
        // Base and factor id first: a different base is a precondition
        // failure, not a malformed file.
        adapter
            .check_base(shown, &self.key)
            .map_err(StoreError::Mismatch)?;
        if adapter.is_lora() {
            let none = LoraLimits::default();
            let limits = self.lora.as_ref().unwrap_or(&none);
            adapter
                .validate_lora(shown, &self.key.base_sha256, limits)
                .map_err(StoreError::Invalid)?;
            return Ok(adapter);
        }
        adapter
            .validate(shown, &self.key, &self.singular)
            .map_err(StoreError::Invalid)?;
        Ok(adapter)
    }

    /// What the store knows of a checked `adapter` whose file is `bytes`.
    pub(super) fn stored(
        &self,
        tenant: &str,
        id: &str,
        mut adapter: Adapter,
        bytes: &[u8],
    ) -> Stored {
        let version = version_of(&adapter).unwrap_or(1);
        let hash = hex(&sha2::Sha256::digest(bytes)[..6]);
        // The engine's copy is the only one kept.
        let lora = std::mem::take(&mut adapter.lora);
        let deltas: Deltas = if lora.is_empty() {
            adapter.deltas(&self.singular)
        } else {
            Vec::new()
        };
        Stored {
            tenant: tenant.to_string(),
            id: id.to_string(),
            version,
            bytes: bytes.len() as u64,
            deltas: Arc::new(AdapterDeltas {
                key: format!("{tenant}/{id}@v{version}-{hash}"),
                owner: Some(format!("{tenant}/{id}")),
                version,
                deltas,
                lora,
            }),
            adapter,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
