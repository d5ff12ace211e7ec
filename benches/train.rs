//! Training throughput on the default model: tokens per second of one
//! optimizer micro-step (forward + backward of a packed row) for `q,v` and
//! `all-linear` adapters, next to our forward-only pass over the same row
//! and llama.cpp's prompt processing of the same tokens (same threads, same
//! process) as the reference.
//!
//! Rows are 512 tokens of this repository's README packed as 4 examples of
//! 128 tokens, with the loss either on every token (language modelling) or
//! on the last 4 tokens of each example (a short answer, as in
//! classification data). The learner is `svfit train`'s: full-rank factors
//! stand for the targets where that pays, and the examples attend one by
//! one.
//!
//! `cargo bench --bench train -- [--threads N] [--model PATH] [--reps N]`
//!
//! With `--peft DIR` it instead compares `svfit train` (its defaults: v,down)
//! with PyTorch + PEFT LoRA (rank 8 on q and v, lr 1e-3; `benches/peft/
//! lora.py` on the same GGUF, dequantized to fp32 by transformers) on
//! DIR/train.jsonl, for `--steps N` steps of `--batch B` examples on the
//! same schedule (cosine, a tenth warm-up) and threads, then scores both on
//! DIR/eval.jsonl, or DIR/NAME.jsonl with `--split NAME` (greedy answers,
//! as `svfit eval` scores them: the first label named when the completions
//! are class labels, else the exact answer). It reports
//! seconds per step (the first, a warm-up, left out), trained tokens per
//! second, trainable values and accuracy, in one run. `scripts/peft-env`
//! makes the Python environment (`--python` to use another). Each
//! `--variant "OPTIONS"` adds a `svfit train` run with those options (a
//! sweep of its hyper-parameters against the same PEFT run).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::fail;
use svfit::factors::{self, FactorsKey};
use svfit::model::{Batch, Learner, LoadOptions, Model, Tokenizer, TrainRow};
use svfit::oracle::Reference;

