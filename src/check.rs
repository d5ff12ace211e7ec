//! `svfit check`: runs one compute device against the CPU on one model and
//! reports, step by step, whether it computes what the CPU computes and how
//! fast it trains. The steps:
//!
//! - `parity`: the device's logits of a prompt against the CPU's, both on
//!   the weights as stored (top-1 ≥ 98%, mean |Δ| < 2% of the logits' std);
//! - `adapter`: an adapter through the SVFit branch against the same
//!   adapter merged into the weights (`svfit merge`, F32 targets), both on
//!   the device and both with f32 target matrices (the parity thresholds,
//!   or 1.5x the model's own distance to itself when its sigmas are nudged
//!   by 1e-6, whichever is looser; the adapter must move the logits more
//!   than twice as far);
//! - `batch`: a sequence's logits alone against the same sequence in a
//!   batch with others on other adapters (exact on the CPU; reported, not
//!   judged, on a GPU, whose kernels may change with the batch);
//! - `lora`: the same adapter exported as an exact LoRA (`svfit adapter
//!   export`) through the LoRA branch against the SVFit branch, both on the
//!   device (the `adapter` step's bounds), and the LoRA sequence batched
//!   with a base and an SVFit sequence against alone (as `batch`);
//! - `gradient`: the training gradient of up to 32 singular values against
//!   central finite differences of the loss, on the device (< 1e-2);
//! - `train`: training tokens/s (forward and backward of packed rows) on the
//!   device and on the CPU;
//! - `placement`: on which backend every node of a decode graph and a
//!   training graph ran: nothing may fall back to the CPU unnoticed.
//!
//! The comparisons (`compare`, `gradient_check`) are the tests' too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::adapter::Adapter;
use crate::factors::{self, Factor, FactorsKey, SingularValues, TargetMatrix};
use crate::ggml::{Placement, Type};
use crate::merge::{self, MergeType};
use crate::model::{
    Batch, Learner, LoadOptions, Model, ModelError, Slot, Slots, TrainRow, WeightFormat,
};
use crate::rng::Rng;
use crate::sampling::argmax;

/// How close two sets of logits rows are.
#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    pub rows: usize,
    /// Fraction of rows whose argmax agrees.
    pub top1: f64,
    /// Mean |a - b| over all values, divided by the std of the reference.
    pub mean_abs_rel: f64,
    /// Max |a - b|, divided by the std of the reference.
    pub max_abs_rel: f64,
    /// Standard deviation of the reference logits (near 0 means the
    /// comparison says nothing).
    pub std: f64,
}

impl Agreement {
    /// The parity thresholds: top-1 ≥ 98%, mean |Δ| < 2% of the std.
    pub fn close(&self) -> bool {
        self.top1 >= 0.98 && self.mean_abs_rel < 2e-2 && self.std > 1e-3
    }
}

/// Compares `ours` with `reference` row by row; `None` when their shapes
/// differ.
pub fn compare(ours: &[&[f32]], reference: &[&[f32]]) -> Option<Agreement> {
    let same_shape = ours.len() == reference.len()
        && ours.iter().zip(reference).all(|(a, b)| a.len() == b.len());
    let n: usize = reference.iter().map(|r| r.len()).sum();
    if !same_shape || n == 0 {
        return None;
    }
    let values = || reference.iter().flat_map(|r| r.iter()).map(|&x| x as f64);
    let mean = values().sum::<f64>() / n as f64;
    let std = (values().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64)
        .sqrt()
        .max(1e-12);
    let (mut agree, mut sum_abs, mut max_abs) = (0, 0.0f64, 0.0f64);
    for (a, b) in ours.iter().zip(reference) {
        agree += usize::from(argmax(a) == argmax(b));
        for (x, y) in a.iter().zip(b.iter()) {
            let d = (*x as f64 - *y as f64).abs();
            sum_abs += d;
            max_abs = max_abs.max(d);
        }
    }
    Some(Agreement {
        rows: ours.len(),
        top1: agree as f64 / ours.len() as f64,
        mean_abs_rel: sum_abs / n as f64 / std,
        max_abs_rel: max_abs / std,
        std,
    })
}

