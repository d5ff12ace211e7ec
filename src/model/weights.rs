//! The model's weights: every tensor is looked up by its GGUF name here, and
//! only here, with its shape checked against the config.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use crate::ggml::gguf::{GgufFile, GgufWriter, TensorInfo};
use crate::ggml::kernel::Matrix;
use crate::ggml::{Backend, Context, Tensor, TensorId, TensorSet, Type};

use super::config::Arch;
use super::{Config, ModelError};

/// How the model's weight matrices are held in memory (`--weights`).
///
/// ggml's CPU kernels cost as much per column at a batch of 8 as at 1; our
/// batched kernels (`ggml::kernel`: Q8_0, Q4_0, Q5_0, Q4_1, Q4_K, Q6_K)
/// read the stored blocks once per 8 columns and compute the same numbers
/// as ggml. So the default serves the file exactly, fast in batches; only
/// `q8_0` and `f16` change the numbers, and only when asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// As stored, in the fastest layout for the backend (on CPU, the
    /// batched kernels' where one reads the type): the same as `Keep`.
    #[default]
    Auto,
    /// As stored in the file (bit-exact with llama.cpp on the same file).
    Keep,
    /// Every matrix re-quantized to Q8_0.
    Q8_0,
    /// Every matrix as F16.
    F16,
}

impl WeightFormat {
    /// The type a tensor is held in. Only 2-D matrices change; norms and
    /// other vectors stay as stored.
    fn type_of(self, info: &TensorInfo) -> Type {
        let matrix = info.ne[1] > 1 && info.ne[2] == 1 && info.ne[3] == 1;
        let target = match self {
            _ if !matrix => return info.ty,
            WeightFormat::Auto | WeightFormat::Keep => return info.ty,
            WeightFormat::Q8_0 => Type::Q8_0,
            WeightFormat::F16 => Type::F16,
        };
        match target.row_size(info.ne[0]) {
            Some(_) => target,
            None => info.ty,
        }
    }
}

/// Bytes a tensor takes once loaded as `format` holds it.
pub fn held_bytes(format: WeightFormat, info: &TensorInfo) -> u64 {
    let rows = (info.ne[1] * info.ne[2] * info.ne[3]) as u64;
    let ty = format.type_of(info);
    ty.row_size(info.ne[0])
        .map_or(info.n_bytes as u64, |row| row as u64 * rows)
}

impl FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(WeightFormat::Auto),
            "keep" => Ok(WeightFormat::Keep),
            "q8_0" => Ok(WeightFormat::Q8_0),
            "f16" => Ok(WeightFormat::F16),
            _ => Err(format!(
                "unknown weight format '{s}' (use auto, keep, q8_0 or f16)"
            )),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::Auto => "auto",
            WeightFormat::Keep => "keep",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::F16 => "f16",
        })
    }
}

/// Writes the GGUF at `src` to `out` with its matrices in the types that
/// `format` holds them in at load, everything else
/// (metadata, tokenizer, other tensors) as it was: llama.cpp then runs the
/// very weights `svfit serve --weights FORMAT` runs. Returns the number of
/// matrices converted.
pub fn write_converted(src: &Path, format: WeightFormat, out: &Path) -> Result<usize, ModelError> {
    let gguf = GgufFile::open(src)?;
    let mut writer = GgufWriter::new(gguf.tensors().len())?;
    writer.copy_metadata_from(&gguf);
    let mut converted = 0;
    for info in gguf.tensors() {
        let ty = format.type_of(info);
        let bytes = gguf.read_tensor_bytes(info)?;
        let bytes = if ty == info.ty {
            bytes
        } else {
            converted += 1;
            gguf.convert(info, &bytes, ty)?
        };
        writer.add_tensor(&info.name, ty, info.shape(), bytes)?;
    }
    writer.write(out)?;
    Ok(converted)
}

/// How [`Weights::load`] holds the tensors.
#[derive(Clone, Copy, Debug)]
pub(super) enum Holding {
    /// Serving, as `WeightFormat` says.
    Serve(WeightFormat),
    /// Training: every matrix a backward pass goes through as f32.
    Train,
    /// Training through the stored types: as in the file, in the backend's
    /// own buffer (a backward pass reads no repacked layout and no custom op).
    Stored,
}

