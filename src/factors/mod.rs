//! SVD factors of the base model's target matrices (METHOD.md §1–2): the
//! rank policy, the thin SVD (`faer`) of each matrix dequantized from the
//! GGUF, and the factor cache (safetensors, keyed by the base's sha256,
//! targets, rank policy and dtype).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::ggml::gguf::{GgufError, GgufFile};
use crate::ggml::{self, Type};
use crate::model::{Config, MatrixSlice, ModelError};

mod build;
mod file;

pub use build::{build, full_rank, partial_dir, Progress};
pub use file::{read_factors, read_singular_values, write_factors, FactorFile, Shape};

/// Matrix kinds that can be targets: short name and GGUF tensor kind.
pub const KINDS: [(&str, &str); 7] = [
    ("q", "attn_q"),
    ("k", "attn_k"),
    ("v", "attn_v"),
    ("o", "attn_output"),
    ("gate", "ffn_gate"),
    ("up", "ffn_up"),
    ("down", "ffn_down"),
];

/// The targets `svfit train` and `svfit serve` use unless told: the value
/// projection and the MLP's down projection. Chosen on the dev splits of four
/// tasks, where `v,down` learned more than `q,v` on each (PERFORMANCE.md,
/// "v,down by default"); its serving branch costs more multiply-adds.
pub const DEFAULT_TARGETS: &str = "v,down";

/// The rank policy used unless told: each matrix keeps the singular values
/// that hold 99% of its energy.
pub const DEFAULT_RANK: &str = "energy:0.99";

#[derive(Debug, thiserror::Error)]
pub enum FactorError {
    #[error("invalid rank policy '{0}': use energy:T (0 < T <= 1), rank:N (N >= 1) or full")]
    Policy(String),
    #[error("invalid targets '{0}': use all-linear or a comma list of q, k, v, o, gate, up, down")]
    Targets(String),
    #[error("invalid dtype '{0}': use f16 or f32")]
    Dtype(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tensor '{name}' of type {ty} cannot be dequantized")]
    Dequantize { name: String, ty: Type },
    #[error("tensor '{0}' is missing from the model")]
    MissingTensor(String),
    #[error("tensor '{name}' has {m} rows, a target is its rows {rows:?}")]
    Rows {
        name: String,
        m: usize,
        rows: Range<usize>,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the SVD of '{0}' did not converge")]
    Svd(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid factor file: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// How many singular triplets of a matrix to keep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankPolicy {
    /// The smallest r with `sum(S[..r]^2) >= T * sum(S^2)` (Frobenius energy).
    Energy(f64),
    /// A fixed rank, clipped to `min(m, n)`.
    Rank(usize),
    /// All of them.
    Full,
}

impl RankPolicy {
    /// The most this policy keeps of `k` singular values.
    pub fn bound(&self, k: usize) -> usize {
        match *self {
            RankPolicy::Rank(n) => n.min(k),
            RankPolicy::Energy(_) | RankPolicy::Full => k,
        }
    }

    /// The rank for singular values `s` (descending).
    pub fn rank(&self, s: &[f32]) -> usize {
        match *self {
            RankPolicy::Full => s.len(),
            RankPolicy::Rank(n) => n.min(s.len()),
            RankPolicy::Energy(t) => {
                let total: f64 = s.iter().map(|&x| (x as f64).powi(2)).sum();
                if total == 0.0 {
                    return s.len().min(1);
                }
                let mut acc = 0.0;
                for (i, &x) in s.iter().enumerate() {
                    acc += (x as f64).powi(2);
                    // A relative slack so that T = 1 keeps every non-zero value
                    // despite rounding in the sum.
                    if acc >= t * total * (1.0 - 1e-12) {
                        return i + 1;
                    }
                }
                s.len()
            }
        }
    }
}

impl FromStr for RankPolicy {
    type Err = FactorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FactorError::Policy(s.to_string());
        match s.split_once(':') {
            None if s == "full" => Ok(RankPolicy::Full),
            Some(("energy", t)) => match t.parse::<f64>() {
                Ok(t) if t > 0.0 && t <= 1.0 => Ok(RankPolicy::Energy(t)),
                _ => Err(bad()),
            },
            Some(("rank", n)) => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(RankPolicy::Rank(n)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for RankPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankPolicy::Energy(t) => write!(f, "energy:{t}"),
            RankPolicy::Rank(n) => write!(f, "rank:{n}"),
            RankPolicy::Full => f.write_str("full"),
        }
    }
}

/// The target matrix kinds (GGUF kinds such as "attn_q"), in a fixed order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets(Vec<&'static str>);

impl Targets {
    pub fn kinds(&self) -> &[&'static str] {
        &self.0
    }
}

impl FromStr for Targets {
    type Err = FactorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all-linear" {
            return Ok(Targets(KINDS.iter().map(|k| k.1).collect()));
        }
        let names: Vec<&str> = s.split(',').map(str::trim).collect();
        if names.iter().any(|n| !KINDS.iter().any(|k| k.0 == *n)) {
            return Err(FactorError::Targets(s.to_string()));
        }
        Ok(Targets(
            KINDS
                .iter()
                .filter(|k| names.contains(&k.0))
                .map(|k| k.1)
                .collect(),
        ))
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short: Vec<&str> = self
            .0
            .iter()
            .filter_map(|k| KINDS.iter().find(|x| x.1 == *k).map(|x| x.0))
            .collect();
        f.write_str(&short.join(","))
    }
}

/// The element type of U and Vt in the factor file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorDtype {
    F16,
    F32,
}

