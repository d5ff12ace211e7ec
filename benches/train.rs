//! Training throughput on the default model: tokens per second of one
//! optimizer micro-step (forward + backward of a packed row) for `q,v` and
//! `all-linear` adapters, next to our forward-only pass over the same row
//! and llama.cpp's prompt processing of the same tokens (same threads, same
//! process) as the reference.
//!
//! Rows are 512 tokens of this repository's README packed as 4 examples of
//! 128 tokens, with the loss either on every token (language modelling) or
//! on the last 4 tokens of each example (a short answer, as in
//! classification data).
//!
//! `cargo bench --bench train -- [--threads N] [--model PATH] [--reps N]`

mod common;

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

fn main() {
    let opts = common::parse_args(3);
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
    let reference = Reference::load(&opts.model).unwrap_or_else(fail);
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
        ..LoadOptions::default()
    };
    for targets in ["q,v", "all-linear"] {
        let key =
            FactorsKey::for_model(&opts.model, targets, "energy:0.99", "f16").unwrap_or_else(fail);
        let path =
            factors::ensure(&opts.model, &key, &svfit::home::home_dir()).unwrap_or_else(fail);
        let factors = factors::read_factors(&path, &key).unwrap_or_else(fail);
        let model = Model::load_for_training(&opts.model, &options, true).unwrap_or_else(fail);
        let mut learner = Learner::new(model, &factors).unwrap_or_else(fail);
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
