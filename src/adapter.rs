//! SVFit adapters (METHOD.md §2): per target matrix a vector `sigma [r]` of
//! trained singular values, stored as safetensors. Reading checks the file
//! itself (format, dtype, finite values); [`Adapter::validate`] checks it
//! against a base model's factors (base hash, factor id, every tensor
//! present with the factor's rank). Every failure names the tensor or field
//! and the expected and actual value.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::factors::{self, FactorError, FactorsKey, SingularValues, TargetMatrix};

pub const FORMAT: &str = "adapter/1";
/// The format of a LoRA kept as an adapter (`svfit adapter import`, the
/// store): `blk.L.kind.lora_a` `[r, n]` and `.lora_b` `[m, r]` f32 pairs,
/// the scale folded into `B` (see `lora::stored`).
pub const LORA_FORMAT: &str = "lora/1";

/// Per target matrix (`blk.L.kind`), `delta = sigma - S`.
pub type Deltas = Vec<(String, Vec<f32>)>;

/// A LoRA's update of one target matrix, `ΔW = B A`, its scale folded
/// into `B`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    /// `[rank, n]`, row-major.
    pub a: Vec<f32>,
    /// `[m, rank]`, row-major.
    pub b: Vec<f32>,
    pub rank: usize,
}

/// Per target matrix (`blk.L.kind`), a LoRA's update.
pub type LowRanks = Vec<(String, LowRank)>;

/// An adapter (one version of it, or a mix) as the engine sees it: its
/// deltas, and the key its device slot and cached cells are found under.
#[derive(Debug)]
pub struct AdapterDeltas {
    /// Unique per adapter version or mix of versions.
    pub key: String,
    /// The stored adapter (`tenant/id`) this is a version of; `None` for a
    /// mix. Pins belong to the owner, not to one version.
    pub owner: Option<String>,
    /// The owner's version (0 for a mix).
    pub version: u64,
    /// The SVFit deltas (empty for a LoRA alone).
    pub deltas: Deltas,
    /// The LoRA updates (empty for an SVFit adapter alone).
    pub lora: LowRanks,
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors adapter file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: metadata '{field}' is {actual}, expected {expected}")]
    Metadata {
        path: PathBuf,
        field: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: tensor '{tensor}': {problem}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
    #[error("adapters in a mix must share their factors: {first} uses '{first_id}', {other} uses '{other_id}'")]
    MixedFactors {
        first: PathBuf,
        first_id: String,
        other: PathBuf,
        other_id: String,
    },
    #[error(transparent)]
    Factors(#[from] FactorError),
}

/// An adapter checked against a base model, with the key and singular
/// values of its factors.
pub struct Loaded {
    pub adapter: Adapter,
    pub key: FactorsKey,
    pub singular: SingularValues,
}

impl Loaded {
    /// Reads the adapter at `path` and validates it against the model at
    /// `model` (whose sha256 is `base_sha256`), computing and caching the
    /// model's factors under `home` when they are missing.
    pub fn open(
        path: &Path,
        model: &Path,
        base_sha256: &str,
        home: &Path,
    ) -> Result<Self, AdapterError> {
        let adapter = Adapter::read(path)?;
        if adapter.is_lora() {
            return Err(AdapterError::Metadata {
                path: path.to_path_buf(),
                field: "svfit.format".into(),
                expected: format!("'{FORMAT}' (an SVFit adapter, with factors)"),
                actual: format!("'{LORA_FORMAT}' (a LoRA)"),
            });
        }
        let key = adapter.factors_key(path, base_sha256)?;
        // Refused before the (slow) factorization: names the base hash.
        adapter.check_base(path, &key)?;
        let factors = factors::ensure(model, &key, home)?;
        let singular = factors::read_singular_values(&factors, &key)?;
        adapter.validate(path, &key, &singular)?;
        Ok(Loaded {
            adapter,
            key,
            singular,
        })
    }

    pub fn deltas(&self) -> Deltas {
        self.adapter.deltas(&self.singular)
    }
}

/// `delta = Σ w_i delta_i` of weighted adapters that share their factors
/// (all `Deltas` in the same matrix order).
pub fn mix(parts: &[(f32, &Deltas)]) -> Deltas {
    let Some((_, first)) = parts.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, (prefix, d))| {
            let mut sum = vec![0f32; d.len()];
            for (w, deltas) in parts {
                for (s, v) in sum.iter_mut().zip(&deltas[i].1) {
                    *s += w * v;
                }
            }
            (prefix.clone(), sum)
        })
        .collect()
}

