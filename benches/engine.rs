//! Engine throughput, ours versus llama.cpp (through `llama-cpp-2`) on the
//! same model, threads and tokens, in one process:
//!
//! - prompt processing: one 512-token prompt;
//! - generation: 128 tokens for 1 sequence, and for 8 sequences decoded
//!   together (one token of each per step).
//!
//! `cargo bench --bench engine -- [--threads N] [--model PATH] [--reps N] [--weights keep,auto]`
//!
//! Each `--weights` layout is one svfit column; llama.cpp runs the file as
//! stored, with its default kernels (`GGML_CPU_TILED_MM` on unless set).

mod common;

use std::time::Instant;

use common::fail;

use svfit::model::{Batch, LoadOptions, Logits, Model, Tokenizer};
use svfit::oracle::Reference;
use svfit::sampling::argmax;

const PROMPT: usize = 512;
const GEN: usize = 128;
const GEN_PROMPT: usize = 16;

/// Something that decodes batches: our engine or llama.cpp.
trait Engine {
    fn decode(&mut self, batch: &Batch) -> Logits;
    fn reset(&mut self);
}

struct Ours {
    model: Model,
    cache: svfit::model::KvCache,
}

impl Engine for Ours {
    fn decode(&mut self, batch: &Batch) -> Logits {
        self.model.decode(&mut self.cache, batch).expect("decode")
    }
    fn reset(&mut self) {
        self.cache.clear();
    }
}

struct LlamaCpp<'m>(svfit::oracle::ReferenceSession<'m>);

impl Engine for LlamaCpp<'_> {
    fn decode(&mut self, batch: &Batch) -> Logits {
        self.0.decode(batch).expect("llama.cpp decode")
    }
    fn reset(&mut self) {
        self.0.clear();
    }
}

/// Tokens per second of one 512-token prompt.
fn prompt_speed(engine: &mut dyn Engine, tokens: &[u32]) -> f64 {
    engine.reset();
    let mut batch = Batch::new();
    batch.add_sequence(&tokens[..PROMPT], 0, 0, false);
    let start = Instant::now();
    engine.decode(&batch);
    PROMPT as f64 / start.elapsed().as_secs_f64()
}

/// Generated tokens per second with `n_seq` sequences decoded together
/// (greedy; the prompts are prefilled before the clock starts).
fn generation_speed(engine: &mut dyn Engine, tokens: &[u32], n_seq: usize) -> f64 {
    engine.reset();
    let mut batch = Batch::new();
    for s in 0..n_seq {
        let prompt = &tokens[s * 7..s * 7 + GEN_PROMPT];
        batch.add_sequence(prompt, 0, s as u32, false);
    }
    let mut logits = engine.decode(&batch);
    let start = Instant::now();
    for step in 0..GEN {
        batch.clear();
        for s in 0..n_seq {
            batch.add(argmax(logits.row(s)), GEN_PROMPT + step, s as u32, true);
        }
        logits = engine.decode(&batch);
    }
    (GEN * n_seq) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // llama.cpp as it runs by default: with ggml's tiled K-quant product,
    // which svfit turns off in its own processes for batch invariance
    // (products of the types our kernels read go through them either way).
    if std::env::var_os("GGML_CPU_TILED_MM").is_none() {
        std::env::set_var("GGML_CPU_TILED_MM", "1");
    }
    let opts = common::parse_args(7);
    let tokenizer = Tokenizer::load(&opts.model).unwrap_or_else(fail);
    let text = include_str!("engine.rs").repeat(4);
    let tokens = tokenizer.encode(&text, true);
    assert!(tokens.len() >= PROMPT, "bench text too short");

    let reference = Reference::load_default(&opts.model).unwrap_or_else(fail);
    let mut engines: Vec<(String, Box<dyn Engine>)> = Vec::new();
    for &weights in &opts.weights {
        let load = LoadOptions {
            device: "cpu".into(),
            threads: opts.threads,
            weights,
            batch_kernels: opts.batch_kernels,
        };
        let model = Model::load(&opts.model, &load).unwrap_or_else(fail);
        let cache = model.new_cache(2048).unwrap_or_else(fail);
        engines.push((format!("svfit {weights}"), Box::new(Ours { model, cache })));
    }
    let fa = std::env::var("FA").is_ok();
    let theirs = reference
        .session_with(2048, 8, opts.threads, fa)
        .unwrap_or_else(fail);
    engines.push(("llama.cpp".into(), Box::new(LlamaCpp(theirs))));

    println!(
        "model {}, {} threads, best of {} runs, tokens/s",
        opts.model_name(),
        opts.threads,
        opts.reps
    );
    print!("{:<28}", "test");
    for (name, _) in &engines {
        print!(" {name:>14}");
    }
    println!();
    let mut rows = Vec::new();
    for (name, run) in [
        (
            "prompt 512",
            &(|e: &mut dyn Engine, t: &[u32]| prompt_speed(e, t))
                as &dyn Fn(&mut dyn Engine, &[u32]) -> f64,
        ),
        (
            "generate 128, 1 sequence",
            &|e: &mut dyn Engine, t: &[u32]| generation_speed(e, t, 1),
        ),
        (
            "generate 128, 8 sequences",
            &|e: &mut dyn Engine, t: &[u32]| generation_speed(e, t, 8),
        ),
    ] {
        // Take turns so that no engine always runs on a warmer or quieter
        // machine.
        let mut best = vec![0f64; engines.len()];
        for _ in 0..opts.reps {
            for ((_, engine), best) in engines.iter_mut().zip(&mut best) {
                *best = best.max(run(engine.as_mut(), &tokens));
            }
        }
        print!("{name:<28}");
        for b in &best {
            print!(" {b:>14.1}");
        }
        println!();
        rows.push(best);
    }
    for (i, (name, _)) in engines.iter().enumerate() {
        println!(
            "{name}: batch-8 / batch-1 generation {:.2}x; versus {}: prompt {:.2}x, batch-8 {:.2}x",
            rows[2][i] / rows[1][i],
            engines[0].0,
            rows[0][i] / rows[0][0],
            rows[2][i] / rows[2][0],
        );
    }
}
