//! The forward graph of every family, one function per block, read top to
//! bottom: embed → (attention, feed-forward) × layers → norm → output head.
//! A family's pieces (biases, q/k norms, post-norms, GeGLU, the query
//! scale, sliding windows, soft-capping) are steps each block takes or
//! skips as the config and the weights say, in llama.cpp's order
//! (`src/models/{llama,qwen2,qwen3,gemma3}.cpp` of the vendored llama.cpp).
//!
//! A [`Builder`] holds what every block reads (the context the graph is
//! built in, the config and the weights), as llama.cpp's
//! `llm_graph_context` does; a pass adds what it shares across layers
//! (`Serving`: the KV cache, the batch's inputs and shape, the SVFit
//! branch; `Training`: the packed row's inputs and the deltas), so each
//! block takes its pass plus what varies per call.

use crate::ggml::kernel::Matrix;
use crate::ggml::{Context, Graph, Rope, Tensor, TensorId, Type};

use super::config::Activation;
use super::kv_cache::{KvCache, SeqGroup};
use super::lora::LoraBranch;
use super::svfit::{Branch, TargetTensors};
use super::weights::{LayerWeights, Weights};
use super::Config;

mod training;
pub(super) use training::{train_graph_size, ByExample};

/// The graph's inputs, filled per batch after allocation.
pub(super) struct Inputs<'a> {
    /// Token ids, i32 `[n_tokens]`.
    pub tokens: Tensor<'a>,
    /// Positions, i32 `[n_tokens]`.
    pub positions: Tensor<'a>,
    /// KV cell of each token, i64 `[n_tokens]`.
    pub kv_cells: Tensor<'a>,
    /// Element indices of the batch's V values in the transposed V cache,
    /// i64 `[n_embd_kv * n_tokens]`.
    pub v_elements: Tensor<'a>,
    /// Per sequence group, f32 `[n_kv, n_tokens]`: 0 where a token may
    /// attend a cell, -inf elsewhere.
    pub kq_masks: Vec<Tensor<'a>>,
    /// The same within the sliding window, when the model has one.
    pub kq_masks_swa: Option<Vec<Tensor<'a>>>,
    /// Rows whose logits are wanted, i32 `[n_outputs]`; absent when all are.
    pub out_rows: Option<Tensor<'a>>,
    /// With the SVFit branch: each token's adapter slot, i32 `[n_tokens]`,
    /// and the slots of the output rows, i32 `[n_outputs]` (with `out_rows`).
    pub slots: Option<Tensor<'a>>,
    pub out_slots: Option<Tensor<'a>>,
    /// With the LoRA branch: the same for LoRA slots, i32 `[1, n_tokens]`
    /// and `[1, n_outputs]`.
    pub lora_slots: Option<Tensor<'a>>,
    pub out_lora_slots: Option<Tensor<'a>>,
}

/// Shapes of one forward pass.
pub(super) struct Shape<'g> {
    pub n_tokens: usize,
    pub n_outputs: usize,
    /// The batch's sequences: their tokens and cells.
    pub groups: &'g [SeqGroup],
}

/// Graph nodes one forward pass needs at most (with the SVFit and LoRA
/// branches on every linear matrix).
pub(super) fn graph_size(cfg: &Config, n_groups: usize) -> usize {
    (144 + 16 * n_groups) * (cfg.n_layer + 2) + 256
}

/// A bound of the compute buffers of one forward pass of `n_tokens`
/// tokens, `n_outputs` of which produce logits, where one sequence's
/// `n_query` tokens attend over `n_kv` cells: the f32 activations of one
/// block (the allocator reuses them from block to block), one sequence's
/// attention scores and softmax, and the logits.
pub fn compute_bytes_bound(
    cfg: &Config,
    n_tokens: usize,
    n_outputs: usize,
    n_query: usize,
    n_kv: usize,
) -> u64 {
    let n_q = cfg.n_head * cfg.head_dim;
    let per_token = 6 * cfg.n_embd + 3 * (n_q + 2 * cfg.n_embd_kv()) + 4 * cfg.n_ff;
    let scores = 2 * cfg.n_head * n_query * n_kv;
    let logits = (cfg.n_vocab + cfg.n_embd) * n_outputs;
    4 * (per_token * n_tokens + scores + logits) as u64
}

