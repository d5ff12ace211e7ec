//! The SVFit branch in the engine (METHOD.md §4), against its oracles:
//! - identity: an adapter with sigma = S gives the base model's logits;
//! - exactness: a perturbed adapter on our path agrees with llama.cpp running
//!   the `svfit merge` output (W' = W + U diag(delta) Vt stored as F32);
//! - mixed batch: sequences on three adapters and the base decoded in one
//!   batch give, per sequence, what each gives alone.

use crate::common;

use std::path::{Path, PathBuf};

use common::{compare, rows, temp_dir, Agreement, Rng, TempDir};
use svfit::adapter::{Adapter, Deltas};
use svfit::factors::{self, Factor, FactorsKey, SingularValues, TargetMatrix};
use svfit::ggml::Type;
use svfit::merge::{self, MergeType};
use svfit::model::{random, Arch, Batch, LoadOptions, Model, SeqId, Slot, Tokenizer};
use svfit::sampling::argmax;

const THREADS: usize = 2;
const N_CTX: usize = 512;

/// A model with its factors (computed into a temp cache, f16 file).
struct Setup {
    dir: TempDir,
    model: PathBuf,
    key: FactorsKey,
    factors: Vec<(TargetMatrix, Factor)>,
    singular: SingularValues,
}

fn setup(dir: TempDir, model: PathBuf, targets: &str) -> Setup {
    let key = FactorsKey::for_model(&model, targets, "energy:0.99", "f16").unwrap();
    let path = factors::ensure(&model, &key, &dir.path().join("home")).unwrap();
    Setup {
        factors: factors::read_factors(&path, &key).unwrap(),
        singular: factors::read_singular_values(&path, &key).unwrap(),
        dir,
        model,
        key,
    }
}

impl Setup {
    /// An adapter with sigma = S (1 + scale z), z ~ N(0, 1).
    fn adapter(&self, scale: f32, seed: u64) -> Adapter {
        let mut a = Adapter::identity(&self.key, &self.singular);
        let mut rng = Rng::new(seed);
        for (_, sigma) in &mut a.sigma {
            for v in sigma.iter_mut() {
                *v *= 1.0 + scale * rng.normal();
            }
        }
        a
    }

    fn deltas(&self, adapter: &Adapter) -> Deltas {
        adapter.deltas(&self.singular)
    }

    /// The model with the factors attached and `adapters` in slots 1, 2, ...
    fn model(&self, adapters: &[&Adapter]) -> Model {
        let mut model = load(&self.model);
        model
            .attach_factors(&self.factors, adapters.len() + 1, Type::Q8_0)
            .unwrap();
        for (i, a) in adapters.iter().enumerate() {
            model.set_adapter(i as Slot + 1, &self.deltas(a)).unwrap();
        }
        model
    }
}

fn load(path: &Path) -> Model {
    let options = LoadOptions {
        device: "cpu".into(),
        threads: THREADS,
        ..LoadOptions::default()
    };
    Model::load(path, &options).unwrap()
}

/// Logits of every position of `tokens` as sequence 0 on `slot`.
fn logits(model: &mut Model, tokens: &[u32], slot: Slot) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(N_CTX).unwrap();
    let mut batch = Batch::new();
    batch.add_sequence(tokens, 0, 0, true);
    batch.set_adapter(0, slot);
    let out = model.decode(&mut cache, &batch).unwrap();
    rows(&out).into_iter().map(<[f32]>::to_vec).collect()
}

fn agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> Agreement {
    fn view(x: &[Vec<f32>]) -> Vec<&[f32]> {
        x.iter().map(Vec::as_slice).collect()
    }
    compare(&view(a), &view(b))
}

fn random_tokens(n: usize, seed: u64) -> Vec<u32> {
    Rng::new(seed).tokens(n, common::TINY.n_vocab)
}

fn default_texts(model: &Path) -> Vec<Vec<u32>> {
    let tokenizer = Tokenizer::load(model).unwrap();
    [
        "The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea, \
         the fishermen were mending their nets and talking about the weather.",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "fn main() {\n    let numbers = vec![1, 2, 3];\n    println!(\"{}\", numbers.len());\n}",
        "Once upon a time",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\
         <|im_end|>\n<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a \
         message in a bottle.<|im_end|>\n<|im_start|>assistant\nOnce upon a time, on a rocky \
         island far from the mainland, there lived an old lighthouse keeper named Elias. Every \
         night he climbed the spiral stairs to light the lamp, and every morning he walked along \
         the shore to see what the sea had brought.",
    ]
    .iter()
    .map(|t| tokenizer.encode(t, true))
    .collect()
}

