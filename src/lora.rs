//! LoRA out: an SVFit adapter's update of a matrix,
//! `ΔW = U diag(σ′ − σ) Vt` (METHOD.md §1), is exactly a LoRA
//! `ΔW = B A` with `A = diag(σ′ − σ) Vt` (`[r, n]`) and `B = U` (`[m, r]`),
//! of rank `r` = the number of non-zero deltas, scale 1. [`export`] writes
//! it for llama.cpp (`--lora`, a GGUF LoRA) or PEFT (a directory of
//! `adapter_model.safetensors` and `adapter_config.json`).
//!
//! - A fused tensor (Phi-3's `attn_qkv`, `ffn_up`) gets one LoRA whose `B`
//!   holds each target's `U` in its rows and zeros elsewhere.
//! - `rank` keeps the largest deltas of each matrix. `U` and `V` are
//!   orthonormal, so `|ΔW|` (Frobenius) is `|σ′ − σ|`, and the relative
//!   error of what is dropped is exact: [`Exported::dropped`].
//! - PEFT's matrices are Hugging Face's: a `llama` GGUF stores q and k with
//!   their rows permuted per head (llama.cpp's converter does it for its
//!   rope), so their `B` rows are put back in Hugging Face's order.
//!
//! LoRA in: [`Lora::read`] reads a PEFT directory or a GGUF LoRA and
//! checks it against the base model (every tensor a matrix the base has,
//! shapes, ranks from 1 to the matrix's smaller side, finite values, the
//! config agreeing with the weights); `merge::merge_lora` merges it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::adapter::Deltas;
use crate::factors::{Factor, FactorError, TargetMatrix};
use crate::ggml::gguf::{GgufError, GgufFile, GgufWriteError, GgufWriter};
use crate::ggml::Type;
use crate::merge::{parts_by_tensor, MergeError};
use crate::model::Config;

