//! The training variant of the forward pass (METHOD.md §5): packed
//! examples as one row, no KV cache, plain attention, the SVFit branch with
//! one shared delta per target; the blocks are [`Builder`]'s.

use crate::ggml::{Graph, Tensor, Type};

use super::{Builder, LayerBranch};
use crate::model::weights::LayerWeights;
use crate::model::Config;

impl<'a> Builder<'a, '_> {
    /// The forward graph of training (METHOD.md §5): whole sequences
    /// without a KV cache, plain attention, split SwiGLU, the SVFit branch
    /// with a shared delta per target matrix (`svfit`), and the output head
    /// only at the rows that carry loss. Returns the inputs, the logits
    /// `[n_vocab, n_targets]` and the mean cross-entropy (a scalar marked
    /// as the loss).
    pub(in crate::model) fn train_forward(
        self,
        gf: &mut Graph<'a>,
        svfit: LayerBranch<'_, 'a>,
        n_tokens: usize,
        n_targets: usize,
    ) -> (TrainInputs<'a>, Tensor<'a>, Tensor<'a>) {
        let ctx = self.ctx;
        let inputs = self.training_inputs(n_tokens, n_targets);
        let pass = Training {
            builder: self,
            inputs: &inputs,
            n: n_tokens as i64,
            svfit,
        };
        let mut x = self.embed(inputs.tokens);
        for (il, layer) in self.weights.layers.iter().enumerate() {
            x = pass.layer(il, layer, x);
        }
        let x = ctx.get_rows(x, inputs.loss_rows);
        let logits = self.output_head(x);
        let loss = ctx
            .cross_entropy_loss(logits, inputs.labels)
            .set_name("loss")
            .set_output()
            .set_loss();
        gf.expand(loss);
        (inputs, logits, loss)
    }

    /// The input tensors of a training row of `n_tokens`, `n_targets` of
    /// which carry loss.
    fn training_inputs(self, n_tokens: usize, n_targets: usize) -> TrainInputs<'a> {
        let n = n_tokens as i64;
        let input =
            |ty, shape: &[i64], name| self.ctx.new_tensor(ty, shape).set_name(name).set_input();
        TrainInputs {
            tokens: input(Type::I32, &[n], "inp_tokens"),
            positions: input(Type::I32, &[n], "inp_pos"),
            mask: input(Type::F32, &[n, n], "inp_kq_mask"),
            mask_swa: self
                .cfg
                .sliding_window
                .is_some()
                .then(|| input(Type::F32, &[n, n], "inp_kq_mask_swa")),
            loss_rows: input(Type::I32, &[n_targets as i64], "inp_loss_rows"),
            labels: input(
                Type::F32,
                &[self.cfg.n_vocab as i64, n_targets as i64],
                "inp_labels",
            ),
        }
    }
}

/// The inputs of a training graph: packed examples as one token row.
pub(in crate::model) struct TrainInputs<'a> {
    /// Token ids, i32 `[n_tokens]`.
    pub tokens: Tensor<'a>,
    /// Positions (restarting at each packed example), i32 `[n_tokens]`.
    pub positions: Tensor<'a>,
    /// f32 `[n_tokens, n_tokens]`: 0 where a token may attend another (an
    /// earlier token of its own example), -inf elsewhere.
    pub mask: Tensor<'a>,
    /// The same within the sliding window, when the model has one.
    pub mask_swa: Option<Tensor<'a>>,
    /// Rows whose next-token prediction is in the loss, i32 `[n_targets]`.
    pub loss_rows: Tensor<'a>,
    /// One-hot next tokens of those rows, f32 `[n_vocab, n_targets]`.
    pub labels: Tensor<'a>,
}

/// Graph nodes a training graph (forward and backward) needs at most.
pub(in crate::model) fn train_graph_size(cfg: &Config) -> usize {
    512 * (cfg.n_layer + 2)
}

/// One training pass: the packed row's inputs, its length and the SVFit
/// branch of every target matrix (with its shared delta).
struct Training<'a, 'p> {
    builder: Builder<'a, 'p>,
    inputs: &'p TrainInputs<'a>,
    /// Tokens in the row.
    n: i64,
    svfit: LayerBranch<'p, 'a>,
}

impl<'a> Training<'a, '_> {
    /// Layer `il` over the hidden states `x`.
    fn layer(&self, il: usize, layer: &LayerWeights, x: Tensor<'a>) -> Tensor<'a> {
        let b = self.builder;
        let attn_in = b.rms_norm(x, layer.attn_norm);
        let attn_out = self.attention(il, layer, attn_in);
        let attn_out = b.maybe_norm(attn_out, layer.post_attention_norm);
        let ffn_in = b.ctx.add(attn_out, x);
        let ffn_out = b.feed_forward(layer, ffn_in, &|kind| (self.svfit)(il, kind));
        b.ctx.add(ffn_out, ffn_in)
    }

    /// Self-attention of a row of packed examples over itself (no cache).
    fn attention(&self, il: usize, layer: &LayerWeights, x: Tensor<'a>) -> Tensor<'a> {
        let (b, inputs, n) = (self.builder, self.inputs, self.n);
        let (ctx, cfg) = (b.ctx, b.cfg);
        let (hd, n_head, n_head_kv) =
            (cfg.head_dim as i64, cfg.n_head as i64, cfg.n_head_kv as i64);
        let svfit = |kind: &str| (self.svfit)(il, kind);
        let [q, k, v] = b.qkv(il, layer, x, inputs.positions, &svfit);
        // [hd, heads, n] → [hd, n, heads]
        let q = ctx.permute(q, [0, 2, 1, 3]);
        let k = ctx.permute(k, [0, 2, 1, 3]);
        let mask = match inputs.mask_swa {
            Some(swa) if cfg.is_swa(il) => swa,
            _ => inputs.mask,
        };
        let kq = ctx.soft_max_ext(b.scores(k, q), mask, b.kq_scale());
        // v: [n_embd_kv, n] → [n, hd, n_head_kv]
        let v = ctx.reshape_3d(v, hd, n_head_kv, n);
        let v = ctx.cont(ctx.permute(v, [1, 2, 0, 3]));
        // [hd, n, n_head] → [hd, n_head, n] → [n_embd, n]
        let out = ctx.permute(ctx.mul_mat(v, kq), [0, 2, 1, 3]);
        let out = ctx.reshape_2d(ctx.cont(out), hd * n_head, n);
        b.project(layer, "attn_output", out, svfit("attn_output"))
    }
}
