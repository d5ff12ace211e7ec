//! Models with random weights, written as GGUF with the tensor names, shapes
//! and metadata llama.cpp's converter writes for each family: the tests'
//! tiny models, and models of real shapes for device checks where the real
//! file cannot travel (`svfit check --shape`). Weights are N(0, 1/fan-in), norms near 1,
//! so activations keep their scale through the layers and the logits are
//! far from constant; a fixed seed gives the same file every time.

use std::path::Path;

use crate::ggml::gguf::{GgufFile, GgufWriter};
use crate::ggml::{self, Type};
use crate::rng::Rng;

use super::config::Arch;
use super::ModelError;

/// The hyper-parameters of a random model.
#[derive(Clone, Debug)]
pub struct Shape {
    /// The GGUF's architecture name (its keys' prefix): one of
    /// [`SUPPORTED_ARCHITECTURES`](super::SUPPORTED_ARCHITECTURES) gets
    /// that family's tensors and keys, any other llama's.
    pub arch: &'static str,
    /// Width of a head (`None`: `n_embd / n_head`).
    pub head_dim: Option<usize>,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub n_ctx: usize,
}

impl Shape {
    /// The tests' tiny model: 512 tokens, 64 wide, 2 layers.
    pub const TINY: Shape = Shape {
        arch: "llama",
        head_dim: None,
        n_vocab: 512,
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 128,
        n_layer: 2,
        n_ctx: 512,
    };

    /// About a billion parameters with a 49k vocabulary (Llama 3.2 1B's
    /// widths, 16 layers).
    pub const ONE_B: Shape = Shape {
        arch: "llama",
        head_dim: None,
        n_vocab: 49152,
        n_embd: 2048,
        n_head: 32,
        n_head_kv: 8,
        n_ff: 8192,
        n_layer: 16,
        n_ctx: 2048,
    };

    /// Llama 3.2 3B's widths and depth (28 layers), with a 49k vocabulary.
    pub const THREE_B: Shape = Shape {
        n_embd: 3072,
        n_head: 24,
        n_ff: 8192,
        n_layer: 28,
        ..Shape::ONE_B
    };

    /// Llama 3.1 8B's widths and depth (32 layers), with a 49k vocabulary.
    pub const EIGHT_B: Shape = Shape {
        n_embd: 4096,
        n_head: 32,
        n_ff: 14336,
        n_layer: 32,
        ..Shape::ONE_B
    };

    /// The tests' tiny model of a family: [`Shape::TINY`] with heads wider
    /// than `n_embd / n_head` for Gemma, and one KV head for Gemma 3, as
    /// their files have.
    pub fn tiny(arch: Arch) -> Shape {
        match arch {
            Arch::Gemma2 => Shape {
                arch: arch.name(),
                head_dim: Some(32),
                ..Shape::TINY
            },
            Arch::Gemma3 => Shape {
                arch: arch.name(),
                head_dim: Some(32),
                n_head_kv: 1,
                ..Shape::TINY
            },
            _ => Shape {
                arch: arch.name(),
                ..Shape::TINY
            },
        }
    }

    /// The shape of the model in `gguf`, read from its metadata alone (a
    /// file of `svfit check --write-metadata` has no tensors): the
    /// vocabulary is the tokenizer's.
    pub fn of(gguf: &GgufFile) -> Result<Self, ModelError> {
        let name = gguf.get_str("general.architecture")?.unwrap_or_default();
        let arch = Arch::from_name(&name).ok_or(ModelError::UnsupportedArchitecture(name))?;
        let int = |k: &str| -> Result<usize, ModelError> {
            let key = format!("{}.{k}", arch.name());
            match gguf.get_int(&key)? {
                Some(v) if v > 0 => Ok(v as usize),
                _ => Err(ModelError::Metadata(format!(
                    "{key} is missing or not positive"
                ))),
            }
        };
        let n_head = int("attention.head_count")?;
        Ok(Shape {
            arch: arch.name(),
            head_dim: int("attention.key_length").ok(),
            n_vocab: gguf.get_arr_len("tokenizer.ggml.tokens")?.unwrap_or(0),
            n_embd: int("embedding_length")?,
            n_head,
            n_head_kv: int("attention.head_count_kv").unwrap_or(n_head),
            n_ff: int("feed_forward_length")?,
            n_layer: int("block_count")?,
            n_ctx: int("context_length")?,
        })
    }

    /// Width of a head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head)
    }

    /// Parameters of the matrices (embeddings tied to the output).
    pub fn n_params(&self) -> usize {
        let q = self.head_dim() * self.n_head;
        let kv = self.head_dim() * self.n_head_kv;
        let layer = 2 * self.n_embd * q + 2 * self.n_embd * kv + 3 * self.n_embd * self.n_ff;
        self.n_vocab * self.n_embd + self.n_layer * layer
    }
}

