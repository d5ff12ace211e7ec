//! The batched SVFit branch (METHOD.md §4). Every target matrix `W` keeps
//! its SVD factors `U`, `Vt` on the backend, shared by all adapters, and a
//! delta table `D` with one column per adapter slot; slot 0 is the base
//! model and stays all zeros. A token of a sequence on slot `j` gets
//!
//! ```text
//! y = W x + U (D[:, j] ⊙ (Vt x))
//! ```
//!
//! so one batch mixes any adapters at the cost of two dense products per
//! target matrix and a row gather.
//!
//! `U` and `Vt` are held as q8_0 by default (half the bytes of f16: decoding
//! is bound by the bytes read per token). ggml quantizes rows in blocks of
//! 32, so the rank is padded to a multiple of 32 with zero columns of `U`,
//! zero rows of `Vt` and zero deltas: the padding adds exact zeros.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::factors::{Factor, Shape, TargetMatrix, KINDS};
use crate::ggml::kernel::Matrix;
use crate::ggml::{self, Backend, Context, Tensor, TensorId, TensorSet, Type};

use super::{Config, ModelError};

/// An adapter slot; slot 0 is the base model (all deltas zero).
pub type Slot = u32;

/// Rank padding: ggml's quantization block.
const BLOCK: usize = 32;

/// One target matrix's tensors.
struct Target {
    u: TensorId,
    vt: TensorId,
    d: TensorId,
    rank: usize,
    padded: usize,
}

/// The tensors of one target matrix for a graph.
#[derive(Clone, Copy)]
pub(super) struct TargetTensors<'a> {
    /// `[padded, m]`
    pub u: Matrix<'a>,
    /// `[n, padded]`
    pub vt: Matrix<'a>,
    /// `[padded, n_slots]` f32
    pub d: Tensor<'a>,
}

/// The factors of every target matrix and the slot tables, on one backend.
pub struct Branch {
    set: TensorSet,
    /// Indexed by layer, then by the kind's position in [`KINDS`].
    targets: Vec<[Option<Target>; KINDS.len()]>,
    by_prefix: HashMap<String, (usize, usize)>,
    n_slots: usize,
    /// Whether the batched kernels compute the factors' products.
    batched: bool,
}

fn kind_index(kind: &str) -> Option<usize> {
    KINDS.iter().position(|k| k.1 == kind)
}

