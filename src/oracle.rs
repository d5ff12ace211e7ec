//! llama.cpp itself, through `llama-cpp-2`, run on the same GGUF and batches
//! as our engine: the reference for parity tests and the baseline for
//! benchmarks. Configured like our engine: f16 KV cache, plain (not flash)
//! attention, one unified cache shared by all sequences.

use std::num::NonZeroU32;
use std::path::Path;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use crate::model::tokenizer::llama_backend;
use crate::model::{Batch, Logits};

#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    #[error("llama.cpp could not load {0}")]
    Load(String),
    #[error("llama.cpp could not create a context: {0}")]
    Context(String),
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
}

/// A model loaded by llama.cpp (weights on the CPU, not repacked).
pub struct Reference {
    model: LlamaModel,
}

impl Reference {
    /// Loads `path` as `llama-server --no-repack` would: every weight in
    /// the plain CPU buffer, none in ggml's repacked layouts (llama.cpp's
    /// default for Q4_0, Q4_K and IQ4_NL on x86), whose kernels round a
    /// token's column differently in a batch of 4 than alone. Our engine
    /// never repacks, to stay batch-invariant (model::weights).
    pub fn load(path: &Path) -> Result<Self, OracleError> {
        llama_backend();
        let model = crate::ggml::llama::load_model_without_repack(path)
            .ok_or_else(|| OracleError::Load(path.display().to_string()))?;
        Ok(Reference { model })
    }

    /// Loads `path` with llama.cpp's defaults, repacked weights included:
    /// the opponent of the benchmarks (llama-server as people run it).
    pub fn load_default(path: &Path) -> Result<Self, OracleError> {
        let params = LlamaModelParams::default().with_n_gpu_layers(0);
        let model = LlamaModel::load_from_file(llama_backend(), path, &params)
            .map_err(|_| OracleError::Load(path.display().to_string()))?;
        Ok(Reference { model })
    }

    /// A LoRA in llama.cpp's GGUF format for this model (`--lora FILE`).
    pub fn lora(&mut self, path: &Path) -> Result<LlamaLoraAdapter, OracleError> {
        self.model
            .lora_adapter_init(path)
            .map_err(|e| OracleError::Load(format!("{}: {e}", path.display())))
    }

    /// A llama.cpp context of `n_ctx` cells for up to `n_seq` sequences,
    /// with plain attention as our engine.
    pub fn session(
        &self,
        n_ctx: usize,
        n_seq: usize,
        threads: usize,
    ) -> Result<ReferenceSession<'_>, OracleError> {
        self.session_with(n_ctx, n_seq, threads, false)
    }

    /// As [`Reference::session`], choosing flash attention (llama.cpp's
    /// default on CPU) or plain attention.
    pub fn session_with(
        &self,
        n_ctx: usize,
        n_seq: usize,
        threads: usize,
        flash_attn: bool,
    ) -> Result<ReferenceSession<'_>, OracleError> {
        let attention = if flash_attn {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
        };
        let n_batch = 512u32.max(n_ctx as u32);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx as u32))
            .with_n_batch(n_batch)
            .with_n_ubatch(512)
            .with_n_seq_max(n_seq as u32)
            .with_n_threads(threads as i32)
            .with_n_threads_batch(threads as i32)
            .with_flash_attention_policy(attention)
            .with_type_k(KvCacheType::F16)
            .with_type_v(KvCacheType::F16)
            .with_kv_unified(true);
        let ctx = self
            .model
            .new_context(llama_backend(), params)
            .map_err(|e| OracleError::Context(e.to_string()))?;
        Ok(ReferenceSession {
            ctx,
            n_seq,
            n_vocab: self.model.n_vocab() as usize,
        })
    }
}

pub struct ReferenceSession<'m> {
    ctx: LlamaContext<'m>,
    n_seq: usize,
    n_vocab: usize,
}

impl ReferenceSession<'_> {
    /// Applies `lora` at scale 1 to what this session decodes from now on.
    pub fn apply_lora(&mut self, lora: &mut LlamaLoraAdapter) -> Result<(), OracleError> {
        self.ctx
            .lora_adapter_set(lora, 1.0)
            .map_err(|e| OracleError::Context(e.to_string()))
    }

    /// Decodes `batch` (same meaning as [`crate::model::Model::decode`]) and
    /// returns the logits of its output tokens.
    pub fn decode(&mut self, batch: &Batch) -> Result<Logits, OracleError> {
        let mut lb = LlamaBatch::new(batch.len(), self.n_seq as i32);
        let mut outputs = Vec::new();
        for (i, (token, pos, seq, output)) in batch.entries().enumerate() {
            lb.add(LlamaToken(token as i32), pos as i32, &[seq as i32], output)
                .map_err(|e| OracleError::Decode(e.to_string()))?;
            if output {
                outputs.push(i as i32);
            }
        }
        self.ctx
            .decode(&mut lb)
            .map_err(|e| OracleError::Decode(e.to_string()))?;
        let mut data = Vec::with_capacity(outputs.len() * self.n_vocab);
        for i in outputs {
            data.extend_from_slice(self.ctx.get_logits_ith(i));
        }
        Ok(Logits::new(self.n_vocab, data))
    }

    /// Forgets every sequence.
    pub fn clear(&mut self) {
        self.ctx.clear_kv_cache();
    }
}
