//! The differentiable side of the model (METHOD.md §5): the loss of packed
//! training rows and its gradient with respect to the delta (`sigma - S`) of
//! every SVFit target matrix. The factors are held as f32 (the backward pass
//! multiplies by them), the deltas are graph parameters, and ggml's backward
//! graph writes their gradients into accumulators that are read back.

use crate::factors::{Factor, TargetMatrix};
use crate::ggml::kernel::Matrix;
use crate::ggml::{Context, Tensor, TensorId, TensorSet, Type};

use super::graph::{self, Adapted, ByExample, Delta, SvFit};
use super::{Model, ModelError};

/// Packed training examples as one row of tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainRow {
    pub tokens: Vec<u32>,
    /// Position of each token within its own example.
    pub positions: Vec<i32>,
    /// Example of each token: a token attends earlier tokens of its example only.
    pub segments: Vec<u32>,
    /// `(row, next)`: rows whose prediction of the next token `next` is in
    /// the loss.
    pub targets: Vec<(u32, u32)>,
}

impl TrainRow {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends one example; `loss[i]` says whether predicting `tokens[i + 1]`
    /// from `tokens[..=i]` counts (`loss.len() == tokens.len()`, the last
    /// entry is ignored).
    pub fn push(&mut self, tokens: &[u32], loss: &[bool]) {
        let segment = self.segments.last().map_or(0, |s| s + 1);
        let start = self.tokens.len() as u32;
        for (i, &t) in tokens.iter().enumerate() {
            if i + 1 < tokens.len() && loss[i] {
                self.targets.push((start + i as u32, tokens[i + 1]));
            }
            self.tokens.push(t);
            self.positions.push(i as i32);
            self.segments.push(segment);
        }
    }

    /// Each example's first token and length, in order.
    fn examples(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (i, s) in self.segments.iter().enumerate() {
            match out.last_mut() {
                Some((start, len)) if self.segments[*start] == *s => *len += 1,
                _ => out.push((i, 1)),
            }
        }
        out
    }

    /// Attention example by example, where that computes at most half the
    /// scores of attention over the whole row (the examples padded to the
    /// longest): short examples packed many to a row.
    fn by_example(&self) -> Option<ByExample> {
        let examples = self.examples();
        let len = examples.iter().map(|e| e.1).max()?;
        let count = examples.len();
        (count > 1 && 2 * count * len * len <= self.len() * self.len())
            .then_some(ByExample { len, count })
    }

    /// Whether the row attends example by example (see
    /// [`Learner::set_attention_by_example`]).
    pub fn attends_by_example(&self) -> bool {
        self.by_example().is_some()
    }

    /// Rows of attention by example (`graph::ByExampleInputs`): the row of
    /// each padded row for `heads` heads (past an example's end, its last
    /// token's), and each token's and head's padded row for `heads`.
    fn padded_rows(&self, len: usize, heads: usize) -> (Vec<i32>, Vec<i32>) {
        let examples = self.examples();
        let mut gather = Vec::with_capacity(len * heads * examples.len());
        let mut scatter = vec![0; self.len() * heads];
        for (e, &(start, n)) in examples.iter().enumerate() {
            for h in 0..heads {
                let padded = (e * heads + h) * len;
                gather.extend((0..len).map(|p| ((start + p.min(n - 1)) * heads + h) as i32));
                for p in 0..n {
                    scatter[(start + p) * heads + h] = (padded + p) as i32;
                }
            }
        }
        (gather, scatter)
    }

    /// The masks `[len, len, 1, count]` of attention by example, by query
    /// within each example: causal, within the `window`; a padded query
    /// sees its example's first token only (finite, and its output is
    /// dropped).
    fn padded_mask(&self, len: usize, window: Option<usize>) -> Vec<f32> {
        let examples = self.examples();
        let mut mask = vec![f32::NEG_INFINITY; len * len * examples.len()];
        for (e, &(_, n)) in examples.iter().enumerate() {
            let mask = &mut mask[e * len * len..][..len * len];
            for q in 0..len {
                let first = window.map_or(0, |w| (q + 1).saturating_sub(w));
                let keys = if q < n { first..q + 1 } else { 0..1 };
                mask[q * len..][keys].fill(0.0);
            }
        }
        mask
    }