const EXAMPLE: usize = 128;
const PER_ROW: usize = 4;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of `f`, median over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// The training bench's options: the shared ones and the PEFT comparison.
#[derive(clap::Parser)]
struct TrainOptions {
    #[command(flatten)]
    common: common::Options,
    /// Compare with PyTorch + PEFT LoRA on DIR/train.jsonl and DIR/eval.jsonl
    #[arg(long, value_name = "DIR")]
    peft: Option<PathBuf>,
    /// Optimizer steps of the comparison
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Examples per step in the comparison
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Score the comparison on DIR/NAME.jsonl (e.g. dev, to choose settings
    /// without looking at eval)
    #[arg(long, value_name = "NAME", default_value = "eval")]
    split: String,
    /// The Python with torch, transformers, peft and gguf [default: the
    /// environment scripts/peft-env makes]
    #[arg(long)]
    python: Option<PathBuf>,
    /// Also train with these `svfit train` options added (repeatable, one
    /// quoted string each, e.g. "--targets q,k,v --rank full")
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    variant: Vec<String>,
}

fn main() {
    let o = <TrainOptions as clap::Parser>::parse();
    let opts = o.common.with_default_reps(3);
    if let Some(dir) = &o.peft {
        let python = o
            .python
            .clone()
            .unwrap_or_else(|| svfit::home::home_dir().join("peft-venv/bin/python"));
        let run = Comparison {
            dir,
            held_out: dir.join(format!("{}.jsonl", o.split)),
            steps: o.steps,
            batch: o.batch,
        };
        return compare_with_peft(&opts, &run, &python, &o.variant);
    }
    let tokenizer = Tokenizer::load(&opts.model).unwrap_or_else(fail);
    let text = include_str!("../README.md").repeat(2);
    let tokens = tokenizer.encode(&text, false);
    if tokens.len() < EXAMPLE * PER_ROW {
        common::exit("README.md is too short for a row");
    }
    let examples: Vec<&[u32]> = tokens.chunks_exact(EXAMPLE).take(PER_ROW).collect();
    let row = |answer_only: bool| {
        let mut row = TrainRow::default();
        for e in &examples {
            let loss: Vec<bool> = (0..EXAMPLE)
                .map(|i| !answer_only || i + 5 >= EXAMPLE)
                .collect();
            row.push(e, &loss);
        }
        row
    };
    let rows = [("every token", row(false)), ("answer only", row(true))];
    let n = (EXAMPLE * PER_ROW) as f64;

    // llama.cpp: the same 4 examples as 4 sequences in one batch.
    let reference = Reference::load_default(&opts.model).unwrap_or_else(fail);
    let mut session = reference
        .session(EXAMPLE * PER_ROW, PER_ROW, opts.threads)
        .unwrap_or_else(fail);
    let mut batch = Batch::new();
    for (s, e) in examples.iter().enumerate() {
        batch.add_sequence(e, 0, s as u32, false);
    }
    let llama = time(opts.reps, || {
        session.clear();
        session.decode(&batch).unwrap_or_else(fail);
    });
    drop(session);
    drop(reference);

    println!(
        "svfit training throughput, {} threads, {}, rows of {} tokens ({PER_ROW} x {EXAMPLE})",
        opts.threads,
        opts.model_name(),
        n
    );
    println!("llama.cpp prompt processing: {:.0} tok/s", n / llama);
    println!(
        "{:<11} {:<12} {:>8} {:>14} {:>14} {:>10}",
        "targets", "loss on", "values", "forward tok/s", "train tok/s", "vs llama"
    );
    let options = LoadOptions {
        device: "cpu".into(),
        threads: opts.threads,
        batch_kernels: opts.batch_kernels,
        ..LoadOptions::default()
    };
    for targets in ["q,v", "all-linear"] {
        let key =
            FactorsKey::for_model(&opts.model, targets, "energy:0.99", "f16").unwrap_or_else(fail);
        let path =
            factors::ensure(&opts.model, &key, &svfit::home::home_dir()).unwrap_or_else(fail);
        let factors = factors::read_factors(&path, &key).unwrap_or_else(fail);
        let model = Model::load_for_training(&opts.model, &options, true).unwrap_or_else(fail);
        // As `svfit train` runs: full-rank factors where they pay.
        let matrices: Vec<_> = factors.iter().map(|(t, _)| t.clone()).collect();
        let full: Vec<_> = factors::full_rank(&opts.model, &matrices, factors::default_jobs())
            .unwrap_or_else(fail)
            .into_iter()
            .map(Some)
            .collect();
        let mut learner = Learner::with_full_rank(model, &factors, &full).unwrap_or_else(fail);
        learner.set_gemm(opts.train_gemm);
        let mut grad = vec![0f32; learner.n_params()];
        for (what, row) in &rows {
            let forward = time(opts.reps, || {
                learner.evaluate(row).unwrap_or_else(fail);
            });
            let train = time(opts.reps, || {
                learner.gradient(row, &mut grad).unwrap_or_else(fail);
            });
            println!(
                "{targets:<11} {what:<12} {:>8} {:>14.0} {:>14.0} {:>9.2}x",
                learner.n_params(),
                n / forward,
                n / train,
                llama / train
            );
        }
    }
}

/// What the PEFT comparison trains on and scores on.
struct Comparison<'a> {
    dir: &'a Path,
    held_out: PathBuf,
    steps: usize,
    batch: usize,
}

/// One side of the PEFT comparison.
struct Side {
    engine: String,
    trainable: usize,
    s_per_step: f64,
    tokens_per_step: f64,
    tokens_per_s: f64,
    accuracy: f64,
    /// How answers were scored: "label" or "exact".
    scored: String,
}

