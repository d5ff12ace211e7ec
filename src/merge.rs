//! `svfit merge`: the base GGUF with every target matrix replaced by
//! `W' = W + U diag(delta) Vt` (METHOD.md §1), all other tensors and all
//! metadata (tokenizer included) kept, so llama.cpp and every GGUF tool can
//! run an adapter — and so llama.cpp can check our adapter path.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use crate::adapter::Deltas;
use crate::factors::{self, Factor, FactorError, TargetMatrix};
use crate::ggml::gguf::{GgufError, GgufFile, GgufWriteError, GgufWriter};
use crate::ggml::{self, Type};
use crate::model::Config;

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

/// The part of a merged tensor one target is: its rows, factors and deltas.
pub(crate) type Part<'f> = (Range<usize>, &'f Factor, &'f [f32]);

/// Writes the merged model to `out`; `info` becomes extra metadata keys.
/// Returns the number of matrices replaced. A target that is rows of a
/// fused tensor (Phi-3's q of `attn_qkv`) is merged into those rows.
pub fn merge(
    model: &Path,
    factors: &[(TargetMatrix, Factor)],
    deltas: &Deltas,
    ty: MergeType,
    info: &[(String, String)],
    out: &Path,
) -> Result<usize, MergeError> {
    let gguf = GgufFile::open(model)?;
    let parts = parts_by_tensor(&gguf, factors, deltas)?;
    write_merged(
        &gguf,
        ty,
        info,
        out,
        &|name| parts.contains_key(name),
        &mut |name, w, m, n| {
            let mut replaced = 0;
            for (rows, factor, delta) in &parts[name] {
                if (factor.m, factor.n, factor.rank()) != (rows.len(), n, delta.len())
                    || rows.end > m
                {
                    return Err(format!(
                    "factors [{}, {}] of rank {} for rows {rows:?} of a [{m}, {n}] matrix with \
                     {} deltas",
                    factor.m,
                    factor.n,
                    factor.rank(),
                    delta.len()
                ));
                }
                add_low_rank(&mut w[rows.start * n..rows.end * n], factor, delta);
                replaced += 1;
            }
            Ok(replaced)
        },
    )
}

/// Writes the model with `lora` merged (`W' = W + scale · B A` for each of
/// its tensors) to `out`, as [`merge`] does; returns the matrices changed.
pub fn merge_lora(
    model: &Path,
    lora: &crate::lora::Lora,
    ty: MergeType,
    info: &[(String, String)],
    out: &Path,
) -> Result<usize, MergeError> {
    let gguf = GgufFile::open(model)?;
    let updates = &lora.updates;
    write_merged(
        &gguf,
        ty,
        info,
        out,
        &|name| updates.contains_key(name),
        &mut |name, w, m, n| {
            updates[name].add_to(w, m, n);
            Ok(1)
        },
    )
}

/// Changes the tensor `name`, a row-major `[m, n]` matrix `w`: the matrices
/// changed, or why it could not.
type Apply<'a> = dyn FnMut(&str, &mut [f32], usize, usize) -> Result<usize, String> + 'a;

/// Copies `gguf` to `out`, each tensor that `adapted` names dequantized,
/// changed by `apply` (which returns the matrices it changed, or why it
/// could not) and stored as `ty`.
fn write_merged(
    gguf: &GgufFile,
    ty: MergeType,
    info: &[(String, String)],
    out: &Path,
    adapted: &dyn Fn(&str) -> bool,
    apply: &mut Apply,
) -> Result<usize, MergeError> {
    let mut writer = GgufWriter::new(gguf.tensors().len())?;
    writer.copy_metadata_from(gguf);
    for (key, value) in info {
        writer.set_str(key, value)?;
    }
    let mut replaced = 0;
    for tensor in gguf.tensors() {
        let shape = tensor.shape();
        if !adapted(&tensor.name) {
            writer.add_tensor(
                &tensor.name,
                tensor.ty,
                shape,
                gguf.read_tensor_bytes(tensor)?,
            )?;
            continue;
        }
        let bad = |reason: String| MergeError::Matrix {
            name: tensor.name.clone(),
            reason,
        };
        let (mut w, m, n) = factors::read_matrix(gguf, &tensor.name)?;
        replaced += apply(&tensor.name, &mut w, m, n).map_err(bad)?;
        let out_type = match ty {
            MergeType::F16 => Type::F16,
            MergeType::F32 => Type::F32,
            MergeType::Keep => tensor.ty,
        };
        let bytes = ggml::quantize(out_type, &w, n)
            .ok_or_else(|| bad(format!("cannot store it as {out_type}")))?;
        writer.add_tensor(&tensor.name, out_type, shape, bytes)?;
    }
    writer.write(out)?;
    Ok(replaced)
}

/// Each adapted tensor's parts, by tensor name: every delta's target with
/// its factors, where the model stores it (the config says, per family).
pub(crate) fn parts_by_tensor<'f>(
    gguf: &GgufFile,
    factors: &'f [(TargetMatrix, Factor)],
    deltas: &'f Deltas,
) -> Result<HashMap<String, Vec<Part<'f>>>, MergeError> {
    let config = Config::from_gguf(gguf).map_err(FactorError::from)?;
    let mut parts: HashMap<String, Vec<Part<'f>>> = HashMap::new();
    for (prefix, delta) in deltas {
        let bad = |reason: &str| MergeError::Matrix {
            name: format!("{prefix}.weight"),
            reason: reason.into(),
        };
        let (t, factor) = factors
            .iter()
            .find(|(t, _)| t.prefix() == *prefix)
            .ok_or_else(|| bad("no factors for this matrix"))?;
        let slice = t.slice(&config)?;
        let name = slice.tensor_name(t.layer);
        if t.layer >= config.n_layer || gguf.tensor(&name).is_none() {
            return Err(bad("the adapter names a matrix the model does not have"));
        }
        parts
            .entry(name)
            .or_default()
            .push((slice.rows, factor, delta));
    }
    Ok(parts)
}

/// `w += U diag(delta) Vt` for the row-major `[m, n]` matrix `w`.
fn add_low_rank(w: &mut [f32], f: &Factor, delta: &[f32]) {
    let r = f.rank();
    add_product(w, (f.m, f.n, r), |i, j| f.u[i * r + j] * delta[j], &f.vt);
}

/// `w += B A` for the row-major `[m, n]` matrix `w`, `B` `[m, r]` given by
/// `b(i, j)` and `A` `[r, n]` row-major (`(m, n, r)` = `shape`).
pub(crate) fn add_product(
    w: &mut [f32],
    (m, n, r): (usize, usize, usize),
    b: impl Fn(usize, usize) -> f32,
    a: &[f32],
) {
    let b = faer::Mat::<f32>::from_fn(m, r, b);
    let a = faer::Mat::<f32>::from_fn(r, n, |i, j| a[i * n + j]);
    let product = &b * &a;
    for i in 0..m {
        for j in 0..n {
            w[i * n + j] += product[(i, j)];
        }
    }
}