/// Where the exported LoRA goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A PEFT adapter directory (`adapter_model.safetensors`,
    /// `adapter_config.json`).
    Peft,
    /// A GGUF LoRA for llama.cpp (`--lora FILE`).
    GgufLora,
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error(transparent)]
    Factors(#[from] FactorError),
    #[error(transparent)]
    GgufWrite(#[from] GgufWriteError),
    #[error(transparent)]
    Write(#[from] crate::tensorfile::WriteError),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// What [`export`] wrote.
#[derive(Debug, Default)]
pub struct Exported {
    /// Matrices with a LoRA (those whose deltas are all zero have none).
    pub matrices: usize,
    /// The largest rank of one matrix's LoRA.
    pub max_rank: usize,
    /// Parameters of all A and B matrices.
    pub parameters: usize,
    /// `|dropped ΔW| / |ΔW|` over all matrices (0 without `rank`).
    pub dropped: f64,
}

/// One tensor's LoRA: `A` `[r, n]` and `B` `[m, r]`, row-major.
struct LowRank {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    m: usize,
    n: usize,
}

/// Writes the LoRA of `deltas` (on `factors` of the model at `model`) to
/// `out` (a file for a GGUF LoRA, a directory for PEFT); `rank` keeps at
/// most that many deltas per matrix, the largest.
pub fn export(
    model: &Path,
    factors: &[(TargetMatrix, Factor)],
    deltas: &Deltas,
    format: Format,
    rank: Option<usize>,
    out: &Path,
) -> Result<Exported, LoraError> {
    let gguf = GgufFile::open(model)?;
    let config = Config::from_gguf(&gguf).map_err(FactorError::from)?;
    let parts = parts_by_tensor(&gguf, factors, deltas)?;
    let mut report = Exported::default();
    let (mut kept_sq, mut dropped_sq) = (0f64, 0f64);
    let mut loras = BTreeMap::new();
    for (name, parts) in &parts {
        let info = gguf.tensor(name).expect("parts name the model's tensors");
        let (n, m) = (info.ne[0] as usize, info.ne[1] as usize);
        // Each part's deltas to keep: non-zero, the largest `rank`.
        let mut kept: Vec<(usize, Vec<usize>)> = Vec::new();
        for (p, (_, _, delta)) in parts.iter().enumerate() {
            let mut order: Vec<usize> = (0..delta.len()).filter(|&j| delta[j] != 0.0).collect();
            order.sort_by(|&x, &y| delta[y].abs().total_cmp(&delta[x].abs()));
            let keep = rank.unwrap_or(order.len()).min(order.len());
            for &j in &order[keep..] {
                dropped_sq += (delta[j] as f64).powi(2);
            }
            for &j in &order[..keep] {
                kept_sq += (delta[j] as f64).powi(2);
            }
            kept.push((p, order[..keep].to_vec()));
        }
        let r: usize = kept.iter().map(|(_, k)| k.len()).sum();
        if r == 0 {
            continue;
        }
        let mut lora = LowRank {
            a: vec![0.0; r * n],
            b: vec![0.0; m * r],
            rank: r,
            m,
            n,
        };
        let mut col = 0;
        for (p, indices) in kept {
            let (rows, factor, delta) = &parts[p];
            let fr = factor.rank();
            for j in indices {
                let a = &mut lora.a[col * n..(col + 1) * n];
                for (a, v) in a.iter_mut().zip(&factor.vt[j * n..(j + 1) * n]) {
                    *a = delta[j] * v;
                }
                for (i, row) in rows.clone().enumerate() {
                    lora.b[row * r + col] = factor.u[i * fr + j];
                }
                col += 1;
            }
        }
        report.matrices += 1;
        report.max_rank = report.max_rank.max(r);
        report.parameters += r * (m + n);
        loras.insert(name.clone(), lora);
    }
    let total = kept_sq + dropped_sq;
    report.dropped = if total > 0.0 {
        (dropped_sq / total).sqrt()
    } else {
        0.0
    };
    match format {
        Format::GgufLora => write_gguf(&gguf, &loras, out)?,
        Format::Peft => write_peft(model, &config, &loras, out)?,
    }
    Ok(report)
}

/// llama.cpp's LoRA: `general.type = adapter`, the base's architecture,
/// `NAME.lora_a` `[n, r]` and `NAME.lora_b` `[r, m]` (ggml's order) in f32,
/// alpha 0 (llama.cpp then scales by 1, whatever the rank).
fn write_gguf(
    gguf: &GgufFile,
    loras: &BTreeMap<String, LowRank>,
    out: &Path,
) -> Result<(), LoraError> {
    let arch = gguf
        .get_str("general.architecture")?
        .ok_or_else(|| LoraError::Unsupported("the model has no general.architecture".into()))?;
    let mut w = GgufWriter::new(2 * loras.len() + 1)?;
    w.set_str("general.architecture", &arch)?;
    w.set_str("general.type", "adapter")?;
    w.set_str("adapter.type", "lora")?;
    w.set_f32("adapter.lora.alpha", 0.0)?;
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (name, l) in loras {
        let (r, m, n) = (l.rank as i64, l.m as i64, l.n as i64);
        w.add_tensor(&format!("{name}.lora_a"), Type::F32, &[n, r], f32s(&l.a))?;
        w.add_tensor(&format!("{name}.lora_b"), Type::F32, &[r, m], f32s(&l.b))?;
    }
    w.write(out)?;
    Ok(())
}

/// PEFT's LoRA: `base_model.model.model.layers.L.MODULE.lora_{A,B}.weight`
/// in f32, each module's rank and alpha (equal: scale 1) in the config's
/// `rank_pattern` and `alpha_pattern`.
fn write_peft(
    model: &Path,
    config: &Config,
    loras: &BTreeMap<String, LowRank>,
    out: &Path,
) -> Result<(), LoraError> {
    let io = |e: std::io::Error| LoraError::Io {
        path: out.display().to_string(),
        source: e,
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let mut entries = Vec::new();
    let mut ranks = BTreeMap::new();
    let mut modules = std::collections::BTreeSet::new();
    for (name, l) in loras {
        let (layer, module) = hf_module(config, name)?;
        let key = format!("model.layers.{layer}.{module}");
        let mut b = l.b.clone();
        if let Some(heads) = permuted_heads(config, name) {
            b = unpermute_rows(&b, l.m, l.rank, heads);
        }
        entries.push(crate::tensorfile::Entry::f32(
            format!("base_model.model.{key}.lora_A.weight"),
            vec![l.rank, l.n],
            &l.a,
        ));
        entries.push(crate::tensorfile::Entry::f32(
            format!("base_model.model.{key}.lora_B.weight"),
            vec![l.m, b.len() / l.m],
            &b,
        ));
        modules.insert(module.rsplit('.').next().unwrap_or(module).to_string());
        ranks.insert(key, l.rank);
    }
    let r = ranks.values().copied().max().unwrap_or(1);
    let base = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
    });
    let metadata = [("format".to_string(), "pt".to_string())].into();
    crate::tensorfile::write(&out.join("adapter_model.safetensors"), &entries, metadata)?;
    let text = serde_json::to_string_pretty(&adapter_config).expect("JSON values");
    crate::home::write_atomic(&out.join("adapter_config.json"), |w| {
        std::io::Write::write_all(w, text.as_bytes())
    })
    .map_err(io)?;
    Ok(())
}

/// The layer and Hugging Face module of GGUF tensor `blk.L.KIND.weight`.
fn hf_module(config: &Config, name: &str) -> Result<(usize, &'static str), LoraError> {
    let unsupported = || LoraError::Unsupported(format!("{name}: no PEFT module for this tensor"));
    let rest = name.strip_prefix("blk.").ok_or_else(unsupported)?;
    let (layer, kind) = rest.split_once('.').ok_or_else(unsupported)?;
    let layer: usize = layer.parse().map_err(|_| unsupported())?;
    let phi3 = config.arch.name() == "phi3";
    let module = match kind.strip_suffix(".weight").ok_or_else(unsupported)? {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_qkv" => "self_attn.qkv_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" if phi3 => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return Err(unsupported()),
    };
    Ok((layer, module))
}

/// The heads whose rows llama.cpp's converter permuted in tensor `name`
/// (q and k of a `llama` model), if any.
fn permuted_heads(config: &Config, name: &str) -> Option<usize> {
    if config.arch.name() != "llama" {
        return None;
    }
    if name.ends_with(".attn_q.weight") {
        Some(config.n_head)
    } else if name.ends_with(".attn_k.weight") {
        Some(config.n_head_kv)
    } else {
        None
    }
}

/// Rows of `[m, cols]` `b` back in Hugging Face's order: llama.cpp's
/// converter writes row `h·d + 2i + s` of a head of `d` rows from Hugging
/// Face's row `h·d + s·d/2 + i`.
fn unpermute_rows(b: &[f32], m: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(b, m, cols, heads, |gguf, hf| (gguf, hf))
}

/// The rows of `b` in llama.cpp's order from Hugging Face's (the inverse
/// of [`unpermute_rows`]).
fn permute_rows(b: &[f32], m: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(b, m, cols, heads, |gguf, hf| (hf, gguf))
}

/// `out[to] = b[from]` for each row pair `(from, to) = pair(gguf, hf)` of
/// the converter's permutation.
fn move_rows(
    b: &[f32],
    m: usize,
    cols: usize,
    heads: usize,
    pair: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let d = m / heads;
    let mut out = vec![0.0; b.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for s in 0..2 {
                let (from, to) = pair(h * d + 2 * i + s, h * d + s * d / 2 + i);
                out[to * cols..(to + 1) * cols].copy_from_slice(&b[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// A LoRA read and checked against its base: per GGUF tensor,
/// `ΔW = scale · B A`.
#[derive(Debug)]
pub struct Lora {
    pub format: Format,
    /// By GGUF tensor name.
    pub updates: BTreeMap<String, Update>,
}

/// One tensor's LoRA update, in the GGUF's row order.
#[derive(Debug)]
pub struct Update {
    /// `[rank, n]`, row-major.
    pub a: Vec<f32>,
    /// `[m, rank]`, row-major.
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

impl Update {
    /// `w += scale · B A` for the row-major `[m, n]` matrix `w`.
    pub fn add_to(&self, w: &mut [f32], m: usize, n: usize) {
        let r = self.rank;
        let b = faer::Mat::<f32>::from_fn(m, r, |i, j| self.scale * self.b[i * r + j]);
        let a = faer::Mat::<f32>::from_fn(r, n, |i, j| self.a[i * n + j]);
        let product = &b * &a;
        for i in 0..m {
            for j in 0..n {
                w[i * n + j] += product[(i, j)];
            }
        }
    }
}

/// The largest LoRA file or weights file read (4 GiB).
const MAX_LORA_BYTES: u64 = 4 << 30;

impl Lora {
    /// Reads the LoRA at `path` (a PEFT directory, or a GGUF LoRA file)
    /// for the model `gguf`; every problem is an error naming it.
    pub fn read(path: &Path, gguf: &GgufFile) -> Result<Lora, LoraError> {
        let config = Config::from_gguf(gguf).map_err(FactorError::from)?;
        if path.is_dir() {
            return read_peft(path, gguf, &config);
        }
        let mut magic = [0u8; 4];
        let opened = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
        match opened {
            Ok(()) if &magic == b"GGUF" => read_gguf(path, gguf, &config),
            Ok(()) => Err(bad(path, "neither a PEFT directory nor a GGUF LoRA file")),
            Err(e) => Err(LoraError::Io {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> LoraError {
    LoraError::Invalid(format!("{}: {reason}", path.display()))
}

/// The file's bytes, at most [`MAX_LORA_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, LoraError> {
    let io = |e: std::io::Error| LoraError::Io {
        path: path.display().to_string(),
        source: e,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_LORA_BYTES {
        return Err(bad(
            path,
            format!("{size} bytes; at most {MAX_LORA_BYTES} are read"),
        ));
    }
    std::fs::read(path).map_err(io)
}

/// Checks `a` `[r, n]` and `b` `[m, r]` against the base tensor `name` and
/// makes the update.
fn update(
    path: &Path,
    gguf: &GgufFile,
    name: &str,
    (a, a_shape): (Vec<f32>, [usize; 2]),
    (b, b_shape): (Vec<f32>, [usize; 2]),
    scale: impl FnOnce(usize) -> f32,
) -> Result<Update, LoraError> {
    let info = gguf
        .tensor(name)
        .ok_or_else(|| bad(path, format!("{name}: the base model has no such matrix")))?;
    let (n, m) = (info.ne[0] as usize, info.ne[1] as usize);
    let [r, a_n] = a_shape;
    let [b_m, b_r] = b_shape;
    if a_n != n || b_m != m || b_r != r {
        return Err(bad(
            path,
            format!(
                "{name}: A is [{r}, {a_n}] and B [{b_m}, {b_r}], but the base matrix is [{m}, {n}] \
                 (B A must be [{m}, {n}])"
            ),
        ));
    }
    if r == 0 || r > m.min(n) {
        return Err(bad(
            path,
            format!(
                "{name}: rank {r}; a [{m}, {n}] matrix takes 1 to {}",
                m.min(n)
            ),
        ));
    }
    for (which, values) in [("A", &a), ("B", &b)] {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(
                path,
                format!("{name}: {which} value {i} is {}", values[i]),
            ));
        }
    }
    let scale = scale(r);
    if !scale.is_finite() {
        return Err(bad(path, format!("{name}: the scale is {scale}")));
    }
    Ok(Update {
        a,
        b,
        rank: r,
        scale,
    })
}

/// llama.cpp's GGUF LoRA: `NAME.lora_a` `[n, r]` and `NAME.lora_b`
/// `[r, m]` pairs, scaled by `adapter.lora.alpha / r` (by 1 when alpha is
/// 0 or absent).
fn read_gguf(path: &Path, base: &GgufFile, config: &Config) -> Result<Lora, LoraError> {
    let file = GgufFile::open(path)?;
    let key = |k: &str| file.get_str(k).ok().flatten().unwrap_or_default();
    if key("general.type") != "adapter" || key("adapter.type") != "lora" {
        return Err(bad(
            path,
            "not a LoRA (general.type must be 'adapter' and adapter.type 'lora')",
        ));
    }
    let arch = key("general.architecture");
    if arch != config.arch.name() {
        return Err(bad(
            path,
            format!(
                "a LoRA for architecture '{}', the model is '{}'",
                crate::store::shown(&arch),
                config.arch.name()
            ),
        ));
    }
    let alpha = file
        .get_f32("adapter.lora.alpha")
        .ok()
        .flatten()
        .unwrap_or(0.0);
    let mut pairs: BTreeMap<String, [Option<&crate::ggml::gguf::TensorInfo>; 2]> = BTreeMap::new();
    for info in file.tensors() {
        let (name, side) = if let Some(name) = info.name.strip_suffix(".lora_a") {
            (name, 0)
        } else if let Some(name) = info.name.strip_suffix(".lora_b") {
            (name, 1)
        } else {
            return Err(bad(
                path,
                format!(
                    "tensor '{}' is not a lora_a or lora_b",
                    crate::store::shown(&info.name)
                ),
            ));
        };
        pairs.entry(name.to_string()).or_default()[side] = Some(info);
    }
    let read = |info: &crate::ggml::gguf::TensorInfo| -> Result<(Vec<f32>, [usize; 2]), LoraError> {
        if info.ne[2] != 1 || info.ne[3] != 1 {
            return Err(bad(path, format!("{}: not a matrix", info.name)));
        }
        let bytes = file.read_tensor_bytes(info)?;
        let n = info.ne[0] as usize * info.ne[1] as usize;
        let values = crate::ggml::dequantize(info.ty, &bytes, n)
            .ok_or_else(|| bad(path, format!("{}: type {} is not read", info.name, info.ty)))?;
        Ok((values, [info.ne[1] as usize, info.ne[0] as usize]))
    };
    let mut updates = BTreeMap::new();
    for (name, pair) in pairs {
        let [Some(a), Some(b)] = pair else {
            return Err(bad(
                path,
                format!("{name}: lora_a and lora_b come in pairs"),
            ));
        };
        let scale = |r: usize| if alpha == 0.0 { 1.0 } else { alpha / r as f32 };
        let u = update(path, base, &name, read(a)?, read(b)?, scale)?;
        updates.insert(name, u);
    }
    if updates.is_empty() {
        return Err(bad(path, "no LoRA tensors"));
    }
    Ok(Lora {
        format: Format::GgufLora,
        updates,
    })
}

/// A PEFT directory: `adapter_config.json` (`r`, `lora_alpha`,
/// `use_rslora`, `rank_pattern`, `alpha_pattern`) and
/// `adapter_model.safetensors` (`...layers.L.MODULE.lora_{A,B}.weight`).
fn read_peft(dir: &Path, base: &GgufFile, config: &Config) -> Result<Lora, LoraError> {
    use serde_json::Value;
    let config_path = dir.join("adapter_config.json");
    let text = read_bounded(&config_path)?;
    let peft: Value = serde_json::from_slice(&text)
        .map_err(|e| bad(&config_path, format!("not valid JSON: {e}")))?;
    let field = |k: &str| peft.get(k).filter(|v| !v.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(
                &config_path,
                format!("peft_type {other:?}: only LORA adapters are read"),
            ))
        }
    }
    for (key, harmless) in [
        ("use_dora", Value::Bool(false)),
        ("fan_in_fan_out", Value::Bool(false)),
        ("bias", Value::String("none".into())),
    ] {
        if field(key).is_some_and(|v| *v != harmless) {
            return Err(bad(
                &config_path,
                format!(
                    "{key} {} is not supported (only {harmless})",
                    field(key).unwrap()
                ),
            ));
        }
    }
    let number = |k: &str| field(k).and_then(Value::as_f64);
    let r = number("r").ok_or_else(|| bad(&config_path, "r is required"))?;
    let alpha = number("lora_alpha").unwrap_or(r);
    let rslora = field("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let pattern = |k: &str, module: &str| -> Option<f64> {
        let map = field(k)?.as_object()?;
        map.iter()
            .find(|(key, _)| module == key.as_str() || module.ends_with(&format!(".{key}")))
            .and_then(|(_, v)| v.as_f64())
    };

    let weights = dir.join("adapter_model.safetensors");
    let bytes = read_bounded(&weights)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(&weights, format!("not a safetensors file: {e}")))?;
    let mut pairs: BTreeMap<(usize, String), [Option<String>; 2]> = BTreeMap::new();
    for name in st.names() {
        let (module, side) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(bad(
                &weights,
                format!(
                    "tensor '{}' is not a lora_A or lora_B weight",
                    crate::store::shown(name)
                ),
            ));
        };
        let (_, layers) = module.split_once("layers.").ok_or_else(|| {
            bad(
                &weights,
                format!("{}: not a layer's module", crate::store::shown(name)),
            )
        })?;
        let (layer, module) = layers
            .split_once('.')
            .and_then(|(l, m)| Some((l.parse::<usize>().ok()?, m)))
            .ok_or_else(|| {
                bad(
                    &weights,
                    format!("{}: no layer number", crate::store::shown(name)),
                )
            })?;
        pairs.entry((layer, module.to_string())).or_default()[side] = Some(name.to_string());
    }
    let read = |name: &str| -> Result<(Vec<f32>, [usize; 2]), LoraError> {
        let view = st
            .tensor(name)
            .map_err(|e| bad(&weights, format!("{name}: {e}")))?;
        let shape = view.shape();
        let [rows, cols] = shape else {
            return Err(bad(
                &weights,
                format!("{name}: shape {shape:?} is not a matrix"),
            ));
        };
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => crate::tensorfile::f32s(data),
            safetensors::Dtype::F16 => {
                let bits: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                let mut values = vec![0.0; bits.len()];
                crate::ggml::f16_to_f32(&bits, &mut values);
                values
            }
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            other => {
                return Err(bad(
                    &weights,
                    format!("{name}: dtype {other:?} is not read"),
                ))
            }
        };
        Ok((values, [*rows, *cols]))
    };
    let mut updates = BTreeMap::new();
    for ((layer, module), [a, b]) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(
                &weights,
                format!("layer {layer} {module}: lora_A and lora_B come in pairs"),
            ));
        };
        let name = gguf_tensor(config, layer, &module).ok_or_else(|| {
            bad(
                &weights,
                format!(
                    "layer {layer} module '{}': not a matrix svfit maps (q/k/v/o_proj, \
                     gate/up/down_proj, qkv_proj, gate_up_proj)",
                    crate::store::shown(&module)
                ),
            )
        })?;
        if layer >= config.n_layer {
            return Err(bad(
                &weights,
                format!("layer {layer}: the model has {}", config.n_layer),
            ));
        }
        let key = format!("model.layers.{layer}.{module}");
        let (a, mut b) = (read(&a)?, read(&b)?);
        let rank = pattern("rank_pattern", &key).unwrap_or(r);
        if rank as usize != a.1[0] {
            return Err(bad(
                &weights,
                format!(
                    "{key}: the config's rank is {rank}, lora_A has {} rows",
                    a.1[0]
                ),
            ));
        }
        let alpha = pattern("alpha_pattern", &key).unwrap_or(alpha);
        if let Some(heads) = permuted_heads(config, &name) {
            let [m, r] = b.1;
            if m % heads != 0 || (m / heads) % 2 != 0 {
                return Err(bad(
                    &weights,
                    format!("{key}: {m} rows do not split into {heads} heads"),
                ));
            }
            b.0 = permute_rows(&b.0, m, r, heads);
        }
        let scale = |r: usize| {
            let r = r as f64;
            (if rslora { alpha / r.sqrt() } else { alpha / r }) as f32
        };
        let u = update(&weights, base, &name, a, b, scale)?;
        updates.insert(name, u);
    }
    if updates.is_empty() {
        return Err(bad(&weights, "no LoRA tensors"));
    }
    Ok(Lora {
        format: Format::Peft,
        updates,
    })
}

/// The GGUF tensor of Hugging Face module `module` of layer `layer`.
fn gguf_tensor(config: &Config, layer: usize, module: &str) -> Option<String> {
    let phi3 = config.arch.name() == "phi3";
    let kind = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.gate_up_proj" if phi3 => "ffn_up",
        "mlp.up_proj" if !phi3 => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{kind}.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermuting_inverts_the_converters_permutation() {
        // llama.cpp's `permute`: reshape(heads, 2, d/2, ...).swapaxes(1, 2).
        let (heads, d, cols) = (2, 6, 1);
        let hf: Vec<f32> = (0..heads * d).map(|i| i as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..d / 2 {
                    gguf[h * d + 2 * i + s] = hf[h * d + s * d / 2 + i];
                }
            }
        }
        assert_eq!(gguf[..6], [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(unpermute_rows(&gguf, heads * d, cols, heads), hf);
        assert_eq!(permute_rows(&hf, heads * d, cols, heads), gguf);
    }
}