/// A weighted mix of LoRAs, exact: `Σ w_i B_i A_i` is the LoRA whose `A`
/// stacks the `A_i` and whose `B` sets the `w_i B_i` side by side (rank
/// `Σ r_i` per matrix).
pub fn mix_lora(parts: &[(f32, &LowRanks)]) -> LowRanks {
    let mut by_prefix: Vec<(String, Vec<(f32, &LowRank)>)> = Vec::new();
    for (w, lora) in parts {
        for (prefix, u) in lora.iter() {
            match by_prefix.iter_mut().find(|(p, _)| p == prefix) {
                Some((_, list)) => list.push((*w, u)),
                None => by_prefix.push((prefix.clone(), vec![(*w, u)])),
            }
        }
    }
    by_prefix
        .into_iter()
        .map(|(prefix, list)| {
            let rank: usize = list.iter().map(|(_, u)| u.rank).sum();
            let m = list[0].1.b.len() / list[0].1.rank;
            let mut a = Vec::new();
            let mut b = vec![0f32; m * rank];
            let mut col = 0;
            for (w, u) in list {
                a.extend_from_slice(&u.a);
                for i in 0..m {
                    for j in 0..u.rank {
                        b[i * rank + col + j] = w * u.b[i * u.rank + j];
                    }
                }
                col += u.rank;
            }
            (prefix, LowRank { a, b, rank })
        })
        .collect()
}

/// An adapter: its metadata and `sigma` per target matrix (`blk.L.kind`).
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub base_sha256: String,
    pub factors_id: String,
    pub targets: String,
    pub rank_policy: String,
    /// Free-form information (training data, steps, losses, ...).
    pub info: HashMap<String, String>,
    /// `(prefix, sigma)` in the factors' order (empty for a LoRA).
    pub sigma: Vec<(String, Vec<f32>)>,
    /// A LoRA's updates (empty for an SVFit adapter): the file's format is
    /// then [`LORA_FORMAT`] and it has no factors.
    pub lora: LowRanks,
}

impl Adapter {
    /// The identity adapter of `factors`: `sigma = S`, so `delta = 0`.
    pub fn identity(key: &FactorsKey, singular_values: &[(TargetMatrix, Vec<f32>)]) -> Self {
        Adapter {
            base_sha256: key.base_sha256.clone(),
            factors_id: key.id(),
            targets: key.targets.to_string(),
            rank_policy: key.policy.to_string(),
            info: HashMap::new(),
            sigma: singular_values
                .iter()
                .map(|(t, s)| (t.prefix(), s.clone()))
                .collect(),
            lora: Vec::new(),
        }
    }

    /// The identity with random deltas (see [`Adapter::perturb`]).
    pub fn perturbed(
        key: &FactorsKey,
        singular_values: &[(TargetMatrix, Vec<f32>)],
        scale: f32,
        seed: u64,
    ) -> Self {
        let mut a = Adapter::identity(key, singular_values);
        a.perturb(singular_values, scale, seed);
        a
    }

    /// Random deltas, for demos, tests and benchmarks: sigma = S (1 + scale
    /// z), z ~ N(0, 1) drawn from `seed` matrix by matrix (`svfit adapter
    /// perturb`).
    pub fn perturb(&mut self, singular_values: &[(TargetMatrix, Vec<f32>)], scale: f32, seed: u64) {
        let mut rng = crate::rng::Rng::new(seed);
        for ((_, sigma), (_, s)) in self.sigma.iter_mut().zip(singular_values) {
            for (v, base) in sigma.iter_mut().zip(s) {
                *v = base * (1.0 + scale * rng.normal());
            }
        }
    }

