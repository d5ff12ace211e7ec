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
        by_example: Option<ByExample>,
    ) -> (TrainInputs<'a>, Tensor<'a>, Tensor<'a>) {
        let ctx = self.ctx;
        let inputs = self.training_inputs(n_tokens, n_targets, by_example);
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
    /// which carry loss, its attention `by_example` or over the whole row.
    fn training_inputs(
        self,
        n_tokens: usize,
        n_targets: usize,
        by_example: Option<ByExample>,
    ) -> TrainInputs<'a> {
        let n = n_tokens as i64;
        let input =
            |ty, shape: &[i64], name| self.ctx.new_tensor(ty, shape).set_name(name).set_input();
        let mask_shape = match by_example {
            Some(b) => vec![b.len as i64, b.len as i64, 1, b.count as i64],
            None => vec![n, n],
        };
        TrainInputs {
            tokens: input(Type::I32, &[n], "inp_tokens"),
            positions: input(Type::I32, &[n], "inp_pos"),
            mask: input(Type::F32, &mask_shape, "inp_kq_mask"),
            mask_swa: self
                .cfg
                .sliding_window
                .is_some()
                .then(|| input(Type::F32, &mask_shape, "inp_kq_mask_swa")),
            by_example: by_example.map(|b| {
                let padded = |heads: usize| (b.len * heads * b.count) as i64;
                ByExampleInputs {
                    shape: b,
                    gather_q: input(Type::I32, &[padded(self.cfg.n_head)], "inp_gather_q"),
                    gather_kv: input(Type::I32, &[padded(self.cfg.n_head_kv)], "inp_gather_kv"),
                    scatter: input(Type::I32, &[n * self.cfg.n_head as i64], "inp_scatter"),
                }
            }),
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
    /// earlier token of its own example), -inf elsewhere; by example, f32
    /// `[len, len, 1, count]`, each example's own.
    pub mask: Tensor<'a>,
    /// The same within the sliding window, when the model has one.
    pub mask_swa: Option<Tensor<'a>>,
    /// Where attention runs example by example: the padded layout.
    pub by_example: Option<ByExampleInputs<'a>>,
    /// Rows whose next-token prediction is in the loss, i32 `[n_targets]`.
    pub loss_rows: Tensor<'a>,
    /// One-hot next tokens of those rows, f32 `[n_vocab, n_targets]`.
    pub labels: Tensor<'a>,
}

/// Attention example by example: the row's `count` examples each padded
/// to `len` positions (the longest), so that scores are computed within
/// examples only (`count len²` of them, not the row's `n²`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::model) struct ByExample {
    pub len: usize,
    pub count: usize,
}

/// The inputs of attention by example: rows of `head_dim` values, a row
/// per token and head (`token * heads + head`) in the row's layout, per
/// position, head and example (`(example * heads + head) * len +
/// position`) in the padded one.
pub(in crate::model) struct ByExampleInputs<'a> {
    pub shape: ByExample,
    /// i32 `[len * n_head * count]`: the query row at each padded row
    /// (past an example's end, its last token's, masked).
    pub gather_q: Tensor<'a>,
    /// i32 `[len * n_head_kv * count]`: the same for keys and values.
    pub gather_kv: Tensor<'a>,
    /// i32 `[n_tokens * n_head]`: each token's and head's padded row.
    pub scatter: Tensor<'a>,
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
        let mask = match inputs.mask_swa {
            Some(swa) if cfg.is_swa(il) => swa,
            _ => inputs.mask,
        };
        if let Some(by_example) = &inputs.by_example {
            let out = self.attention_by_example(q, k, v, mask, by_example);
            return b.project(layer, "attn_output", out, svfit("attn_output"));
        }
        // [hd, heads, n] → [hd, n, heads]
        let q = ctx.permute(q, [0, 2, 1, 3]);
        let k = ctx.permute(k, [0, 2, 1, 3]);
        let kq = ctx.soft_max_ext(b.scores(k, q), mask, b.kq_scale());
        // v: [n_embd_kv, n] → [n, hd, n_head_kv]
        let v = ctx.reshape_3d(v, hd, n_head_kv, n);
        let v = ctx.cont(ctx.permute(v, [1, 2, 0, 3]));
        // [hd, n, n_head] → [hd, n_head, n] → [n_embd, n]
        let out = ctx.permute(ctx.mul_mat(v, kq), [0, 2, 1, 3]);
        let out = ctx.reshape_2d(ctx.cont(out), hd * n_head, n);
        b.project(layer, "attn_output", out, svfit("attn_output"))
    }

    /// Attention within each example of the row (`q`, `k` `[hd, heads,
    /// n]`, `v` `[n_embd_kv, n]`): each head's rows of each example
    /// gathered into the padded layout `[hd, len, heads * count]` (heads
    /// before examples, so that ggml's GQA broadcast, which has a backward
    /// in three dimensions only, pairs each query head with its key head),
    /// scores and values per example and head, the outputs scattered back
    /// to `[n_embd, n]`.
    fn attention_by_example(
        &self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        mask: Tensor<'a>,
        inputs: &ByExampleInputs<'a>,
    ) -> Tensor<'a> {
        let (b, n) = (self.builder, self.n);
        let (ctx, cfg) = (b.ctx, b.cfg);
        let (hd, n_head, n_head_kv) =
            (cfg.head_dim as i64, cfg.n_head as i64, cfg.n_head_kv as i64);
        let ByExample { len, count } = inputs.shape;
        let (len, count) = (len as i64, count as i64);
        let gather = |t: Tensor<'a>, heads: i64, rows: Tensor<'a>| {
            let t = if t.is_contiguous() { t } else { ctx.cont(t) };
            let t = ctx.get_rows(ctx.reshape_2d(t, hd, heads * n), rows);
            ctx.reshape_3d(t, hd, len, heads * count)
        };
        let q = gather(q, n_head, inputs.gather_q);
        let k = gather(k, n_head_kv, inputs.gather_kv);
        let kq = ctx.reshape_4d(b.scores(k, q), [len, len, n_head, count]);
        let kq = ctx.soft_max_ext(kq, mask, b.kq_scale());
        let kq = ctx.reshape_3d(kq, len, len, n_head * count);
        // [hd, len, heads_kv * count] → [len, hd, heads_kv * count]
        let v = ctx.cont(ctx.permute(gather(v, n_head_kv, inputs.gather_kv), [1, 0, 2, 3]));
        // [hd, len, n_head * count], a row per position, head and example
        let out = ctx.mul_mat(v, kq);
        let out = ctx.get_rows(
            ctx.reshape_2d(out, hd, len * n_head * count),
            inputs.scatter,
        );
        ctx.reshape_2d(out, hd * n_head, n)
    }
}
