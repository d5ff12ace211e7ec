//! Hyper-parameters of a model, read from GGUF metadata in one place, which
//! also accounts for every other key of the file: a key the engine does not
//! read and does not know to be irrelevant fails the load, naming it (a file
//! we do not fully understand is never served).
//!
//! The families share one forward pass (model::graph); what sets them apart
//! is data here: [`Arch`] says which pieces a family's blocks have, and the
//! config holds the values llama.cpp reads for it (`src/models/*.cpp` of
//! the llama.cpp that llama-cpp-sys-2 vendors).

use crate::ggml::gguf::GgufFile;

use super::ModelError;

/// The architectures this engine runs (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];

/// A model family: the GGUF architecture names llama.cpp's converter writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3.x, Mistral, SmolLM: the plain pre-norm SwiGLU block.
    Llama,
    /// Qwen2 and Qwen2.5: biases on q, k and v; NeoX RoPE.
    Qwen2,
    /// Qwen3: an RMSNorm per head on q and k; NeoX RoPE.
    Qwen3,
    /// Gemma 2: √d embedding scale, norms after attention and after the
    /// FFN, GELU-gated FFN, a query scale, every other layer within a
    /// sliding window, soft-capped attention scores and logits.
    Gemma2,
    /// Gemma 3: as Gemma 2 with q/k norms, five sliding-window layers in
    /// six with their own RoPE base, and no soft-capping by default.
    Gemma3,
    /// Phi-3 (mini, medium): llama's block with q, k and v fused in one
    /// matrix (`attn_qkv`), gate and up in one (`ffn_up`, gate first), q
    /// scaled by 1/√head_dim before attention; NeoX RoPE. The LongRoPE
    /// files (Phi-3 128k, Phi-3.5) are refused.
    Phi3,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// Whether q, k and v are row ranges of one matrix `attn_qkv` (and
    /// their biases of one `attn_qkv.bias`).
    pub fn fused_qkv(self) -> bool {
        self == Arch::Phi3
    }

    /// Whether the FFN's gate and up are the two halves of one matrix
    /// `ffn_up` of `2 n_ff` rows, the gate first (ggml's `swiglu` of one
    /// input).
    pub fn fused_gate_up(self) -> bool {
        self == Arch::Phi3
    }

    /// Whether q and k go through an RMSNorm per head before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Whether the attention and FFN outputs are normalized before their
    /// residual additions (`post_attention_norm`, `post_ffw_norm`).
    pub fn post_norms(self) -> bool {
        self.is_gemma()
    }

    /// Gemma 2 or 3.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// The FFN's gate activation.
    pub fn activation(self) -> Activation {
        match self {
            Arch::Gemma2 | Arch::Gemma3 => Activation::Gelu,
            _ => Activation::Silu,
        }
    }

    /// ggml's RoPE mode: 0 rotates adjacent pairs (llama), 2 the two halves
    /// of each head (NeoX: Qwen, Gemma).
    pub fn rope_mode(self) -> i32 {
        match self {
            Arch::Llama => 0,
            _ => 2,
        }
    }

    /// The layer tensors (kinds) whose `.bias` a file of this family may
    /// hold: llama.cpp reads q/k/v biases for every family (one fused
    /// `attn_qkv.bias` for Phi-3), and llama's attention-output and FFN
    /// biases.
    pub fn biases(self) -> &'static [&'static str] {
        match self {
            Arch::Phi3 => &["attn_qkv"],
            Arch::Llama => &[
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ],
            _ => &["attn_q", "attn_k", "attn_v"],
        }
    }
}

/// The FFN's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with GELU's tanh approximation: `gelu(gate) * up`.
    Gelu,
}

/// The `{arch}.` keys [`Config::from_gguf`] reads: each is used, or its
/// value checked to be one the engine computes (else the load fails).
const READ: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "attention.causal",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "expert_count",
    "expert_used_count",
];

/// The keys only Gemma reads, beyond [`READ`] (in another family's file
/// llama.cpp ignores them, so a file holding them is refused).
const GEMMA_READ: &[&str] = &[
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "rope.freq_base_swa",
    "final_logit_softcapping",
];

/// The key only Gemma 2 reads, beyond [`GEMMA_READ`].
const GEMMA2_READ: &[&str] = &["attn_logit_softcapping"];