    /// The attention mask `[n, n]`, row-major by query; with a `window`,
    /// a token sees only the last `window` positions of its example.
    fn mask(&self, window: Option<usize>) -> Vec<f32> {
        let n = self.len();
        let mut mask = vec![f32::NEG_INFINITY; n * n];
        for q in 0..n {
            let first = window.map_or(0, |w| (q + 1).saturating_sub(w));
            for k in first..=q {
                if self.segments[k] == self.segments[q] {
                    mask[q * n + k] = 0.0;
                }
            }
        }
        mask
    }
}

/// Loss of one row, and for evaluation whether each target's next token is
/// the model's most likely one.
#[derive(Clone, Debug)]
pub struct RowLoss {
    /// Mean cross-entropy over the row's targets (nats per token).
    pub loss: f32,
    pub n_targets: usize,
    /// Per target (with [`Learner::evaluate`]): argmax of the logits == next.
    pub hits: Vec<bool>,
}

struct Param {
    prefix: String,
    layer: usize,
    kind: &'static str,
    /// Trained values: the rank kept.
    rank: usize,
    /// Length of the factors, delta and gradient tensors: the rank, or
    /// `min(m, n)` when `spectrum` is there.
    width: usize,
    u: TensorId,
    vt: TensorId,
    delta: TensorId,
    grad: TensorId,
    /// `S` of `W`'s full-rank factors, which then stand for `W`
    /// ([`Delta::Whole`]); the delta's values past the rank stay zero.
    spectrum: Option<TensorId>,
}

/// A model with SVFit factors whose deltas are trained.
pub struct Learner {
    model: Model,
    set: TensorSet,
    params: Vec<Param>,
    /// The loss gradient accumulator (holds 1.0).
    loss_grad: TensorId,
    ctx: Context,
    /// Whether graphs on a CPU run their f32 products through faer's GEMM
    /// (`ggml::gemm`), see [`Learner::set_gemm`].
    gemm: bool,
    /// Whether attention runs example by example where that pays, see
    /// [`Learner::set_attention_by_example`].
    by_example: bool,
}

/// Whether a target's training graph takes fewer multiply-adds per token
/// as one product over `W`'s full-rank factors, `U ((S + Δ) ⊙ Vt x)` with
/// `k = min(m, n)` values, than as `W x` plus the branch of `rank` values:
/// `k (m + n) < m n + rank (m + n)`. Most policies keep a rank near full
/// (`energy:0.99` keeps 90% of `ffn_down`'s), where the full-rank product
/// saves about a third. Never for a part of a fused matrix, whose product
/// the other parts share.
pub fn full_rank_pays(
    config: &super::Config,
    t: &TargetMatrix,
    m: usize,
    n: usize,
    rank: usize,
) -> bool {
    let own = config
        .matrix_slice(t.kind)
        .is_some_and(|s| s.tensor == t.kind);
    let k = m.min(n);
    own && k * (m + n) < m * n + rank * (m + n)
}

/// Whether `full` (full rank) begins with `kept`'s singular values and
/// vectors, within the rounding of a factor file's f16: the same SVD, so
/// that values trained over `full` are `kept`'s.
fn extends(full: &Factor, kept: &Factor) -> bool {
    let r = kept.rank();
    let close = |a: f32, b: f32, tol: f32| (a - b).abs() <= tol * (1.0 + a.abs());
    full.m == kept.m
        && full.n == kept.n
        && full.rank() == full.m.min(full.n)
        && full.rank() >= r
        && full.s.iter().zip(&kept.s).all(|(&a, &b)| close(a, b, 1e-3))
        && (0..full.m).all(|i| {
            let (a, b) = (&full.u[i * full.rank()..][..r], &kept.u[i * r..][..r]);
            a.iter().zip(b).all(|(&a, &b)| close(a, b, 2e-3))
        })
        && full.vt[..r * full.n]
            .iter()
            .zip(&kept.vt)
            .all(|(&a, &b)| close(a, b, 2e-3))
}

