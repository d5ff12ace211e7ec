//! Parity with llama.cpp: our engine and a llama.cpp context on the same GGUF
//! (f16 KV cache, plain attention, same threads) give the same logits, alone
//! and for several sequences of different lengths decoded in one batch. For
//! every `--weights` layout: llama.cpp runs the file `svfit convert` writes
//! for that layout, holding the very weights we hold.

use crate::common;

use std::path::Path;

use common::{compare, Agreement, Rng};
use svfit::model::{
    random, Arch, Batch, LoadOptions, Logits, Model, SeqId, Tokenizer, WeightFormat,
};

const THREADS: usize = 2;
const N_CTX: usize = 1024;

/// Logits of every position of each sequence, `[seq][pos][vocab]`.
type PerSequence = Vec<Vec<Vec<f32>>>;

/// Feeds `seqs` through `decode`: the first `prefill` tokens of every
/// sequence in one batch, then one token of each unfinished sequence per
/// step, so that prefill and decode of sequences with different lengths mix.
fn run_schedule(
    decode: &mut dyn FnMut(&Batch) -> Logits,
    seqs: &[(SeqId, Vec<u32>)],
    prefill: &[usize],
) -> PerSequence {
    let mut out: PerSequence = vec![Vec::new(); seqs.len()];
    let mut batch = Batch::new();
    for ((seq, tokens), &n) in seqs.iter().zip(prefill) {
        batch.add_sequence(&tokens[..n], 0, *seq, true);
    }
    let mut owners: Vec<usize> = prefill
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i, n))
        .collect();
    let mut step = 0;
    loop {
        let logits = decode(&batch);
        for (row, &owner) in owners.iter().enumerate() {
            out[owner].push(logits.row(row).to_vec());
        }
        batch.clear();
        owners.clear();
        for (i, ((seq, tokens), &n)) in seqs.iter().zip(prefill).enumerate() {
            if let Some(&t) = tokens.get(n + step) {
                batch.add(t, n + step, *seq, true);
                owners.push(i);
            }
        }
        if batch.is_empty() {
            return out;
        }
        step += 1;
    }
}

/// The weight layouts every parity test runs.
const FORMATS: [WeightFormat; 4] = [
    WeightFormat::Keep,
    WeightFormat::Auto,
    WeightFormat::Q8_0,
    WeightFormat::F16,
];

/// A model file and the layout we load it in.
#[derive(Clone, Copy)]
struct Ours<'p>(&'p Path, WeightFormat);