    /// Reads and checks the file on its own: safetensors layout, format,
    /// required metadata, f32 vectors, finite values.
    pub fn read(path: &Path) -> Result<Self, AdapterError> {
        let bytes = std::fs::read(path).map_err(|source| AdapterError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// As [`Adapter::read`], for a file's bytes; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, AdapterError> {
        let corrupt = |reason: String| AdapterError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let st =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut info = meta.metadata().clone().unwrap_or_default();
        let mut take = |field: &str| {
            info.remove(field).ok_or_else(|| AdapterError::Metadata {
                path: path.to_path_buf(),
                field: field.to_string(),
                expected: "present".into(),
                actual: "missing".into(),
            })
        };
        let format = take("svfit.format")?;
        if format != FORMAT && format != LORA_FORMAT {
            return Err(AdapterError::Metadata {
                path: path.to_path_buf(),
                field: "svfit.format".into(),
                expected: format!("'{FORMAT}' or '{LORA_FORMAT}'"),
                actual: format!("'{format}'"),
            });
        }
        let (base_sha256, factors_id, targets, rank_policy) = (
            take("svfit.base_sha256")?,
            take("svfit.factors_id")?,
            take("svfit.targets")?,
            take("svfit.rank_policy")?,
        );
        if format == LORA_FORMAT {
            return Ok(Adapter {
                base_sha256,
                factors_id,
                targets,
                rank_policy,
                info,
                sigma: Vec::new(),
                lora: crate::lora::stored::parse(&st, path)?,
            });
        }
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort_by_key(|n| tensor_order(n));
        let mut sigma = Vec::with_capacity(names.len());
        for name in names {
            let bad = |problem: String| AdapterError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                problem,
            };
            let Some(prefix) = name.strip_suffix(".sigma") else {
                return Err(bad(
                    "unexpected tensor (adapters hold only blk.L.kind.sigma)".into(),
                ));
            };
            let view = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
                return Err(bad(format!(
                    "expected F32 [r], got {:?} {:?}",
                    view.dtype(),
                    view.shape()
                )));
            }
            let values = crate::tensorfile::f32s(view.data());
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("value {i} is {} (must be finite)", values[i])));
            }
            sigma.push((prefix.to_string(), values));
        }
        Ok(Adapter {
            base_sha256,
            factors_id,
            targets,
            rank_policy,
            info,
            sigma,
            lora: Vec::new(),
        })
    }

    /// Checks the adapter against the factors it must apply to.
    pub fn validate(
        &self,
        path: &Path,
        key: &FactorsKey,
        singular_values: &[(TargetMatrix, Vec<f32>)],
    ) -> Result<(), AdapterError> {
        self.check_base(path, key)?;
        let mine: HashMap<&str, &Vec<f32>> =
            self.sigma.iter().map(|(p, s)| (p.as_str(), s)).collect();
        for (t, s) in singular_values {
            let tensor = format!("{}.sigma", t.prefix());
            let problem = match mine.get(t.prefix().as_str()) {
                None => Some("missing".to_string()),
                Some(v) if v.len() != s.len() => Some(format!(
                    "length {}, expected the factor rank {}",
                    v.len(),
                    s.len()
                )),
                Some(_) => None,
            };
            if let Some(problem) = problem {
                return Err(AdapterError::Tensor {
                    path: path.to_path_buf(),
                    tensor,
                    problem,
                });
            }
        }
        if self.sigma.len() != singular_values.len() {
            let known: Vec<String> = singular_values.iter().map(|(t, _)| t.prefix()).collect();
            let extra = self
                .sigma
                .iter()
                .find(|(p, _)| !known.contains(p))
                .map(|(p, _)| p.clone());
            return Err(AdapterError::Tensor {
                path: path.to_path_buf(),
                tensor: format!("{}.sigma", extra.unwrap_or_default()),
                problem: "not a target matrix of these factors".into(),
            });
        }
        Ok(())
    }

    /// Checks the adapter's base model and factor set (its metadata only):
    /// an adapter made for other weights or other factors.
    pub fn check_base(&self, path: &Path, key: &FactorsKey) -> Result<(), AdapterError> {
        let field = |field: &str, expected: &str, actual: &str| {
            (expected != actual).then(|| AdapterError::Metadata {
                path: path.to_path_buf(),
                field: field.to_string(),
                expected: format!("'{expected}'"),
                actual: format!("'{actual}'"),
            })
        };
        // A LoRA has no factors: its base is all there is to check here.
        let factors_id = if self.is_lora() {
            None
        } else {
            field("svfit.factors_id", &key.id(), &self.factors_id)
        };
        let checks = [
            field("svfit.base_sha256", &key.base_sha256, &self.base_sha256),
            factors_id,
        ];
        match checks.into_iter().flatten().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// `delta = sigma - S` per matrix (after [`Adapter::validate`]).
    pub fn deltas(&self, singular_values: &[(TargetMatrix, Vec<f32>)]) -> Deltas {
        let mine: HashMap<&str, &Vec<f32>> =
            self.sigma.iter().map(|(p, s)| (p.as_str(), s)).collect();
        singular_values
            .iter()
            .map(|(t, s)| {
                let prefix = t.prefix();
                let sigma = mine.get(prefix.as_str()).map_or(&[][..], |v| v.as_slice());
                let delta = sigma.iter().zip(s).map(|(a, b)| a - b).collect();
                (prefix, delta)
            })
            .collect()
    }

    /// The factors key this adapter names, for the model whose sha256 is
    /// `base_sha256` (the dtype is the last part of the factor id).
    pub fn factors_key(&self, path: &Path, base_sha256: &str) -> Result<FactorsKey, AdapterError> {
        let meta = |field: &str, actual: &str, expected: &str| AdapterError::Metadata {
            path: path.to_path_buf(),
            field: field.to_string(),
            expected: expected.to_string(),
            actual: format!("'{actual}'"),
        };
        let dtype = self.factors_id.rsplit('-').next().unwrap_or_default();
        Ok(FactorsKey {
            base_sha256: base_sha256.to_string(),
            targets: self.targets.parse().map_err(|_| {
                meta(
                    "svfit.targets",
                    &self.targets,
                    "a target list such as 'q,v'",
                )
            })?,
            policy: self.rank_policy.parse().map_err(|_| {
                meta(
                    "svfit.rank_policy",
                    &self.rank_policy,
                    "energy:T, rank:N or full",
                )
            })?,
            dtype: dtype.parse().map_err(|_| {
                meta(
                    "svfit.factors_id",
                    &self.factors_id,
                    "an id ending in -f16 or -f32",
                )
            })?,
        })
    }

    /// The adapter as the bytes of a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, crate::tensorfile::WriteError> {
        let (entries, metadata) = self.entries();
        crate::tensorfile::serialize(&entries, metadata)
    }

    /// Writes the adapter as safetensors, atomically.
    pub fn write(&self, path: &Path) -> Result<(), AdapterError> {
        let (entries, metadata) = self.entries();
        crate::tensorfile::write(path, &entries, metadata).map_err(|e| match e {
            crate::tensorfile::WriteError::Io(source) => AdapterError::Io {
                path: path.to_path_buf(),
                source,
            },
            other => AdapterError::Corrupt {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })
    }

    /// Whether this is a LoRA kept as an adapter.
    pub fn is_lora(&self) -> bool {
        !self.lora.is_empty()
    }

    fn entries(&self) -> (Vec<crate::tensorfile::Entry>, HashMap<String, String>) {
        let mut metadata = self.info.clone();
        let format = if self.is_lora() { LORA_FORMAT } else { FORMAT };
        metadata.insert("svfit.format".into(), format.into());
        metadata.insert("svfit.base_sha256".into(), self.base_sha256.clone());
        metadata.insert("svfit.factors_id".into(), self.factors_id.clone());
        metadata.insert("svfit.targets".into(), self.targets.clone());
        metadata.insert("svfit.rank_policy".into(), self.rank_policy.clone());
        let mut entries: Vec<_> = self
            .sigma
            .iter()
            .map(|(p, s)| crate::tensorfile::Entry::f32(format!("{p}.sigma"), vec![s.len()], s))
            .collect();
        entries.extend(crate::lora::stored::entries(&self.lora));
        (entries, metadata)
    }
}