impl Learner {
    /// Places `factors` (f32) next to `model`'s weights with zero deltas:
    /// every target's graph is `W x` plus its branch.
    pub fn new(model: Model, factors: &[(TargetMatrix, Factor)]) -> Result<Self, ModelError> {
        Self::build(model, factors, None)
    }

    /// [`Learner::new`], where full-rank factors stand for the matrix when
    /// that pays ([`full_rank_pays`]): a target's own factors when they are
    /// full rank, else `full[i]` (for `factors[i]`, computed from the same
    /// matrix) when it begins with them. The same values are trained, with
    /// fewer multiply-adds.
    pub fn with_full_rank(
        model: Model,
        factors: &[(TargetMatrix, Factor)],
        full: &[Option<Factor>],
    ) -> Result<Self, ModelError> {
        Self::build(model, factors, Some(full))
    }

    fn build(
        model: Model,
        factors: &[(TargetMatrix, Factor)],
        full: Option<&[Option<Factor>]>,
    ) -> Result<Self, ModelError> {
        if factors.is_empty() {
            return Err(ModelError::Factors("no target matrices to train".into()));
        }
        let mut stand_ins = Vec::with_capacity(factors.len());
        for (i, (t, f)) in factors.iter().enumerate() {
            let (m, n) = super::svfit::check_factor(model.config(), t, f)?;
            let stand_in = match full {
                Some(_) if !full_rank_pays(model.config(), t, m, n, f.rank()) => None,
                Some(_) if f.rank() == m.min(n) => Some(f),
                Some(full) => full
                    .get(i)
                    .and_then(Option::as_ref)
                    .filter(|g| extends(g, f)),
                None => None,
            };
            stand_ins.push(stand_in);
        }
        let ctx = Context::new(5 * factors.len() + 1, 0)?;
        for ((t, f), stand_in) in factors.iter().zip(&stand_ins) {
            let p = t.prefix();
            let width = stand_in.unwrap_or(f).rank() as i64;
            ctx.new_tensor(Type::F32, &[width, f.m as i64])
                .set_name(&format!("{p}.U"));
            ctx.new_tensor(Type::F32, &[f.n as i64, width])
                .set_name(&format!("{p}.Vt"));
            ctx.new_tensor(Type::F32, &[width])
                .set_name(&format!("{p}.delta"))
                .set_param();
            ctx.new_tensor(Type::F32, &[width, 1, 1, 1])
                .set_name(&format!("{p}.grad"));
            if stand_in.is_some() {
                ctx.new_tensor(Type::F32, &[width])
                    .set_name(&format!("{p}.S"));
            }
        }
        ctx.new_tensor(Type::F32, &[1, 1, 1, 1])
            .set_name("loss.grad");
        let set = TensorSet::allocate(ctx, model.sched.primary())?;
        set.buffer().clear(0);
        let loss_grad = set.find("loss.grad").expect("created above");
        set.get(loss_grad).write(&[1.0f32])?;
        let mut params = Vec::with_capacity(factors.len());
        for ((t, f), stand_in) in factors.iter().zip(stand_ins) {
            let p = t.prefix();
            let id = |suffix: &str| set.find(&format!("{p}.{suffix}")).expect("created above");
            let stored = stand_in.unwrap_or(f);
            let param = Param {
                layer: t.layer,
                kind: t.kind,
                rank: f.rank(),
                width: stored.rank(),
                u: id("U"),
                vt: id("Vt"),
                delta: id("delta"),
                grad: id("grad"),
                spectrum: stand_in.map(|_| id("S")),
                prefix: p,
            };
            set.get(param.u).write(&stored.u)?;
            set.get(param.vt).write(&stored.vt)?;
            if let Some(s) = param.spectrum {
                set.get(s).write(&stored.s)?;
            }
            params.push(param);
        }
        let size = graph::train_graph_size(model.config());
        Ok(Learner {
            ctx: Context::with_graphs(4 * size, size, true)?,
            model,
            set,
            params,
            loss_grad,
            gemm: true,
            by_example: true,
        })
    }

