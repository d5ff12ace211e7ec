//! A LoRA kept as an adapter file ([`crate::adapter::LORA_FORMAT`]): what
//! `svfit adapter import` writes and the store holds, so a LoRA is
//! uploaded, versioned, listed and served like any adapter. Per target
//! matrix `blk.L.kind`: `.lora_a` f32 `[r, n]` and `.lora_b` f32 `[m, r]`,
//! the scale folded into `B` (`ΔW = B A`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::SafeTensors;

use crate::adapter::{Adapter, AdapterError, LowRank, LowRanks};
use crate::tensorfile::Entry;

/// What a server (or a command) can serve: the `[m, n]` of each target
/// matrix that has LoRA tables, and the largest rank.
#[derive(Clone, Debug, Default)]
pub struct LoraLimits {
    pub shapes: HashMap<String, (usize, usize)>,
    pub max_rank: usize,
}

/// A matrix's values and `[rows, columns]`.
type Matrix = (Vec<f32>, [usize; 2]);

/// The tensors of one LoRA file, checked on their own: pairs of f32
/// matrices whose ranks agree, finite values.
pub(crate) fn parse(st: &SafeTensors<'_>, path: &Path) -> Result<LowRanks, AdapterError> {
    let mut pairs: BTreeMap<(usize, String), [Option<Matrix>; 2]> = BTreeMap::new();
    for name in st.names() {
        let bad = |problem: String| AdapterError::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            problem,
        };
        let (prefix, side) = match (name.strip_suffix(".lora_a"), name.strip_suffix(".lora_b")) {
            (Some(p), _) => (p, 0),
            (_, Some(p)) => (p, 1),
            _ => {
                return Err(bad(
                    "a LoRA file holds only blk.L.kind.lora_a and .lora_b".into()
                ))
            }
        };
        let layer = prefix
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| bad("not a blk.L.kind name".into()))?;
        let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        let shape = view.shape();
        if view.dtype() != safetensors::Dtype::F32 || shape.len() != 2 {
            return Err(bad(format!(
                "expected F32 [rows, columns], got {:?} {shape:?}",
                view.dtype()
            )));
        }
        let values = crate::tensorfile::f32s(view.data());
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("value {i} is {} (must be finite)", values[i])));
        }
        pairs.entry((layer, prefix.to_string())).or_default()[side] =
            Some((values, [shape[0], shape[1]]));
    }
    let mut lora = LowRanks::new();
    for ((_, prefix), pair) in pairs {
        let bad = |problem: String| AdapterError::Tensor {
            path: path.to_path_buf(),
            tensor: format!("{prefix}.lora_a"),
            problem,
        };
        let [Some((a, [r, _])), Some((b, [_, b_r]))] = pair else {
            return Err(bad("lora_a and lora_b come in pairs".into()));
        };
        if r == 0 || b_r != r {
            return Err(bad(format!(
                "rank {r}, and lora_b has {b_r} columns (they must agree, at least 1)"
            )));
        }
        lora.push((prefix, LowRank { a, b, rank: r }));
    }
    if lora.is_empty() {
        return Err(AdapterError::Corrupt {
            path: path.to_path_buf(),
            reason: "a LoRA file without tensors".into(),
        });
    }
    Ok(lora)
}

/// The tensors of `lora` as file entries.
pub(crate) fn entries(lora: &LowRanks) -> Vec<Entry> {
    let mut out = Vec::with_capacity(2 * lora.len());
    for (prefix, u) in lora {
        let (r, n, m) = (u.rank, u.a.len() / u.rank, u.b.len() / u.rank);
        out.push(Entry::f32(format!("{prefix}.lora_a"), vec![r, n], &u.a));
        out.push(Entry::f32(format!("{prefix}.lora_b"), vec![m, r], &u.b));
    }
    out
}

