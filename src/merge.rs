//! `svfit merge`: the base GGUF with every target matrix replaced by
//! `W' = W + U diag(delta) Vt` (METHOD.md §1), all other tensors and all
//! metadata (tokenizer included) kept, so llama.cpp and every GGUF tool can
//! run an adapter — and so llama.cpp can check our adapter path.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use crate::adapter::Deltas;
use crate::factors::{self, Factor, FactorError, TargetMatrix};
use crate::ggml::gguf::{GgufError, GgufFile, GgufWriteError, GgufWriter};
use crate::ggml::{self, Type};

/// The stored type of the merged target matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeType {
    F16,
    F32,
    /// The base tensor's own type (re-quantized: small deltas may be lost).
    Keep,
}

impl FromStr for MergeType {
    type Err = MergeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f16" => Ok(MergeType::F16),
            "f32" => Ok(MergeType::F32),
            "keep" => Ok(MergeType::Keep),
            _ => Err(MergeError::Type(s.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("invalid merge type '{0}': use f16, f32 or keep")]
    Type(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Factors(#[from] FactorError),
    #[error(transparent)]
    Write(#[from] GgufWriteError),
    #[error("{name}: {reason}")]
    Matrix { name: String, reason: String },
}

/// Writes the merged model to `out`; `info` becomes extra metadata keys.
/// Returns the number of matrices replaced.
pub fn merge(
    model: &Path,
    factors: &[(TargetMatrix, Factor)],
    deltas: &Deltas,
    ty: MergeType,
    info: &[(String, String)],
    out: &Path,
) -> Result<usize, MergeError> {
    let gguf = GgufFile::open(model)?;
    let factors: HashMap<String, &Factor> = factors.iter().map(|(t, f)| (t.prefix(), f)).collect();
    let mut writer = GgufWriter::new(gguf.tensors().len())?;
    writer.copy_metadata_from(&gguf);
    for (key, value) in info {
        writer.set_str(key, value)?;
    }
    let mut replaced = 0;
    for tensor in gguf.tensors() {
        let shape = tensor.shape();
        let target = tensor.name.strip_suffix(".weight").and_then(|p| {
            let delta = deltas.iter().find(|(q, _)| q == p)?;
            Some((factors.get(p).copied(), &delta.1))
        });
        let Some((factor, delta)) = target else {
            writer.add_tensor(
                &tensor.name,
                tensor.ty,
                shape,
                gguf.read_tensor_bytes(tensor)?,
            )?;
            continue;
        };
        let bad = |reason: String| MergeError::Matrix {
            name: tensor.name.clone(),
            reason,
        };
        let factor = factor.ok_or_else(|| bad("no factors for this matrix".into()))?;
        let (mut w, m, n) = factors::read_matrix(&gguf, &tensor.name)?;
        if (factor.m, factor.n, factor.rank()) != (m, n, delta.len()) {
            return Err(bad(format!(
                "factors [{}, {}] of rank {} for a [{m}, {n}] matrix with {} deltas",
                factor.m,
                factor.n,
                factor.rank(),
                delta.len()
            )));
        }
        add_low_rank(&mut w, factor, delta);
        let out_type = match ty {
            MergeType::F16 => Type::F16,
            MergeType::F32 => Type::F32,
            MergeType::Keep => tensor.ty,
        };
        let bytes = ggml::quantize(out_type, &w, n)
            .ok_or_else(|| bad(format!("cannot store it as {out_type}")))?;
        writer.add_tensor(&tensor.name, out_type, shape, bytes)?;
        replaced += 1;
    }
    if replaced != deltas.len() {
        let missing = deltas
            .iter()
            .find(|(p, _)| gguf.tensor(&format!("{p}.weight")).is_none())
            .map_or_else(String::new, |(p, _)| p.clone());
        return Err(MergeError::Matrix {
            name: format!("{missing}.weight"),
            reason: "the adapter names a matrix the model does not have".into(),
        });
    }
    writer.write(out)?;
    Ok(replaced)
}

/// `w += U diag(delta) Vt` for the row-major `[m, n]` matrix `w`.
fn add_low_rank(w: &mut [f32], f: &Factor, delta: &[f32]) {
    let (m, n, r) = (f.m, f.n, f.rank());
    let u = faer::Mat::<f32>::from_fn(m, r, |i, j| f.u[i * r + j] * delta[j]);
    let vt = faer::Mat::<f32>::from_fn(r, n, |i, j| f.vt[i * n + j]);
    let product = &u * &vt;
    for i in 0..m {
        for j in 0..n {
            w[i * n + j] += product[(i, j)];
        }
    }
}