/// The element type of each weight, by tensor name.
pub enum Types<'a> {
    /// One of each type the engine reads (f32, f16, q8_0, q4_1), spread
    /// over the matrices: the tests' mix.
    Mixed,
    /// As the model in this file stores them (f32 where it lacks the name).
    Like(&'a GgufFile),
    /// A quantized model as people serve it: q4_1 matrices, q8_0
    /// embeddings, f16 attention output.
    Quantized,
    /// Every matrix of the blocks in one type, q8_0 embeddings.
    All(Type),
}

impl Types<'_> {
    fn of(&self, name: &str) -> Type {
        let kind = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .map_or(name, |(_, kind)| kind);
        match self {
            Types::Like(gguf) => gguf.tensor(name).map_or(Type::F32, |t| t.ty),
            _ if kind.contains("norm") || kind.ends_with(".bias") => Type::F32,
            Types::Mixed => match kind {
                "token_embd.weight" | "attn_v.weight" | "attn_qkv.weight" | "ffn_down.weight" => {
                    Type::Q8_0
                }
                "attn_q.weight" | "attn_k.weight" => Type::F16,
                "attn_output.weight" => Type::Q4_1,
                _ => Type::F32,
            },
            Types::Quantized => match kind {
                "token_embd.weight" => Type::Q8_0,
                "attn_output.weight" => Type::F16,
                _ => Type::Q4_1,
            },
            Types::All(_) if kind == "token_embd.weight" => Type::Q8_0,
            &Types::All(ty) => ty,
        }
    }
}

/// Writes a random model of `shape` to `path`. With `metadata`, every key
/// of that file is copied first (its tokenizer above all, whose size must
/// be `shape.n_vocab`) but those of another family's hyper-parameters,
/// then the shape's keys are set over them; without,
/// the model has no tokenizer ("no_vocab": token ids only).
pub fn write(
    path: &Path,
    shape: &Shape,
    types: &Types,
    metadata: Option<&GgufFile>,
    seed: u64,
) -> Result<(), ModelError> {
    let family = Arch::from_name(shape.arch).unwrap_or(Arch::Llama);
    let mut w = GgufWriter::new(2 + 17 * shape.n_layer)?;
    match metadata {
        Some(src) => {
            let tokens = src.get_arr_len("tokenizer.ggml.tokens")?.unwrap_or(0);
            if tokens != shape.n_vocab {
                return Err(ModelError::Metadata(format!(
                    "the tokenizer has {tokens} tokens, the shape {}",
                    shape.n_vocab
                )));
            }
            w.copy_metadata_from(src);
            drop_other_family(&mut w, src, shape.arch)?;
        }
        None => w.set_str("tokenizer.ggml.model", "no_vocab")?,
    }
    write_keys(&mut w, shape, family)?;
    let mut tensors = Tensors {
        w: &mut w,
        types,
        rng: Rng::new(seed),
    };
    let (e, f, v) = (shape.n_embd, shape.n_ff, shape.n_vocab);
    let (q, kv, hd) = (
        shape.head_dim() * shape.n_head,
        shape.head_dim() * shape.n_head_kv,
        shape.head_dim(),
    );
    let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
    tensors.add("token_embd.weight", e, v, 1.0)?;
    tensors.add("output_norm.weight", e, 1, 0.0)?;
    for l in 0..shape.n_layer {
        let name = |k: &str| format!("blk.{l}.{k}.weight");
        tensors.add(&name("attn_norm"), e, 1, 0.0)?;
        if family.fused_qkv() {
            tensors.add(&name("attn_qkv"), e, q + 2 * kv, fan_in(e))?;
        } else {
            tensors.add(&name("attn_q"), e, q, fan_in(e))?;
            tensors.add(&name("attn_k"), e, kv, fan_in(e))?;
            tensors.add(&name("attn_v"), e, kv, fan_in(e))?;
        }
        tensors.add(&name("attn_output"), q, e, fan_in(q))?;
        tensors.add(&name("ffn_norm"), e, 1, 0.0)?;
        if family.fused_gate_up() {
            tensors.add(&name("ffn_up"), e, 2 * f, fan_in(e))?;
        } else {
            tensors.add(&name("ffn_gate"), e, f, fan_in(e))?;
            tensors.add(&name("ffn_up"), e, f, fan_in(e))?;
        }
        tensors.add(&name("ffn_down"), f, e, fan_in(f))?;
        if family == Arch::Qwen2 {
            for (kind, n) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                tensors.add(&format!("blk.{l}.{kind}.bias"), n, 1, 0.5)?;
            }
        }
        if family.qk_norm() {
            tensors.add(&name("attn_q_norm"), hd, 1, 0.0)?;
            tensors.add(&name("attn_k_norm"), hd, 1, 0.0)?;
        }
        if family.post_norms() {
            tensors.add(&name("post_attention_norm"), e, 1, 0.0)?;
            tensors.add(&name("post_ffw_norm"), e, 1, 0.0)?;
        }
    }
    w.write(path)?;
    Ok(())
}