/// What every block of a graph reads: the context the graph is built in,
/// the model's hyper-parameters and its weights.
#[derive(Clone, Copy)]
pub(super) struct Builder<'a, 'c> {
    pub ctx: &'a Context,
    pub cfg: &'c Config,
    pub weights: &'a Weights,
    /// Training: every op must have a backward in ggml, so GELU and tanh
    /// (which have none) are composed from ops that do.
    pub differentiable: bool,
}

/// A target matrix's SVFit factors and the deltas its tokens use.
#[derive(Clone, Copy)]
pub(super) struct SvFit<'a> {
    /// `[rank, m]`
    pub u: Matrix<'a>,
    /// `[n, rank]`
    pub vt: Matrix<'a>,
    pub delta: Delta<'a>,
}

/// A target matrix's LoRA slot tables and each token's slot.
#[derive(Clone, Copy)]
pub(super) struct LowRankTables<'a> {
    /// `[n, R, n_slots]`
    pub a: Tensor<'a>,
    /// `[R, m, n_slots]`
    pub b: Tensor<'a>,
    /// i32 `[1, n_tokens]`
    pub slots: Tensor<'a>,
}

/// The branches a target matrix adds to its product.
#[derive(Clone, Copy)]
pub(super) struct Adapted<'a> {
    pub svfit: Option<SvFit<'a>>,
    pub lora: Option<LowRankTables<'a>>,
}

