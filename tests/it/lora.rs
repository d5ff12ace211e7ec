//! LoRA in (`svfit merge --lora`), on the tiny llama (q and k rows
//! permuted per head in its GGUF, as llama.cpp's converter writes them):
//! - a PEFT LoRA written here, with Hugging Face's names, row order and
//!   scale (alpha / r), merged by svfit, runs in llama.cpp as llama.cpp runs
//!   the base with the same LoRA as a GGUF LoRA (written here too, its q and
//!   k rows permuted by this file's own copy of the converter's `permute`);
//! - exports read back: an adapter exported as PEFT or GGUF LoRA and merged
//!   as a LoRA is the adapter merged, to f32 rounding;
//! - bad LoRAs are refused naming the problem, and nothing is written.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::adapter::svfit;
use common::{compare, rows, Rng};
use svfit::ggml::gguf::{GgufFile, GgufWriter};
use svfit::ggml::Type;
use svfit::lora::{export, Format, Lora};
use svfit::merge::{merge, merge_lora, MergeType};
use svfit::model::Batch;
use svfit::tensorfile::Entry;

pub(super) const RANK: usize = 4;
pub(super) const ALPHA: f32 = 8.0;

/// The modules of the test LoRA: (Hugging Face module, GGUF kind, m, n).
fn modules() -> Vec<(&'static str, &'static str, usize, usize)> {
    let (e, kv, ff) = (64, 32, 128);
    vec![
        ("self_attn.q_proj", "attn_q", e, e),
        ("self_attn.k_proj", "attn_k", kv, e),
        ("self_attn.v_proj", "attn_v", kv, e),
        ("self_attn.o_proj", "attn_output", e, e),
        ("mlp.gate_proj", "ffn_gate", ff, e),
        ("mlp.down_proj", "ffn_down", e, ff),
    ]
}

/// llama.cpp's converter's `permute(w, n_head)`:
/// `w.reshape(n_head, 2, m / n_head / 2, cols).swapaxes(1, 2).reshape(m, cols)`.
fn converter_permute(w: &[f32], m: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = m / n_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let row = (h * 2 + s) * half + i;
                out.extend_from_slice(&w[row * cols..(row + 1) * cols]);
            }
        }
    }
    out
}

/// A random LoRA as PEFT writes it (directory `peft`) and as a GGUF LoRA
/// (`gguf`), both for the tiny llama's two layers.
pub(super) fn write_loras(peft: &Path, gguf: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut entries = Vec::new();
    let mut w = GgufWriter::new(64).unwrap();
    w.set_str("general.architecture", "llama").unwrap();
    w.set_str("general.type", "adapter").unwrap();
    w.set_str("adapter.type", "lora").unwrap();
    w.set_f32("adapter.lora.alpha", ALPHA).unwrap();
    for layer in 0..2 {
        for (module, kind, m, n) in modules() {
            let mut values = |count: usize, scale: f32| -> Vec<f32> {
                (0..count).map(|_| scale * rng.normal()).collect()
            };
            let a = values(RANK * n, 1.0 / (n as f32).sqrt());
            let b = values(m * RANK, 0.05);
            let key = format!("base_model.model.model.layers.{layer}.{module}");
            entries.push(Entry::f32(
                format!("{key}.lora_A.weight"),
                vec![RANK, n],
                &a,
            ));
            entries.push(Entry::f32(
                format!("{key}.lora_B.weight"),
                vec![m, RANK],
                &b,
            ));
            let heads = match kind {
                "attn_q" => Some(4),
                "attn_k" => Some(2),
                _ => None,
            };
            let b = match heads {
                Some(h) => converter_permute(&b, m, RANK, h),
                None => b,
            };
            let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let name = format!("blk.{layer}.{kind}.weight");
            w.add_tensor(
                &format!("{name}.lora_a"),
                Type::F32,
                &[n as i64, RANK as i64],
                bytes(&a),
            )
            .unwrap();
            w.add_tensor(
                &format!("{name}.lora_b"),
                Type::F32,
                &[RANK as i64, m as i64],
                bytes(&b),
            )
            .unwrap();
        }
    }
    w.write(gguf).unwrap();
    std::fs::create_dir_all(peft).unwrap();
    svfit::tensorfile::write(
        &peft.join("adapter_model.safetensors"),
        &entries,
        HashMap::new(),
    )
    .unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        "lora_dropout": 0.0, "bias": "none", "use_rslora": false, "fan_in_fan_out": false,
    });
    std::fs::write(peft.join("adapter_config.json"), config.to_string()).unwrap();
}

/// llama.cpp's logits of `tokens` on `model`, with `lora` applied if any.
pub(super) fn llama_cpp(model: &Path, lora: Option<&Path>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut reference = common::reference(model);
    let mut adapter = lora.map(|l| reference.lora(l).unwrap());
    let mut session = reference.session(256, 1, 2).unwrap();
    if let Some(adapter) = &mut adapter {
        session.apply_lora(adapter).unwrap();
    }
    let mut batch = Batch::new();
    batch.add_sequence(tokens, 0, 0, true);
    let out = session.decode(&batch).unwrap();
    rows(&out).into_iter().map(<[f32]>::to_vec).collect()
}