impl FromStr for FactorDtype {
    type Err = FactorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f16" => Ok(FactorDtype::F16),
            "f32" => Ok(FactorDtype::F32),
            _ => Err(FactorError::Dtype(s.to_string())),
        }
    }
}

impl fmt::Display for FactorDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FactorDtype::F16 => "f16",
            FactorDtype::F32 => "f32",
        })
    }
}

/// The kept SVD of one matrix `W [m, n] ≈ U diag(S) Vt`, row-major f32.
#[derive(Clone, Debug)]
pub struct Factor {
    pub m: usize,
    pub n: usize,
    /// `[m, r]`
    pub u: Vec<f32>,
    /// `[r]`, descending
    pub s: Vec<f32>,
    /// `[r, n]`
    pub vt: Vec<f32>,
}

impl Factor {
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// Thin SVD of the row-major `[m, n]` matrix `w`, truncated by `policy`.
    pub fn of_matrix(w: &[f32], m: usize, n: usize, policy: RankPolicy) -> Option<Self> {
        Self::of_matrix_with(w, m, n, policy, faer::Par::rayon(0))
    }

    /// [`Factor::of_matrix`] on `par`'s threads. The SVD runs in f64: in
    /// f32 it takes half the time, but the singular vectors of close
    /// singular values move by up to 10% (those of an f64 SVD by less
    /// than 1e-9), and an adapter trained on one set of factors is served
    /// on factors computed again wherever the base is.
    pub fn of_matrix_with(
        w: &[f32],
        m: usize,
        n: usize,
        policy: RankPolicy,
        par: faer::Par,
    ) -> Option<Self> {
        use faer::dyn_stack::{MemBuffer, MemStack};
        use faer::linalg::svd::{self, ComputeSvdVectors};
        let a = faer::Mat::<f64>::from_fn(m, n, |i, j| w[i * n + j] as f64);
        let k = m.min(n);
        let (mut u, mut v) = (faer::Mat::<f64>::zeros(m, k), faer::Mat::<f64>::zeros(n, k));
        let mut s = faer::diag::Diag::<f64>::zeros(k);
        let thin = ComputeSvdVectors::Thin;
        let scratch = svd::svd_scratch::<f64>(m, n, thin, thin, par, Default::default());
        svd::svd(
            a.as_ref(),
            s.as_mut(),
            Some(u.as_mut()),
            Some(v.as_mut()),
            par,
            MemStack::new(&mut MemBuffer::try_new(scratch).ok()?),
            Default::default(),
        )
        .ok()?;
        drop(a);
        let (u, s, v) = (u.as_ref(), s.as_ref(), v.as_ref());
        let all: Vec<f32> = (0..k).map(|i| s[i] as f32).collect();
        let r = policy.rank(&all).max(1);
        Some(Factor {
            m,
            n,
            u: (0..m)
                .flat_map(|i| (0..r).map(move |j| u[(i, j)] as f32))
                .collect(),
            s: all[..r].to_vec(),
            vt: (0..r)
                .flat_map(|i| (0..n).map(move |j| v[(j, i)] as f32))
                .collect(),
        })
    }
}

/// The singular values `S` of every target matrix, in the factors' order.
pub type SingularValues = Vec<(TargetMatrix, Vec<f32>)>;

/// One target matrix of the model: a layer and a kind (`attn_q` …), its
/// factor-file prefix. Where the family fuses matrices, it is rows of a
/// tensor ([`Config::matrix_slice`]: q of Phi-3's `attn_qkv`), factored on
/// its own.
#[derive(Clone, Debug)]
pub struct TargetMatrix {
    pub layer: usize,
    pub kind: &'static str,
}

impl TargetMatrix {
    /// `blk.{L}.{kind}` (the factor and adapter tensor prefix).
    pub fn prefix(&self) -> String {
        format!("blk.{}.{}", self.layer, self.kind)
    }

    /// Where the matrix is stored in a model of `config`: its tensor and
    /// rows.
    pub fn slice(&self, config: &Config) -> Result<MatrixSlice, FactorError> {
        config
            .matrix_slice(self.kind)
            .ok_or_else(|| FactorError::MissingTensor(format!("{}.weight", self.prefix())))
    }
}