/// The key only Phi-3 reads, beyond [`READ`]: llama.cpp reads Phi-3's
/// sliding window (a count, else the load fails) and then turns it off
/// (`src/models/phi3.cpp`: "Phi SWA is currently disabled"), so every
/// layer attends to the whole context, here too.
const PHI3_READ: &[&str] = &["attention.sliding_window"];

/// `{arch}.` keys that change nothing the engine computes, with why.
const IGNORED: &[(&str, &str)] = &[
    (
        "rope.scaling.original_context_length",
        "only YaRN and Phi-3's LongRoPE factors read it, and both are refused \
         (rope.scaling.type, rope_factors_long.weight)",
    ),
    (
        "rope.scaling.finetuned",
        "a note on how the model was trained",
    ),
];

/// Namespaces of keys outside `{arch}.`, with what they are to the engine.
/// `general.type` and `split.count` are checked in [`check_keys`].
const NAMESPACES: &[(&str, &str)] = &[
    (
        "general.",
        "the file's description (name, license, file type); general.architecture \
         is read above and general.alignment by the GGUF reader",
    ),
    (
        "tokenizer.",
        "the vocabulary and chat template, read by llama.cpp's tokenizer (model::tokenizer)",
    ),
    (
        "quantize.",
        "how the file was quantized (importance matrix); each tensor's type says what it holds",
    ),
    (
        "split.",
        "parts of a split file; only a file in one part loads",
    ),
    ("svfit.", "what `svfit merge` merged into the file"),
];

fn needs(what: String) -> ModelError {
    ModelError::NeedsSupport(what)
}

/// Every metadata key of the file is one the engine reads, or one known
/// not to change what it computes; any other fails the load, naming it.
fn check_keys(gguf: &GgufFile, arch: Arch) -> Result<(), ModelError> {
    for key in gguf.keys() {
        let own = key
            .strip_prefix(arch.name())
            .and_then(|k| k.strip_prefix('.'));
        let known = match own {
            Some(k) => {
                READ.contains(&k)
                    || (arch.is_gemma() && GEMMA_READ.contains(&k))
                    || (arch == Arch::Gemma2 && GEMMA2_READ.contains(&k))
                    || (arch == Arch::Phi3 && PHI3_READ.contains(&k))
                    || IGNORED.iter().any(|(name, _)| *name == k)
            }
            None => NAMESPACES.iter().any(|(prefix, _)| key.starts_with(prefix)),
        };
        if !known {
            return Err(needs(format!("metadata key {key}")));
        }
    }
    if let Some(kind) = gguf.get_str("general.type")? {
        if kind != "model" {
            return Err(needs(format!("general.type = {kind} (not a model)")));
        }
    }
    if let Some(n @ 2..) = gguf.get_int("split.count")? {
        return Err(needs(format!(
            "split.count = {n} (a model split into files)"
        )));
    }
    Ok(())
}

/// Sliding-window attention: which layers attend only to their last
/// `size` positions, and the RoPE base and position scale those layers use.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    /// A token at position `p` sees positions `p - size + 1 ..= p`.
    pub size: usize,
    /// Per layer, whether it is a sliding-window layer.
    pub layers: Vec<bool>,
    pub freq_base: f32,
    pub freq_scale: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Width of one head of q, k and v (`attention.key_length`; by default
    /// `n_embd / n_head`).
    pub head_dim: usize,
    pub n_vocab: usize,
    /// The context length the model was trained with.
    pub n_ctx_train: usize,
    pub rope_freq_base: f32,
    /// RoPE's position scale (1 / the linear scaling factor) of the layers
    /// that are not sliding-window ones.
    pub rope_freq_scale: f32,
    pub rms_norm_eps: f32,
    /// Gemma: the token embeddings are multiplied by √n_embd.
    pub embedding_scale: Option<f32>,
    /// Gemma: q is multiplied by this before attention, whose softmax then
    /// scales by 1; otherwise the softmax scales by 1/√head_dim.
    pub query_scale: Option<f32>,
    pub sliding_window: Option<SlidingWindow>,
    /// `c · tanh(logits / c)` when set.
    pub final_logit_softcap: Option<f32>,
    /// Gemma 2: attention scores soft-capped the same way before the
    /// softmax.
    pub attn_logit_softcap: Option<f32>,
}