pub(super) fn agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> common::Agreement {
    fn view(x: &[Vec<f32>]) -> Vec<&[f32]> {
        x.iter().map(Vec::as_slice).collect()
    }
    compare(&view(a), &view(b))
}

/// Every tensor of two GGUF files as f32: the largest difference relative
/// to the largest value of its tensor.
fn max_rel_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (GgufFile::open(a).unwrap(), GgufFile::open(b).unwrap());
    let mut worst = 0f32;
    for info in a.tensors() {
        let x = svfit::factors::read_matrix(&a, &info.name);
        let y = svfit::factors::read_matrix(&b, &info.name);
        let (Ok((x, ..)), Ok((y, ..))) = (x, y) else {
            continue;
        };
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        for (x, y) in x.iter().zip(&y) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    worst
}

#[test]
fn a_peft_lora_merges_as_llama_cpp_runs_it() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    let (peft, gguf) = (dir.path().join("peft"), dir.path().join("lora.gguf"));
    write_loras(&peft, &gguf, 7);
    let base = GgufFile::open(&model).unwrap();
    let lora = Lora::read(&peft, &base).unwrap();
    assert_eq!(lora.updates.len(), 12);
    assert_eq!(
        lora.updates["blk.1.attn_k.weight"].scale,
        ALPHA / RANK as f32
    );
    let merged = dir.path().join("merged.gguf");
    assert_eq!(
        merge_lora(&model, &lora, MergeType::F32, &[], &merged).unwrap(),
        12
    );

    let tokens = common::Rng::new(3).tokens(80, common::TINY.n_vocab);
    let theirs = llama_cpp(&model, Some(&gguf), &tokens);
    let ours = llama_cpp(&merged, None, &tokens);
    let plain = llama_cpp(&model, None, &tokens);
    let a = agreement(&ours, &theirs);
    let moved = agreement(&theirs, &plain);
    eprintln!("merged PEFT LoRA vs llama.cpp with the GGUF LoRA: {a:?}; the LoRA moves {moved:?}");
    assert!(a.top1 >= 0.98, "top-1 agrees at {:.1}%", 100.0 * a.top1);
    assert!(a.mean_abs_rel < 2e-2, "{a:?}");
    assert!(
        moved.mean_abs_rel > 5.0 * a.mean_abs_rel,
        "{moved:?} against {a:?}"
    );

    // The GGUF LoRA merged by svfit is the same model.
    let from_gguf = dir.path().join("merged-gguf.gguf");
    let lora = Lora::read(&gguf, &base).unwrap();
    merge_lora(&model, &lora, MergeType::F32, &[], &from_gguf).unwrap();
    let d = max_rel_difference(&merged, &from_gguf);
    assert!(d < 1e-6, "{d}");
}

#[test]
fn exports_read_back_as_the_adapter() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    let key =
        svfit::factors::FactorsKey::for_model(&model, "all-linear", "energy:0.99", "f16").unwrap();
    let path = svfit::factors::ensure(&model, &key, &dir.path().join("home")).unwrap();
    let factors = svfit::factors::read_factors(&path, &key).unwrap();
    let singular = svfit::factors::read_singular_values(&path, &key).unwrap();
    let mut adapter = svfit::adapter::Adapter::identity(&key, &singular);
    adapter.perturb(&singular, 0.05, 5);
    let deltas = adapter.deltas(&singular);
    let merged = dir.path().join("merged.gguf");
    merge(&model, &factors, &deltas, MergeType::F32, &[], &merged).unwrap();
    let base = GgufFile::open(&model).unwrap();
    for (format, out) in [(Format::Peft, "peft"), (Format::GgufLora, "lora.gguf")] {
        let out = dir.path().join(out);
        export(&model, &factors, &deltas, format, None, &out).unwrap();
        let lora = Lora::read(&out, &base).unwrap();
        assert_eq!(lora.format, format);
        let again = dir.path().join("again.gguf");
        merge_lora(&model, &lora, MergeType::F32, &[], &again).unwrap();
        let d = max_rel_difference(&merged, &again);
        eprintln!("{format:?}: largest difference {d:.2e} of a tensor's largest value");
        assert!(d < 1e-5, "{format:?}: {d}");
    }
}

/// Copies the PEFT directory `from` to `to`, changing its weights with
/// `weights` and its config with `config`.
fn altered(
    from: &Path,
    to: &Path,
    weights: impl FnOnce(&mut Vec<Entry>),
    config: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    let bytes = std::fs::read(from.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| Entry {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            bytes: view.data().to_vec(),
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    weights(&mut entries);
    svfit::tensorfile::write(
        &to.join("adapter_model.safetensors"),
        &entries,
        HashMap::new(),
    )
    .unwrap();
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from.join("adapter_config.json")).unwrap()).unwrap();
    config(&mut c);
    std::fs::write(to.join("adapter_config.json"), c.to_string()).unwrap();
    to.to_path_buf()
}