/// Every target matrix of `gguf` for `targets`, in layer order, with where
/// it is stored (the model's config says, per family).
pub fn target_matrices(
    gguf: &GgufFile,
    targets: &Targets,
) -> Result<Vec<(TargetMatrix, MatrixSlice)>, FactorError> {
    let config = Config::from_gguf(gguf)?;
    let mut out = Vec::new();
    for layer in 0..config.n_layer {
        for &kind in targets.kinds() {
            let t = TargetMatrix { layer, kind };
            let slice = t.slice(&config)?;
            let name = slice.tensor_name(layer);
            if gguf.tensor(&name).is_none() {
                return Err(FactorError::MissingTensor(name));
            }
            out.push((t, slice));
        }
    }
    Ok(out)
}

/// Dequantizes one weight of the GGUF as a row-major `[m, n]` matrix
/// (m = out features = ggml ne[1], n = in features = ne[0]).
pub fn read_matrix(gguf: &GgufFile, name: &str) -> Result<(Vec<f32>, usize, usize), FactorError> {
    let m = gguf.tensor(name).map_or(0, |info| info.ne[1] as usize);
    read_rows(gguf, name, 0..m)
}

/// Dequantizes rows `rows` of one weight of the GGUF (a matrix that a
/// family fuses with others): row-major `[rows.len(), n]`.
pub fn read_rows(
    gguf: &GgufFile,
    name: &str,
    rows: Range<usize>,
) -> Result<(Vec<f32>, usize, usize), FactorError> {
    let info = gguf
        .tensor(name)
        .ok_or_else(|| FactorError::MissingTensor(name.to_string()))?;
    let (n, m) = (info.ne[0] as usize, info.ne[1] as usize);
    let dequantize = || FactorError::Dequantize {
        name: name.to_string(),
        ty: info.ty,
    };
    if rows.start > rows.end || rows.end > m || info.ne[2] * info.ne[3] != 1 {
        return Err(FactorError::Rows {
            name: name.to_string(),
            m,
            rows,
        });
    }
    let row = info.ty.row_size(n as i64).ok_or_else(dequantize)?;
    let bytes = gguf.read_tensor_bytes(info)?;
    let part = bytes
        .get(rows.start * row..rows.end * row)
        .ok_or_else(dequantize)?;
    let data = ggml::dequantize(info.ty, part, rows.len() * n).ok_or_else(dequantize)?;
    Ok((data, rows.len(), n))
}

/// Identifies a factor set: base, targets, rank policy, dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct FactorsKey {
    pub base_sha256: String,
    pub targets: Targets,
    pub policy: RankPolicy,
    pub dtype: FactorDtype,
}

impl FactorsKey {
    /// The key of `model`'s factors (its sha256, read now) for `targets`
    /// (`q,v`, `all-linear`, ...), rank `policy` (`energy:0.99`, ...) and
    /// `dtype` (`f16` or `f32`).
    pub fn for_model(
        model: &Path,
        targets: &str,
        policy: &str,
        dtype: &str,
    ) -> Result<Self, FactorError> {
        Ok(FactorsKey {
            targets: targets.parse()?,
            policy: policy.parse()?,
            dtype: dtype.parse()?,
            base_sha256: crate::home::sha256_file(model).map_err(|source| FactorError::Io {
                path: model.to_path_buf(),
                source,
            })?,
        })
    }

    /// A file-name-safe id, also stored as `svfit.factors_id` in adapters.
    pub fn id(&self) -> String {
        let policy = self.policy.to_string().replace(':', "-");
        format!(
            "{}-{}-{}-{}",
            &self.base_sha256[..16.min(self.base_sha256.len())],
            self.targets.to_string().replace(',', "+"),
            policy,
            self.dtype
        )
    }

    /// Where the factor file lives in the cache.
    pub fn path(&self, home: &Path) -> PathBuf {
        home.join("factors")
            .join(format!("{}.safetensors", self.id()))
    }

    fn metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("svfit.format".into(), "factors/1".into()),
            ("svfit.base_sha256".into(), self.base_sha256.clone()),
            ("svfit.targets".into(), self.targets.to_string()),
            ("svfit.rank_policy".into(), self.policy.to_string()),
            ("svfit.dtype".into(), self.dtype.to_string()),
        ])
    }
}

