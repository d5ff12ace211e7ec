//! LoRAs served beside SVFit adapters, on the tiny llama:
//! - a PEFT LoRA served (the LoRA branch) gives the logits of its merge
//!   and llama.cpp's with the same LoRA as a GGUF LoRA, and 32 greedy
//!   tokens equal to llama.cpp's; the GGUF LoRA served is the same;
//! - base, SVFit, LoRA and SVFit + LoRA sequences in one batch each equal
//!   the sequence alone, bit for bit.

use crate::common;

use std::path::Path;

use super::lora::{agreement, llama_cpp, write_loras, RANK};
use common::{greedy_tokens, rows, Rng};
use svfit::adapter::{Adapter, LowRanks};
use svfit::ggml::gguf::GgufFile;
use svfit::ggml::Type;
use svfit::lora::Lora;
use svfit::merge::{merge_lora, MergeType};
use svfit::model::{Batch, Config, LoadOptions, Model, Slots, WeightFormat};

const THREADS: usize = 2;
const N_CTX: usize = 256;

fn load(path: &Path) -> Model {
    let options = LoadOptions {
        device: "cpu".into(),
        threads: THREADS,
        weights: WeightFormat::Keep,
        ..LoadOptions::default()
    };
    Model::load(path, &options).unwrap()
}

/// The LoRA at `path` as the engine serves it.
fn served(model: &Path, path: &Path) -> LowRanks {
    let gguf = GgufFile::open(model).unwrap();
    let config = Config::from_gguf(&gguf).unwrap();
    Lora::read(path, &gguf).unwrap().low_ranks(&config).unwrap()
}

/// Every kind a LoRA adapts.
fn kinds(lora: &LowRanks) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    for (prefix, _) in lora {
        let kind = prefix.rsplit('.').next().unwrap();
        let k = svfit::factors::KINDS
            .iter()
            .find(|k| k.1 == kind)
            .unwrap()
            .1;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    kinds
}

/// Logits of every position of `tokens` as sequence 0 on `slots`.
fn logits(model: &mut Model, tokens: &[u32], slots: Slots) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(N_CTX).unwrap();
    let mut batch = Batch::new();
    batch.add_sequence(tokens, 0, 0, true);
    batch.set_slots(0, slots);
    let out = model.decode(&mut cache, &batch).unwrap();
    rows(&out).into_iter().map(<[f32]>::to_vec).collect()
}

const LORA: Slots = Slots { svfit: 0, lora: 1 };

#[test]
fn a_served_peft_lora_is_its_merge_and_llama_cpp_running_it() {
    let _machine = crate::common::shared();
    let (dir, model_path) = common::tiny_model();
    let (peft, gguf) = (dir.path().join("peft"), dir.path().join("lora.gguf"));
    write_loras(&peft, &gguf, 11);
    let lora = served(&model_path, &peft);
    let mut model = load(&model_path);
    model.attach_lora(&kinds(&lora), RANK, 2).unwrap();
    model.set_lora(1, &lora).unwrap();

    let tokens = Rng::new(4).tokens(80, common::TINY.n_vocab);
    let ours = logits(&mut model, &tokens, LORA);
    let plain = logits(&mut model, &tokens, Slots::default());

    // The merge (f32) run by our engine, and llama.cpp with the GGUF LoRA.
    let merged_path = dir.path().join("merged.gguf");
    let base = GgufFile::open(&model_path).unwrap();
    let read = Lora::read(&peft, &base).unwrap();
    merge_lora(&model_path, &read, MergeType::F32, &[], &merged_path).unwrap();
    let merged = logits(&mut load(&merged_path), &tokens, Slots::default());
    let theirs = llama_cpp(&model_path, Some(&gguf), &tokens);
    let (m, l, moved) = (
        agreement(&ours, &merged),
        agreement(&ours, &theirs),
        agreement(&ours, &plain),
    );
    eprintln!("served LoRA vs its merge: {m:?}; vs llama.cpp with it: {l:?}; it moves {moved:?}");
    for (what, a) in [("the merge", &m), ("llama.cpp", &l)] {
        assert!(
            a.top1 >= 0.98,
            "{what}: top-1 agrees at {:.1}%",
            100.0 * a.top1
        );
        assert!(a.mean_abs_rel < 2e-2, "{what}: {a:?}");
        assert!(
            moved.mean_abs_rel > 5.0 * a.mean_abs_rel,
            "{what}: {moved:?} against {a:?}"
        );
    }

    // The same LoRA as a GGUF LoRA is the same served LoRA.
    let from_gguf = served(&model_path, &gguf);
    model.set_lora(1, &from_gguf).unwrap();
    assert_eq!(logits(&mut model, &tokens, LORA), ours);

    // 32 greedy tokens, as llama.cpp with the LoRA.
    let prompt = &tokens[..24];
    let mut cache = model.new_cache(N_CTX).unwrap();
    let mine = greedy_tokens(
        &mut |b| model.decode(&mut cache, b).unwrap(),
        prompt,
        LORA,
        32,
    );
    let mut reference = common::reference(&model_path);
    let mut adapter = reference.lora(&gguf).unwrap();
    let mut session = reference.session(N_CTX, 1, THREADS).unwrap();
    session.apply_lora(&mut adapter).unwrap();
    let theirs = greedy_tokens(&mut |b| session.decode(b).unwrap(), prompt, LORA, 32);
    assert_eq!(mine, theirs, "greedy tokens with the LoRA");
}

