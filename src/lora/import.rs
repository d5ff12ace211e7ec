//! LoRA in: a PEFT directory or a GGUF LoRA, read and checked against
//! the base (see the module above).

use std::collections::BTreeMap;
use std::path::Path;

use super::{permute_rows, permuted_heads, Format, LoraError};
use crate::adapter::{LowRank, LowRanks};
use crate::factors::{FactorError, KINDS};
use crate::ggml::gguf::GgufFile;
use crate::model::Config;

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
        let b = |i: usize, j: usize| self.scale * self.b[i * r + j];
        crate::merge::add_product(w, (m, n, r), b, &self.a);
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

impl Lora {
    /// The updates per target matrix (`blk.L.kind`), as the engine serves
    /// them: a fused tensor's update is cut into its matrices' rows (a part
    /// whose rows are all zero is left out), and the scale is folded into
    /// `B`. A LoRA of a tensor that is not a linear matrix of the blocks
    /// (the output head, the embeddings) is refused.
    pub fn low_ranks(&self, config: &Config) -> Result<LowRanks, LoraError> {
        let mut out = LowRanks::new();
        for (name, u) in &self.updates {
            let parsed = name
                .strip_prefix("blk.")
                .and_then(|rest| rest.strip_suffix(".weight"))
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(l, t)| Some((l.parse::<usize>().ok()?, t)));
            let parts: Vec<(&str, std::ops::Range<usize>)> = match parsed {
                Some((_, tensor)) => KINDS
                    .iter()
                    .filter_map(|&(_, kind)| {
                        let slice = config.matrix_slice(kind)?;
                        (slice.tensor == tensor).then_some((kind, slice.rows))
                    })
                    .collect(),
                None => Vec::new(),
            };
            let Some((layer, _)) = parsed.filter(|_| !parts.is_empty()) else {
                return Err(LoraError::Unsupported(format!(
                    "{name}: a LoRA of this tensor is merged (svfit merge --lora), not served; \
                     svfit serves LoRAs of the blocks' q, k, v, o, gate, up and down"
                )));
            };
            let r = u.rank;
            for (kind, rows) in parts {
                let b: Vec<f32> = u.b[rows.start * r..rows.end * r]
                    .iter()
                    .map(|v| u.scale * v)
                    .collect();
                if b.iter().all(|&v| v == 0.0) {
                    continue;
                }
                out.push((
                    format!("blk.{layer}.{kind}"),
                    LowRank {
                        a: u.a.clone(),
                        b,
                        rank: r,
                    },
                ));
            }
        }
        Ok(out)
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
    // Above min(m, n) a LoRA is redundant but exact: a fused tensor's
    // stacks its parts' ranks (an export of q, k and v in `attn_qkv`).
    if r == 0 || r > m.max(n) {
        return Err(bad(
            path,
            format!(
                "{name}: rank {r}; a [{m}, {n}] matrix takes 1 to {}",
                m.max(n)
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
