//! Hyper-parameters of a llama-architecture model, read from GGUF metadata in
//! one place, which also accounts for every other key of the file: a key
//! the engine does not read and does not know to be irrelevant fails the
//! load, naming it (a file we do not fully understand is never served).

use crate::ggml::gguf::GgufFile;

use super::ModelError;

/// The architectures this engine runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

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

/// `{arch}.` keys that change nothing the engine computes, with why.
const IGNORED: &[(&str, &str)] = &[
    (
        "rope.scaling.original_context_length",
        "only YaRN reads it, and a YaRN file is refused (rope.scaling.type)",
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
fn check_keys(gguf: &GgufFile, arch: &str) -> Result<(), ModelError> {
    for key in gguf.keys() {
        let known = match key.strip_prefix(arch).and_then(|k| k.strip_prefix('.')) {
            Some(k) => READ.contains(&k) || IGNORED.iter().any(|(name, _)| *name == k),
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

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    /// The context length the model was trained with.
    pub n_ctx_train: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f32,
}

impl Config {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let arch = gguf
            .get_str("general.architecture")?
            .ok_or_else(|| ModelError::Metadata("general.architecture is missing".into()))?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| -> Result<Option<usize>, ModelError> {
            let full = key(k);
            match gguf.get_int(&full)? {
                None => Ok(None),
                Some(v) if v > 0 => Ok(Some(v as usize)),
                Some(v) => Err(ModelError::Metadata(format!(
                    "{full} = {v} must be positive"
                ))),
            }
        };
        let required = |k: &str| -> Result<usize, ModelError> {
            int(k)?.ok_or_else(|| ModelError::Metadata(format!("{} is missing", key(k))))
        };
        for k in ["expert_count", "expert_used_count"] {
            if let Some(n @ 1..) = gguf.get_int(&key(k))? {
                return Err(needs(format!("{} = {n} (mixture of experts)", key(k))));
            }
        }
        if let Some(kind) = gguf.get_str(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(needs(format!("{} = {kind}", key("rope.scaling.type"))));
            }
        }
        // llama.cpp scales RoPE's positions by 1/factor whatever the type
        // (0 means none).
        for k in ["rope.scaling.factor", "rope.scale_linear"] {
            match gguf.get_f32(&key(k))? {
                Some(f) if f != 0.0 && f != 1.0 => {
                    return Err(needs(format!("{} = {f} (linear RoPE scaling)", key(k))))
                }
                _ => {}
            }
        }
        if gguf.get_bool(&key("attention.causal"))? == Some(false) {
            return Err(needs(format!("{} = false", key("attention.causal"))));
        }

        let n_embd = required("embedding_length")?;
        let n_head = required("attention.head_count")?;
        let n_head_kv = int("attention.head_count_kv")?.unwrap_or(n_head);
        if n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::Metadata(format!(
                "embedding length {n_embd}, {n_head} heads and {n_head_kv} KV heads do not divide evenly"
            )));
        }
        let head_dim = n_embd / n_head;
        if let Some(rope_dims) = int("rope.dimension_count")? {
            if rope_dims != head_dim {
                return Err(needs(format!(
                    "{} = {rope_dims} (partial rotary embedding: {rope_dims} of {head_dim} dims)",
                    key("rope.dimension_count")
                )));
            }
        }
        for k in ["attention.key_length", "attention.value_length"] {
            if let Some(n) = int(k)? {
                if n != head_dim {
                    return Err(needs(format!(
                        "{} = {n} (heads of {n}, not embedding length / heads = {head_dim})",
                        key(k)
                    )));
                }
            }
        }
        let n_vocab = gguf
            .tensor("token_embd.weight")
            .map(|t| t.ne[1] as usize)
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        if let Some(n) = int("vocab_size")? {
            if n != n_vocab {
                return Err(ModelError::Metadata(format!(
                    "{} = {n}, but token_embd.weight has {n_vocab} rows",
                    key("vocab_size")
                )));
            }
        }
        check_keys(gguf, &arch)?;
        Ok(Config {
            n_layer: required("block_count")?,
            n_embd,
            n_ff: required("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train: required("context_length")?,
            rope_freq_base: gguf.get_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps: gguf
                .get_f32(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
        })
    }

    /// Width of the K (and V) rows of one layer: all KV heads together.
    pub fn n_embd_kv(&self) -> usize {
        self.head_dim * self.n_head_kv
    }
}
