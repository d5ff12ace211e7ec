//! Hyper-parameters of a llama-architecture model, read from GGUF metadata in
//! one place.

use crate::ggml::gguf::GgufFile;

use super::ModelError;

/// The architectures this engine runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

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
        if let Some(n) = gguf.get_int(&key("expert_count"))? {
            if n > 0 {
                return Err(ModelError::Unsupported(format!(
                    "mixture of experts ({n} experts)"
                )));
            }
        }
        if let Some(kind) = gguf.get_str(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(ModelError::Unsupported(format!("rope scaling '{kind}'")));
            }
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
                return Err(ModelError::Unsupported(format!(
                    "partial rotary embedding ({rope_dims} of {head_dim} dims)"
                )));
            }
        }
        let n_vocab = gguf
            .tensor("token_embd.weight")
            .map(|t| t.ne[1] as usize)
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
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
