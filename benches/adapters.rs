//! SVFit adapter serving cost on the default model: decode throughput with
//! the batched SVFit branch as a ratio to the base model, in one process,
//! the modes alternating:
//!
//! - 1 sequence: base (slot 0, the branch skipped) and one adapter;
//! - 8 sequences decoded together: all base, all on one adapter, and each on
//!   its own adapter (8 distinct slots in one batch);
//!
//! once with `q,v` factors and once with `v,down` (the default targets).
//! Also prints the factor memory for `q,v`, `v,down` and `all-linear`
//! (computing and caching the factors in $SVFIT_HOME when missing).
//!
//! `cargo bench --bench adapters -- [--threads N] [--model PATH] [--reps N] [--weights LAYOUT]`

mod common;

use std::time::Instant;

use common::fail;
use svfit::adapter::Adapter;
use svfit::factors::{self, FactorsKey};
use svfit::ggml::Type;
use svfit::model::{Batch, LoadOptions, Model, Slot, Tokenizer};
use svfit::sampling::argmax;

const GEN: usize = 64;
const GEN_PROMPT: usize = 16;
const N_ADAPTERS: usize = 8;
/// The factor sets whose decode throughput is measured: the serving default
/// of before (`q,v`) and of now (`v,down`).
const THROUGHPUT_TARGETS: [&str; 2] = ["q,v", "v,down"];

/// Generated tokens per second, sequence `s` on `slots[s]` (greedy; the
/// prompts are prefilled before the clock starts).
fn generation_speed(model: &mut Model, tokens: &[u32], slots: &[Slot]) -> f64 {
    let mut cache = model.new_cache(1024).unwrap_or_else(fail);
    let mut batch = Batch::new();
    for (s, &slot) in slots.iter().enumerate() {
        let prompt = &tokens[s * 7..s * 7 + GEN_PROMPT];
        batch.add_sequence(prompt, 0, s as u32, false);
        batch.set_adapter(s as u32, slot);
    }
    let mut logits = model.decode(&mut cache, &batch).expect("decode");
    let start = Instant::now();
    for step in 0..GEN {
        batch.clear();
        for (s, &slot) in slots.iter().enumerate() {
            batch.add(argmax(logits.row(s)), GEN_PROMPT + step, s as u32, true);
            batch.set_adapter(s as u32, slot);
        }
        logits = model.decode(&mut cache, &batch).expect("decode");
    }
    (GEN * slots.len()) as f64 / start.elapsed().as_secs_f64()
}

fn key(model: &std::path::Path, targets: &str) -> FactorsKey {
    FactorsKey::for_model(model, targets, "energy:0.99", "f16").unwrap_or_else(fail)
}

fn main() {
    let opts = common::parse_args(5);
    let tokenizer = Tokenizer::load(&opts.model).unwrap_or_else(fail);
    let tokens = tokenizer.encode(&include_str!("adapters.rs").repeat(2), true);
    // The layout served by default: the last `--weights` given (auto).
    let load = LoadOptions {
        device: "cpu".into(),
        threads: opts.threads,
        weights: opts.weights.last().copied().unwrap_or_default(),
        batch_kernels: opts.batch_kernels,
    };
    let home = svfit::home::home_dir();

    // Factor memory per target set: the file (f16) and on the backend (q8_0).
    let mut memory = Vec::new();
    for targets in ["q,v", "v,down", "all-linear"] {
        let key = key(&opts.model, targets);
        let path = factors::ensure(&opts.model, &key, &home).unwrap_or_else(fail);
        let factors = factors::read_factors(&path, &key).unwrap_or_else(fail);
        let values: usize = factors.iter().map(|(_, f)| f.rank() * (f.m + f.n)).sum();
        let mut model = Model::load(&opts.model, &load).unwrap_or_else(fail);
        model
            .attach_factors(&factors, N_ADAPTERS + 1, Type::Q8_0)
            .unwrap_or_else(fail);
        let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let device = model.branch().map_or(0, |b| b.bytes());
        memory.push((targets, factors.len(), values, file, device));
    }

    for targets in THROUGHPUT_TARGETS {
        throughput(&opts, &load, &tokens, &home, targets);
    }
    println!(
        "\n{:<12} {:>9} {:>14} {:>14} {:>16}",
        "targets", "matrices", "factor values", "file (f16) MB", "in memory MB"
    );
    for (targets, n, values, file, device) in memory {
        println!(
            "{targets:<12} {n:>9} {values:>14} {:>14.1} {:>16.1}",
            file as f64 / 1e6,
            device as f64 / 1e6
        );
    }
}

/// Decode throughput of the modes with `targets` adapters in slots 1..=8,
/// and the ratios between them.
fn throughput(
    opts: &common::Options,
    load: &LoadOptions,
    tokens: &[u32],
    home: &std::path::Path,
    targets: &str,
) {
    let key = key(&opts.model, targets);
    let path = key.path(home);
    let factors = factors::read_factors(&path, &key).unwrap_or_else(fail);
    let singular = factors::read_singular_values(&path, &key).unwrap_or_else(fail);
    let mut model = Model::load(&opts.model, load).unwrap_or_else(fail);
    model
        .attach_factors(&factors, N_ADAPTERS + 1, Type::Q8_0)
        .unwrap_or_else(fail);
    for slot in 1..=N_ADAPTERS {
        let a = Adapter::perturbed(&key, &singular, 0.05, slot as u64);
        model
            .set_adapter(slot as Slot, &a.deltas(&singular))
            .unwrap_or_else(fail);
    }

    let modes: [(&str, Vec<Slot>); 5] = [
        ("1 sequence, base", vec![0]),
        ("1 sequence, 1 adapter", vec![1]),
        ("8 sequences, base", vec![0; 8]),
        ("8 sequences, 1 adapter", vec![1; 8]),
        ("8 sequences, 8 adapters", (1..=8).collect()),
    ];
    // Every rep runs each mode once, back to back: ratios are taken within
    // a rep (the machine's speed drifts between reps) and the median kept.
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _ in 0..opts.reps {
        for (r, (_, slots)) in runs.iter_mut().zip(&modes) {
            r.push(generation_speed(&mut model, tokens, slots));
        }
    }
    let best: Vec<f64> = runs
        .iter()
        .map(|r| r.iter().cloned().fold(0.0, f64::max))
        .collect();
    let median_ratio = |a: usize, b: usize| {
        let mut ratios: Vec<f64> = runs[a].iter().zip(&runs[b]).map(|(x, y)| x / y).collect();
        ratios.sort_by(f64::total_cmp);
        (
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1],
        )
    };

    println!(
        "\nmodel {}, {} threads, {targets} factors as q8_0, generate {GEN} tokens, {} runs",
        opts.model_name(),
        opts.threads,
        opts.reps
    );
    println!("{:<28} {:>10}", "mode", "best tok/s");
    for ((name, _), b) in modes.iter().zip(&best) {
        println!("{name:<28} {b:>10.1}");
    }
    println!("ratio (median over runs, [min, max])");
    for (name, a, b) in [
        ("1 adapter / base, 1 sequence", 1, 0),
        ("1 adapter / base, 8 sequences", 3, 2),
        ("8 adapters / 1 adapter, 8 seqs", 4, 3),
    ] {
        let (median, min, max) = median_ratio(a, b);
        println!("{name:<32} {median:.3} [{min:.3}, {max:.3}]");
    }
}
