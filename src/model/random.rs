//! Llama models with random weights, written as GGUF: the tests' tiny model,
//! and models of real shapes for device checks where the real file cannot
//! travel (`svfit check --shape`). Weights are N(0, 1/fan-in), norms near 1,
//! so activations keep their scale through the layers and the logits are
//! far from constant; a fixed seed gives the same file every time.

use std::path::Path;

use crate::ggml::gguf::{GgufFile, GgufWriter};
use crate::ggml::{self, Type};

use super::ModelError;

/// The hyper-parameters of a random llama model.
#[derive(Clone, Debug)]
pub struct Shape {
    /// The GGUF's architecture name (its keys' prefix); the engine runs
    /// "llama".
    pub arch: &'static str,
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
        n_vocab: 49152,
        n_embd: 2048,
        n_head: 32,
        n_head_kv: 8,
        n_ff: 8192,
        n_layer: 16,
        n_ctx: 2048,
    };

    /// The shape of the llama model in `gguf`, read from its metadata alone
    /// (a file of `svfit check --write-metadata` has no tensors): the vocabulary
    /// is the tokenizer's.
    pub fn of(gguf: &GgufFile) -> Result<Self, ModelError> {
        let int = |k: &str| -> Result<usize, ModelError> {
            match gguf.get_int(&format!("llama.{k}"))? {
                Some(v) if v > 0 => Ok(v as usize),
                _ => Err(ModelError::Metadata(format!(
                    "llama.{k} is missing or not positive"
                ))),
            }
        };
        let n_head = int("attention.head_count")?;
        Ok(Shape {
            arch: "llama",
            n_vocab: gguf.get_arr_len("tokenizer.ggml.tokens")?.unwrap_or(0),
            n_embd: int("embedding_length")?,
            n_head,
            n_head_kv: int("attention.head_count_kv").unwrap_or(n_head),
            n_ff: int("feed_forward_length")?,
            n_layer: int("block_count")?,
            n_ctx: int("context_length")?,
        })
    }

    /// Parameters of the matrices (embeddings tied to the output).
    pub fn n_params(&self) -> usize {
        let kv = self.n_embd / self.n_head * self.n_head_kv;
        let layer =
            2 * self.n_embd * self.n_embd + 2 * self.n_embd * kv + 3 * self.n_embd * self.n_ff;
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
}

impl Types<'_> {
    fn of(&self, name: &str) -> Type {
        let kind = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .map_or(name, |(_, kind)| kind);
        match self {
            Types::Like(gguf) => gguf.tensor(name).map_or(Type::F32, |t| t.ty),
            _ if kind.contains("norm") => Type::F32,
            Types::Mixed => match kind {
                "token_embd.weight" | "attn_v.weight" | "ffn_down.weight" => Type::Q8_0,
                "attn_q.weight" | "attn_k.weight" => Type::F16,
                "attn_output.weight" => Type::Q4_1,
                _ => Type::F32,
            },
            Types::Quantized => match kind {
                "token_embd.weight" => Type::Q8_0,
                "attn_output.weight" => Type::F16,
                _ => Type::Q4_1,
            },
        }
    }
}

/// A deterministic normal generator (xorshift64 and Box-Muller).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    pub fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }

    /// `n` token ids drawn uniformly from a vocabulary of `n_vocab`.
    pub fn tokens(&mut self, n: usize, n_vocab: usize) -> Vec<u32> {
        let top = n_vocab.saturating_sub(1);
        (0..n)
            .map(|_| ((self.uniform() * n_vocab as f32) as usize).min(top) as u32)
            .collect()
    }
}

/// Writes a random llama model of `shape` to `path`. With `metadata`, every
/// key of that file is copied first (its tokenizer above all, whose size
/// must be `shape.n_vocab`), then the shape's keys are set over them;
/// without, the model has no tokenizer ("no_vocab": token ids only).
pub fn write(
    path: &Path,
    shape: &Shape,
    types: &Types,
    metadata: Option<&GgufFile>,
    seed: u64,
) -> Result<(), ModelError> {
    let arch = shape.arch;
    let mut w = GgufWriter::new(2 + 9 * shape.n_layer)?;
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
        }
        None => w.set_str("tokenizer.ggml.model", "no_vocab")?,
    }
    w.set_str("general.architecture", arch)?;
    w.set_str("general.name", "svfit-random")?;
    let u32_keys = [
        ("block_count", shape.n_layer),
        ("context_length", shape.n_ctx),
        ("embedding_length", shape.n_embd),
        ("feed_forward_length", shape.n_ff),
        ("attention.head_count", shape.n_head),
        ("attention.head_count_kv", shape.n_head_kv),
        ("rope.dimension_count", shape.n_embd / shape.n_head),
        ("vocab_size", shape.n_vocab),
    ];
    for (key, value) in u32_keys {
        w.set_u32(&format!("{arch}.{key}"), value as u32)?;
    }
    w.set_f32(&format!("{arch}.rope.freq_base"), 10000.0)?;
    w.set_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5)?;

    let mut rng = Rng::new(seed);
    let mut add = |w: &mut GgufWriter, name: &str, n_in: usize, n_out: usize, std: f32| {
        let ty = types.of(name);
        let values = if name.contains("norm") {
            (0..n_in).map(|_| 1.0 + 0.1 * rng.normal()).collect()
        } else {
            rng.normals(n_in * n_out, std)
        };
        let bytes = ggml::quantize(ty, &values, n_in).ok_or_else(|| {
            ModelError::Unsupported(format!("{name}: rows of {n_in} cannot be {ty:?}"))
        })?;
        let shape: &[i64] = if n_out == 1 {
            &[n_in as i64]
        } else {
            &[n_in as i64, n_out as i64]
        };
        w.add_tensor(name, ty, shape, bytes)?;
        Ok::<_, ModelError>(())
    };
    let (e, f, v) = (shape.n_embd, shape.n_ff, shape.n_vocab);
    let kv = e / shape.n_head * shape.n_head_kv;
    let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
    add(&mut w, "token_embd.weight", e, v, 1.0)?;
    add(&mut w, "output_norm.weight", e, 1, 0.0)?;
    for l in 0..shape.n_layer {
        let name = |k: &str| format!("blk.{l}.{k}.weight");
        add(&mut w, &name("attn_norm"), e, 1, 0.0)?;
        add(&mut w, &name("attn_q"), e, e, fan_in(e))?;
        add(&mut w, &name("attn_k"), e, kv, fan_in(e))?;
        add(&mut w, &name("attn_v"), e, kv, fan_in(e))?;
        add(&mut w, &name("attn_output"), e, e, fan_in(e))?;
        add(&mut w, &name("ffn_norm"), e, 1, 0.0)?;
        add(&mut w, &name("ffn_gate"), e, f, fan_in(e))?;
        add(&mut w, &name("ffn_up"), e, f, fan_in(e))?;
        add(&mut w, &name("ffn_down"), f, e, fan_in(f))?;
    }
    w.write(path)?;
    Ok(())
}