/// The result of [`gradient_check`].
#[derive(Clone, Debug, Serialize)]
pub struct GradientCheck {
    /// Singular values checked.
    pub checked: usize,
    pub largest_gradient: f64,
    /// The worst relative error, and where.
    pub worst: f64,
    pub at: String,
}

/// The analytic gradient of `row`'s loss at deltas `base` against sixth-order
/// central differences (step 0.3: f32 rounding of the loss, ~1e-6, stays far
/// below the signal; truncation is O(h^6)), for the singular values at
/// `indices` (all when `None`). Errors are relative to the larger of the
/// two, floored at 1% of the largest gradient: both carry f32 error of
/// ~1e-5 absolute.
pub fn gradient_check(
    learner: &mut Learner,
    row: &TrainRow,
    base: &[f32],
    indices: Option<&[usize]>,
) -> Result<GradientCheck, ModelError> {
    learner.set_deltas(base)?;
    let mut grad = vec![0f32; learner.n_params()];
    learner.gradient(row, &mut grad)?;
    let g_max = grad.iter().fold(0f32, |m, g| m.max(g.abs())) as f64;
    let names: Vec<(String, usize)> = learner
        .matrices()
        .flat_map(|(p, r)| (0..r).map(move |i| (p.to_string(), i)))
        .collect();
    let all: Vec<usize> = (0..base.len()).collect();
    let indices = indices.unwrap_or(&all);
    let h = 0.3f32;
    let mut deltas = base.to_vec();
    let mut worst = (0.0f64, String::new());
    for &i in indices {
        let mut loss_at = |d: f32| -> Result<f64, ModelError> {
            deltas[i] = base[i] + d;
            learner.set_deltas(&deltas)?;
            Ok(learner.evaluate(row)?.loss as f64)
        };
        let mut diff =
            |k: f32| -> Result<f64, ModelError> { Ok(loss_at(k * h)? - loss_at(-k * h)?) };
        let numeric = (45.0 * diff(1.0)? - 9.0 * diff(2.0)? + diff(3.0)?) / (60.0 * h as f64);
        deltas[i] = base[i];
        let analytic = grad[i] as f64;
        let scale = analytic.abs().max(numeric.abs()).max(1e-2 * g_max);
        let rel = (analytic - numeric).abs() / scale;
        if rel > worst.0 || worst.1.is_empty() {
            let (prefix, j) = &names[i];
            worst = (
                rel,
                format!("{prefix}[{j}]: analytic {analytic:.6e}, numeric {numeric:.6e}"),
            );
        }
    }
    learner.set_deltas(base)?;
    Ok(GradientCheck {
        checked: indices.len(),
        largest_gradient: g_max,
        worst: worst.0,
        at: worst.1,
    })
}

/// What to check.
pub struct Options {
    pub model: PathBuf,
    /// The device under test ("cpu" checks the CPU against itself).
    pub device: String,
    pub threads: usize,
    /// Where the factors are cached.
    pub home: PathBuf,
    /// Scratch space (the merged model).
    pub scratch: PathBuf,
    /// Tokens of each training row.
    pub train_ctx: usize,
    /// Time for each training measurement.
    pub train_time: Duration,
    /// `LoadOptions::batch_kernels` of every model loaded.
    pub batch_kernels: bool,
    /// `Learner::set_gemm` of every learner (the CPU's training products).
    pub train_gemm: bool,
}

/// One step's outcome.
#[derive(Debug, Serialize)]
pub struct Step {
    pub name: &'static str,
    /// What was measured, in words.
    pub result: String,
    /// What it is judged against (empty: reported only).
    pub target: String,
    /// `None`: reported, not judged.
    pub pass: Option<bool>,
    pub data: serde_json::Value,
}

/// Every step's outcome.
#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub device: String,
    pub params: usize,
    pub steps: Vec<Step>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.steps.iter().all(|s| s.pass != Some(false))
    }
}