/// Where a branch's deltas come from.
#[derive(Clone, Copy)]
pub(super) enum Delta<'a> {
    /// Serving: each token's row of the slot table `[rank, n_slots]`.
    PerToken {
        table: Tensor<'a>,
        slots: Tensor<'a>,
    },
    /// Training: one vector `[rank]` for every token (the parameter).
    Shared(Tensor<'a>),
    /// Training over `W`'s full-rank factors: the whole spectrum `S + Δ`
    /// `[min(m, n)]`, so that `U ((S + Δ) ⊙ Vt x)` stands for `W x` plus
    /// the branch (fewer multiply-adds when the rank kept is near full).
    /// Never a part of a fused matrix, whose product is shared.
    Whole(Tensor<'a>),
}

/// The SVFit branch (if any) of a layer's matrix of a given kind.
type BranchOf<'b, 'a> = &'b dyn Fn(&str) -> Option<Adapted<'a>>;

/// The SVFit branch (if any) of the matrix of a kind in a layer.
pub(super) type LayerBranch<'b, 'a> = &'b dyn Fn(usize, &str) -> Option<Adapted<'a>>;

impl<'a> Builder<'a, '_> {
    /// `x` RMS-normalized, times the weight `weight`.
    fn rms_norm(self, x: Tensor<'a>, weight: TensorId) -> Tensor<'a> {
        let ctx = self.ctx;
        ctx.mul(
            ctx.rms_norm(x, self.cfg.rms_norm_eps),
            self.weights.get(weight),
        )
    }

    /// The token embeddings of `tokens`, scaled where the family does.
    fn embed(self, tokens: Tensor<'a>) -> Tensor<'a> {
        let x = self
            .ctx
            .get_rows(self.weights.get(self.weights.token_embd), tokens);
        match self.cfg.embedding_scale {
            Some(s) => self.ctx.scale(x, s),
            None => x,
        }
    }

    /// `y = W x (+ b)` for the layer's matrix of `kind` (and its bias where
    /// the file has one), plus the SVFit branch when it is a target.
    fn project(
        self,
        layer: &LayerWeights,
        kind: &str,
        x: Tensor<'a>,
        svfit: Option<Adapted<'a>>,
    ) -> Tensor<'a> {
        let y = self.linear(layer.matrix(kind), x, svfit);
        match layer.bias(kind) {
            Some(b) => self.ctx.add(y, self.weights.get(b)),
            None => y,
        }
    }

    /// `x` normalized by the weight `norm` where the layer has one.
    fn maybe_norm(self, x: Tensor<'a>, norm: Option<TensorId>) -> Tensor<'a> {
        match norm {
            Some(w) => self.rms_norm(x, w),
            None => x,
        }
    }

    /// `y = W x` for a weight of the model, plus `U (D[:, slot] ⊙ Vt x)`
    /// when the matrix is an SVFit target (METHOD.md §4), or `U ((S + Δ) ⊙
    /// Vt x)` alone over full-rank factors ([`Delta::Whole`]).
    fn linear(self, w: TensorId, x: Tensor<'a>, svfit: Option<Adapted<'a>>) -> Tensor<'a> {
        if let Some(Adapted {
            svfit:
                Some(SvFit {
                    u,
                    vt,
                    delta: Delta::Whole(spectrum),
                }),
            lora: None,
        }) = svfit
        {
            let ctx = self.ctx;
            return ctx.product(u, ctx.mul(ctx.product(vt, x), spectrum));
        }
        let y = self.weights.product(self.ctx, w, x);
        self.adapt(y, x, svfit)
    }

    /// The layer's fused matrix `tensor` (with its bias) over `x`, cut into
    /// the matrices of `kinds` (`[rows, n_tokens]` each, in order, rows as
    /// [`Config::matrix_slice`] says), each plus its SVFit branch where it
    /// is a target: llama.cpp's views of one product, and a target per
    /// logical matrix.
    fn project_fused<const N: usize>(
        self,
        layer: &LayerWeights,
        tensor: &str,
        x: Tensor<'a>,
        kinds: [&str; N],
        svfit: BranchOf<'_, 'a>,
    ) -> [Tensor<'a>; N] {
        let y = self.project(layer, tensor, x, None);
        let (row, n_tokens) = (y.nb()[1], y.ne()[1]);
        let f32 = Type::F32.row_size(1).expect("f32");
        kinds.map(|kind| {
            let rows = match self.cfg.matrix_slice(kind) {
                Some(slice) if slice.tensor == tensor => slice.rows,
                _ => unreachable!("{kind} is not a part of {tensor}"),
            };
            let len = (rows.end - rows.start) as i64;
            let part = self.ctx.view_3d(
                y,
                [len, n_tokens, 1],
                row,
                row * n_tokens as usize,
                rows.start * f32,
            );
            let part = self.adapt(part, x, svfit(kind));
            // ggml's backward zeroes the source of a view with `scale`, which
            // reads whole rows only: a training graph views no view.
            if self.differentiable && !part.is_contiguous() {
                self.ctx.cont(part)
            } else {
                part
            }
        })
    }

    /// `y` (a product over `x`) plus the SVFit branch `U (D[:, slot] ⊙ Vt
    /// x)` where there is one.
    fn adapt(self, y: Tensor<'a>, x: Tensor<'a>, adapted: Option<Adapted<'a>>) -> Tensor<'a> {
        let ctx = self.ctx;
        let Some(adapted) = adapted else {
            return y;
        };
        let mut y = y;
        if let Some(SvFit { u, vt, delta }) = adapted.svfit {
            let scaled = match delta {
                Delta::PerToken { table, slots } => ctx.product_scaled(vt, x, table, slots),
                Delta::Shared(d) => ctx.mul(ctx.product(vt, x), d),
                Delta::Whole(_) => unreachable!("a whole spectrum stands for a matrix's product"),
            };
            y = ctx.product_added(u, scaled, y);
        }
        if let Some(lora) = adapted.lora {
            y = self.low_rank(y, x, lora);
        }
        y
    }

    /// `y` plus each token's LoRA, `B_j (A_j x)` for its slot `j`: two
    /// per-token products (`MUL_MAT_ID`), so a token's branch is its own
    /// column whatever else the batch holds.
    fn low_rank(self, y: Tensor<'a>, x: Tensor<'a>, t: LowRankTables<'a>) -> Tensor<'a> {
        let ctx = self.ctx;
        let [n, n_tokens, ..] = x.ne();
        let m = y.ne()[0];
        let x = if x.is_contiguous() { x } else { ctx.cont(x) };
        let ax = ctx.mul_mat_id(t.a, ctx.reshape_3d(x, n, 1, n_tokens), t.slots);
        let bax = ctx.mul_mat_id(t.b, ax, t.slots);
        ctx.add(y, ctx.reshape_2d(bax, m, n_tokens))
    }

    /// q or k of layer `il` (`[n_heads * head_dim, n_tokens]`) as heads
    /// `[head_dim, n_heads, n_tokens]`, each normalized by `norm` where the
    /// family does, then rotated by RoPE at `positions`.
    fn heads(
        self,
        il: usize,
        t: Tensor<'a>,
        norm: Option<TensorId>,
        positions: Tensor<'a>,
    ) -> Tensor<'a> {
        let (ctx, cfg, weights) = (self.ctx, self.cfg, self.weights);
        let hd = cfg.head_dim as i64;
        let shape = [hd, t.ne()[0] / hd, t.ne()[1]];
        let t = if t.is_contiguous() {
            ctx.reshape_3d(t, shape[0], shape[1], shape[2])
        } else {
            // A part of a fused product: heads in place, as llama.cpp's view.
            ctx.view_3d(t, shape, t.nb()[0] * hd as usize, t.nb()[1], 0)
        };
        let t = self.maybe_norm(t, norm);
        let (freq_base, freq_scale) = cfg.rope_of_layer(il);
        let rope = Rope {
            mode: cfg.arch.rope_mode(),
            n_dims: cfg.head_dim as i32,
            n_ctx_orig: cfg.n_ctx_train as i32,
            freq_base,
            freq_scale,
        };
        ctx.rope(
            t,
            positions,
            weights.rope_freqs.map(|id| weights.get(id)),
            rope,
        )
    }

    /// q, k and v of layer `il` over `x`: q and k as RoPE'd heads (q
    /// scaled where the family does), v `[n_embd_kv, n_tokens]`.
    fn qkv(
        self,
        il: usize,
        layer: &LayerWeights,
        x: Tensor<'a>,
        positions: Tensor<'a>,
        svfit: BranchOf<'_, 'a>,
    ) -> [Tensor<'a>; 3] {
        let [q, k, v] = if self.cfg.arch.fused_qkv() {
            let kinds = ["attn_q", "attn_k", "attn_v"];
            self.project_fused(layer, "attn_qkv", x, kinds, svfit)
        } else {
            ["attn_q", "attn_k", "attn_v"].map(|kind| self.project(layer, kind, x, svfit(kind)))
        };
        let q = self.heads(il, q, layer.attn_q_norm, positions);
        let k = self.heads(il, k, layer.attn_k_norm, positions);
        let q = match self.cfg.query_scale {
            Some(s) if !self.differentiable => self.ctx.scale(q, s),
            _ => q,
        };
        // The caches and training read v's rows whole.
        let v = if v.is_contiguous() {
            v
        } else {
            self.ctx.cont(v)
        };
        [q, k, v]
    }

    /// The softmax's scale of attention scores: 1 where q was scaled.
    /// Training scales the scores instead (the same up to rounding): the
    /// gradient reaching q is a permuted view, which ggml cannot scale.
    fn kq_scale(self) -> f32 {
        match self.cfg.query_scale {
            Some(s) if self.differentiable => s,
            Some(_) => 1.0,
            None => 1.0 / (self.cfg.head_dim as f32).sqrt(),
        }
    }

    /// The gated feed-forward block, from its input norm to the residual
    /// it adds to: `down(act(gate x) * up x)`, normalized after where the
    /// family does.
    fn feed_forward(
        self,
        layer: &LayerWeights,
        x: Tensor<'a>,
        svfit: BranchOf<'_, 'a>,
    ) -> Tensor<'a> {
        let x = self.rms_norm(x, layer.ffn_norm);
        let [gate, up] = if self.cfg.arch.fused_gate_up() {
            // The gate is the first half (ggml's swiglu of one input).
            self.project_fused(layer, "ffn_up", x, ["ffn_gate", "ffn_up"], svfit)
        } else {
            let up = self.project(layer, "ffn_up", x, svfit("ffn_up"));
            [self.project(layer, "ffn_gate", x, svfit("ffn_gate")), up]
        };
        let act = match self.cfg.arch.activation() {
            Activation::Silu => self.ctx.swiglu_split(gate, up),
            Activation::Gelu if self.differentiable => self.ctx.mul(self.gelu(gate), up),
            Activation::Gelu => self.ctx.geglu_split(gate, up),
        };
        let out = self.project(layer, "ffn_down", act, svfit("ffn_down"));
        self.maybe_norm(out, layer.post_ffw_norm)
    }

    /// The final norm and the output head: logits `[n_vocab, rows of x]`,
    /// soft-capped where the family does.
    fn output_head(self, x: Tensor<'a>) -> Tensor<'a> {
        let ctx = self.ctx;
        let x = self.rms_norm(x, self.weights.output_norm);
        let mut logits = self.weights.product(ctx, self.weights.output, x);
        if let Some(cap) = self.cfg.final_logit_softcap {
            logits = self.softcap(logits, cap);
        }
        logits.set_name("logits").set_output()
    }

    /// `c·tanh(y/c)`, as llama.cpp computes it; in training (tanh has no
    /// backward in ggml) as `2c·σ(2y/c) − c`.
    fn softcap(self, y: Tensor<'a>, cap: f32) -> Tensor<'a> {
        let ctx = self.ctx;
        if self.differentiable {
            ctx.scale_bias(self.sigmoid(ctx.scale(y, 2.0 / cap)), 2.0 * cap, -cap)
        } else {
            ctx.scale(ctx.tanh(ctx.scale(y, 1.0 / cap)), cap)
        }
    }

    /// The attention scores `k·q`, soft-capped where the family does.
    fn scores(self, k: Tensor<'a>, q: Tensor<'a>) -> Tensor<'a> {
        let kq = self.ctx.prec_f32(self.ctx.mul_mat(k, q));
        match self.cfg.attn_logit_softcap {
            Some(cap) => self.softcap(kq, cap),
            None => kq,
        }
    }

    /// `σ(z) = exp(z − softplus(z))`, from ops with a backward (and finite
    /// for every z: softplus(z) is z past 20).
    fn sigmoid(self, z: Tensor<'a>) -> Tensor<'a> {
        let ctx = self.ctx;
        ctx.exp(ctx.sub(z, ctx.softplus(z)))
    }

    /// GELU's tanh approximation, `x·σ(2√(2/π)·(x + 0.044715x³))`, from ops
    /// with a backward: ggml's own GELU (a table on CPU) has none. It
    /// differs from that table by rounding only.
    fn gelu(self, x: Tensor<'a>) -> Tensor<'a> {
        let ctx = self.ctx;
        let cube = ctx.mul(x, ctx.sqr(x));
        let inner = ctx.add(x, ctx.scale(cube, 0.044_715));
        let z = ctx.scale(inner, 2.0 * (2.0 / std::f32::consts::PI).sqrt());
        ctx.mul(x, self.sigmoid(z))
    }

    /// Builds the forward graph into `gf`, with the SVFit branch of
    /// `branch` on its target matrices when given; returns its inputs and
    /// the logits `[n_vocab, n_outputs]`.
    pub(super) fn forward(
        self,
        gf: &mut Graph<'a>,
        cache: &'a KvCache,
        (branch, lora): (Option<&'a Branch>, Option<&'a LoraBranch>),
        shape: &Shape,
    ) -> (Inputs<'a>, Tensor<'a>) {
        let inputs = self.serving_inputs(shape, branch.is_some(), lora.is_some());
        let pass = Serving {
            builder: self,
            cache,
            branch,
            lora,
            inputs: &inputs,
            shape,
        };
        let mut x = self.embed(inputs.tokens);
        for il in 0..self.weights.layers.len() {
            x = pass.layer(gf, il, x);
        }
        let logits = self.output_head(x);
        gf.expand(logits);
        (inputs, logits)
    }

    /// The input tensors of a serving pass of `shape`, with slot inputs
    /// for the branches that are on.
    fn serving_inputs(self, shape: &Shape, with_branch: bool, with_lora: bool) -> Inputs<'a> {
        let ctx = self.ctx;
        let n_tokens = shape.n_tokens as i64;
        let partial = shape.n_outputs < shape.n_tokens;
        let input =
            |ty, dims: &[i64], name: &str| ctx.new_tensor(ty, dims).set_name(name).set_input();
        let masks = |kind: &str| -> Vec<Tensor<'a>> {
            shape
                .groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    input(
                        Type::F32,
                        &[g.n_kv as i64, g.n_tokens as i64],
                        &format!("inp_{kind}_{i}"),
                    )
                })
                .collect()
        };
        Inputs {
            tokens: input(Type::I32, &[n_tokens], "inp_tokens"),
            positions: input(Type::I32, &[n_tokens], "inp_pos"),
            kv_cells: input(Type::I64, &[n_tokens], "inp_kv_cells"),
            v_elements: input(
                Type::I64,
                &[self.cfg.n_embd_kv() as i64 * n_tokens],
                "inp_v_elements",
            ),
            kq_masks: masks("kq_mask"),
            kq_masks_swa: self
                .cfg
                .sliding_window
                .is_some()
                .then(|| masks("kq_mask_swa")),
            out_rows: partial.then(|| input(Type::I32, &[shape.n_outputs as i64], "inp_out_rows")),
            slots: with_branch.then(|| input(Type::I32, &[n_tokens], "inp_slots")),
            out_slots: (with_branch && partial)
                .then(|| input(Type::I32, &[shape.n_outputs as i64], "inp_out_slots")),
            lora_slots: with_lora.then(|| input(Type::I32, &[1, n_tokens], "inp_lora_slots")),
            out_lora_slots: (with_lora && partial).then(|| {
                input(
                    Type::I32,
                    &[1, shape.n_outputs as i64],
                    "inp_out_lora_slots",
                )
            }),
        }
    }
}

