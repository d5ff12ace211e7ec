//! The batched LoRA branch: each target kind of each layer keeps two slot
//! tables on the backend, `A` `[n, R, n_slots]` and `B` `[R, m, n_slots]`
//! (f32, `R` the largest rank served), and a token of a sequence on LoRA
//! slot `j` gets
//!
//! ```text
//! y = W x + B_j (A_j x)
//! ```
//!
//! through two of ggml's `MUL_MAT_ID` products (BGMV: each token is
//! multiplied only by its own slot's matrices). Slot 0 stays all zeros
//! (no LoRA), a LoRA of rank `r < R` has zero rows beyond `r`, and a
//! LoRA's scale is folded into its `B`. The branch sits beside the SVFit
//! branch, so one batch mixes base, SVFit and LoRA tokens.

use std::collections::HashMap;

use crate::adapter::LowRank;
use crate::factors::{TargetMatrix, KINDS};
use crate::ggml::{Backend, Context, Tensor, TensorId, TensorSet, Type};
use crate::lora::LoraLimits;

use super::svfit::{adapter_slot, expected_shape, Slot};
use super::{Config, ModelError};

/// One target matrix's slot tables.
struct Tables {
    a: TensorId,
    b: TensorId,
    m: usize,
    n: usize,
}

/// The LoRA slot tables of every target matrix, on one backend.
pub struct LoraBranch {
    set: TensorSet,
    /// Indexed by layer, then by the kind's position in [`KINDS`].
    targets: Vec<[Option<Tables>; KINDS.len()]>,
    n_slots: usize,
    rank: usize,
}