/// Runs a command; its stdout, or an exit with its stderr.
fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(fail);
    if !out.status.success() {
        common::exit(&format!(
            "{cmd:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `svfit train` then `svfit eval`, as a user runs them.
fn svfit_side(opts: &common::Options, run: &Comparison, variant: &str) -> Side {
    let work = std::env::temp_dir().join(format!("svfit-bench-peft-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap_or_else(fail);
    let adapter = work.join("a.safetensors");
    // `svfit COMMAND --model M --device cpu --threads T`, then the rest.
    let threads = opts.threads.to_string();
    let svfit = |command: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_svfit"));
        cmd.arg(command).arg("--model").arg(&opts.model).args([
            "--device",
            "cpu",
            "--threads",
            &threads,
        ]);
        cmd
    };
    let (steps, batch) = (run.steps.to_string(), run.batch.to_string());
    output(
        svfit("train")
            .args(["--epochs", "1", "--max-steps", &steps, "--batch", &batch])
            .arg("--data")
            .arg(run.dir.join("train.jsonl"))
            .arg("--out")
            .arg(&adapter)
            .args(variant.split_whitespace()),
    );
    let metrics = std::fs::read_to_string(work.join("a.metrics.jsonl")).unwrap_or_else(fail);
    // Every step but the first (a warm-up): (tokens, seconds).
    let timed: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|step| step > 1))
        .filter_map(|v| {
            let tokens = v["tokens"].as_f64()?;
            Some((tokens, tokens / v["tokens_per_s"].as_f64()?))
        })
        .collect();
    let tokens: f64 = timed.iter().map(|t| t.0).sum();
    let seconds: f64 = timed.iter().map(|t| t.1).sum();
    let eval = output(
        svfit("eval")
            .arg("--data")
            .arg(&run.held_out)
            .arg("--adapter")
            .arg(&adapter),
    );
    // `label accuracy  N (P%)` for class labels, else `exact answers  N (P%)`.
    let percent = |line: &str| {
        eval.lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.split(['(', '%']).nth(1))
            .and_then(|pct| pct.parse::<f64>().ok())
    };
    let (scored, accuracy) = percent("label accuracy")
        .map(|p| ("label", p))
        .or_else(|| percent("exact answers").map(|p| ("exact", p)))
        .unwrap_or_else(|| common::exit(&format!("no accuracy in: {eval}")));
    let adapter_values = svfit::adapter::Adapter::read(&adapter)
        .unwrap_or_else(fail)
        .sigma
        .iter()
        .map(|(_, s)| s.len())
        .sum();
    let _ = std::fs::remove_dir_all(&work);
    Side {
        engine: format!("svfit train {variant}").trim_end().to_string(),
        trainable: adapter_values,
        s_per_step: seconds / timed.len().max(1) as f64,
        tokens_per_step: tokens / timed.len().max(1) as f64,
        tokens_per_s: tokens / seconds,
        accuracy: accuracy / 100.0,
        scored: scored.into(),
    }
}

fn compare_with_peft(opts: &common::Options, run: &Comparison, python: &Path, variants: &[String]) {
    let ours: Vec<Side> = std::iter::once("")
        .chain(variants.iter().map(String::as_str))
        .map(|variant| svfit_side(opts, run, variant))
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peft/lora.py");
    let arg = |p: &Path| p.to_string_lossy().into_owned();
    let out = output(Command::new(python).args([
        arg(&script).as_str(),
        "--model",
        &arg(&opts.model),
        "--data",
        &arg(&run.dir.join("train.jsonl")),
        "--eval",
        &arg(&run.held_out),
        "--steps",
        &run.steps.to_string(),
        "--batch",
        &run.batch.to_string(),
        "--threads",
        &opts.threads.to_string(),
    ]));
    let v: serde_json::Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| common::exit(&format!("no JSON from {}: {out}", script.display())));
    let number = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let peft = Side {
        engine: "PEFT LoRA r=8".into(),
        trainable: number("trainable") as usize,
        s_per_step: number("s_per_step"),
        tokens_per_step: number("tokens_per_step"),
        tokens_per_s: number("tokens_per_s"),
        accuracy: number("accuracy"),
        scored: v["scored"].as_str().unwrap_or("?").into(),
    };
    println!(
        "svfit train vs PyTorch {} + PEFT, {}, {} threads, {} steps of {} examples, {} scored on {}",
        v["torch"].as_str().unwrap_or("?"),
        opts.model_name(),
        opts.threads,
        run.steps,
        run.batch,
        run.dir.display(),
        run.held_out.display()
    );
    let width = ours
        .iter()
        .map(|s| s.engine.len())
        .max()
        .unwrap_or(0)
        .max(14);
    println!(
        "{:<width$} {:>16} {:>8} {:>12} {:>10} {:>9}  scored",
        "engine", "trainable values", "s/step", "tokens/step", "tokens/s", "accuracy"
    );
    for s in ours.iter().chain([&peft]) {
        println!(
            "{:<width$} {:>16} {:>8.2} {:>12.0} {:>10.0} {:>8.1}%  {}",
            s.engine,
            s.trainable,
            s.s_per_step,
            s.tokens_per_step,
            s.tokens_per_s,
            100.0 * s.accuracy,
            s.scored
        );
    }
    for s in &ours {
        println!(
            "{} / PEFT: {:.2}x the time per step, {:.3}x the trainable values, accuracy {:+.1} points",
            s.engine,
            s.s_per_step / peft.s_per_step,
            s.trainable as f64 / peft.trainable as f64,
            100.0 * (s.accuracy - peft.accuracy)
        );
    }
}