    /// Whether training graphs on a CPU run their f32 products through
    /// faer's GEMM (`ggml::gemm`, on by default: 3–4× faster); off, ggml's
    /// own kernels run them (to compare).
    pub fn set_gemm(&mut self, on: bool) {
        self.gemm = on;
    }

    /// Whether a row of many short examples attends example by example on
    /// a CPU (on by default: at most half the scores), or over the whole
    /// row with a mask (to compare: the same loss and gradients).
    pub fn set_attention_by_example(&mut self, on: bool) {
        self.by_example = on;
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// `(blk.L.kind, rank)` of every trained matrix, in parameter order.
    pub fn matrices(&self) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.params.iter().map(|p| (p.prefix.as_str(), p.rank))
    }

    /// How many targets train over full-rank factors that stand for their
    /// matrix ([`Learner::with_full_rank`]).
    pub fn n_full_rank(&self) -> usize {
        self.params.iter().filter(|p| p.spectrum.is_some()).count()
    }

    /// Trained values in all: the sum of the ranks.
    pub fn n_params(&self) -> usize {
        self.params.iter().map(|p| p.rank).sum()
    }

    /// Sets every delta from one flat vector (parameter order).
    pub fn set_deltas(&mut self, flat: &[f32]) -> Result<(), ModelError> {
        if flat.len() != self.n_params() {
            return Err(ModelError::Factors(format!(
                "{} deltas for {} trained values",
                flat.len(),
                self.n_params()
            )));
        }
        let mut rest = flat;
        for p in &self.params {
            let (mine, tail) = rest.split_at(p.rank);
            if p.width == p.rank {
                self.set.get(p.delta).write(mine)?;
            } else {
                let mut padded = mine.to_vec();
                padded.resize(p.width, 0.0);
                self.set.get(p.delta).write(&padded)?;
            }
            rest = tail;
        }
        Ok(())
    }

    /// The row's mean loss, and its gradient with respect to every delta
    /// written into `grad` (parameter order).
    pub fn gradient(&mut self, row: &TrainRow, grad: &mut [f32]) -> Result<f32, ModelError> {
        if grad.len() != self.n_params() {
            return Err(ModelError::Factors(format!(
                "a gradient buffer of {} for {} trained values",
                grad.len(),
                self.n_params()
            )));
        }
        let result = self.run(row, true)?;
        let mut rest = grad;
        for p in &self.params {
            let (mine, tail) = rest.split_at_mut(p.rank);
            if p.width == p.rank {
                self.set.get(p.grad).read(mine)?;
            } else {
                // The values past the rank are not trained.
                mine.copy_from_slice(&self.set.get(p.grad).read_f32_vec()?[..p.rank]);
            }
            rest = tail;
        }
        Ok(result.loss)
    }

    /// The row's mean loss and per-target hits, without gradients.
    pub fn evaluate(&mut self, row: &TrainRow) -> Result<RowLoss, ModelError> {
        self.run(row, false)
    }