/// One serving pass: the batch's KV cache, inputs and shape, the SVFit
/// branch when some token has an SVFit adapter and the LoRA branch when
/// some token has a LoRA.
struct Serving<'a, 'p> {
    builder: Builder<'a, 'p>,
    cache: &'a KvCache,
    branch: Option<&'a Branch>,
    lora: Option<&'a LoraBranch>,
    inputs: &'p Inputs<'a>,
    shape: &'p Shape<'p>,
}

/// A pass's SVFit slots `[n]` and LoRA slots `[1, n]` of its tokens.
type Slots<'a> = (Option<Tensor<'a>>, Option<Tensor<'a>>);

impl<'a> Serving<'a, '_> {
    /// The branches of a target matrix, for tokens whose SVFit and LoRA
    /// slots are `slots`.
    fn adapted(&self, il: usize, kind: &str, slots: Slots<'a>) -> Option<Adapted<'a>> {
        let (svfit_slots, lora_slots) = slots;
        let svfit = self
            .branch
            .and_then(|b| b.target(il, kind))
            .zip(svfit_slots);
        let svfit = svfit.map(|(TargetTensors { u, vt, d }, slots)| SvFit {
            u,
            vt,
            delta: Delta::PerToken { table: d, slots },
        });
        let lora = self.lora.and_then(|l| l.target(il, kind)).zip(lora_slots);
        let lora = lora.map(|((a, b), slots)| LowRankTables { a, b, slots });
        (svfit.is_some() || lora.is_some()).then_some(Adapted { svfit, lora })
    }

    /// Layer `il` over the hidden states `x`.
    fn layer(&self, gf: &mut Graph<'a>, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        let b = self.builder;
        let layer = &b.weights.layers[il];
        let attn_in = b.rms_norm(x, layer.attn_norm);
        let mut attn_out = self.attention(gf, il, attn_in);
        let mut residual = x;
        let mut ffn_slots = (self.inputs.slots, self.inputs.lora_slots);
        if il + 1 == b.weights.layers.len() {
            // Only the rows that produce logits go through the last FFN.
            if let Some(rows) = self.inputs.out_rows {
                attn_out = b.ctx.get_rows(attn_out, rows);
                residual = b.ctx.get_rows(residual, rows);
                ffn_slots = (self.inputs.out_slots, self.inputs.out_lora_slots);
            }
        }
        let attn_out = b.maybe_norm(attn_out, layer.post_attention_norm);
        let ffn_in = b.ctx.add(attn_out, residual);
        let ffn_out = b.feed_forward(layer, ffn_in, &|kind| self.adapted(il, kind, ffn_slots));
        b.ctx.add(ffn_out, ffn_in)
    }

    /// Grouped-query self-attention with RoPE over the KV cache (within
    /// the sliding window in the layers that have one).
    fn attention(&self, gf: &mut Graph<'a>, il: usize, x: Tensor<'a>) -> Tensor<'a> {
        let (b, inputs) = (self.builder, self.inputs);
        let layer = &b.weights.layers[il];
        let (ctx, cfg) = (b.ctx, b.cfg);
        let n_tokens = self.shape.n_tokens as i64;
        let slots = (inputs.slots, inputs.lora_slots);
        let svfit = |kind: &str| self.adapted(il, kind, slots);
        let [q, k, v] = b.qkv(il, layer, x, inputs.positions, &svfit);

        // Store this batch's K and V in their cells before attention reads them.
        // Plain attention, not ggml's flash attention: its CPU kernel switches
        // between f16 and f32 accumulation with the number of queries, so a
        // sequence's logits would depend on what else is in the batch.
        let n_embd_kv = cfg.n_embd_kv() as i64;
        let k_cache = self.cache.tensors().get(self.cache.k[il]);
        let v_cache = self.cache.tensors().get(self.cache.v[il]);
        gf.expand(ctx.set_rows(
            k_cache,
            ctx.reshape_2d(k, n_embd_kv, n_tokens),
            inputs.kv_cells,
        ));
        let v_flat = ctx.reshape_2d(v_cache, 1, v_cache.n_elements());
        gf.expand(ctx.set_rows(
            v_flat,
            ctx.reshape_2d(v, 1, n_embd_kv * n_tokens),
            inputs.v_elements,
        ));

        // Each sequence attends over its own cells only.
        let masks = match &inputs.kq_masks_swa {
            Some(swa) if cfg.is_swa(il) => swa,
            _ => &inputs.kq_masks,
        };
        let scale = b.kq_scale();
        let heads: Vec<Tensor<'a>> = self
            .shape
            .groups
            .iter()
            .zip(masks)
            .map(|(g, &mask)| {
                let kq = (mask, scale);
                sequence_attention(b, q, k_cache, v_cache, g, kq)
            })
            .collect();
        let out = join_tokens(ctx, &heads);
        b.project(layer, "attn_output", out, svfit("attn_output"))
    }
}