#[test]
fn base_svfit_and_lora_tokens_batched_equal_each_alone() {
    let _machine = crate::common::shared();
    let (dir, model_path) = common::tiny_model();
    let (peft, gguf) = (dir.path().join("peft"), dir.path().join("lora.gguf"));
    write_loras(&peft, &gguf, 12);
    let lora = served(&model_path, &peft);
    let key = svfit::factors::FactorsKey::for_model(&model_path, "q,v,down", "energy:0.99", "f16")
        .unwrap();
    let path = svfit::factors::ensure(&model_path, &key, &dir.path().join("home")).unwrap();
    let factors = svfit::factors::read_factors(&path, &key).unwrap();
    let singular = svfit::factors::read_singular_values(&path, &key).unwrap();
    let adapter = Adapter::perturbed(&key, &singular, 0.2, 3);

    let mut model = load(&model_path);
    model.attach_factors(&factors, 2, Type::Q8_0).unwrap();
    model.set_adapter(1, &adapter.deltas(&singular)).unwrap();
    // Rank 8 tables: the LoRA's rank 4 padded with zeros.
    model.attach_lora(&kinds(&lora), 2 * RANK, 2).unwrap();
    model.set_lora(1, &lora).unwrap();

    let mut rng = Rng::new(9);
    let cases = [
        (Slots::default(), rng.tokens(30, common::TINY.n_vocab)),
        (
            Slots { svfit: 1, lora: 0 },
            rng.tokens(41, common::TINY.n_vocab),
        ),
        (LORA, rng.tokens(25, common::TINY.n_vocab)),
        (
            Slots { svfit: 1, lora: 1 },
            rng.tokens(37, common::TINY.n_vocab),
        ),
    ];
    let alone: Vec<Vec<Vec<f32>>> = cases
        .iter()
        .map(|(slots, tokens)| logits(&mut model, tokens, *slots))
        .collect();
    // Each moves the logits: the branches are on.
    for (i, a) in alone.iter().enumerate().skip(1) {
        let base = logits(&mut model, &cases[i].1, Slots::default());
        assert_ne!(*a, base, "case {i} equals the base");
    }

    // All four in one batch, their tokens interleaved.
    let mut cache = model.new_cache(4 * N_CTX).unwrap();
    let mut batch = Batch::new();
    let longest = cases.iter().map(|c| c.1.len()).max().unwrap();
    for pos in 0..longest {
        for (seq, (_, tokens)) in cases.iter().enumerate() {
            if let Some(&t) = tokens.get(pos) {
                batch.add(t, pos, seq as u32, true);
            }
        }
    }
    for (seq, (slots, _)) in cases.iter().enumerate() {
        batch.set_slots(seq as u32, *slots);
    }
    let out = model.decode(&mut cache, &batch).unwrap();
    let out = rows(&out);
    let mut row = 0;
    let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); cases.len()];
    for pos in 0..longest {
        for (seq, (_, tokens)) in cases.iter().enumerate() {
            if pos < tokens.len() {
                together[seq].push(out[row].to_vec());
                row += 1;
            }
        }
    }
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert!(
            t == a,
            "case {i} ({:?}): batched differs from alone",
            cases[i].0
        );
    }
}

/// Every family the engine runs serves a LoRA as llama.cpp runs it: an
/// SVFit adapter of every linear matrix exported as a GGUF LoRA (exact),
/// served through the LoRA branch, against llama.cpp with `--lora`; on
/// Phi-3 the LoRA's fused `attn_qkv` and `ffn_up` are cut per matrix.
#[test]
fn every_family_serves_a_lora_as_llama_cpp_runs_it() {
    use svfit::model::{random, Arch, SUPPORTED_ARCHITECTURES};
    let _machine = crate::common::shared();
    for name in SUPPORTED_ARCHITECTURES {
        let arch = Arch::from_name(name).unwrap();
        let dir = common::temp_dir("lora-family");
        let model_path = dir.path().join("model.gguf");
        common::write_tiny_model(&model_path, &random::Shape::tiny(arch));
        let key =
            svfit::factors::FactorsKey::for_model(&model_path, "all-linear", "energy:0.99", "f16")
                .unwrap();
        let path = svfit::factors::ensure(&model_path, &key, &dir.path().join("home")).unwrap();
        let factors = svfit::factors::read_factors(&path, &key).unwrap();
        let singular = svfit::factors::read_singular_values(&path, &key).unwrap();
        let deltas = Adapter::perturbed(&key, &singular, 0.05, 2).deltas(&singular);
        let gguf = dir.path().join("lora.gguf");
        svfit::lora::export(
            &model_path,
            &factors,
            &deltas,
            svfit::lora::Format::GgufLora,
            None,
            &gguf,
        )
        .unwrap();
        let lora = served(&model_path, &gguf);
        let rank = lora.iter().map(|(_, u)| u.rank).max().unwrap();
        let mut model = load(&model_path);
        model.attach_lora(&kinds(&lora), rank, 2).unwrap();
        model.set_lora(1, &lora).unwrap();

        let tokens = Rng::new(5).tokens(60, common::TINY.n_vocab);
        let ours = logits(&mut model, &tokens, LORA);
        let plain = logits(&mut model, &tokens, Slots::default());
        let theirs = llama_cpp(&model_path, Some(&gguf), &tokens);
        let (a, moved) = (agreement(&ours, &theirs), agreement(&ours, &plain));
        eprintln!(
            "{}: served LoRA vs llama.cpp {a:?}; it moves {moved:?}",
            arch.name()
        );
        assert!(
            a.top1 >= 0.98,
            "{}: top-1 {:.1}%",
            arch.name(),
            100.0 * a.top1
        );
        assert!(a.mean_abs_rel < 2e-2, "{}: {a:?}", arch.name());
        assert!(
            moved.mean_abs_rel > 2.5 * a.mean_abs_rel.max(1e-4),
            "{}: {moved:?} against {a:?}",
            arch.name()
        );
    }
}
