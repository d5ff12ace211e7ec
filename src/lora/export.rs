//! LoRA out: an adapter's update written as a GGUF LoRA or a PEFT
//! directory (see the module above).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::{permuted_heads, unpermute_rows, Format, LoraError};
use crate::adapter::Deltas;
use crate::factors::{Factor, FactorError, TargetMatrix};
use crate::ggml::gguf::{GgufFile, GgufWriter};
use crate::ggml::Type;
use crate::merge::parts_by_tensor;
use crate::model::Config;

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