impl Adapter {
    /// Checks a LoRA adapter against what is served: the base model
    /// (`base_sha256`), each matrix one with LoRA tables and its shape,
    /// ranks within the largest.
    pub fn validate_lora(
        &self,
        path: &Path,
        base_sha256: &str,
        limits: &LoraLimits,
    ) -> Result<(), AdapterError> {
        if self.base_sha256 != base_sha256 {
            return Err(AdapterError::Metadata {
                path: path.to_path_buf(),
                field: "svfit.base_sha256".into(),
                expected: format!("'{base_sha256}'"),
                actual: format!("'{}'", self.base_sha256),
            });
        }
        for (prefix, u) in &self.lora {
            let bad = |problem: String| AdapterError::Tensor {
                path: path.to_path_buf(),
                tensor: format!("{prefix}.lora_a"),
                problem,
            };
            let Some(&(m, n)) = limits.shapes.get(prefix) else {
                return Err(bad(if limits.shapes.is_empty() {
                    "this server serves no LoRAs (--lora-slots 0)".into()
                } else {
                    "not a LoRA target of this server (see --lora-targets)".into()
                }));
            };
            if u.a.len() != u.rank * n || u.b.len() != m * u.rank {
                return Err(bad(format!(
                    "A [{}, {}] and B [{}, {}]; the matrix is [{m}, {n}]",
                    u.rank,
                    u.a.len() / u.rank,
                    u.b.len() / u.rank,
                    u.rank
                )));
            }
            if u.rank > limits.max_rank {
                return Err(bad(format!(
                    "rank {}; this server serves ranks up to {} (--lora-rank)",
                    u.rank, limits.max_rank
                )));
            }
        }
        Ok(())
    }

    /// A LoRA of the model whose sha256 is `base_sha256` as an adapter,
    /// described by `source` (where it came from).
    pub fn from_lora(base_sha256: &str, lora: LowRanks, source: &str) -> Adapter {
        let mut kinds: Vec<&str> = Vec::new();
        for (prefix, _) in &lora {
            let kind = prefix.rsplit('.').next().unwrap_or_default();
            let short = crate::factors::KINDS
                .iter()
                .find(|k| k.1 == kind)
                .map_or(kind, |k| k.0);
            if !kinds.contains(&short) {
                kinds.push(short);
            }
        }
        let max_rank = lora.iter().map(|(_, u)| u.rank).max().unwrap_or(0);
        let mut info = HashMap::new();
        info.insert("svfit.lora_source".into(), source.to_string());
        Adapter {
            base_sha256: base_sha256.to_string(),
            factors_id: String::new(),
            targets: kinds.join(","),
            rank_policy: format!("lora:{max_rank}"),
            info,
            sigma: Vec::new(),
            lora,
        }
    }
}