/// Ranks per matrix kind: (kind, min, mean, max) in target order.
pub fn rank_summary(factors: &[(TargetMatrix, usize)]) -> Vec<(&'static str, usize, f64, usize)> {
    let mut kinds: Vec<&'static str> = Vec::new();
    for (t, _) in factors {
        if !kinds.contains(&t.kind) {
            kinds.push(t.kind);
        }
    }
    kinds
        .into_iter()
        .map(|kind| {
            let ranks: Vec<usize> = factors
                .iter()
                .filter(|(t, _)| t.kind == kind)
                .map(|(_, r)| *r)
                .collect();
            let mean = ranks.iter().sum::<usize>() as f64 / ranks.len() as f64;
            (
                kind,
                *ranks.iter().min().unwrap_or(&0),
                mean,
                *ranks.iter().max().unwrap_or(&0),
            )
        })
        .collect()
}

/// The factor file for `key`: from the cache, or computed and cached.
pub fn ensure(model: &Path, key: &FactorsKey, home: &Path) -> Result<PathBuf, FactorError> {
    let path = key.path(home);
    if !path.exists() {
        build(model, key, &path, default_jobs(), |_| {})?;
    }
    Ok(path)
}

/// Matrices factorized at a time by default: one per core.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_policy_keeps_the_smallest_rank_reaching_the_threshold() {
        // Energies 100, 25, 16, 9 of 150: 66.7%, 83.3%, 94%, 100%.
        let s = [10.0, 5.0, 4.0, 3.0];
        assert_eq!(RankPolicy::Energy(0.6).rank(&s), 1);
        assert_eq!(RankPolicy::Energy(0.8).rank(&s), 2);
        assert_eq!(RankPolicy::Energy(0.9).rank(&s), 3);
        assert_eq!(RankPolicy::Energy(0.99).rank(&s), 4);
        assert_eq!(RankPolicy::Energy(1.0).rank(&s), 4);
        assert_eq!(RankPolicy::Rank(2).rank(&s), 2);
        assert_eq!(RankPolicy::Rank(9).rank(&s), 4);
        assert_eq!(RankPolicy::Full.rank(&s), 4);
    }

    #[test]
    fn policies_and_targets_parse_and_refuse_nonsense() {
        assert_eq!(
            "energy:0.99".parse::<RankPolicy>().unwrap(),
            RankPolicy::Energy(0.99)
        );
        assert_eq!("rank:8".parse::<RankPolicy>().unwrap(), RankPolicy::Rank(8));
        assert_eq!("full".parse::<RankPolicy>().unwrap(), RankPolicy::Full);
        for bad in ["energy:0", "energy:1.5", "rank:0", "rank:x", "half", ""] {
            assert!(bad.parse::<RankPolicy>().is_err(), "{bad}");
        }
        let t: Targets = "v,q".parse().unwrap();
        assert_eq!(t.kinds(), ["attn_q", "attn_v"]);
        assert_eq!(t.to_string(), "q,v");
        assert_eq!("all-linear".parse::<Targets>().unwrap().kinds().len(), 7);
        assert!("q,x".parse::<Targets>().is_err());
    }

    #[test]
    fn svd_of_a_matrix_with_known_spectrum() {
        // W = U diag(S) Vt with orthogonal U, Vt from rotations: the SVD must
        // give back S, and the energy policy the rank it implies.
        let (m, n) = (6, 4);
        let s_true = [8.0f32, 4.0, 1.0, 0.1];
        let rot = |k: usize, i: usize, j: usize, angle: f32| -> f32 {
            // Columns of a Givens-rotated identity, enough to mix coordinates.
            let (c, s) = (angle.cos(), angle.sin());
            match (i == k, i == k + 1, j == k, j == k + 1) {
                (true, _, true, _) | (_, true, _, true) => c,
                (true, _, _, true) => -s,
                (_, true, true, _) => s,
                _ if i == j => 1.0,
                _ => 0.0,
            }
        };
        let mut w = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                w[i * n + j] = (0..n)
                    .map(|l| rot(0, i, l, 0.7) * s_true[l] * rot(1, l, j, 0.4))
                    .sum();
            }
        }
        let f = Factor::of_matrix(&w, m, n, RankPolicy::Full).unwrap();
        for (got, want) in f.s.iter().zip(&s_true) {
            assert!((got - want).abs() < 1e-4, "{:?}", f.s);
        }
        // Reconstruction.
        for i in 0..m {
            for j in 0..n {
                let x: f32 = (0..f.rank())
                    .map(|l| f.u[i * f.rank() + l] * f.s[l] * f.vt[l * n + j])
                    .sum();
                assert!((x - w[i * n + j]).abs() < 1e-4);
            }
        }
        // 64+16 of 81.01 is 98.75%: energy 0.98 keeps 2, 0.99 keeps 3.
        assert_eq!(
            Factor::of_matrix(&w, m, n, RankPolicy::Energy(0.98))
                .unwrap()
                .rank(),
            2
        );
        assert_eq!(
            Factor::of_matrix(&w, m, n, RankPolicy::Energy(0.99))
                .unwrap()
                .rank(),
            3
        );
    }
}
