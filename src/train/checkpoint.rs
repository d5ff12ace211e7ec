//! A training checkpoint (`A.ckpt`): the trained shifts and the optimiser's
//! moments as f32 tensors, and what the run was (`CheckpointInfo`, JSON in
//! the safetensors metadata), so that `--resume` continues exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::session::{io, SessionError};
use super::{Hyper, State};
use crate::tensorfile::{self, Entry};

pub(super) const CHECKPOINT_FORMAT: &str = "svfit-checkpoint/1";

/// What a checkpoint stores besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub format: String,
    pub base_sha256: String,
    pub factors_id: String,
    pub targets: String,
    pub rank_policy: String,
    pub data: PathBuf,
    pub data_sha256: String,
    pub eval: Option<PathBuf>,
    pub eval_sha256: Option<String>,
    pub eval_split: f64,
    pub strict: bool,
    pub out: PathBuf,
    pub hyper: Hyper,
    pub step: u64,
    pub epoch: usize,
    pub next_batch: usize,
    pub adam_t: u64,
}

/// A checkpoint: its information and the state.
pub struct Checkpoint {
    pub info: CheckpointInfo,
    pub state: State,
}

impl Checkpoint {
    pub fn write(&self, path: &Path) -> Result<(), SessionError> {
        let n = self.state.shift.len();
        let entries = [
            Entry::f32("shift".into(), vec![n], &self.state.shift),
            Entry::f32("adam.m".into(), vec![n], &self.state.adam.m),
            Entry::f32("adam.v".into(), vec![n], &self.state.adam.v),
        ];
        let json = serde_json::to_string(&self.info).map_err(|e| SessionError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let meta = HashMap::from([("svfit.checkpoint".to_string(), json)]);
        tensorfile::write(path, &entries, meta).map_err(|e| SessionError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    pub fn read(path: &Path) -> Result<Self, SessionError> {
        let bad = |reason: String| SessionError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(io(path))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("svfit.checkpoint"))
            .ok_or_else(|| bad("not a checkpoint: no svfit.checkpoint metadata".into()))?;
        let info: CheckpointInfo =
            serde_json::from_str(json).map_err(|e| bad(format!("bad checkpoint metadata: {e}")))?;
        if info.format != CHECKPOINT_FORMAT {
            return Err(bad(format!(
                "checkpoint format '{}', expected '{CHECKPOINT_FORMAT}'",
                info.format
            )));
        }
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let vector = |name: &str| -> Result<Vec<f32>, SessionError> {
            let t = tensors
                .tensor(name)
                .map_err(|_| bad(format!("tensor '{name}' is missing")))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!(
                    "tensor '{name}' is {:?}, expected F32",
                    t.dtype()
                )));
            }
            let v = tensorfile::f32s(t.data());
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("tensor '{name}' holds non-finite values")));
            }
            Ok(v)
        };
        let shift = vector("shift")?;
        let (m, v) = (vector("adam.m")?, vector("adam.v")?);
        if m.len() != shift.len() || v.len() != shift.len() {
            return Err(bad("tensors of different lengths".into()));
        }
        let mut adam = AdamW::new(shift.len(), info.hyper.weight_decay);
        adam.m = m;
        adam.v = v;
        adam.t = info.adam_t;
        let state = State {
            shift,
            adam,
            step: info.step,
            epoch: info.epoch,
            next_batch: info.next_batch,
        };
        Ok(Checkpoint { info, state })
    }
}