impl Branch {
    /// Places the factors of the matrices `shapes` (checked against the
    /// model's shapes) on `backend` with `n_slots` slots (at least 2: the
    /// base and one adapter), reading one matrix at a time with `load`
    /// (matrix `i` of `shapes`). U and Vt are stored as `factor_type`
    /// (q8_0, f16 or f32); a Vt whose width is not a multiple of 32 stays
    /// f16 when q8_0 is asked for. With `batched` (the batched kernels run
    /// on `backend`), q8_0 factors go through them.
    pub(super) fn new<'f>(
        config: &Config,
        shapes: &[Shape],
        load: &mut dyn FnMut(usize) -> Result<Cow<'f, Factor>, ModelError>,
        n_slots: usize,
        factor_type: Type,
        backend: &Backend,
        batched: bool,
    ) -> Result<Self, ModelError> {
        if ![Type::Q8_0, Type::F16, Type::F32].contains(&factor_type) {
            return Err(ModelError::Factors(format!(
                "factor type {factor_type} is not one of q8_0, f16, f32"
            )));
        }
        let n_slots = n_slots.max(2);
        let ctx = Context::new(3 * shapes.len().max(1), 0)?;
        let mut layout = Vec::with_capacity(shapes.len());
        for shape in shapes {
            let (t, m, n) = (&shape.target, shape.m, shape.n);
            check_shape(config, t, m, n)?;
            let padded = shape.rank.next_multiple_of(BLOCK);
            let vt_type = storage_type(factor_type, n);
            let p = t.prefix();
            ctx.new_tensor(factor_type, &[padded as i64, m as i64])
                .set_name(&format!("{p}.U"));
            ctx.new_tensor(vt_type, &[n as i64, padded as i64])
                .set_name(&format!("{p}.Vt"));
            ctx.new_tensor(Type::F32, &[padded as i64, n_slots as i64])
                .set_name(&format!("{p}.D"));
            layout.push((padded, vt_type));
        }
        let set = TensorSet::allocate(ctx, backend)?;
        set.buffer().clear(0);

        let mut targets: Vec<[Option<Target>; KINDS.len()]> =
            (0..config.n_layer).map(|_| Default::default()).collect();
        let mut by_prefix = HashMap::new();
        for (i, (shape, (padded, vt_type))) in shapes.iter().zip(layout).enumerate() {
            let t = &shape.target;
            let f = load(i)?;
            check_factor(config, t, &f)?;
            if f.rank() != shape.rank {
                return Err(ModelError::Factors(format!(
                    "{}: a factor of rank {}, expected {}",
                    t.prefix(),
                    f.rank(),
                    shape.rank
                )));
            }
            let p = t.prefix();
            let id = |suffix: &str| set.find(&format!("{p}.{suffix}")).expect("created above");
            let (r, m, n) = (f.rank(), f.m, f.n);
            let mut u = vec![0f32; padded * m];
            for i in 0..m {
                u[i * padded..i * padded + r].copy_from_slice(&f.u[i * r..(i + 1) * r]);
            }
            let mut vt = Vec::with_capacity(padded * n);
            vt.extend_from_slice(&f.vt);
            vt.resize(padded * n, 0.0);
            let encode = |ty: Type, values: &[f32], row: usize| {
                ggml::quantize(ty, values, row).ok_or_else(|| {
                    ModelError::Factors(format!("{p}: cannot store the factors as {ty}"))
                })
            };
            let (u_id, vt_id) = (id("U"), id("Vt"));
            set.get(u_id).write(&encode(factor_type, &u, padded)?)?;
            set.get(vt_id).write(&encode(vt_type, &vt, n)?)?;
            let target = Target {
                u: u_id,
                vt: vt_id,
                d: id("D"),
                rank: r,
                padded,
            };
            let kind = kind_index(t.kind).expect("factor kinds come from KINDS");
            targets[t.layer][kind] = Some(target);
            by_prefix.insert(p, (t.layer, kind));
        }
        Ok(Branch {
            set,
            targets,
            by_prefix,
            n_slots,
            batched,
        })
    }

    /// Bytes [`Branch::new`] places on the backend for `shapes`, `n_slots`
    /// and `factor_type`.
    pub fn bytes_for(shapes: &[Shape], n_slots: usize, factor_type: Type) -> u64 {
        let size = |ty: Type, width: usize, rows: usize| {
            ty.row_size(width as i64).unwrap_or(4 * width) as u64 * rows as u64
        };
        shapes
            .iter()
            .map(|s| {
                let padded = s.rank.next_multiple_of(BLOCK);
                size(factor_type, padded, s.m)
                    + size(storage_type(factor_type, s.n), s.n, padded)
                    + size(Type::F32, padded, n_slots.max(2))
            })
            .sum()
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Bytes the factors and slot tables take on the backend.
    pub fn bytes(&self) -> usize {
        self.set.buffer().size()
    }

    /// Writes an adapter's deltas (`sigma - S` per `blk.L.kind`) into `slot`;
    /// matrices it does not name get zeros.
    pub(super) fn set_slot(
        &self,
        slot: Slot,
        deltas: &[(String, Vec<f32>)],
    ) -> Result<(), ModelError> {
        let slot = adapter_slot(slot, self.n_slots)?;
        // Check everything before writing anything.
        let mut columns = HashMap::new();
        for (prefix, delta) in deltas {
            let target = self
                .by_prefix
                .get(prefix)
                .and_then(|&(l, k)| self.targets[l][k].as_ref())
                .ok_or_else(|| {
                    ModelError::Factors(format!("{prefix}: not a target matrix of the factors"))
                })?;
            if delta.len() != target.rank {
                return Err(ModelError::Factors(format!(
                    "{prefix}: {} deltas for a factor of rank {}",
                    delta.len(),
                    target.rank
                )));
            }
            if let Some(v) = delta.iter().find(|v| !v.is_finite()) {
                return Err(ModelError::Factors(format!(
                    "{prefix}: delta {v} is not finite"
                )));
            }
            columns.insert(prefix.as_str(), delta);
        }
        for (prefix, &(l, k)) in &self.by_prefix {
            let target = self.targets[l][k].as_ref().expect("indexed above");
            let mut column = vec![0f32; target.padded];
            if let Some(delta) = columns.get(prefix.as_str()) {
                column[..target.rank].copy_from_slice(delta);
            }
            let bytes: Vec<u8> = column.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.set
                .get(target.d)
                .write_at(slot * target.padded * 4, &bytes)?;
        }
        Ok(())
    }

    /// The tensors of the target `kind` ("attn_q", ...) of layer `layer`.
    pub(super) fn target(&self, layer: usize, kind: &str) -> Option<TargetTensors<'_>> {
        let t = self.targets.get(layer)?[kind_index(kind)?].as_ref()?;
        Some(TargetTensors {
            u: Matrix {
                tensor: self.set.get(t.u),
                batched: self.batched,
            },
            vt: Matrix {
                tensor: self.set.get(t.vt),
                batched: self.batched,
            },
            d: self.set.get(t.d),
        })
    }
}