/// A LoRA uploaded as bytes — a GGUF LoRA, or PEFT's
/// `adapter_model.safetensors` with its `adapter_config.json` text
/// (`peft_config`) — read and checked against the model at `model` (whose
/// sha256 is `base_sha256`), as the bytes of an svfit LoRA file.
pub fn import_bytes(
    bytes: &[u8],
    peft_config: Option<&str>,
    model: &Path,
    base_sha256: &str,
) -> Result<Vec<u8>, super::LoraError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "svfit-lora-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| super::LoraError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let read = (|| {
        let path = match peft_config {
            Some(config) => {
                std::fs::write(dir.join("adapter_config.json"), config).map_err(io(&dir))?;
                std::fs::write(dir.join("adapter_model.safetensors"), bytes).map_err(io(&dir))?;
                dir.clone()
            }
            None => {
                let file = dir.join("lora.gguf");
                std::fs::write(&file, bytes).map_err(io(&file))?;
                file
            }
        };
        let gguf = crate::ggml::gguf::GgufFile::open(model)?;
        let config =
            crate::model::Config::from_gguf(&gguf).map_err(crate::factors::FactorError::from)?;
        let lora = super::Lora::read(&path, &gguf)?;
        let source = if peft_config.is_some() {
            "peft"
        } else {
            "gguf-lora"
        };
        let adapter = Adapter::from_lora(base_sha256, lora.low_ranks(&config)?, source);
        Ok(adapter.to_bytes()?)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    // Errors name the upload, not this process's temporary files.
    read.map_err(|e| match e {
        super::LoraError::Io { source, .. } => super::LoraError::Io {
            path: "the LoRA".into(),
            source,
        },
        e => super::LoraError::Invalid(
            e.to_string()
                .replace(&format!("{}/", dir.display()), "")
                .replace(&dir.display().to_string(), "the LoRA"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorfile::serialize;

    /// A rank-2 LoRA of a `[2, 3]` q.
    fn lora() -> LowRanks {
        let a = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = vec![0.5, -1.0, 2.0, 0.0];
        vec![("blk.0.attn_q".into(), LowRank { a, b, rank: 2 })]
    }

    fn limits(max_rank: usize) -> LoraLimits {
        LoraLimits {
            shapes: [("blk.0.attn_q".to_string(), (2, 3))].into(),
            max_rank,
        }
    }

    #[test]
    fn a_lora_file_reads_back_and_is_checked_against_the_tables() {
        let path = Path::new("l.safetensors");
        let a = Adapter::from_lora("abc", lora(), "peft");
        let back = Adapter::parse(&a.to_bytes().unwrap(), path).unwrap();
        assert!(back.is_lora());
        assert_eq!(back.lora, lora());
        assert_eq!(
            (back.targets.as_str(), back.rank_policy.as_str()),
            ("q", "lora:2")
        );
        back.validate_lora(path, "abc", &limits(2)).unwrap();
        let refused = |base: &str, limits: &LoraLimits| {
            back.validate_lora(path, base, limits)
                .unwrap_err()
                .to_string()
        };
        assert!(refused("xyz", &limits(2)).contains("svfit.base_sha256"));
        assert!(refused("abc", &limits(1)).contains("rank 2"));
        let mut other = limits(2);
        other.shapes.insert("blk.0.attn_q".into(), (3, 3));
        assert!(refused("abc", &other).contains("the matrix is [3, 3]"));
        other.shapes = [("blk.0.attn_v".to_string(), (2, 3))].into();
        assert!(refused("abc", &other).contains("--lora-targets"));
        assert!(refused("abc", &LoraLimits::default()).contains("--lora-slots 0"));
    }

    #[test]
    fn bad_lora_tensors_are_refused_by_name() {
        let meta = |extra: &[(&str, &str)]| {
            let mut m: HashMap<String, String> = [
                ("svfit.format", crate::adapter::LORA_FORMAT),
                ("svfit.base_sha256", "abc"),
                ("svfit.factors_id", ""),
                ("svfit.targets", "q"),
                ("svfit.rank_policy", "lora:2"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            m.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            m
        };
        let parse = |entries: Vec<Entry>| {
            let bytes = serialize(&entries, meta(&[])).unwrap();
            Adapter::parse(&bytes, Path::new("l"))
                .unwrap_err()
                .to_string()
        };
        let a = |name: &str, values: &[f32]| Entry::f32(name.into(), vec![2, 3], values);
        let b = |name: &str, values: &[f32]| Entry::f32(name.into(), vec![2, 2], values);
        let six = [1.0; 6];
        assert!(parse(vec![a("blk.0.attn_q.lora_a", &six)]).contains("in pairs"));
        let mut nan = six;
        nan[4] = f32::NAN;
        let e = parse(vec![
            a("blk.0.attn_q.lora_a", &nan),
            b("blk.0.attn_q.lora_b", &[1.0; 4]),
        ]);
        assert!(e.contains("value 4 is NaN"), "{e}");
        let e = parse(vec![
            a("blk.0.attn_q.lora_a", &six),
            Entry::f32("blk.0.attn_q.lora_b".into(), vec![6, 1], &six),
        ]);
        assert!(e.contains("must agree"), "{e}");
        let e = parse(vec![a("output.weight", &six)]);
        assert!(e.contains("only blk.L.kind.lora_a"), "{e}");
    }
}