/// One transformer block's weights (ids into the weight set).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: TensorId,
    pub ffn_norm: TensorId,
    /// `(kind, matrix)` of every matrix tensor of the block, as the family
    /// stores them ([`matrix_tensors`]: `attn_q`, … or fused `attn_qkv`).
    matrices: Vec<(&'static str, TensorId)>,
    /// `(kind, bias)` of the matrices that have a bias in the file.
    pub biases: Vec<(&'static str, TensorId)>,
    /// Qwen3, Gemma: RMSNorm weights of each q and k head.
    pub attn_q_norm: Option<TensorId>,
    pub attn_k_norm: Option<TensorId>,
    /// Gemma: norms of the attention's and the FFN's outputs.
    pub post_attention_norm: Option<TensorId>,
    pub post_ffw_norm: Option<TensorId>,
}

pub struct Weights {
    set: TensorSet,
    /// Whether the batched CPU kernels (`ggml::kernel`: the same numbers
    /// as ggml's products, faster in batches) compute the products of the
    /// matrices of the types they read.
    batched: bool,
    pub token_embd: TensorId,
    pub output_norm: TensorId,
    /// `output.weight`, or `token_embd.weight` when the embeddings are tied.
    pub output: TensorId,
    pub layers: Vec<LayerWeights>,
    /// `rope_freqs.weight`: Llama 3's per-frequency RoPE factors (RoPE's
    /// frequency `i` divided by factor `i`), shared by every layer.
    pub rope_freqs: Option<TensorId>,
}

impl Weights {
    /// Checks every tensor's presence and shape, then loads them on `backend`
    /// as `holding` says: for training, every matrix that a backward pass
    /// goes through dequantized to f32 (all but an untied token embedding).
    /// With `batched` (the batched kernels run on `backend`), the products
    /// of served matrices go through them.
    pub fn load(
        gguf: &mut GgufFile,
        config: &Config,
        backend: &Backend,
        holding: Holding,
        batched: bool,
    ) -> Result<Self, ModelError> {
        check_tensors(gguf, config)?;
        // Never in ggml's repacked layouts (llama.cpp's default for Q4_0,
        // Q4_K and IQ4_NL on x86): their kernels round a column differently
        // in a batch of 4 than alone, so a sequence's logits would depend on
        // its batch. The oracle runs llama.cpp without them too (oracle.rs).
        let set = match holding {
            Holding::Serve(WeightFormat::Auto | WeightFormat::Keep) | Holding::Stored => {
                gguf.load_tensors(backend)?
            }
            Holding::Serve(format) => gguf.load_tensors_as(backend, |info| format.type_of(info))?,
            Holding::Train => {
                let tied = gguf.tensor("output.weight").is_none();
                let type_of = |info: &TensorInfo| {
                    if tied || info.name != "token_embd.weight" {
                        Type::F32
                    } else {
                        info.ty
                    }
                };
                gguf.load_tensors_as(backend, type_of)?
            }
        };
        let id = |name: &str| {
            set.find(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
        };
        let layers = (0..config.n_layer)
            .map(|l| {
                let t = |kind: &str| id(&format!("blk.{l}.{kind}.weight"));
                let optional = |kind: &str| set.find(&format!("blk.{l}.{kind}.weight"));
                let biases = config
                    .arch
                    .biases()
                    .iter()
                    .filter_map(|&kind| Some((kind, set.find(&format!("blk.{l}.{kind}.bias"))?)))
                    .collect();
                let matrices = matrix_tensors(config.arch)
                    .into_iter()
                    .map(|kind| Ok((kind, t(kind)?)))
                    .collect::<Result<_, ModelError>>()?;
                Ok(LayerWeights {
                    biases,
                    matrices,
                    attn_q_norm: optional("attn_q_norm"),
                    attn_k_norm: optional("attn_k_norm"),
                    post_attention_norm: optional("post_attention_norm"),
                    post_ffw_norm: optional("post_ffw_norm"),
                    attn_norm: t("attn_norm")?,
                    ffn_norm: t("ffn_norm")?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let token_embd = id("token_embd.weight")?;
        let output_norm = id("output_norm.weight")?;
        let output = set.find("output.weight").unwrap_or(token_embd);
        let rope_freqs = set.find("rope_freqs.weight");
        Ok(Weights {
            batched: batched && matches!(holding, Holding::Serve(_)),
            output,
            rope_freqs,
            output_norm,
            token_embd,
            layers,
            set,
        })
    }

    pub fn get(&self, id: TensorId) -> Tensor<'_> {
        self.set.get(id)
    }

    /// `w x` for the weight `w`, through a batched kernel where one takes
    /// it (the same numbers as ggml's product).
    pub fn product<'a>(&'a self, ctx: &'a Context, w: TensorId, x: Tensor<'a>) -> Tensor<'a> {
        let matrix = Matrix {
            tensor: self.get(w),
            batched: self.batched,
        };
        ctx.product(matrix, x)
    }
}

impl LayerWeights {
    /// The matrix tensor of `kind` (one of the family's
    /// [`matrix_tensors`]: `attn_q` … `ffn_down`, or a fused one).
    pub fn matrix(&self, kind: &str) -> TensorId {
        match self.matrices.iter().find(|(k, _)| *k == kind) {
            Some(&(_, id)) => id,
            None => unreachable!("the graph asks for its family's matrices only, not {kind}"),
        }
    }

    /// The bias of the matrix of `kind`, where the file has one.
    pub fn bias(&self, kind: &str) -> Option<TensorId> {
        self.biases
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|&(_, b)| b)
    }
}

/// The matrix tensors (kinds) of a block of the family: llama's seven, or
/// Phi-3's four with q/k/v fused in `attn_qkv` and gate/up in `ffn_up`.
pub fn matrix_tensors(arch: Arch) -> Vec<&'static str> {
    let attention: &[&str] = if arch.fused_qkv() {
        &["attn_qkv"]
    } else {
        &["attn_q", "attn_k", "attn_v"]
    };
    let ffn: &[&str] = if arch.fused_gate_up() {
        &["ffn_up"]
    } else {
        &["ffn_gate", "ffn_up"]
    };
    [attention, &["attn_output"], ffn, &["ffn_down"]].concat()
}

/// Where a layer's matrix of one kind (`attn_q` … `ffn_down`, the kinds
/// targets name) is stored: in the tensor of kind `tensor`, rows `rows`
/// (ggml's ne\[1\]; the whole tensor unless the family fuses it with
/// others).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatrixSlice {
    pub tensor: &'static str,
    pub rows: Range<usize>,
}