#[test]
fn bad_loras_are_refused_by_name_and_nothing_is_written() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    let home = dir.path().join("home");
    let (peft, gguf) = (dir.path().join("peft"), dir.path().join("lora.gguf"));
    write_loras(&peft, &gguf, 9);
    let q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let set = |name: &'static str, shape: Vec<usize>, values: Vec<f32>| {
        move |e: &mut Vec<Entry>| {
            e.retain(|t| t.name != name);
            e.push(Entry::f32(name.into(), shape, &values));
        }
    };
    let keep = |_: &mut serde_json::Value| {};
    let same = |_: &mut Vec<Entry>| {};
    let at = |name: &str| dir.path().join(name);
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            altered(
                &peft,
                &at("rank0"),
                |e| {
                    set(q_a, vec![0, 64], vec![])(e);
                    set(q_b, vec![64, 0], vec![])(e);
                },
                |c| c["rank_pattern"] = serde_json::json!({"model.layers.0.self_attn.q_proj": 0}),
            ),
            "rank 0; a [64, 64] matrix takes 1 to 64",
        ),
        (
            altered(
                &peft,
                &at("rank-big"),
                |e| {
                    set(q_a, vec![65, 64], vec![0.0; 65 * 64])(e);
                    set(q_b, vec![64, 65], vec![0.0; 64 * 65])(e);
                },
                |c| c["rank_pattern"] = serde_json::json!({"model.layers.0.self_attn.q_proj": 65}),
            ),
            "rank 65; a [64, 64] matrix takes 1 to 64",
        ),
        (
            altered(
                &peft,
                &at("shape"),
                set(q_b, vec![32, RANK], vec![0.0; 32 * RANK]),
                keep,
            ),
            "the base matrix is [64, 64]",
        ),
        (
            altered(
                &peft,
                &at("layer"),
                |e| {
                    let renamed = |t: &mut Entry| t.name = t.name.replace("layers.1.", "layers.9.");
                    e.iter_mut().for_each(renamed);
                },
                keep,
            ),
            "layer 9: the model has 2",
        ),
        (
            altered(
                &peft,
                &at("module"),
                |e| {
                    let renamed =
                        |t: &mut Entry| t.name = t.name.replace("mlp.down_proj", "mlp.fc9");
                    e.iter_mut().for_each(renamed);
                },
                keep,
            ),
            "module 'mlp.fc9': not a matrix svfit maps",
        ),
        (
            altered(
                &peft,
                &at("nan"),
                set(q_a, vec![RANK, 64], {
                    let mut v = vec![0.1; RANK * 64];
                    v[17] = f32::NAN;
                    v
                }),
                keep,
            ),
            "blk.0.attn_q.weight: A value 17 is NaN",
        ),
        (
            altered(&peft, &at("config-rank"), same, |c| {
                c["r"] = serde_json::json!(8)
            }),
            "the config's rank is 8, lora_A has 4 rows",
        ),
        (
            altered(&peft, &at("dora"), same, |c| {
                c["use_dora"] = serde_json::json!(true)
            }),
            "use_dora true is not supported",
        ),
        (
            altered(&peft, &at("pair"), |e| e.retain(|t| t.name != q_b), keep),
            "lora_A and lora_B come in pairs",
        ),
        (
            altered(&peft, &at("json"), same, |c| *c = serde_json::json!("r")),
            "peft_type",
        ),
        (model.clone(), "not a LoRA"),
        (
            at("peft/adapter_config.json"),
            "neither a PEFT directory nor a GGUF LoRA",
        ),
        (at("missing"), "missing"),
    ];
    let out = at("out.gguf");
    for (lora, cause) in cases {
        let said = svfit(
            &home,
            &[
                "merge",
                "--model",
                model.to_str().unwrap(),
                "--lora",
                lora.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        let stderr = String::from_utf8_lossy(&said.stderr);
        assert!(!said.status.success(), "{lora:?} was taken");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(cause), "want '{cause}': {stderr}");
        assert!(!out.exists(), "{lora:?}: a merged file was written");
    }
    // A LoRA of another architecture.
    let other = at("gemma.gguf");
    let file = GgufFile::open(&gguf).unwrap();
    let mut w = GgufWriter::new(64).unwrap();
    w.copy_metadata_from(&file);
    w.set_str("general.architecture", "gemma3").unwrap();
    for info in file.tensors() {
        w.add_tensor(
            &info.name,
            info.ty,
            info.shape(),
            file.read_tensor_bytes(info).unwrap(),
        )
        .unwrap();
    }
    w.write(&other).unwrap();
    let err = Lora::read(&other, &GgufFile::open(&model).unwrap()).unwrap_err();
    assert!(err.to_string().contains("architecture 'gemma3'"), "{err}");
}
