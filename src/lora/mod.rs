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
//! shapes, ranks from 1 to the matrix's larger side, finite values, the
//! config agreeing with the weights); `merge::merge_lora` merges it.
//!
//! `export.rs` writes, `import.rs` reads; this file holds what both use:
//! the formats, the errors, and the two orders of q and k rows.

use crate::factors::FactorError;
use crate::ggml::gguf::{GgufError, GgufWriteError};
use crate::merge::MergeError;
use crate::model::Config;

mod export;
mod import;
pub mod stored;

pub use export::{export, Exported};
pub use import::{Lora, Update};
pub use stored::LoraLimits;

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