impl MatrixSlice {
    /// The GGUF name of the tensor in layer `layer`.
    pub fn tensor_name(&self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.tensor)
    }
}

impl Config {
    /// Where the matrix of `kind` lives in this model's files: q, k and v
    /// are the rows of `attn_qkv` in that order where the family fuses
    /// them, gate and up the two halves of `ffn_up`. `None` for a kind
    /// that is no matrix.
    pub fn matrix_slice(&self, kind: &str) -> Option<MatrixSlice> {
        let (embd, ff) = (self.n_embd, self.n_ff);
        let (q, kv) = (self.n_embd_q(), self.n_embd_kv());
        let (qkv, gate_up) = (self.arch.fused_qkv(), self.arch.fused_gate_up());
        let (tensor, rows) = match kind {
            "attn_q" if qkv => ("attn_qkv", 0..q),
            "attn_k" if qkv => ("attn_qkv", q..q + kv),
            "attn_v" if qkv => ("attn_qkv", q + kv..q + 2 * kv),
            "ffn_gate" if gate_up => ("ffn_up", 0..ff),
            "ffn_up" if gate_up => ("ffn_up", ff..2 * ff),
            "attn_q" => ("attn_q", 0..q),
            "attn_k" => ("attn_k", 0..kv),
            "attn_v" => ("attn_v", 0..kv),
            "attn_output" => ("attn_output", 0..embd),
            "ffn_gate" => ("ffn_gate", 0..ff),
            "ffn_up" => ("ffn_up", 0..ff),
            "ffn_down" => ("ffn_down", 0..embd),
            _ => return None,
        };
        Some(MatrixSlice { tensor, rows })
    }
}