fn ours(model: Ours, seqs: &[(SeqId, Vec<u32>)], prefill: &[usize]) -> PerSequence {
    let Ours(path, weights) = model;
    let mut model = Model::load(
        path,
        &LoadOptions {
            device: "cpu".into(),
            threads: THREADS,
            weights,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let mut cache = model.new_cache(N_CTX).unwrap();
    run_schedule(&mut |b| model.decode(&mut cache, b).unwrap(), seqs, prefill)
}

fn llama_cpp(path: &Path, seqs: &[(SeqId, Vec<u32>)], prefill: &[usize]) -> PerSequence {
    let reference = common::reference(path);
    let n_seq = seqs
        .iter()
        .map(|(id, _)| *id as usize + 1)
        .max()
        .unwrap_or(1);
    let mut session = reference.session(N_CTX, n_seq, THREADS).unwrap();
    run_schedule(&mut |b| session.decode(b).unwrap(), seqs, prefill)
}

fn flat(x: &PerSequence) -> Vec<&[f32]> {
    x.iter().flatten().map(|r| r.as_slice()).collect()
}

fn agreement(a: &PerSequence, b: &PerSequence) -> Agreement {
    compare(&flat(a), &flat(b))
}

fn assert_parity(what: &str, a: &Agreement) {
    eprintln!("{what}: {a:?}");
    // Relative errors mean nothing on no rows or flat logits.
    assert!(
        a.rows > 0 && a.std > 1e-3,
        "{what}: degenerate logits {a:?}"
    );
    assert!(
        a.top1 >= 0.98,
        "{what}: top-1 agrees at only {:.1}% of positions",
        100.0 * a.top1
    );
    assert!(
        a.mean_abs_rel < 2e-2,
        "{what}: mean |Δ| is {:.4} of the logits' std",
        a.mean_abs_rel
    );
}

/// Decoding is batch-invariant: a sequence's logits do not depend on what
/// else is in its batch (each sequence attends over its own page-aligned
/// cells, so ggml's reductions round the same way).
fn assert_batch_invariant(what: &str, a: &Agreement) {
    eprintln!("{what}: {a:?}");
    assert!(
        a.max_abs_rel <= 1e-4,
        "{what}: max |Δ| is {:.2e} of the logits' std",
        a.max_abs_rel
    );
}

/// One sequence alone, then three sequences together versus each alone,
/// for `path` loaded in `weights` and llama.cpp on the converted file.
fn check_model(path: &Path, seqs: Vec<Vec<u32>>, weights: WeightFormat) {
    // llama.cpp runs the file as we hold it: as stored for `keep`.
    let dir = common::temp_dir("parity");
    let converted = dir.path().join("converted.gguf");
    let theirs = match weights {
        WeightFormat::Keep => path,
        _ => {
            svfit::model::write_converted(path, weights, &converted).unwrap();
            converted.as_path()
        }
    };
    let (mine, path) = (Ours(path, weights), theirs);
    eprintln!("--weights {weights}");
    let single = vec![(0, seqs[0].clone())];
    let prefill_single = [seqs[0].len() - 4];
    assert_parity(
        "one sequence vs llama.cpp",
        &agreement(
            &ours(mine, &single, &prefill_single),
            &llama_cpp(path, &single, &prefill_single),
        ),
    );

    let together: Vec<(SeqId, Vec<u32>)> = seqs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, s)| (i as SeqId + 1, s))
        .collect();
    let prefill: Vec<usize> = seqs.iter().map(|s| s.len() * 2 / 3).collect();
    let batched = ours(mine, &together, &prefill);
    let mut alone_ours = PerSequence::new();
    let mut alone_ref = PerSequence::new();
    for (i, s) in together.iter().enumerate() {
        alone_ours.extend(ours(mine, std::slice::from_ref(s), &prefill[i..=i]));
        alone_ref.extend(llama_cpp(path, std::slice::from_ref(s), &prefill[i..=i]));
    }
    let vs_ref = agreement(&batched, &alone_ref);
    let vs_ours = agreement(&batched, &alone_ours);
    assert_parity("3 sequences batched vs each alone in llama.cpp", &vs_ref);
    assert_batch_invariant("3 sequences batched vs each alone (ours)", &vs_ours);
}

#[test]
fn tiny_model_matches_llama_cpp() {
    let _machine = crate::common::shared();
    let (_dir, path) = common::tiny_model();
    let mut rng = Rng::new(7);
    let seqs = [45usize, 70, 96]
        .iter()
        .map(|&n| rng.tokens(n, common::TINY.n_vocab))
        .collect::<Vec<_>>();
    for weights in FORMATS {
        check_model(&path, seqs.clone(), weights);
    }
}

/// `n` greedy tokens after `prompt` (sequence 0), from `decode`.
fn greedy(decode: &mut dyn FnMut(&Batch) -> Logits, prompt: &[u32], n: usize) -> Vec<u32> {
    common::greedy_tokens(decode, prompt, Default::default(), n)
}

/// `n` greedy tokens after `prompt` from our engine (`keep`) and from
/// llama.cpp, on `path`.
fn greedy_both(path: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<u32>) {
    let options = LoadOptions {
        device: "cpu".into(),
        threads: THREADS,
        weights: WeightFormat::Keep,
        ..LoadOptions::default()
    };
    let mut model = Model::load(path, &options).unwrap();
    let mut cache = model.new_cache(N_CTX).unwrap();
    let mine = greedy(&mut |b| model.decode(&mut cache, b).unwrap(), prompt, n);
    let reference = common::reference(path);
    let mut session = reference.session(N_CTX, 1, THREADS).unwrap();
    let theirs = greedy(&mut |b| session.decode(b).unwrap(), prompt, n);
    (mine, theirs)
}

