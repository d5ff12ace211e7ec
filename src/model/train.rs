//! The differentiable side of the model (METHOD.md §5): the loss of packed
//! training rows and its gradient with respect to the delta (`sigma - S`) of
//! every SVFit target matrix. The factors are held as f32 (the backward pass
//! multiplies by them), the deltas are graph parameters, and ggml's backward
//! graph writes their gradients into accumulators that are read back.

use crate::factors::{Factor, TargetMatrix};
use crate::ggml::kernel::Matrix;
use crate::ggml::{Context, Tensor, TensorId, TensorSet, Type};

use super::graph::{self, Adapted, Delta, SvFit};
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
    rank: usize,
    u: TensorId,
    vt: TensorId,
    delta: TensorId,
    grad: TensorId,
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
}

impl Learner {
    /// Places `factors` (f32) next to `model`'s weights with zero deltas.
    pub fn new(model: Model, factors: &[(TargetMatrix, Factor)]) -> Result<Self, ModelError> {
        if factors.is_empty() {
            return Err(ModelError::Factors("no target matrices to train".into()));
        }
        let ctx = Context::new(4 * factors.len() + 1, 0)?;
        for (t, f) in factors {
            let (m, n) = super::svfit::check_factor(model.config(), t, f)?;
            let (p, r) = (t.prefix(), f.rank() as i64);
            ctx.new_tensor(Type::F32, &[r, m as i64])
                .set_name(&format!("{p}.U"));
            ctx.new_tensor(Type::F32, &[n as i64, r])
                .set_name(&format!("{p}.Vt"));
            ctx.new_tensor(Type::F32, &[r])
                .set_name(&format!("{p}.delta"))
                .set_param();
            ctx.new_tensor(Type::F32, &[r, 1, 1, 1])
                .set_name(&format!("{p}.grad"));
        }
        ctx.new_tensor(Type::F32, &[1, 1, 1, 1])
            .set_name("loss.grad");
        let set = TensorSet::allocate(ctx, model.sched.primary())?;
        set.buffer().clear(0);
        let loss_grad = set.find("loss.grad").expect("created above");
        set.get(loss_grad).write(&[1.0f32])?;
        let mut params = Vec::with_capacity(factors.len());
        for (t, f) in factors {
            let p = t.prefix();
            let id = |suffix: &str| set.find(&format!("{p}.{suffix}")).expect("created above");
            let param = Param {
                layer: t.layer,
                kind: t.kind,
                rank: f.rank(),
                u: id("U"),
                vt: id("Vt"),
                delta: id("delta"),
                grad: id("grad"),
                prefix: p,
            };
            set.get(param.u).write(&f.u)?;
            set.get(param.vt).write(&f.vt)?;
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
        })
    }

    /// Whether training graphs on a CPU run their f32 products through
    /// faer's GEMM (`ggml::gemm`, on by default: 3–4× faster); off, ggml's
    /// own kernels run them (to compare).
    pub fn set_gemm(&mut self, on: bool) {
        self.gemm = on;
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// `(blk.L.kind, rank)` of every trained matrix, in parameter order.
    pub fn matrices(&self) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.params.iter().map(|p| (p.prefix.as_str(), p.rank))
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
            self.set.get(p.delta).write(mine)?;
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
            self.set.get(p.grad).read(mine)?;
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
            Some(Adapted {
                svfit: Some(SvFit {
                    u: Matrix::plain(set.get(p.u)),
                    vt: Matrix::plain(set.get(p.vt)),
                    delta: Delta::Shared(set.get(p.delta)),
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
        let (inputs, logits, loss) =
            builder.train_forward(&mut gf, &branch, row.len(), row.targets.len());
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
        // Only the masks some layer reads are allocated.
        if inputs.mask.is_allocated() {
            inputs.mask.write(&row.mask(None))?;
        }
        if let (Some(mask), Some(w)) = (inputs.mask_swa, &cfg.sliding_window) {
            if mask.is_allocated() {
                mask.write(&row.mask(Some(w.size)))?;
            }
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