impl LoraBranch {
    /// Tables for the kinds `kinds` ("attn_q", ...) of every layer, with
    /// `n_slots` slots (at least 2: none and one LoRA) of rank up to
    /// `rank`, all zeros.
    pub(super) fn new(
        config: &Config,
        kinds: &[&'static str],
        rank: usize,
        n_slots: usize,
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        let n_slots = n_slots.max(2);
        if rank == 0 {
            return Err(ModelError::Factors("a LoRA rank of 0".into()));
        }
        let shapes = shapes(config, kinds)?;
        let ctx = Context::new(2 * shapes.len().max(1), 0)?;
        for (t, m, n) in &shapes {
            let p = t.prefix();
            let (r, s) = (rank as i64, n_slots as i64);
            ctx.new_tensor(Type::F32, &[*n as i64, r, s])
                .set_name(&format!("{p}.lora_a"));
            ctx.new_tensor(Type::F32, &[r, *m as i64, s])
                .set_name(&format!("{p}.lora_b"));
        }
        let set = TensorSet::allocate(ctx, backend)?;
        set.buffer().clear(0);
        let mut targets: Vec<[Option<Tables>; KINDS.len()]> =
            (0..config.n_layer).map(|_| Default::default()).collect();
        for (t, m, n) in shapes {
            let p = t.prefix();
            let id = |suffix: &str| set.find(&format!("{p}.{suffix}")).expect("created above");
            targets[t.layer][kind_index(t.kind)] = Some(Tables {
                a: id("lora_a"),
                b: id("lora_b"),
                m,
                n,
            });
        }
        Ok(LoraBranch {
            set,
            targets,
            n_slots,
            rank,
        })
    }

    /// Bytes [`LoraBranch::new`] places on the backend.
    pub fn bytes_for(
        config: &Config,
        kinds: &[&'static str],
        rank: usize,
        n_slots: usize,
    ) -> Result<u64, ModelError> {
        let per_slot: usize = shapes(config, kinds)?
            .iter()
            .map(|(_, m, n)| rank * (m + n))
            .sum();
        Ok(4 * (per_slot * n_slots.max(2)) as u64)
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// What tables of `kinds` and `rank` for a model of `config` can hold,
    /// for checking LoRA files before the tables exist.
    pub fn limits_for(
        config: &Config,
        kinds: &[&'static str],
        rank: usize,
    ) -> Result<LoraLimits, ModelError> {
        let shapes = shapes(config, kinds)?
            .into_iter()
            .map(|(t, m, n)| (t.prefix(), (m, n)))
            .collect();
        Ok(LoraLimits {
            shapes,
            max_rank: rank,
        })
    }

    /// Writes a LoRA (per `blk.L.kind`, `ΔW = B A`) into `slot`; matrices
    /// it does not name get zeros. Everything is checked before anything
    /// is written.
    pub(super) fn set_slot(
        &self,
        slot: Slot,
        lora: &[(String, LowRank)],
    ) -> Result<(), ModelError> {
        let slot = adapter_slot(slot, self.n_slots)?;
        let mut given = HashMap::new();
        for (prefix, update) in lora {
            let tables = self.tables(prefix).ok_or_else(|| {
                ModelError::Factors(format!(
                    "{prefix}: not a LoRA target of this server (see --lora-targets)"
                ))
            })?;
            check(prefix, update, tables, self.rank)?;
            given.insert(prefix.as_str(), update);
        }
        let bytes =
            |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
        for (layer, kinds) in self.targets.iter().enumerate() {
            for (k, tables) in kinds.iter().enumerate() {
                let Some(Tables { a, b, m, n }) = tables else {
                    continue;
                };
                let (m, n, big_r) = (*m, *n, self.rank);
                let prefix = format!("blk.{layer}.{}", KINDS[k].1);
                let mut a_rows = vec![0f32; big_r * n];
                let mut b_rows = vec![0f32; m * big_r];
                if let Some(u) = given.get(prefix.as_str()) {
                    a_rows[..u.rank * n].copy_from_slice(&u.a);
                    for i in 0..m {
                        b_rows[i * big_r..i * big_r + u.rank]
                            .copy_from_slice(&u.b[i * u.rank..(i + 1) * u.rank]);
                    }
                }
                self.set
                    .get(*a)
                    .write_at(slot * big_r * n * 4, &bytes(&a_rows))?;
                self.set
                    .get(*b)
                    .write_at(slot * m * big_r * 4, &bytes(&b_rows))?;
            }
        }
        Ok(())
    }

    fn tables(&self, prefix: &str) -> Option<&Tables> {
        let rest = prefix.strip_prefix("blk.")?;
        let (layer, kind) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let k = KINDS.iter().position(|k| k.1 == kind)?;
        self.targets.get(layer)?[k].as_ref()
    }

    /// The tables `(A, B)` of the kind `kind` in layer `layer`.
    pub(super) fn target(&self, layer: usize, kind: &str) -> Option<(Tensor<'_>, Tensor<'_>)> {
        let k = KINDS.iter().position(|k| k.1 == kind)?;
        let t = self.targets.get(layer)?[k].as_ref()?;
        Some((self.set.get(t.a), self.set.get(t.b)))
    }
}

fn kind_index(kind: &str) -> usize {
    KINDS
        .iter()
        .position(|k| k.1 == kind)
        .expect("kinds are checked against KINDS")
}

/// Every target matrix of `kinds` in the model, with its `[m, n]`.
fn shapes(
    config: &Config,
    kinds: &[&'static str],
) -> Result<Vec<(TargetMatrix, usize, usize)>, ModelError> {
    let mut shapes = Vec::new();
    for &kind in kinds {
        if !KINDS.iter().any(|k| k.1 == kind) {
            return Err(ModelError::Factors(format!("unknown target kind '{kind}'")));
        }
        for layer in 0..config.n_layer {
            let t = TargetMatrix { layer, kind };
            let (m, n) = expected_shape(config, &t)?;
            shapes.push((t, m, n));
        }
    }
    Ok(shapes)
}

/// Checks one matrix's LoRA against its tables.
fn check(prefix: &str, u: &LowRank, t: &Tables, max_rank: usize) -> Result<(), ModelError> {
    let bad = |problem: String| Err(ModelError::Factors(format!("{prefix}: {problem}")));
    if u.rank == 0 || u.rank > max_rank {
        return bad(format!(
            "a LoRA of rank {}; this server holds ranks 1 to {max_rank} (--lora-rank)",
            u.rank
        ));
    }
    if u.a.len() != u.rank * t.n || u.b.len() != t.m * u.rank {
        return bad(format!(
            "A and B do not hold [{r}, {n}] and [{m}, {r}] values",
            r = u.rank,
            n = t.n,
            m = t.m
        ));
    }
    if let Some(v) = u.a.iter().chain(&u.b).find(|v| !v.is_finite()) {
        return bad(format!("a LoRA value {v} is not finite"));
    }
    Ok(())
}