/// A Llama 3.x file (RoPE base 500000, `rope_freqs.weight`): our logits
/// under every layout are llama.cpp's, and 32 greedy tokens the same. The
/// factors matter: llama.cpp answers otherwise without them.
#[test]
fn llama3_rope_freqs_match_llama_cpp() {
    let _machine = crate::common::shared();
    let dir = common::temp_dir("llama3");
    let path = dir.path().join("llama3.gguf");
    common::write_llama3_model(&path, true);
    let mut rng = Rng::new(8);
    let seqs = [40usize, 64, 90]
        .iter()
        .map(|&n| rng.tokens(n, common::TINY.n_vocab))
        .collect::<Vec<_>>();
    for weights in FORMATS {
        check_model(&path, seqs.clone(), weights);
    }

    let prompt = &seqs[0];
    let (mine, theirs) = greedy_both(&path, prompt, 32);
    eprintln!("32 greedy tokens: {mine:?}");
    assert_eq!(mine, theirs, "32 greedy tokens, ours then llama.cpp's");

    let plain = dir.path().join("without-factors.gguf");
    common::rewrite(&path, &plain, |name| name != "rope_freqs.weight", |_| {});
    let reference = common::reference(&plain);
    let mut session = reference.session(N_CTX, 1, THREADS).unwrap();
    let ignored = greedy(&mut |b| session.decode(b).unwrap(), prompt, 32);
    assert_ne!(
        ignored, theirs,
        "llama.cpp's greedy tokens without the factors"
    );
    let single = vec![(0, seqs[1].clone())];
    let moved = agreement(
        &llama_cpp(&plain, &single, &[40]),
        &llama_cpp(&path, &single, &[40]),
    );
    eprintln!("llama.cpp without the factors vs with: {moved:?}");
    assert!(
        moved.mean_abs_rel > 0.1,
        "the factors barely change llama.cpp's logits: {moved:?}"
    );
}

/// A sequence that outgrows its cells while its neighbour holds the next
/// page moves elsewhere in the cache, and its logits do not change.
#[test]
fn growing_sequence_moves_without_changing_logits() {
    let _machine = crate::common::shared();
    let (_dir, path) = common::tiny_model();
    let mut rng = Rng::new(11);
    let mut tokens = |n: usize| rng.tokens(n, common::TINY.n_vocab);
    // Both start with one page; the first grows past 64 tokens, then past 128.
    let seqs = vec![(0, tokens(150)), (1, tokens(40))];
    let prefill = [10, 10];
    for weights in FORMATS {
        let mine = Ours(&path, weights);
        let batched = ours(mine, &seqs, &prefill);
        let mut alone = PerSequence::new();
        for (i, s) in seqs.iter().enumerate() {
            alone.extend(ours(mine, std::slice::from_ref(s), &prefill[i..=i]));
        }
        assert_batch_invariant(
            &format!("growing sequence batched vs alone, --weights {weights}"),
            &agreement(&batched, &alone),
        );
    }
}

#[test]
fn default_model_matches_llama_cpp() {
    let _machine = crate::common::shared();
    let path = common::default_model();
    let tokenizer = Tokenizer::load(&path).unwrap();
    let texts = [
        "The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea, \
         the fishermen were mending their nets and talking about the weather, which had been \
         unusually warm for the season.",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.",
        "fn main() {\n    let numbers = vec![1, 2, 3, 4, 5];\n    let total: i32 = numbers.iter().sum();\n    \
         println!(\"{}\", total);\n}\n// This program adds up a list of numbers and prints the result.",
    ];
    let seqs: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t, true)).collect();
    assert!(
        seqs.iter().all(|s| s.len() >= 20),
        "prompts tokenize to real sequences"
    );
    // The default layout serves the file as it is: through the batched
    // Q4_1 kernel, llama.cpp's logits bit for bit.
    let single = vec![(0, seqs[2].clone())];
    let prefill = [seqs[2].len() - 8];
    let exact = agreement(
        &ours(Ours(&path, WeightFormat::Auto), &single, &prefill),
        &llama_cpp(&path, &single, &prefill),
    );
    eprintln!("default layout vs llama.cpp: {exact:?}");
    assert_eq!(exact.max_abs_rel, 0.0, "not bit-exact: {exact:?}");
    for weights in FORMATS {
        check_model(&path, seqs.clone(), weights);
    }
}