fn check_identity(s: &Setup, tokens: &[u32]) {
    let base = logits(&mut load(&s.model), tokens, 0);
    let identity = Adapter::identity(&s.key, &s.singular);
    let adapted = logits(&mut s.model(&[&identity]), tokens, 1);
    let a = agreement(&adapted, &base);
    eprintln!("identity adapter vs base: {a:?}");
    assert!(
        a.max_abs_rel <= 1e-4,
        "identity adapter: max |Δ| {:.2e} of the logits' std",
        a.max_abs_rel
    );
}

/// llama.cpp's logits of `tokens` on the model at `path`.
fn llama_cpp(path: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let reference = common::reference(path);
    let mut session = reference.session(N_CTX, 1, THREADS).unwrap();
    let mut batch = Batch::new();
    batch.add_sequence(tokens, 0, 0, true);
    let out = session.decode(&batch).unwrap();
    rows(&out).into_iter().map(<[f32]>::to_vec).collect()
}

/// Merges `deltas` into the model as F32 targets at `out`.
fn merged(s: &Setup, deltas: &Deltas, out: &Path) {
    let n = merge::merge(&s.model, &s.factors, deltas, MergeType::F32, &[], out).unwrap();
    assert_eq!(n, s.factors.len());
}

/// Our adapter path on `base` (with the factors of `s`) versus llama.cpp on
/// the merged model (F32 targets), for an adapter with deltas around 5% of
/// S. Returns that agreement and how far the adapter moves the logits.
fn adapter_vs_merged(s: &Setup, base: &Path, tokens: &[u32]) -> (Agreement, Agreement) {
    let adapter = s.adapter(0.05, 1);
    let path = s.dir.path().join("merged.gguf");
    merged(s, &s.deltas(&adapter), &path);
    let mut model = load(base);
    model.attach_factors(&s.factors, 2, Type::Q8_0).unwrap();
    model.set_adapter(1, &s.deltas(&adapter)).unwrap();
    let ours = logits(&mut model, tokens, 1);
    let unadapted = logits(&mut model, tokens, 0);
    let a = agreement(&ours, &llama_cpp(&path, tokens));
    let moved = agreement(&ours, &unadapted);
    eprintln!("adapter path vs llama.cpp on the merged model: {a:?}");
    eprintln!("adapter vs base: {moved:?}");
    (a, moved)
}

/// The tiny model (random weights in f32, f16, q8_0 and q4_1) meets the
/// thresholds directly, and the adapter moves the logits `moves` times as
/// far as the adapter path is from the merged model.
fn check_exactness(s: &Setup, tokens: &[u32], moves: f64) {
    let (a, moved) = adapter_vs_merged(s, &s.model, tokens);
    assert!(a.top1 >= 0.98, "top-1 agrees at {:.1}%", 100.0 * a.top1);
    assert!(
        a.mean_abs_rel < 2e-2,
        "mean |Δ| {:.4} of the logits' std",
        a.mean_abs_rel
    );
    assert!(
        moved.mean_abs_rel > moves * a.mean_abs_rel,
        "the adapter barely moves the logits"
    );
}

/// The default model is numerically chaotic: scaling every delta by
/// (1 + 1e-5), a change of ~1e-7 in the weights, moves llama.cpp's own
/// logits by 2-3% of their std (its "floor"). So our path runs the base
/// with F32 targets (the identity merge, as llama.cpp runs the merged
/// model: a Q4_1 product also rounds its activations to 8 bits) and must be
/// as close to llama.cpp as llama.cpp is to itself under that perturbation.
fn check_exactness_at_floor(s: &Setup, tokens: &[u32]) {
    let identity = Adapter::identity(&s.key, &s.singular);
    let base = s.dir.path().join("base-f32.gguf");
    merged(s, &s.deltas(&identity), &base);
    let (a, moved) = adapter_vs_merged(s, &base, tokens);

    let mut nudged = s.deltas(&s.adapter(0.05, 1));
    for v in nudged.iter_mut().flat_map(|(_, d)| d.iter_mut()) {
        *v *= 1.0 + 1e-5;
    }
    let path = s.dir.path().join("merged-nudged.gguf");
    merged(s, &nudged, &path);
    let floor = agreement(
        &llama_cpp(&path, tokens),
        &llama_cpp(&s.dir.path().join("merged.gguf"), tokens),
    );
    eprintln!("llama.cpp vs itself, deltas x (1 + 1e-5): {floor:?}");
    assert!(
        a.mean_abs_rel <= 1.5 * floor.mean_abs_rel.max(1e-2),
        "mean |Δ| {:.4} of the logits' std; llama.cpp's own floor {:.4}",
        a.mean_abs_rel,
        floor.mean_abs_rel
    );
    assert!(
        a.top1 >= floor.top1.min(0.98) - 0.05,
        "top-1 agrees at {:.1}%; llama.cpp's own floor {:.1}%",
        100.0 * a.top1,
        100.0 * floor.top1
    );
    assert!(
        moved.mean_abs_rel > 2.0 * a.mean_abs_rel,
        "the adapter barely moves the logits"
    );
}