impl Config {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let name = gguf
            .get_str("general.architecture")?
            .ok_or_else(|| ModelError::Metadata("general.architecture is missing".into()))?;
        let arch = Arch::from_name(&name).ok_or(ModelError::UnsupportedArchitecture(name))?;
        let keys = Keys { gguf, arch };
        keys.refuse_unsupported()?;
        let n_embd = keys.required("embedding_length")?;
        let n_head = keys.required("attention.head_count")?;
        let n_head_kv = keys.int("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(ModelError::Metadata(format!(
                "{n_head} heads and {n_head_kv} KV heads do not divide evenly"
            )));
        }
        let head_dim = keys.head_dim(n_embd, n_head)?;
        let n_vocab = keys.n_vocab()?;
        let n_layer = keys.n_layer()?;
        if arch == Arch::Phi3 {
            keys.phi3(n_embd, n_head * head_dim)?;
        }
        check_keys(gguf, arch)?;
        let gemma = arch.is_gemma();
        let rope_freq_base = keys.freq_base("rope.freq_base")?.unwrap_or(10_000.0);
        let rope_freq_scale = keys.rope_freq_scale()?;
        // As llama.cpp: 1/√(n_embd / n_head) for the 27B Gemmas (46 layers
        // in Gemma 2, 62 in Gemma 3), 1/√head_dim for the others.
        let big = match arch {
            Arch::Gemma2 => n_layer == 46,
            _ => n_layer == 62,
        };
        // A cap of 0 means none in Gemma 3; Gemma 2 always caps (llama.cpp
        // would divide by 0), so there it is refused.
        let softcap = |key: &str, default: Option<f32>| -> Result<Option<f32>, ModelError> {
            match keys.f32(key)?.or(default) {
                Some(0.0) if arch == Arch::Gemma2 => Err(ModelError::Metadata(format!(
                    "{} = 0: Gemma 2 always divides by this cap",
                    keys.key(key)
                ))),
                cap => Ok(cap.filter(|&c| c != 0.0)),
            }
        };
        let gemma2 = arch == Arch::Gemma2;
        Ok(Config {
            arch,
            n_layer,
            n_embd,
            n_ff: keys.required("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train: keys.required("context_length")?,
            rope_freq_base,
            rope_freq_scale,
            rms_norm_eps: keys.rms_norm_eps()?,
            embedding_scale: gemma.then(|| (n_embd as f32).sqrt()),
            query_scale: (gemma || arch == Arch::Phi3).then(|| {
                let d = if gemma && big {
                    n_embd / n_head
                } else {
                    head_dim
                };
                1.0 / (d as f32).sqrt()
            }),
            sliding_window: match arch {
                // Gemma 2: 4096 tokens in every other layer by default, with
                // the model's own RoPE base and scale.
                Arch::Gemma2 => {
                    keys.sliding_window(n_layer, Some(4096), 2, (rope_freq_base, rope_freq_scale))?
                }
                Arch::Gemma3 => keys.sliding_window(n_layer, None, 6, (10_000.0, 1.0))?,
                _ => None,
            },
            final_logit_softcap: match arch {
                Arch::Gemma2 => softcap("final_logit_softcapping", Some(30.0))?,
                Arch::Gemma3 => softcap("final_logit_softcapping", None)?,
                _ => None,
            },
            attn_logit_softcap: if gemma2 {
                softcap("attn_logit_softcapping", Some(50.0))?
            } else {
                None
            },
        })
    }

    /// Width of the K (and V) rows of one layer: all KV heads together.
    pub fn n_embd_kv(&self) -> usize {
        self.head_dim * self.n_head_kv
    }

    /// Width of q (and of the attention's output): all heads together.
    pub fn n_embd_q(&self) -> usize {
        self.head_dim * self.n_head
    }

    /// Whether layer `il` attends within a sliding window.
    pub fn is_swa(&self, il: usize) -> bool {
        self.sliding_window
            .as_ref()
            .is_some_and(|w| w.layers.get(il) == Some(&true))
    }

    /// RoPE's base and position scale in layer `il`.
    pub fn rope_of_layer(&self, il: usize) -> (f32, f32) {
        match &self.sliding_window {
            Some(w) if self.is_swa(il) => (w.freq_base, w.freq_scale),
            _ => (self.rope_freq_base, self.rope_freq_scale),
        }
    }
}

/// The `{arch}.` keys of one file.
struct Keys<'g> {
    gguf: &'g GgufFile,
    arch: Arch,
}