/// `slot` as an index, when it is an adapter slot (1 to `n_slots` - 1) of
/// a table of `n_slots`.
pub(super) fn adapter_slot(slot: Slot, n_slots: usize) -> Result<usize, ModelError> {
    if slot == 0 || slot as usize >= n_slots {
        return Err(ModelError::Slot { slot, n_slots });
    }
    Ok(slot as usize)
}

/// `Vt` rows are `n` wide: q8_0 needs whole blocks.
fn storage_type(factor_type: Type, n: usize) -> Type {
    if factor_type == Type::Q8_0 && !n.is_multiple_of(BLOCK) {
        Type::F16
    } else {
        factor_type
    }
}

/// Checks that `f` factors the model's matrix `t`; returns its `[m, n]`.
pub(super) fn check_factor(
    config: &Config,
    t: &TargetMatrix,
    f: &Factor,
) -> Result<(usize, usize), ModelError> {
    check_shape(config, t, f.m, f.n)?;
    if f.u.len() != f.m * f.rank() || f.vt.len() != f.rank() * f.n {
        return Err(ModelError::Factors(format!(
            "{}: U and Vt do not hold [{}, r] and [r, {}] values",
            t.prefix(),
            f.m,
            f.n
        )));
    }
    Ok((f.m, f.n))
}

/// Checks that the model's matrix `t` is `[m, n]`.
fn check_shape(config: &Config, t: &TargetMatrix, m: usize, n: usize) -> Result<(), ModelError> {
    let (want_m, want_n) = expected_shape(config, t)?;
    if (m, n) != (want_m, want_n) {
        return Err(ModelError::Factors(format!(
            "{}: factors of a [{m}, {n}] matrix, the model's is [{want_m}, {want_n}]",
            t.prefix(),
        )));
    }
    Ok(())
}

/// `[m, n]` (out, in features) of a target matrix of this model.
pub(super) fn expected_shape(c: &Config, t: &TargetMatrix) -> Result<(usize, usize), ModelError> {
    let (embd, ff, q, kv) = (c.n_embd, c.n_ff, c.n_head * c.head_dim, c.n_embd_kv());
    let shape = match t.kind {
        "attn_q" => (q, embd),
        "attn_k" | "attn_v" => (kv, embd),
        "attn_output" => (embd, q),
        "ffn_gate" | "ffn_up" => (ff, embd),
        "ffn_down" => (embd, ff),
        other => {
            return Err(ModelError::Factors(format!(
                "unknown target kind '{other}'"
            )))
        }
    };
    if t.layer >= c.n_layer {
        return Err(ModelError::Factors(format!(
            "{}: the model has {} layers",
            t.prefix(),
            c.n_layer
        )));
    }
    Ok(shape)
}