/// Prefill of every sequence in one batch, then `steps` greedy tokens per
/// sequence, each batch holding all sequences. Returns each sequence's
/// logits rows and generated tokens.
fn greedy(
    model: &mut Model,
    prompts: &[(SeqId, Slot, Vec<u32>)],
    steps: usize,
) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
    let mut cache = model.new_cache(N_CTX).unwrap();
    let mut out: Vec<(Vec<Vec<f32>>, Vec<u32>)> = vec![Default::default(); prompts.len()];
    let mut batch = Batch::new();
    for (seq, slot, tokens) in prompts {
        batch.add_sequence(tokens, 0, *seq, false);
        batch.set_adapter(*seq, *slot);
    }
    for step in 0..=steps {
        let logits = model.decode(&mut cache, &batch).unwrap();
        batch.clear();
        for (i, (seq, slot, tokens)) in prompts.iter().enumerate() {
            let row = logits.row(i).to_vec();
            let next = argmax(&row);
            out[i].0.push(row);
            out[i].1.push(next);
            if step < steps {
                batch.add(next, tokens.len() + step, *seq, true);
                batch.set_adapter(*seq, *slot);
            }
        }
    }
    out
}

fn check_mixed_batch(s: &Setup, prompts: Vec<Vec<u32>>) {
    let adapters = [s.adapter(0.3, 1), s.adapter(0.3, 2), s.adapter(0.3, 3)];
    let mut model = s.model(&[&adapters[0], &adapters[1], &adapters[2]]);
    // Slots 1, 2, 3 and the base; sequence ids not in slot order.
    let slots = [2, 0, 3, 1];
    let seqs: Vec<(SeqId, Slot, Vec<u32>)> = prompts
        .into_iter()
        .zip(slots)
        .enumerate()
        .map(|(i, (p, slot))| (10 - i as SeqId, slot, p))
        .collect();
    const STEPS: usize = 8;
    let together = greedy(&mut model, &seqs, STEPS);
    let mut distinct = Vec::new();
    for (i, seq) in seqs.iter().enumerate() {
        let alone = greedy(&mut model, std::slice::from_ref(seq), STEPS).remove(0);
        assert_eq!(
            together[i].1, alone.1,
            "slot {}: greedy tokens differ batched vs alone",
            seq.1
        );
        let a = agreement(&together[i].0, &alone.0);
        eprintln!("slot {} batched vs alone: {a:?}", seq.1);
        assert!(a.max_abs_rel <= 1e-4, "slot {}: {a:?}", seq.1);
        distinct.push(alone);
    }
    // The same prompt on different adapters gives different logits.
    let prompt = &seqs[0].2;
    let per_slot: Vec<_> = (0..4)
        .map(|slot| logits(&mut model, prompt, slot))
        .collect();
    for i in 0..4 {
        for j in i + 1..4 {
            let a = agreement(&per_slot[i], &per_slot[j]);
            assert!(a.mean_abs_rel > 1e-3, "slots {i} and {j} agree: {a:?}");
        }
    }
}

fn tiny(targets: &str) -> Setup {
    let (dir, model) = common::tiny_model();
    setup(dir, model, targets)
}

fn default_model(targets: &str) -> Setup {
    setup(temp_dir("svfit"), common::default_model(), targets)
}

#[test]
fn tiny_identity_adapter_is_the_base_model() {
    let _machine = crate::common::shared();
    check_identity(&tiny("all-linear"), &random_tokens(60, 1));
}

#[test]
fn tiny_adapter_path_matches_llama_cpp_on_the_merged_model() {
    let _machine = crate::common::shared();
    check_exactness(&tiny("all-linear"), &random_tokens(90, 2), 5.0);
}