const TARGETS: &str = "q,v";
/// Prompt tokens of the logit comparisons.
const PROMPT: usize = 48;

fn random_tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<u32> {
    Rng::new(seed).tokens(n, n_vocab)
}

/// Logits of every position of each `(tokens, slot)` sequence, all in one
/// batch.
fn logits<S: Copy + Into<Slots>>(
    model: &mut Model,
    seqs: &[(&[u32], S)],
) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
    let n: usize = seqs.iter().map(|(t, _)| t.len()).sum();
    // Room to spare: the cache hands out cells in blocks per sequence.
    let mut cache = model.new_cache(4 * n + 256)?;
    let mut batch = Batch::new();
    for (seq, (tokens, slot)) in seqs.iter().enumerate() {
        batch.add_sequence(tokens, 0, seq as _, true);
        batch.set_slots(seq as _, (*slot).into());
    }
    let out = model.decode(&mut cache, &batch)?;
    let mut row = 0;
    Ok(seqs
        .iter()
        .map(|(tokens, _)| {
            let rows = (row..row + tokens.len())
                .map(|i| out.row(i).to_vec())
                .collect();
            row += tokens.len();
            rows
        })
        .collect())
}

fn view(rows: &[Vec<f32>]) -> Vec<&[f32]> {
    rows.iter().map(Vec::as_slice).collect()
}

fn agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<Agreement, ModelError> {
    compare(&view(a), &view(b))
        .ok_or_else(|| ModelError::Unsupported("logits of different shapes".into()))
}

