//! The model's weights: every tensor is looked up by its GGUF name here, and
//! only here, with its shape checked against the config.

use crate::ggml::gguf::GgufFile;
use crate::ggml::{Backend, Tensor, TensorId, TensorSet, Type};

use super::{Config, ModelError};

/// One transformer block's weights (ids into the weight set).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: TensorId,
    pub attn_q: TensorId,
    pub attn_k: TensorId,
    pub attn_v: TensorId,
    pub attn_output: TensorId,
    pub ffn_norm: TensorId,
    pub ffn_gate: TensorId,
    pub ffn_up: TensorId,
    pub ffn_down: TensorId,
}

pub struct Weights {
    set: TensorSet,
    pub token_embd: TensorId,
    pub output_norm: TensorId,
    /// `output.weight`, or `token_embd.weight` when the embeddings are tied.
    pub output: TensorId,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// Checks every tensor's presence and shape, then loads them on `backend`
    /// in their stored types, or with `f32` every matrix that a backward pass
    /// goes through dequantized to f32 (all but an untied token embedding).
    pub fn load(
        gguf: &mut GgufFile,
        config: &Config,
        backend: &Backend,
        f32: bool,
    ) -> Result<Self, ModelError> {
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
                }
            }
        }
        let set = if f32 {
            let tied = gguf.tensor("output.weight").is_none();
            gguf.load_tensors_f32(backend, |info| {
                info.ty != Type::F32 && (tied || info.name != "token_embd.weight")
            })?
        } else {
            gguf.load_tensors(backend)?
        };
        let id = |name: &str| {
            set.find(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
        };
        let layers = (0..config.n_layer)
            .map(|l| {
                let t = |kind: &str| id(&format!("blk.{l}.{kind}.weight"));
                Ok(LayerWeights {
                    attn_norm: t("attn_norm")?,
                    attn_q: t("attn_q")?,
                    attn_k: t("attn_k")?,
                    attn_v: t("attn_v")?,
                    attn_output: t("attn_output")?,
                    ffn_norm: t("ffn_norm")?,
                    ffn_gate: t("ffn_gate")?,
                    ffn_up: t("ffn_up")?,
                    ffn_down: t("ffn_down")?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let token_embd = id("token_embd.weight")?;
        Ok(Weights {
            output: set.find("output.weight").unwrap_or(token_embd),
            output_norm: id("output_norm.weight")?,
            token_embd,
            layers,
            set,
        })
    }

    pub fn get(&self, id: TensorId) -> Tensor<'_> {
        self.set.get(id)
    }
}

/// (name, ggml shape, required) of every weight of a llama model.
fn expected_shapes(c: &Config) -> Vec<(String, Vec<i64>, bool)> {
    let (embd, ff, vocab) = (c.n_embd as i64, c.n_ff as i64, c.n_vocab as i64);
    let q = (c.n_head * c.head_dim) as i64;
    let kv = c.n_embd_kv() as i64;
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![embd, vocab], true),
        ("output_norm.weight".to_string(), vec![embd], true),
        ("output.weight".to_string(), vec![embd, vocab], false),
    ];
    for l in 0..c.n_layer {
        let w = |kind: &str, shape: Vec<i64>| (format!("blk.{l}.{kind}.weight"), shape, true);
        out.extend([
            w("attn_norm", vec![embd]),
            w("attn_q", vec![embd, q]),
            w("attn_k", vec![embd, kv]),
            w("attn_v", vec![embd, kv]),
            w("attn_output", vec![q, embd]),
            w("ffn_norm", vec![embd]),
            w("ffn_gate", vec![embd, ff]),
            w("ffn_up", vec![embd, ff]),
            w("ffn_down", vec![ff, embd]),
        ]);
    }
    out
}