/// Attention of one sequence's tokens over its cells, with the softmax's
/// mask and scale `kq`; `[n_embd_q, n_tokens]`.
fn sequence_attention<'a>(
    b: Builder<'a, '_>,
    q: Tensor<'a>,
    k_cache: Tensor<'a>,
    v_cache: Tensor<'a>,
    g: &SeqGroup,
    (mask, scale): (Tensor<'a>, f32),
) -> Tensor<'a> {
    let (ctx, cfg) = (b.ctx, b.cfg);
    let (hd, n_head, n_head_kv) = (cfg.head_dim as i64, cfg.n_head as i64, cfg.n_head_kv as i64);
    let (n_tokens, n_kv) = (g.n_tokens as i64, g.n_kv as i64);
    let f16 = Type::F16.row_size(1).expect("f16");
    // q: [hd, n_head, n_tokens] → [hd, n_tokens, n_head]
    let q = ctx.view_3d(
        q,
        [hd, n_head, n_tokens],
        q.nb()[1],
        q.nb()[2],
        g.first_token * q.nb()[2],
    );
    let q = ctx.permute(q, [0, 2, 1, 3]);
    // k: [hd, n_kv, n_head_kv] from rows start.. of the K cache
    let k_row = k_cache.nb()[1];
    let k = ctx.view_3d(
        k_cache,
        [hd, n_head_kv, n_kv],
        hd as usize * f16,
        k_row,
        g.start * k_row,
    );
    let k = ctx.permute(k, [0, 2, 1, 3]);
    let kq = ctx.soft_max_ext(b.scores(k, q), mask, scale);
    // v: [n_kv, hd, n_head_kv] from columns start.. of the transposed V cache
    let v_line = v_cache.nb()[1];
    let v = ctx.view_3d(
        v_cache,
        [n_kv, hd, n_head_kv],
        v_line,
        v_line * hd as usize,
        g.start * f16,
    );
    // [hd, n_tokens, n_head] → [hd, n_head, n_tokens] → [n_embd, n_tokens]
    let out = ctx.permute(ctx.mul_mat(v, kq), [0, 2, 1, 3]);
    ctx.reshape_2d(ctx.cont(out), hd * n_head, n_tokens)
}

/// Joins per-sequence results `[n, n_i]` along the token dimension, as a
/// balanced tree of concatenations.
fn join_tokens<'a>(ctx: &'a Context, parts: &[Tensor<'a>]) -> Tensor<'a> {
    match parts {
        [one] => *one,
        _ => {
            let (left, right) = parts.split_at(parts.len() / 2);
            ctx.concat(join_tokens(ctx, left), join_tokens(ctx, right), 1)
        }
    }
}