    fn run(&mut self, row: &TrainRow, backward: bool) -> Result<RowLoss, ModelError> {
        if row.targets.is_empty() {
            return Err(ModelError::EmptyBatch);
        }
        let cfg = self.model.config.clone();
        if let Some(&t) = row.tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
            return Err(ModelError::InvalidToken {
                token: t,
                n_vocab: cfg.n_vocab,
            });
        }
        if row.len() > cfg.n_ctx_train {
            return Err(ModelError::CacheFull {
                needed: row.len(),
                free: cfg.n_ctx_train,
                size: cfg.n_ctx_train,
            });
        }
        self.ctx.reset();
        let ctx = &self.ctx;
        let set = &self.set;
        let params = &self.params;
        let branch = |layer: usize, kind: &str| {
            let p = params.iter().find(|p| p.layer == layer && p.kind == kind)?;
            let delta = set.get(p.delta);
            Some(Adapted {
                svfit: Some(SvFit {
                    u: Matrix::plain(set.get(p.u)),
                    vt: Matrix::plain(set.get(p.vt)),
                    delta: match p.spectrum {
                        Some(s) => Delta::Whole(ctx.add(set.get(s), delta)),
                        None => Delta::Shared(delta),
                    },
                }),
                lora: None,
            })
        };
        let size = graph::train_graph_size(&cfg);
        let mut gf = ctx.new_graph_with_grads(size);
        let builder = graph::Builder {
            ctx,
            cfg: &cfg,
            weights: &self.model.weights,
            differentiable: true,
        };
        // On a GPU the scores are cheap, and this layout is unmeasured.
        let by_example = row
            .by_example()
            .filter(|_| self.by_example && self.model.sched.primary().is_cpu());
        let (inputs, logits, loss) =
            builder.train_forward(&mut gf, &branch, row.len(), row.targets.len(), by_example);
        if backward {
            let mut accs: Vec<(Tensor, Tensor)> = params
                .iter()
                .map(|p| (set.get(p.delta), set.get(p.grad)))
                .collect();
            accs.push((loss, set.get(self.loss_grad)));
            gf.build_backward(ctx, &accs);
        }
        if self.gemm && self.model.sched.primary().is_cpu() {
            gf.use_gemm();
        }
        let mut allocated = self.model.sched.alloc(&mut gf)?;
        if backward {
            allocated.reset_gradients();
        }
        let tokens: Vec<i32> = row.tokens.iter().map(|&t| t as i32).collect();
        inputs.tokens.write(&tokens)?;
        inputs.positions.write(&row.positions)?;
        let mask = |window: Option<usize>| match by_example {
            Some(b) => row.padded_mask(b.len, window),
            None => row.mask(window),
        };
        // Only the masks some layer reads are allocated.
        if inputs.mask.is_allocated() {
            inputs.mask.write(&mask(None))?;
        }
        if let (Some(swa), Some(w)) = (inputs.mask_swa, &cfg.sliding_window) {
            if swa.is_allocated() {
                swa.write(&mask(Some(w.size)))?;
            }
        }
        if let Some(padded) = &inputs.by_example {
            let len = padded.shape.len;
            let (gather_q, scatter) = row.padded_rows(len, cfg.n_head);
            padded.gather_q.write(&gather_q)?;
            padded.scatter.write(&scatter)?;
            padded
                .gather_kv
                .write(&row.padded_rows(len, cfg.n_head_kv).0)?;
        }
        let rows: Vec<i32> = row.targets.iter().map(|&(r, _)| r as i32).collect();
        inputs.loss_rows.write(&rows)?;
        let mut labels = vec![0f32; cfg.n_vocab * row.targets.len()];
        for (i, &(_, next)) in row.targets.iter().enumerate() {
            labels[i * cfg.n_vocab + next as usize] = 1.0;
        }
        inputs.labels.write(&labels)?;
        allocated.compute()?;

        let mut value = [0f32];
        loss.read(&mut value)?;
        let hits = if backward {
            Vec::new()
        } else {
            let mut data = vec![0f32; cfg.n_vocab * row.targets.len()];
            logits.read(&mut data)?;
            data.chunks_exact(cfg.n_vocab)
                .zip(&row.targets)
                .map(|(l, &(_, next))| argmax(l) == next as usize)
                .collect()
        };
        Ok(RowLoss {
            loss: value[0],
            n_targets: row.targets.len(),
            hits,
        })
    }
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}