/// `--weights q8_0` (Q4_1 re-quantized to Q8_0, the lossy layout one may
/// ask for) moves the logits of the Q4_1 file no further than llama.cpp
/// moves them on the converted file.
#[test]
fn default_model_q8_0_stays_within_llama_cpps_conversion_distance() {
    let _machine = crate::common::shared();
    let path = common::default_model();
    let tokenizer = Tokenizer::load(&path).unwrap();
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
                  <|im_start|>assistant\nThe capital of France is Paris. It is";
    let seq = vec![(0, tokenizer.encode(prompt, true))];
    let prefill = [seq[0].1.len() - 8];
    let dir = common::temp_dir("q8_0");
    let converted = dir.path().join("q8_0.gguf");
    svfit::model::write_converted(&path, WeightFormat::Q8_0, &converted).unwrap();

    let file = llama_cpp(&path, &seq, &prefill);
    let theirs = compare(&flat(&llama_cpp(&converted, &seq, &prefill)), &flat(&file));
    let mine = compare(
        &flat(&ours(Ours(&path, WeightFormat::Q8_0), &seq, &prefill)),
        &flat(&file),
    );
    eprintln!("llama.cpp converted vs file: {theirs:?}\nours q8_0 vs file: {mine:?}");
    assert!(
        theirs.max_abs_rel > 0.0,
        "the conversion changes the weights"
    );
    assert!(
        mine.mean_abs_rel <= theirs.mean_abs_rel * 1.001
            && mine.max_abs_rel <= theirs.max_abs_rel * 1.001,
        "q8_0 moves the logits further than llama.cpp's conversion: {mine:?} vs {theirs:?}"
    );
    assert!(mine.top1 >= theirs.top1, "q8_0 changes more greedy tokens");
}

/// Every family the engine runs (llama, qwen2, qwen3, gemma2, gemma3, phi3), as a tiny
/// random model with llama.cpp's tensors and keys for it: under `keep` our
/// logits are llama.cpp's bit for bit, alone and batched, and 32 greedy
/// tokens the same; under every layout within the parity bounds; batched
/// equal to alone.
#[test]
fn every_family_matches_llama_cpp() {
    let _machine = crate::common::shared();
    let dir = common::temp_dir("families");
    for name in svfit::model::SUPPORTED_ARCHITECTURES {
        let arch = Arch::from_name(name).unwrap();
        let path = dir.path().join(format!("{}.gguf", arch.name()));
        common::write_tiny_model(&path, &random::Shape::tiny(arch));
        eprintln!("== {}", arch.name());
        let mut rng = Rng::new(9);
        let seqs = [40usize, 64, 90]
            .iter()
            .map(|&n| rng.tokens(n, common::TINY.n_vocab))
            .collect::<Vec<_>>();
        let single = vec![(0, seqs[2].clone())];
        let exact = agreement(
            &ours(Ours(&path, WeightFormat::Keep), &single, &[60]),
            &llama_cpp(&path, &single, &[60]),
        );
        eprintln!("{} keep vs llama.cpp: {exact:?}", arch.name());
        assert_eq!(exact.max_abs_rel, 0.0, "{}: not bit-exact", arch.name());
        for weights in FORMATS {
            check_model(&path, seqs.clone(), weights);
        }
        let (mine, theirs) = greedy_both(&path, &seqs[0], 32);
        assert_eq!(
            mine,
            theirs,
            "{}: 32 greedy tokens, ours then llama.cpp's",
            arch.name()
        );
    }
}