/// llama.cpp's logits of `tokens` on the model at `path` with the GGUF
/// LoRA at `lora` applied.
fn llama_cpp_with_lora(path: &Path, lora: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut reference = common::reference(path);
    let mut adapter = reference.lora(lora).unwrap();
    let mut session = reference.session(N_CTX, 1, THREADS).unwrap();
    session.apply_lora(&mut adapter).unwrap();
    let mut batch = Batch::new();
    batch.add_sequence(tokens, 0, 0, true);
    let out = session.decode(&batch).unwrap();
    rows(&out).into_iter().map(<[f32]>::to_vec).collect()
}

/// An adapter exported as a GGUF LoRA (`svfit adapter export --format
/// gguf-lora`) and run by llama.cpp (`--lora`) answers as our adapter path
/// does, within the merged model's bounds: on the tiny llama with every
/// target, and on Phi-3 with q and v inside its fused `attn_qkv` (one LoRA
/// for the fused tensor, zeros in k's rows). Keeping fewer deltas
/// (`--rank`) reports what it drops, and drops it.
#[test]
fn exported_gguf_lora_in_llama_cpp_matches_the_adapter_path() {
    use svfit::lora::{export, Format};
    let _machine = crate::common::shared();
    let phi3 = {
        let dir = temp_dir("lora-phi3");
        let model = dir.path().join("phi3.gguf");
        common::write_tiny_model(&model, &random::Shape::tiny(Arch::Phi3));
        setup(dir, model, "q,v")
    };
    for s in [tiny("all-linear"), phi3] {
        let tokens = random_tokens(90, 2);
        let deltas = s.deltas(&s.adapter(0.05, 1));
        let lora = s.dir.path().join("lora.gguf");
        let exported =
            export(&s.model, &s.factors, &deltas, Format::GgufLora, None, &lora).unwrap();
        assert_eq!(exported.dropped, 0.0);
        let mut model = load(&s.model);
        model.attach_factors(&s.factors, 2, Type::Q8_0).unwrap();
        model.set_adapter(1, &deltas).unwrap();
        let ours = logits(&mut model, &tokens, 1);
        let unadapted = logits(&mut model, &tokens, 0);
        let theirs = llama_cpp_with_lora(&s.model, &lora, &tokens);
        let a = agreement(&ours, &theirs);
        let moved = agreement(&ours, &unadapted);
        eprintln!("adapter path vs llama.cpp with the exported LoRA: {a:?}; moved {moved:?}");
        assert!(a.top1 >= 0.98, "top-1 agrees at {:.1}%", 100.0 * a.top1);
        assert!(a.mean_abs_rel < 2e-2, "mean |Δ| {:.4}", a.mean_abs_rel);
        assert!(
            moved.mean_abs_rel > 2.5 * a.mean_abs_rel,
            "{moved:?} against {a:?}"
        );

        // Rank 2: most of the update dropped, as reported.
        let cut = s.dir.path().join("lora-2.gguf");
        let exported = export(
            &s.model,
            &s.factors,
            &deltas,
            Format::GgufLora,
            Some(2),
            &cut,
        )
        .unwrap();
        assert_eq!(
            exported.max_rank,
            2 * if s.model.ends_with("phi3.gguf") { 2 } else { 1 }
        );
        assert!(exported.dropped > 0.5, "{exported:?}");
        let truncated = agreement(&ours, &llama_cpp_with_lora(&s.model, &cut, &tokens));
        assert!(
            truncated.mean_abs_rel > 2.0 * a.mean_abs_rel,
            "{truncated:?}"
        );
    }
}

/// A Llama 3.x file (`rope_freqs.weight`, RoPE base 500000): `merge`
/// keeps the factors as they were, and llama.cpp on the merged file
/// answers as our adapter path does.
#[test]
fn llama3_merge_keeps_rope_freqs_and_matches_the_adapter_path() {
    let _machine = crate::common::shared();
    let dir = temp_dir("llama3-merge");
    let model = dir.path().join("llama3.gguf");
    common::write_llama3_model(&model, false);
    let s = setup(dir, model, "all-linear");
    check_exactness(&s, &random_tokens(90, 3), 5.0);
    let factors = |path: &Path| {
        let gguf = svfit::ggml::gguf::GgufFile::open(path).unwrap();
        let info = gguf
            .tensor("rope_freqs.weight")
            .expect("rope_freqs.weight")
            .clone();
        (info.ty, gguf.read_tensor_bytes(&info).unwrap())
    };
    assert_eq!(
        factors(&s.dir.path().join("merged.gguf")),
        factors(&s.model),
        "the merged file's rope_freqs.weight"
    );
}