fn json(value: impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn judged(a: &Agreement) -> String {
    format!(
        "top-1 {:.1}%, mean |Δ| {:.2e}, max |Δ| {:.2e} of the std",
        100.0 * a.top1,
        a.mean_abs_rel,
        a.max_abs_rel
    )
}

/// The factors every step uses: q,v (f16 file, energy 0.99), the serving
/// default until `v,down` (`factors::DEFAULT_TARGETS`); the check's speed
/// targets were set on q,v, and its load bench serves q,v.
struct Factors {
    key: FactorsKey,
    factors: Vec<(TargetMatrix, Factor)>,
    singular: SingularValues,
}

/// Runs every step; an error is a step that could not run at all.
pub fn run(o: &Options, progress: &mut dyn FnMut(&Step)) -> Result<Report, anyhow::Error> {
    let mut device = load(o, &o.model, &o.device)?;
    let n_vocab = device.config().n_vocab;
    let mut report = Report {
        model: o.model.display().to_string(),
        device: device.device_name(),
        params: crate::model::random::Shape::of(&crate::ggml::gguf::GgufFile::open(&o.model)?)
            .map_or(0, |shape| shape.n_params()),
        steps: Vec::new(),
    };
    let mut push = |step: Step| {
        progress(&step);
        report.steps.push(step);
    };
    let prompt = random_tokens(PROMPT, n_vocab, 1);
    push(parity(o, &mut device, &prompt)?);
    drop(device);

    let key = FactorsKey::for_model(&o.model, TARGETS, "energy:0.99", "f16")?;
    let path = factors::ensure(&o.model, &key, &o.home)?;
    let f = Factors {
        factors: factors::read_factors(&path, &key)?,
        singular: factors::read_singular_values(&path, &key)?,
        key,
    };
    let (steps, decode) = adapter_and_batch(o, &f, &prompt)?;
    for step in steps {
        push(step);
    }

    let (gradient, train, training) = training(o, &f, n_vocab)?;
    push(gradient);
    push(train);
    push(placement(&[("decode", &decode), ("train", &training)]));
    Ok(report)
}

/// The device's logits of `prompt` against the CPU's.
fn parity(o: &Options, device: &mut Model, prompt: &[u32]) -> Result<Step, anyhow::Error> {
    let ours = logits(device, &[(prompt, 0)])?.remove(0);
    let cpu = logits(&mut load(o, &o.model, "cpu")?, &[(prompt, 0)])?.remove(0);
    let a = agreement(&ours, &cpu)?;
    Ok(Step {
        name: "parity",
        result: judged(&a),
        target: "top-1 >= 98%, mean < 2e-2".into(),
        pass: Some(a.close()),
        data: json(&a),
    })
}

/// An adapter through the branch against the adapter merged, then the same
/// sequence batched with others against alone; returns the decode graph's
/// placement too.
fn adapter_and_batch(
    o: &Options,
    f: &Factors,
    prompt: &[u32],
) -> Result<([Step; 3], Placement), anyhow::Error> {
    let adapters = [1, 2].map(|seed| Adapter::perturbed(&f.key, &f.singular, 0.1, seed));
    let merged = |name: &str, adapter: &Adapter| -> Result<PathBuf, anyhow::Error> {
        let path = o.scratch.join(name);
        let deltas = adapter.deltas(&f.singular);
        merge::merge(&o.model, &f.factors, &deltas, MergeType::F32, &[], &path)?;
        Ok(path)
    };
    // Both sides run the target matrices in f32 (the branch on the identity
    // merge): a quantized product also rounds its activations, which is not
    // what is compared here.
    let base_path = merged("base-f32.gguf", &Adapter::identity(&f.key, &f.singular))?;
    let merged_path = merged("merged.gguf", &adapters[0])?;
    // The floor: deep models are chaotic enough that a change of ~1e-6 in
    // the singular values moves their logits by percents.
    let mut nudged = adapters[0].clone();
    for (_, sigma) in nudged.sigma.iter_mut() {
        sigma.iter_mut().for_each(|v| *v *= 1.0 + 1e-6);
    }
    let nudged_path = merged("nudged.gguf", &nudged)?;
    let merged = logits(&mut load(o, &merged_path, &o.device)?, &[(prompt, 0)])?.remove(0);
    let floor = agreement(
        &logits(&mut load(o, &nudged_path, &o.device)?, &[(prompt, 0)])?.remove(0),
        &merged,
    )?;
    let mut device = load(o, &base_path, &o.device)?;
    device.record_placement();
    for path in [&merged_path, &base_path, &nudged_path] {
        let _ = std::fs::remove_file(path);
    }
    device.attach_factors(&f.factors, 3, Type::Q8_0)?;
    for (slot, a) in adapters.iter().enumerate() {
        device.set_adapter(slot as Slot + 1, &a.deltas(&f.singular))?;
    }
    let adapted = logits(&mut device, &[(prompt, 1)])?.remove(0);
    let unadapted = logits(&mut device, &[(prompt, 0)])?.remove(0);
    let a = agreement(&adapted, &merged)?;
    let moved = agreement(&adapted, &unadapted)?;
    let mean_bound = (1.5 * floor.mean_abs_rel).max(2e-2);
    let top1_bound = floor.top1.min(0.98) - 0.05;
    let adapter = Step {
        name: "adapter",
        result: format!(
            "{}; the model against itself nudged: mean {:.2e}; the adapter moves them {:.2e}",
            judged(&a),
            floor.mean_abs_rel,
            moved.mean_abs_rel
        ),
        target: format!(
            "top-1 >= {:.1}%, mean <= {mean_bound:.2e}, moved > 2x mean",
            100.0 * top1_bound
        ),
        pass: Some(
            a.top1 >= top1_bound
                && a.mean_abs_rel <= mean_bound
                && moved.mean_abs_rel > 2.0 * a.mean_abs_rel,
        ),
        data: serde_json::json!({ "agreement": a, "floor": floor, "moved": moved }),
    };

    // The prompt on adapter 1 beside sequences on the base and adapter 2.
    let n_vocab = device.config().n_vocab;
    let others = [
        random_tokens(PROMPT / 2, n_vocab, 2),
        random_tokens(PROMPT + 7, n_vocab, 3),
    ];
    let together = logits(
        &mut device,
        &[(&others[0], 0), (prompt, 1), (&others[1], 2)],
    )?;
    let a = agreement(&together[1], &adapted)?;
    let exact_expected = is_cpu(&device);
    let batch = Step {
        name: "batch",
        result: format!(
            "batched vs alone: max |Δ| {:.2e} of the std, top-1 {:.1}%",
            a.max_abs_rel,
            100.0 * a.top1
        ),
        target: if exact_expected {
            "max <= 1e-4 (the CPU is batch-invariant)".into()
        } else {
            String::new()
        },
        pass: exact_expected.then_some(a.max_abs_rel <= 1e-4),
        data: json(&a),
    };

    // The adapter as a LoRA, alone and beside the base and adapter 2.
    let exported = o.scratch.join("lora.gguf");
    let deltas = adapters[0].deltas(&f.singular);
    crate::lora::export(
        &o.model,
        &f.factors,
        &deltas,
        crate::lora::Format::GgufLora,
        None,
        &exported,
    )?;
    let gguf = crate::ggml::gguf::GgufFile::open(&o.model)?;
    let config = crate::model::Config::from_gguf(&gguf)?;
    let updates = crate::lora::Lora::read(&exported, &gguf)?.low_ranks(&config)?;
    let _ = std::fs::remove_file(&exported);
    let rank = updates.iter().map(|(_, u)| u.rank).max().unwrap_or(1);
    device.attach_lora(f.key.targets.kinds(), rank, 2)?;
    device.set_lora(1, &updates)?;
    let on_lora = Slots { svfit: 0, lora: 1 };
    let via_lora = logits(&mut device, &[(prompt, on_lora)])?.remove(0);
    let together = logits(
        &mut device,
        &[
            (&others[0], Slots::default()),
            (prompt, on_lora),
            (&others[1], Slots::from(2)),
        ],
    )?;
    let (a, b) = (
        agreement(&via_lora, &adapted)?,
        agreement(&together[1], &via_lora)?,
    );
    let lora = Step {
        name: "lora",
        result: format!(
            "{} against the SVFit branch; batched vs alone: max |Δ| {:.2e} of the std",
            judged(&a),
            b.max_abs_rel
        ),
        target: format!(
            "top-1 >= {:.1}%, mean <= {mean_bound:.2e}{}",
            100.0 * top1_bound,
            if exact_expected {
                ", batched max <= 1e-4"
            } else {
                ""
            }
        ),
        pass: Some(
            a.top1 >= top1_bound
                && a.mean_abs_rel <= mean_bound
                && (!exact_expected || b.max_abs_rel <= 1e-4),
        ),
        data: serde_json::json!({ "agreement": a, "batched": b }),
    };
    Ok((
        [adapter, batch, lora],
        device.placement().unwrap_or_default(),
    ))
}

fn is_cpu(model: &Model) -> bool {
    model.device_name().to_ascii_lowercase().contains("cpu")
}

/// The gradient check and training tokens/s on the device (and on the
/// CPU); returns the training graph's placement too.
fn training(
    o: &Options,
    f: &Factors,
    n_vocab: usize,
) -> Result<(Step, Step, Placement), anyhow::Error> {
    let learner = |device: &str| -> Result<Learner, ModelError> {
        let mut model = Model::load_for_training(&o.model, &options(o, device), true)?;
        model.record_placement();
        let mut learner = Learner::new(model, &f.factors)?;
        learner.set_gemm(o.train_gemm);
        Ok(learner)
    };
    let mut on = learner(&o.device)?;
    let n = on.n_params();
    let base: Vec<f32> = Rng::new(3).normals(n, 0.05);
    let picked: Vec<usize> = (0..n.min(32)).map(|i| i * n / n.min(32)).collect();
    let g = gradient_check(&mut on, &short_row(n_vocab, 7), &base, Some(&picked))?;
    let gradient = Step {
        name: "gradient",
        result: format!(
            "{} of {n} singular values: worst relative error {:.2e} ({})",
            g.checked, g.worst, g.at
        ),
        target: "< 1e-2".into(),
        pass: Some(g.worst < 1e-2),
        data: json(&g),
    };
    let n_ctx = on.model().config().n_ctx_train;
    let rows = train_rows(n_vocab, o.train_ctx.min(n_ctx));
    let on_device = tokens_per_second(&mut on, &rows, o.train_time)?;
    let placement = on.model().placement().unwrap_or_default();
    let on_cpu = if is_cpu(on.model()) {
        on_device
    } else {
        drop(on);
        tokens_per_second(&mut learner("cpu")?, &rows, o.train_time)?
    };
    let train = Step {
        name: "train",
        result: format!(
            "{on_device:.0} tok/s on the device, {on_cpu:.0} on the CPU ({:.1}x), rows of {} tokens, q,v",
            on_device / on_cpu.max(1e-9),
            rows[0].len()
        ),
        target: String::new(),
        pass: None,
        data: serde_json::json!({
            "device_tokens_per_s": on_device,
            "cpu_tokens_per_s": on_cpu,
            "row_tokens": rows[0].len(),
        }),
    };
    Ok((gradient, train, placement))
}

/// Every node on the first backend (the device), or which ops were not.
fn placement(graphs: &[(&str, &Placement)]) -> Step {
    let fallback: Vec<String> = graphs
        .iter()
        .filter(|(_, p)| !p.elsewhere.is_empty())
        .map(|(what, p)| format!("{what}: {}", p.elsewhere.join(", ")))
        .collect();
    let summary: Vec<String> = graphs
        .iter()
        .map(|(what, p)| format!("{what}: {}", p.summary()))
        .collect();
    Step {
        name: "placement",
        result: if fallback.is_empty() {
            summary.join("; ")
        } else {
            format!(
                "{}; off the device: {}",
                summary.join("; "),
                fallback.join("; ")
            )
        },
        target: "every node on the device".into(),
        pass: Some(fallback.is_empty()),
        data: serde_json::json!(graphs
            .iter()
            .map(|(w, p)| (w.to_string(), json(p)))
            .collect::<serde_json::Map<_, _>>()),
    }
}

fn options(o: &Options, device: &str) -> LoadOptions {
    LoadOptions {
        device: device.to_string(),
        threads: o.threads,
        weights: WeightFormat::Keep,
        batch_kernels: o.batch_kernels,
    }
}

fn load(o: &Options, path: &Path, device: &str) -> Result<Model, ModelError> {
    Model::load(path, &options(o, device))
}

/// Packs `tokens` into `row` as one example with the loss on its second
/// half (the answer of a prompt/completion pair).
fn push_example(row: &mut TrainRow, tokens: &[u32]) {
    let loss: Vec<bool> = (0..tokens.len()).map(|i| i >= tokens.len() / 2).collect();
    row.push(tokens, &loss);
}

/// Two packed examples of 13 and 9 random tokens, loss on the second half
/// of each: the gradient check's row (the trainer test's too).
pub fn short_row(n_vocab: usize, seed: u64) -> TrainRow {
    let mut rng = Rng::new(seed);
    let mut row = TrainRow::default();
    for len in [13, 9] {
        push_example(&mut row, &rng.tokens(len, n_vocab));
    }
    row
}

/// Rows of `ctx` tokens, each four packed examples with loss on their
/// second halves (as the trainer packs prompt/completion pairs).
fn train_rows(n_vocab: usize, ctx: usize) -> Vec<TrainRow> {
    (0..4u64)
        .map(|r| {
            let mut row = TrainRow::default();
            for e in 0..4 {
                push_example(&mut row, &random_tokens(ctx / 4, n_vocab, 100 + 4 * r + e));
            }
            row
        })
        .collect()
}

/// Forward-and-backward tokens per second over `rows`, after one row of
/// warm-up, for about `time` (at least one row).
fn tokens_per_second(
    learner: &mut Learner,
    rows: &[TrainRow],
    time: Duration,
) -> Result<f64, ModelError> {
    let mut grad = vec![0f32; learner.n_params()];
    learner.gradient(&rows[0], &mut grad)?;
    let start = Instant::now();
    let mut tokens = 0;
    for row in rows.iter().cycle() {
        learner.gradient(row, &mut grad)?;
        tokens += row.len();
        if start.elapsed() >= time {
            break;
        }
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}