/// The real Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 matrices, a
/// 262k vocabulary, sliding-window layers): on a 200-token text our logits
/// under the default layout (each type through its batched kernel) are
/// llama.cpp's bit for bit, batched as alone, and greedy
/// decoding continues
/// "The capital of France is" with llama.cpp's 16 tokens.
#[test]
fn gemma3_270m_matches_llama_cpp() {
    let _machine = crate::common::shared();
    let path = common::gemma_model();
    let tokenizer = Tokenizer::load(&path).unwrap();
    let text = "The history of the printing press begins in the fifteenth century, when \
        Johannes Gutenberg combined movable metal type, oil-based ink and a wooden screw press \
        into a system that could produce books quickly and cheaply. Before that, texts were \
        copied by hand, usually by monks working in scriptoria, and a single Bible could take \
        years to finish. Within a few decades, printing shops had spread to more than two \
        hundred cities across Europe, and millions of volumes were in circulation. Ideas moved \
        faster than ever before: scientific findings, religious pamphlets, maps and news \
        sheets reached readers who had never owned a book. Historians often link the press to \
        the Renaissance, the Reformation and the Scientific Revolution, because each depended \
        on the rapid and accurate copying of written work. The new trade also changed \
        languages: printers chose one spelling for each word, and the dialect of the capital \
        often became the standard for a whole country. Cheap almanacs taught farmers when to \
        plant, merchants kept printed price lists, and governments issued laws that everyone \
        could read in the same words. By the end of the sixteenth century, the book had become \
        an ordinary object rather than a treasure kept behind locked doors.";
    let tokens = tokenizer.encode(text, true);
    assert!(tokens.len() >= 200, "{} tokens", tokens.len());
    let seq = vec![(0, tokens[..200].to_vec())];
    let mine = ours(Ours(&path, WeightFormat::Auto), &seq, &[150]);
    let theirs = llama_cpp(&path, &seq, &[150]);
    let a = agreement(&mine, &theirs);
    eprintln!("Gemma 3 270M, default layout, 200 tokens vs llama.cpp: {a:?}");
    assert_eq!(a.rows, 200);
    assert_eq!(a.max_abs_rel, 0.0, "not bit-exact: {a:?}");
    // Three sequences batched (prefill and decode mixed) = each alone.
    let seqs = vec![
        tokens[..40].to_vec(),
        tokens[40..104].to_vec(),
        tokens[104..194].to_vec(),
    ];
    check_model(&path, seqs, WeightFormat::Keep);

    let prompt = tokenizer.encode("The capital of France is", true);
    let (mine, theirs) = greedy_both(&path, &prompt, 16);
    eprintln!("16 greedy tokens: {:?}", tokenizer.decode(&mine));
    assert_eq!(mine, theirs, "16 greedy tokens, ours then llama.cpp's");
}

/// Linear RoPE scaling (`rope.scaling.type = linear`, factor 4: positions
/// scaled by 1/4, as llama.cpp does): our logits are llama.cpp's bit for
/// bit, and the scaling matters (llama.cpp answers otherwise without it).
#[test]
fn linear_rope_scaling_matches_llama_cpp() {
    let _machine = crate::common::shared();
    let dir = common::temp_dir("linear-rope");
    let plain = dir.path().join("plain.gguf");
    common::write_tiny_model(&plain, &common::TINY);
    let scaled = dir.path().join("scaled.gguf");
    common::rewrite(
        &plain,
        &scaled,
        |_| true,
        |w| {
            w.set_str("llama.rope.scaling.type", "linear").unwrap();
            w.set_f32("llama.rope.scaling.factor", 4.0).unwrap();
        },
    );
    let tokens = Rng::new(12).tokens(80, common::TINY.n_vocab);
    let seq = vec![(0, tokens)];
    let mine = ours(Ours(&scaled, WeightFormat::Keep), &seq, &[60]);
    let exact = agreement(&mine, &llama_cpp(&scaled, &seq, &[60]));
    eprintln!("linear RoPE x4 vs llama.cpp: {exact:?}");
    assert_eq!(exact.max_abs_rel, 0.0, "not bit-exact: {exact:?}");
    let moved = agreement(&llama_cpp(&plain, &seq, &[60]), &mine);
    eprintln!("without the scaling vs with: {moved:?}");
    assert!(
        moved.mean_abs_rel > 0.05,
        "the scaling barely matters: {moved:?}"
    );
}