#[test]
fn tiny_mixed_batch_equals_each_sequence_alone() {
    let _machine = crate::common::shared();
    let prompts = [30, 5, 70, 12]
        .iter()
        .enumerate()
        .map(|(i, &n)| random_tokens(n, 10 + i as u64))
        .collect();
    check_mixed_batch(&tiny("all-linear"), prompts);
}

#[test]
fn default_model_adapters() {
    let _machine = crate::common::shared();
    let s = default_model("q,v");
    let texts = default_texts(&s.model);
    check_identity(&s, &texts[4]);
    check_exactness_at_floor(&s, &texts[4]);
    check_mixed_batch(&s, texts[..4].to_vec());
}

/// Factors that do not belong to the model and slots that do not exist are
/// refused without changing the model.
#[test]
fn wrong_factors_and_slots_are_refused() {
    let _machine = crate::common::shared();
    let s = tiny("q,v");
    let mut model = load(&s.model);
    let mut wrong = s.factors.clone();
    wrong[0].1.m += 1;
    let err = model.attach_factors(&wrong, 2, Type::Q8_0).unwrap_err();
    assert!(err.to_string().contains("blk.0.attn_q"), "{err}");
    assert!(model.branch().is_none());

    model.attach_factors(&s.factors, 2, Type::Q8_0).unwrap();
    let mut deltas = s.deltas(&s.adapter(0.1, 1));
    assert!(model.set_adapter(2, &deltas).is_err());
    deltas[1].1.pop();
    let err = model.set_adapter(1, &deltas).unwrap_err();
    assert!(err.to_string().contains(&deltas[1].0), "{err}");
    let mut batch = Batch::new();
    batch.add_sequence(&random_tokens(4, 1), 0, 0, true);
    batch.set_adapter(0, 5);
    let mut cache = model.new_cache(64).unwrap();
    let err = model.decode(&mut cache, &batch).unwrap_err();
    assert!(err.to_string().contains("slot 5"), "{err}");
}

/// Every other family (qwen2's biases, qwen3's q/k norms, gemma3's
/// post-norms, GeGLU, sliding windows and soft-capped logits, phi3's fused
/// q/k/v and gate/up, each part a target of its own): the identity
/// adapter is the base model, the adapter path matches llama.cpp on the
/// merged file within today's bounds, and a mixed batch equals each
/// sequence alone. Gemma's post-norms and soft-cap damp what an adapter of
/// the same size does to the logits (seen: 4.2× the path's distance from
/// the merged model, against 7× for Qwen): there it must move them 3×.
#[test]
fn every_family_adapter_matches_its_merged_model() {
    let _machine = crate::common::shared();
    for (arch, moves) in [
        (Arch::Qwen2, 5.0),
        (Arch::Qwen3, 5.0),
        (Arch::Gemma2, 3.0),
        (Arch::Gemma3, 3.0),
        (Arch::Phi3, 5.0),
    ] {
        eprintln!("== {}", arch.name());
        // Phi-3 also with the default targets: q and v adapted inside
        // attn_qkv beside a plain k, gate and up plain halves of ffn_up.
        // Two matrices of seven move the logits less (seen: 3.2× and, with
        // other random weights, 2.85× the path's distance from the merged
        // model), while that distance stays all-linear's: it is mostly the
        // merged attn_qkv multiplied in f32 against our q8_0 one (whose
        // product quantizes the activations to q8_0), whatever the targets
        // in it. So there 2.5× is asked.
        let runs: &[(&str, f64)] = match arch {
            Arch::Phi3 => &[("all-linear", moves), ("q,v", 2.5)],
            _ => &[("all-linear", moves)],
        };
        for &(targets, moves) in runs {
            let dir = temp_dir("family-merge");
            let model = dir.path().join(format!("{}.gguf", arch.name()));
            common::write_tiny_model(&model, &random::Shape::tiny(arch));
            let s = setup(dir, model, targets);
            check_identity(&s, &random_tokens(60, 1));
            check_exactness(&s, &random_tokens(90, 2), moves);
            let prompts = [30, 5, 70, 12]
                .iter()
                .enumerate()
                .map(|(i, &n)| random_tokens(n, 10 + i as u64))
                .collect();
            check_mixed_batch(&s, prompts);
        }
    }
}