/// Sorts `blk.L.kind.sigma` by layer number, then name.
fn tensor_order(name: &str) -> (usize, String) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    (layer, name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `B A` of a LoRA, `[m, n]` row-major.
    fn product(u: &LowRank) -> Vec<f32> {
        let (m, n) = (u.b.len() / u.rank, u.a.len() / u.rank);
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..u.rank)
                    .map(|k| u.b[i * u.rank + k] * u.a[k * n + j])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn a_mix_of_loras_is_the_weighted_sum_of_their_updates() {
        let one = LowRank {
            a: vec![1.0, 2.0, 3.0],
            b: vec![2.0, -1.0],
            rank: 1,
        };
        let two = LowRank {
            a: vec![0.5, 0.0, 1.0, -1.0, 2.0, 0.25],
            b: vec![1.0, 3.0, -2.0, 0.5],
            rank: 2,
        };
        let (x, y): (LowRanks, LowRanks) = (
            vec![("blk.0.attn_q".into(), one.clone())],
            vec![
                ("blk.0.attn_q".into(), two.clone()),
                ("blk.1.attn_v".into(), one.clone()),
            ],
        );
        let mixed = mix_lora(&[(0.5, &x), (2.0, &y)]);
        assert_eq!(mixed.len(), 2);
        assert_eq!(mixed[0].1.rank, 3);
        let want: Vec<f32> = product(&one)
            .iter()
            .zip(product(&two))
            .map(|(p, q)| 0.5 * p + 2.0 * q)
            .collect();
        assert_eq!(product(&mixed[0].1), want);
        assert_eq!(
            product(&mixed[1].1),
            product(&one).iter().map(|v| 2.0 * v).collect::<Vec<_>>()
        );
    }

    #[test]
    fn mix_is_the_weighted_sum_of_deltas() {
        let a: Deltas = vec![
            ("blk.0.attn_q".into(), vec![1.0, -2.0]),
            ("blk.0.attn_v".into(), vec![4.0]),
        ];
        let b: Deltas = vec![
            ("blk.0.attn_q".into(), vec![3.0, 2.0]),
            ("blk.0.attn_v".into(), vec![-4.0]),
        ];
        let mixed = mix(&[(0.75, &a), (0.25, &b)]);
        assert_eq!(mixed[0], ("blk.0.attn_q".to_string(), vec![1.5, -1.0]));
        assert_eq!(mixed[1], ("blk.0.attn_v".to_string(), vec![2.0]));
        assert_eq!(mix(&[(1.0, &a)]), a);
        assert!(mix(&[]).is_empty());
    }
}