impl Keys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch.name())
    }

    /// A positive count, at most u32::MAX as llama.cpp reads them (so
    /// that products of two, such as heads × head width, cannot overflow).
    fn int(&self, k: &str) -> Result<Option<usize>, ModelError> {
        let full = self.key(k);
        match self.gguf.get_int(&full)? {
            None => Ok(None),
            Some(v) if v > u32::MAX as i64 => {
                Err(ModelError::Metadata(format!("{full} = {v} is too large")))
            }
            Some(v) if v > 0 => Ok(Some(v as usize)),
            Some(v) => Err(ModelError::Metadata(format!(
                "{full} = {v} must be positive"
            ))),
        }
    }

    /// A count that may be 0, at most u32::MAX.
    fn count(&self, k: &str) -> Result<Option<usize>, ModelError> {
        let full = self.key(k);
        match self.gguf.get_int(&full)? {
            Some(v) if v < 0 => Err(ModelError::Metadata(format!(
                "{full} = {v} must not be negative"
            ))),
            Some(v) if v > u32::MAX as i64 => {
                Err(ModelError::Metadata(format!("{full} = {v} is too large")))
            }
            v => Ok(v.map(|v| v as usize)),
        }
    }

    fn required(&self, k: &str) -> Result<usize, ModelError> {
        self.int(k)?
            .ok_or_else(|| ModelError::Metadata(format!("{} is missing", self.key(k))))
    }

    fn f32(&self, k: &str) -> Result<Option<f32>, ModelError> {
        let full = self.key(k);
        match self.gguf.get_f32(&full)? {
            Some(v) if !v.is_finite() => Err(ModelError::Metadata(format!(
                "{full} = {v} is not a finite number"
            ))),
            v => Ok(v),
        }
    }

    /// A RoPE base: positive (RoPE raises it to negative powers).
    fn freq_base(&self, k: &str) -> Result<Option<f32>, ModelError> {
        match self.f32(k)? {
            Some(v) if v <= 0.0 => Err(ModelError::Metadata(format!(
                "{} = {v} must be positive",
                self.key(k)
            ))),
            v => Ok(v),
        }
    }

    /// RMSNorm's epsilon (1e-5 by default): not negative, which ggml
    /// asserts (a crash).
    fn rms_norm_eps(&self) -> Result<f32, ModelError> {
        let k = "attention.layer_norm_rms_epsilon";
        match self.f32(k)? {
            Some(eps) if eps < 0.0 => Err(ModelError::Metadata(format!(
                "{} = {eps} must not be negative",
                self.key(k)
            ))),
            eps => Ok(eps.unwrap_or(1e-5)),
        }
    }

    /// What Phi-3 needs beyond the shared keys: q as wide as the
    /// embedding (llama.cpp's `attn_qkv` and `attn_output` are sized by
    /// `n_embd`), a sliding window that is a count (read, then unused), and
    /// no LongRoPE factors (Phi-3 128k, Phi-3.5: not implemented, refused
    /// by name before the keys that come with them).
    fn phi3(&self, n_embd: usize, n_embd_q: usize) -> Result<(), ModelError> {
        for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            if self.gguf.tensor(name).is_some() {
                return Err(needs(format!(
                    "tensor {name} (Phi-3 LongRoPE frequency factors, for contexts past the \
                     original one)"
                )));
            }
        }
        if n_embd_q != n_embd {
            return Err(ModelError::Metadata(format!(
                "{}: q is {n_embd_q} wide, Phi-3's attention needs {n_embd} (embedding_length)",
                self.key("attention.key_length")
            )));
        }
        self.count("attention.sliding_window")?;
        Ok(())
    }

    /// Keys whose values ask for what the engine does not compute.
    fn refuse_unsupported(&self) -> Result<(), ModelError> {
        for k in ["expert_count", "expert_used_count"] {
            if let Some(n @ 1..) = self.gguf.get_int(&self.key(k))? {
                return Err(needs(format!("{} = {n} (mixture of experts)", self.key(k))));
            }
        }
        if let Some(kind) = self.gguf.get_str(&self.key("rope.scaling.type"))? {
            if kind != "none" && kind != "linear" {
                return Err(needs(format!("{} = {kind}", self.key("rope.scaling.type"))));
            }
        }
        if self.gguf.get_bool(&self.key("attention.causal"))? == Some(false) {
            return Err(needs(format!("{} = false", self.key("attention.causal"))));
        }
        Ok(())
    }

    /// RoPE's position scale: llama.cpp scales positions by 1/factor for a
    /// linear (or unnamed) scaling type; 0 means none.
    fn rope_freq_scale(&self) -> Result<f32, ModelError> {
        let mut key = "rope.scaling.factor";
        let mut factor = self.f32(key)?;
        if factor.is_none() {
            key = "rope.scale_linear";
            factor = self.f32(key)?;
        }
        match factor {
            None => Ok(1.0),
            Some(0.0) => Ok(1.0),
            Some(f) if f > 0.0 => Ok(1.0 / f),
            Some(f) => Err(ModelError::Metadata(format!(
                "{} = {f} must be positive",
                self.key(key)
            ))),
        }
    }

    /// The width of a head: `attention.key_length` (equal to the value
    /// length and to RoPE's dimensions), by default `n_embd / n_head`.
    fn head_dim(&self, n_embd: usize, n_head: usize) -> Result<usize, ModelError> {
        let head_dim = match self.int("attention.key_length")? {
            Some(n) => n,
            None if n_embd.is_multiple_of(n_head) => n_embd / n_head,
            None => {
                return Err(ModelError::Metadata(format!(
                    "embedding length {n_embd} is not a multiple of {n_head} heads"
                )))
            }
        };
        if let Some(n) = self.int("attention.value_length")? {
            if n != head_dim {
                return Err(needs(format!(
                    "{} = {n} (value heads of {n}, key heads of {head_dim})",
                    self.key("attention.value_length")
                )));
            }
        }
        if let Some(rope_dims) = self.int("rope.dimension_count")? {
            if rope_dims != head_dim {
                return Err(needs(format!(
                    "{} = {rope_dims} (partial rotary embedding: {rope_dims} of {head_dim} dims)",
                    self.key("rope.dimension_count")
                )));
            }
        }
        Ok(head_dim)
    }

    /// The number of layers, no more than the file has tensors (each
    /// layer has several): what is sized by it is allocated before the
    /// tensors are checked.
    fn n_layer(&self) -> Result<usize, ModelError> {
        let n_layer = self.required("block_count")?;
        let n_tensors = self.gguf.tensors().len();
        if n_layer > n_tensors {
            return Err(ModelError::Metadata(format!(
                "{} = {n_layer}, more layers than the file's {n_tensors} tensors hold",
                self.key("block_count")
            )));
        }
        Ok(n_layer)
    }

    /// The vocabulary: the token embedding's rows, which `vocab_size`
    /// (when set) must equal.
    fn n_vocab(&self) -> Result<usize, ModelError> {
        let n_vocab = self
            .gguf
            .tensor("token_embd.weight")
            .map(|t| t.ne[1] as usize)
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        if let Some(n) = self.int("vocab_size")? {
            if n != n_vocab {
                return Err(ModelError::Metadata(format!(
                    "{} = {n}, but token_embd.weight has {n_vocab} rows",
                    self.key("vocab_size")
                )));
            }
        }
        Ok(n_vocab)
    }

    /// Gemma's sliding window: `attention.sliding_window` tokens (Gemma 3:
    /// none when absent or 0; Gemma 2: `default_size` when absent, and 0 is
    /// refused, as it would mask every token) in every layer `il` with
    /// `il % n < n - 1` (`n` = `attention.sliding_window_pattern`, else
    /// `default_pattern`), with RoPE base `rope.freq_base_swa` (else the
    /// default's) and the default's position scale.
    fn sliding_window(
        &self,
        n_layer: usize,
        default_size: Option<usize>,
        default_pattern: usize,
        (default_base, freq_scale): (f32, f32),
    ) -> Result<Option<SlidingWindow>, ModelError> {
        let size = match (self.count("attention.sliding_window")?, default_size) {
            (Some(0), Some(_)) => {
                return Err(ModelError::Metadata(format!(
                    "{} = 0 would mask every token",
                    self.key("attention.sliding_window")
                )))
            }
            (None, None) | (Some(0), None) => return Ok(None),
            (Some(size), _) | (None, Some(size)) => size,
        };
        let pattern_key = self.key("attention.sliding_window_pattern");
        if matches!(self.gguf.get_arr_len(&pattern_key), Ok(Some(_))) {
            return Err(needs(format!("{pattern_key} as a per-layer array")));
        }
        let n = self
            .count("attention.sliding_window_pattern")?
            .unwrap_or(default_pattern);
        Ok(Some(SlidingWindow {
            size,
            layers: (0..n_layer).map(|il| n == 0 || il % n < n - 1).collect(),
            freq_base: self
                .freq_base("rope.freq_base_swa")?
                .unwrap_or(default_base),
            freq_scale,
        }))
    }
}