/// Removes the keys of `src`'s own family (`{arch}.`) where that is not
/// `arch`: a llama file's hyper-parameters are no part of a gemma3 model.
fn drop_other_family(w: &mut GgufWriter, src: &GgufFile, arch: &str) -> Result<(), ModelError> {
    let Some(other) = src.get_str("general.architecture")?.filter(|a| a != arch) else {
        return Ok(());
    };
    let prefix = format!("{other}.");
    for key in src.keys().iter().filter(|k| k.starts_with(&prefix)) {
        w.remove_key(key)?;
    }
    Ok(())
}

/// The metadata of a random model of `shape`: llama.cpp's keys for the
/// family. Phi-3's gets a sliding window (which llama.cpp turns off);
/// Gemma 3's tiny model gets a sliding window of 16 in every other
/// layer, its own RoPE base there and soft-capped logits, so that each of
/// those keys is read.
fn write_keys(w: &mut GgufWriter, shape: &Shape, family: Arch) -> Result<(), ModelError> {
    let arch = shape.arch;
    w.set_str("general.architecture", arch)?;
    w.set_str("general.name", "svfit-random")?;
    let u32_keys = [
        ("block_count", shape.n_layer),
        ("context_length", shape.n_ctx),
        ("embedding_length", shape.n_embd),
        ("feed_forward_length", shape.n_ff),
        ("attention.head_count", shape.n_head),
        ("attention.head_count_kv", shape.n_head_kv),
        ("rope.dimension_count", shape.head_dim()),
        ("vocab_size", shape.n_vocab),
    ];
    for (key, value) in u32_keys {
        w.set_u32(&format!("{arch}.{key}"), value as u32)?;
    }
    if shape.head_dim.is_some() || family == Arch::Qwen3 || family.is_gemma() {
        w.set_u32(
            &format!("{arch}.attention.key_length"),
            shape.head_dim() as u32,
        )?;
        w.set_u32(
            &format!("{arch}.attention.value_length"),
            shape.head_dim() as u32,
        )?;
    }
    let (freq_base, eps) = match family {
        Arch::Gemma2 => (10_000.0, 1e-6),
        Arch::Gemma3 => (1_000_000.0, 1e-6),
        Arch::Qwen2 | Arch::Qwen3 => (1_000_000.0, 1e-6),
        Arch::Llama | Arch::Phi3 => (10_000.0, 1e-5),
    };
    w.set_f32(&format!("{arch}.rope.freq_base"), freq_base)?;
    w.set_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), eps)?;
    if family == Arch::Gemma3 {
        w.set_u32(&format!("{arch}.attention.sliding_window"), 16)?;
        w.set_u32(&format!("{arch}.attention.sliding_window_pattern"), 2)?;
        w.set_f32(&format!("{arch}.rope.freq_base_swa"), 20_000.0)?;
        w.set_f32(&format!("{arch}.final_logit_softcapping"), 30.0)?;
    }
    if family == Arch::Phi3 {
        // As Phi-3 mini's converter writes them: a window that llama.cpp
        // reads and turns off, and the context it was trained with.
        w.set_u32(&format!("{arch}.attention.sliding_window"), 16)?;
        w.set_u32(
            &format!("{arch}.rope.scaling.original_context_length"),
            shape.n_ctx as u32,
        )?;
    }
    if family == Arch::Gemma2 {
        // Every other layer slides (the default pattern); the final cap is
        // the default 30, the scores' cap set low enough to bite.
        w.set_u32(&format!("{arch}.attention.sliding_window"), 16)?;
        w.set_f32(&format!("{arch}.attn_logit_softcapping"), 5.0)?;
    }
    Ok(())
}

/// Adds random tensors to a writer: matrices N(0, std²) `[n_in, n_out]`,
/// vectors (`n_out` = 1) near 1 for norms, N(0, std²) for biases.
struct Tensors<'w, 't> {
    w: &'w mut GgufWriter,
    types: &'t Types<'t>,
    rng: Rng,
}

impl Tensors<'_, '_> {
    fn add(&mut self, name: &str, n_in: usize, n_out: usize, std: f32) -> Result<(), ModelError> {
        let ty = self.types.of(name);
        let values = if name.contains("norm") {
            (0..n_in).map(|_| 1.0 + 0.1 * self.rng.normal()).collect()
        } else {
            self.rng.normals(n_in * n_out, std)
        };
        let bytes = ggml::quantize(ty, &values, n_in).ok_or_else(|| {
            ModelError::Unsupported(format!("{name}: rows of {n_in} cannot be {ty:?}"))
        })?;
        let shape: &[i64] = if n_out == 1 {
            &[n_in as i64]
        } else {
            &[n_in as i64, n_out as i64]
        };
        self.w.add_tensor(name, ty, shape, bytes)?;
        Ok(())
    }
}