/// Every tensor of the file is a weight of [`expected_shapes`], in its
/// shape, and every required one is there: a tensor the engine would not
/// read (a bias, a q/k norm, an expert) fails the load, naming it.
pub(super) fn check_tensors(gguf: &GgufFile, config: &Config) -> Result<(), ModelError> {
    let expected = expected_shapes(config);
    for (name, shape, required) in &expected {
        match gguf.tensor(name) {
            None if *required => return Err(ModelError::MissingTensor(name.clone())),
            None => {}
            Some(info) => {
                let mut want = [1i64; 4];
                want[..shape.len()].copy_from_slice(shape);
                if info.ne != want {
                    return Err(ModelError::TensorShape {
                        name: name.clone(),
                        expected: shape.to_vec(),
                        actual: info.ne.to_vec(),
                    });
                }
                // Vectors (norms, biases, RoPE factors) are added or
                // multiplied in f32, as every converter writes them.
                if shape.len() == 1 && info.ty != Type::F32 {
                    return Err(ModelError::NeedsSupport(format!(
                        "tensor {name} of type {}",
                        info.ty
                    )));
                }
            }
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(name, _, _)| name.as_str()).collect();
    match gguf
        .tensors()
        .iter()
        .find(|t| !known.contains(t.name.as_str()))
    {
        Some(t) => Err(ModelError::NeedsSupport(format!(
            "tensor {}{}",
            t.name,
            what_tensor(&t.name)
        ))),
        None => Ok(()),
    }
}

/// What a tensor the engine does not read is, where its name says.
fn what_tensor(name: &str) -> &'static str {
    let kind = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .map_or(name, |(_, k)| k);
    match kind {
        k if k.ends_with(".bias") => " (a bias)",
        "attn_q_norm.weight" | "attn_k_norm.weight" => " (an RMSNorm of q or k per head)",
        "attn_qkv.weight" | "attn_qkv.bias" => " (q, k and v fused in one matrix)",
        k if k.contains("_exps") || k.starts_with("ffn_gate_inp") => " (mixture of experts)",
        "rope_freqs.weight" => " (RoPE frequency factors per layer)",
        "ffn_gate.weight" => " (a separate gate: this family's is the first half of ffn_up)",
        "attn_q.weight" | "attn_k.weight" | "attn_v.weight" => {
            " (q, k or v apart: this family's are fused in attn_qkv)"
        }
        _ => "",
    }
}

/// (name, ggml shape, required) of every weight of a model of the config's
/// family (llama.cpp's `load_arch_tensors`).
fn expected_shapes(c: &Config) -> Vec<(String, Vec<i64>, bool)> {
    let (embd, ff, vocab) = (c.n_embd as i64, c.n_ff as i64, c.n_vocab as i64);
    let (q, kv, hd) = (c.n_embd_q() as i64, c.n_embd_kv() as i64, c.head_dim as i64);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![embd, vocab], true),
        ("output_norm.weight".to_string(), vec![embd], true),
        ("output.weight".to_string(), vec![embd, vocab], false),
    ];
    if c.arch == Arch::Llama {
        // Llama 3's RoPE frequency factors, one per pair of dims.
        out.push(("rope_freqs.weight".to_string(), vec![hd / 2], false));
    }
    for l in 0..c.n_layer {
        let w = |kind: &str, shape: Vec<i64>| (format!("blk.{l}.{kind}.weight"), shape, true);
        out.extend([w("attn_norm", vec![embd]), w("ffn_norm", vec![embd])]);
        for kind in matrix_tensors(c.arch) {
            let rows = match kind {
                "attn_qkv" => q + 2 * kv,
                "attn_q" => q,
                "attn_k" | "attn_v" => kv,
                "ffn_up" if c.arch.fused_gate_up() => 2 * ff,
                "ffn_gate" | "ffn_up" => ff,
                _ => embd,
            };
            let cols = match kind {
                "attn_output" => q,
                "ffn_down" => ff,
                _ => embd,
            };
            out.push(w(kind, vec![cols, rows]));
        }
        if c.arch.qk_norm() {
            out.extend([w("attn_q_norm", vec![hd]), w("attn_k_norm", vec![hd])]);
        }
        if c.arch.post_norms() {
            out.extend([
                w("post_attention_norm", vec![embd]),
                w("post_ffw_norm", vec![embd]),
            ]);
        }
        for &kind in c.arch.biases() {
            let width = match kind {
                "attn_qkv" => q + 2 * kv,
                "attn_q" => q,
                "attn_k" | "attn_v" => kv,
                "ffn_gate" | "ffn_up" => ff,
                _ => embd,
            };
            out.push((format!("blk.{l}.{kind}.bias"), vec![width], false));
        }
    }
    out
}
