//! The `svfit` binary as a user runs it: answers, files it writes, and the
//! one-line errors bad input gets (non-zero exit, no panic).

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{temp_dir, Shape, TINY};
use svfit::ggml::gguf::GgufWriter;
use svfit::ggml::Type;
use svfit::model::Arch;

fn svfit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(args)
        .env_remove("SVFIT_MODEL")
        .output()
        .expect("run svfit")
}

/// Asserts a clean failure: non-zero exit, one `error:` line naming `cause`.
fn assert_fails_with(out: &Output, cause: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(cause),
        "error should name '{cause}': {stderr}"
    );
}

fn generate_with(model: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    svfit(&args)
}

#[test]
fn truncated_gguf_is_refused() {
    let _machine = crate::common::shared();
    let (dir, tiny) = common::tiny_model();
    let bytes = std::fs::read(&tiny).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert_fails_with(&generate_with(&cut, &["--prompt", "hi"]), "truncated");
    // Cut inside the header too.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    assert_fails_with(&generate_with(&cut, &["--prompt", "hi"]), "not a GGUF file");
}

#[test]
fn non_gguf_file_is_refused() {
    let _machine = crate::common::shared();
    let dir = temp_dir("notgguf");
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, "this is a text file, not a model\n").unwrap();
    assert_fails_with(
        &generate_with(&path, &["--prompt", "hi"]),
        "not a GGUF file",
    );
    let missing = dir.path().join("missing.gguf");
    assert_fails_with(
        &generate_with(&missing, &["--prompt", "hi"]),
        "does not exist",
    );
}

#[test]
fn unsupported_architecture_is_refused() {
    let _machine = crate::common::shared();
    let dir = temp_dir("arch");
    let path = dir.path().join("gpt2.gguf");
    common::write_tiny_model(
        &path,
        &Shape {
            arch: "gpt2",
            ..TINY
        },
    );
    assert_fails_with(
        &generate_with(&path, &["--prompt", "hi"]),
        "unsupported architecture 'gpt2'",
    );
}

/// The tiny model with one thing added (`edit`) that the engine does not
/// compute, at `path`.
fn tiny_with(path: &Path, edit: impl FnOnce(&mut GgufWriter)) {
    let plain = path.with_extension("plain.gguf");
    common::write_tiny_model(&plain, &TINY);
    common::rewrite(&plain, path, |_| true, edit);
}

/// Every tensor and key of a llama file that the engine does not compute
/// as llama.cpp would (another family's q/k or post norms, fused q/k/v,
/// YaRN, sliding windows and soft-capping, which llama.cpp reads only for
/// Gemma, value heads of another width, experts, unknown keys, an adapter
/// file), and every tensor or key it reads with a wrong shape or value,
/// fails `generate`, `factorize`, `merge`, `train` and `serve` with one
/// line naming it, and nothing is written or served.
#[test]
fn files_the_engine_does_not_fully_understand_are_refused() {
    let _machine = crate::common::shared();
    let dir = temp_dir("understand");
    let head = (TINY.n_embd / TINY.n_head) as u32;
    let kv = TINY.n_embd / TINY.n_head * TINY.n_head_kv;
    type Edit = Box<dyn FnOnce(&mut GgufWriter)>;
    let zeros = |n: usize| vec![0.0f32; n];
    let tensor = |name: &'static str, n: usize| -> Edit {
        Box::new(move |w| common::add_f32(w, name, &zeros(n)))
    };
    let cases: Vec<(&str, Edit)> = vec![
        ("blk.0.attn_q.bias", tensor("blk.0.attn_q.bias", kv)),
        (
            "blk.1.attn_k.bias",
            tensor("blk.1.attn_k.bias", TINY.n_embd),
        ),
        (
            "blk.0.ffn_down.bias",
            tensor("blk.0.ffn_down.bias", TINY.n_ff),
        ),
        (
            "blk.0.post_attention_norm.weight",
            tensor("blk.0.post_attention_norm.weight", TINY.n_embd),
        ),
        (
            "blk.0.attn_qkv.weight",
            tensor("blk.0.attn_qkv.weight", TINY.n_embd),
        ),
        (
            "blk.0.attn_q_norm.weight",
            tensor("blk.0.attn_q_norm.weight", head as usize),
        ),
        (
            "blk.0.attn_k_norm.weight",
            tensor("blk.0.attn_k_norm.weight", head as usize),
        ),
        ("rope_freqs.weight", tensor("rope_freqs.weight", 3)),
        ("output.weight", tensor("output.weight", TINY.n_embd)),
        (
            "llama.rope.scaling.type = yarn",
            Box::new(|w| w.set_str("llama.rope.scaling.type", "yarn").unwrap()),
        ),
        (
            "llama.rope.scaling.factor = -2",
            Box::new(|w| w.set_f32("llama.rope.scaling.factor", -2.0).unwrap()),
        ),
        (
            "llama.attention.sliding_window",
            Box::new(|w| w.set_u32("llama.attention.sliding_window", 32).unwrap()),
        ),
        (
            "llama.attn_logit_softcapping",
            Box::new(|w| w.set_f32("llama.attn_logit_softcapping", 50.0).unwrap()),
        ),
        (
            "llama.final_logit_softcapping",
            Box::new(|w| w.set_f32("llama.final_logit_softcapping", 30.0).unwrap()),
        ),
        (
            // Heads of 32, but RoPE over 16 of their dims.
            "llama.rope.dimension_count = 16",
            Box::new(move |w| w.set_u32("llama.attention.key_length", 2 * head).unwrap()),
        ),
        (
            "llama.attention.value_length = 32",
            Box::new(move |w| w.set_u32("llama.attention.value_length", 2 * head).unwrap()),
        ),
        (
            "llama.expert_count = 8",
            Box::new(|w| w.set_u32("llama.expert_count", 8).unwrap()),
        ),
        (
            "llama.embedding_scale",
            Box::new(|w| w.set_f32("llama.embedding_scale", 12.0).unwrap()),
        ),
        (
            "general.type = adapter",
            Box::new(|w| w.set_str("general.type", "adapter").unwrap()),
        ),
    ];
    let home = dir.path().join("home");
    for (i, (name, edit)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("case{i}.gguf"));
        tiny_with(&path, edit);
        let model = path.to_str().unwrap();
        assert_fails_with(&generate_with(&path, &["--prompt", "hi"]), name);
        let out = dir.path().join(format!("case{i}.out.gguf"));
        let out_arg = out.to_str().unwrap();
        let data = dir.path().join("none.jsonl");
        let commands: [&[&str]; 5] = [
            &["factorize", "--model", model],
            &[
                "merge",
                "--model",
                model,
                "--adapter",
                "none.safetensors",
                "--out",
                out_arg,
            ],
            &["convert", "--model", model, "--out", out_arg],
            &[
                "train",
                "--model",
                model,
                "--data",
                data.to_str().unwrap(),
                "--out",
                out_arg,
            ],
            &[
                "serve",
                "--model",
                model,
                "--addr",
                "127.0.0.1:0",
                "--http-addr",
                "none",
            ],
        ];
        assert_all_refuse(&commands, &home, name, &out);
    }
    assert!(
        !home.join("factors").exists(),
        "factors were computed for a refused file"
    );
}

/// Every one of `commands` fails with one line naming `cause` and writes
/// nothing at `out`. A server that did start would run on: `timeout` ends
/// it.
fn assert_all_refuse(commands: &[&[&str]], home: &Path, cause: &str, out: &Path) {
    for args in commands {
        let result = Command::new("timeout")
            .args(["120", env!("CARGO_BIN_EXE_svfit")])
            .args(*args)
            .env("SVFIT_HOME", home)
            .output()
            .unwrap();
        assert_fails_with(&result, cause);
        assert!(!out.exists(), "svfit {args:?} wrote {}", out.display());
    }
}

/// How a family's tiny model is broken: a tensor dropped, then `edit`
/// (keys set, tensors added in their place).
struct Broken {
    arch: Arch,
    /// What the one error line must name.
    names: &'static str,
    drop: Option<&'static str>,
    edit: Box<dyn FnOnce(&mut GgufWriter)>,
}

impl Broken {
    fn new(arch: Arch, names: &'static str, edit: impl FnOnce(&mut GgufWriter) + 'static) -> Self {
        Broken {
            arch,
            names,
            drop: None,
            edit: Box::new(edit),
        }
    }

    /// `names` left out of the file.
    fn missing(arch: Arch, names: &'static str) -> Self {
        Broken {
            drop: Some(names),
            ..Broken::new(arch, names, |_| {})
        }
    }

    /// The vector `names` replaced by one of `len` values of type `ty`.
    fn vector(arch: Arch, names: &'static str, ty: Type, len: usize) -> Self {
        let mut broken = Broken::missing(arch, names);
        broken.edit = Box::new(move |w| {
            let bytes = vec![0u8; ty.row_size(len as i64).unwrap()];
            w.add_tensor(names, ty, &[len as i64], bytes).unwrap();
        });
        broken
    }

    /// The matrix `names` replaced by an f32 one of ggml shape `ne`.
    fn matrix(arch: Arch, names: &'static str, ne: [usize; 2]) -> Self {
        let mut broken = Broken::missing(arch, names);
        broken.edit = Box::new(move |w| {
            let bytes = vec![0u8; 4 * ne[0] * ne[1]];
            let shape = [ne[0] as i64, ne[1] as i64];
            w.add_tensor(names, Type::F32, &shape, bytes).unwrap();
        });
        broken
    }

    fn write(self, path: &Path) -> &'static str {
        let plain = path.with_extension("plain.gguf");
        common::write_tiny_model(&plain, &Shape::tiny(self.arch));
        let drop = self.drop;
        common::rewrite(&plain, path, |name| drop != Some(name), self.edit);
        self.names
    }
}

/// Files of qwen2, qwen3, gemma3 and phi3 whose own tensors are missing,
/// mis-shaped or stored in a type the engine does not add in (a norm in
/// f16), or whose keys contradict each other or hold values no model has
/// (key and value heads of different widths, a per-layer window pattern,
/// a negative RoPE factor, window or RMSNorm epsilon, a RoPE base of 0, a
/// soft-cap as text, a head wider than any file can hold, more layers than
/// the file has tensors; for phi3 a missing or mis-shaped fused q/k/v or
/// gate/up, a separate gate, LongRoPE factors, q narrower than the
/// embedding, a sliding window as text): `generate`, `factorize` and
/// `merge` each fail with one line naming the tensor or key, and nothing
/// is written.
#[test]
fn broken_files_of_every_family_are_refused() {
    let _machine = crate::common::shared();
    let dir = temp_dir("families");
    let (qwen2, qwen3, gemma3, phi3) = (Arch::Qwen2, Arch::Qwen3, Arch::Gemma3, Arch::Phi3);
    let (e, head) = (TINY.n_embd, TINY.n_embd / TINY.n_head);
    let cases = [
        Broken::vector(qwen2, "blk.0.attn_q.bias", Type::F32, head),
        Broken::vector(qwen2, "blk.1.attn_v.bias", Type::F16, 2 * head),
        Broken::new(qwen2, "qwen2.vocab_size", |w| {
            w.set_u32("qwen2.vocab_size", 100).unwrap()
        }),
        Broken::missing(qwen3, "blk.0.attn_q_norm.weight"),
        Broken::vector(qwen3, "blk.1.attn_k_norm.weight", Type::F32, e),
        Broken::vector(qwen3, "blk.0.attn_q_norm.weight", Type::F16, head),
        Broken::new(qwen3, "qwen3.rope.dimension_count", |w| {
            w.set_u32("qwen3.rope.dimension_count", 8).unwrap()
        }),
        Broken::missing(gemma3, "blk.0.attn_q_norm.weight"),
        Broken::missing(gemma3, "blk.1.post_ffw_norm.weight"),
        Broken::vector(gemma3, "blk.0.attn_k_norm.weight", Type::F32, head),
        Broken::vector(gemma3, "blk.1.post_attention_norm.weight", Type::F16, e),
        Broken::new(gemma3, "gemma3.attention.value_length", |w| {
            w.set_u32("gemma3.attention.value_length", 16).unwrap()
        }),
        Broken::new(gemma3, "gemma3.attention.sliding_window_pattern", |w| {
            w.set_bool_array("gemma3.attention.sliding_window_pattern", &[true, false])
                .unwrap()
        }),
        Broken::new(gemma3, "gemma3.rope.scaling.factor", |w| {
            w.set_f32("gemma3.rope.scaling.factor", -2.0).unwrap()
        }),
        Broken::new(gemma3, "gemma3.rope.freq_base_swa", |w| {
            w.set_f32("gemma3.rope.freq_base_swa", 0.0).unwrap()
        }),
        Broken::new(gemma3, "gemma3.attention.sliding_window", |w| {
            w.set_i64("gemma3.attention.sliding_window", -16).unwrap()
        }),
        Broken::new(gemma3, "gemma3.final_logit_softcapping", |w| {
            w.set_str("gemma3.final_logit_softcapping", "30").unwrap()
        }),
        Broken::new(gemma3, "gemma3.attention.key_length", |w| {
            w.set_u64("gemma3.attention.key_length", 1 << 62).unwrap()
        }),
        Broken::new(qwen3, "qwen3.block_count", |w| {
            w.set_u32("qwen3.block_count", u32::MAX).unwrap()
        }),
        Broken::new(qwen2, "qwen2.attention.layer_norm_rms_epsilon", |w| {
            w.set_f32("qwen2.attention.layer_norm_rms_epsilon", -1e-6)
                .unwrap()
        }),
        Broken::missing(phi3, "blk.0.attn_qkv.weight"),
        // q, k and v of equal widths (no GQA), and llama's ffn_up (no gate).
        Broken::matrix(phi3, "blk.1.attn_qkv.weight", [e, 3 * e]),
        Broken::matrix(phi3, "blk.0.ffn_up.weight", [e, TINY.n_ff]),
        Broken::vector(phi3, "blk.1.attn_qkv.bias", Type::F32, e),
        Broken::new(phi3, "blk.0.ffn_gate.weight", move |w| {
            let bytes = vec![0u8; 4 * e * TINY.n_ff];
            let shape = [e as i64, TINY.n_ff as i64];
            w.add_tensor("blk.0.ffn_gate.weight", Type::F32, &shape, bytes)
                .unwrap()
        }),
        Broken::new(phi3, "rope_factors_long.weight", move |w| {
            common::add_f32(w, "rope_factors_long.weight", &vec![1.0; head / 2])
        }),
        // Heads of 8 (RoPE's too): q 32 wide, Phi-3's attention 64.
        Broken::new(phi3, "phi3.attention.key_length", |w| {
            w.set_u32("phi3.attention.key_length", 8).unwrap();
            w.set_u32("phi3.rope.dimension_count", 8).unwrap()
        }),
        Broken::new(phi3, "phi3.attention.sliding_window", |w| {
            w.set_str("phi3.attention.sliding_window", "2047").unwrap()
        }),
    ];
    let home = dir.path().join("home");
    for (i, case) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("case{i}.gguf"));
        let names = case.write(&path);
        let (model, out) = (path.to_str().unwrap(), dir.path().join("out.gguf"));
        let commands: [&[&str]; 3] = [
            &["generate", "--model", model, "--prompt", "hi"],
            &["factorize", "--model", model],
            &[
                "merge",
                "--model",
                model,
                "--adapter",
                "none.safetensors",
                "--out",
                out.to_str().unwrap(),
            ],
        ];
        assert_all_refuse(&commands, &home, names, &out);
    }
    assert!(
        !home.join("factors").exists(),
        "factors were computed for a refused file"
    );
}

#[test]
fn model_without_tokenizer_is_refused_for_text() {
    let _machine = crate::common::shared();
    let (_dir, tiny) = common::tiny_model();
    assert_fails_with(&generate_with(&tiny, &["--prompt", "hi"]), "no tokenizer");
}

#[test]
fn prompt_longer_than_context_is_refused() {
    let _machine = crate::common::shared();
    let model = common::default_model();
    let long = "word ".repeat(100);
    let out = generate_with(&model, &["--ctx", "32", "--prompt", &long]);
    assert_fails_with(&out, "context holds 32");
    let out = svfit(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ctx",
        "32",
        "--text",
        &long,
        "--out",
        "/dev/null",
    ]);
    assert_fails_with(&out, "context holds 32");
}

#[test]
fn greedy_chat_answers_paris() {
    let _machine = crate::common::shared();
    let model = common::default_model();
    let args = [
        "--chat",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ];
    let first = generate_with(&model, &args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let answer = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(answer.contains("Paris"), "answer: {answer}");
    let second = generate_with(&model, &args);
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        answer,
        "greedy is deterministic"
    );
    // The default --weights (auto) is keep: the file as stored.
    let keep = generate_with(&model, &[&args[..], &["--weights", "keep"]].concat());
    assert_eq!(
        String::from_utf8_lossy(&keep.stdout),
        answer,
        "--weights keep"
    );
}

#[test]
fn logits_file_has_every_position() {
    let _machine = crate::common::shared();
    let model = common::default_model();
    let dir = temp_dir("logits");
    let (out, ids) = (dir.path().join("l.npy"), dir.path().join("ids.npy"));
    let text = "<|im_start|>user\nHi<|im_end|>\n";
    let run = svfit(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text,
        "--out",
        out.to_str().unwrap(),
        "--ids-out",
        ids.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (shape, logits) = read_npy(&out, "<f4");
    let (id_shape, id_bytes) = read_npy(&ids, "<i4");
    let ids: Vec<i32> = id_bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(shape, vec![ids.len(), 49152]);
    assert_eq!(id_shape, vec![ids.len()]);
    // Special tokens are parsed (one id each) and no BOS is added for this model.
    assert_eq!(ids.first(), Some(&1), "<|im_start|> is token 1: {ids:?}");
    assert!(ids.len() < 10, "{ids:?}");
    assert_eq!(logits.len(), ids.len() * 49152 * 4);
}

/// Reads a v1 .npy file: (shape, raw data), checking the dtype.
fn read_npy(path: &Path, descr: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains(&format!("'descr': '{descr}'")), "{header}");
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = shape_text
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    (shape, bytes[10 + len..].to_vec())
}

/// `svfit check` on the CPU (what `scripts/gpu-check --cpu` runs): every
/// step runs and passes, the report lands as JSON, the metadata file carries
/// the tokenizer to a random model, and a device that is not there is a
/// one-line error.
#[test]
fn check_runs_every_step_on_the_cpu() {
    let _machine = crate::common::shared();
    let dir = temp_dir("check");
    let home = dir.path().join("home");
    let meta = dir.path().join("metadata.gguf");
    let model = common::default_model();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_svfit"))
            .args(args)
            .env("SVFIT_HOME", &home)
            .output()
            .expect("run svfit")
    };
    let out = run(&[
        "check",
        "--model",
        model.to_str().unwrap(),
        "--write-metadata",
        meta.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&meta).unwrap().len() < 4 << 20,
        "the metadata file holds weights"
    );

    let json = dir.path().join("report.json");
    let kept = dir.path().join("tiny.gguf");
    let out = run(&[
        "check",
        "--model",
        meta.to_str().unwrap(),
        "--random",
        "tiny",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--train-secs",
        "0.5",
        "--keep-model",
        kept.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let steps: Vec<(&str, &serde_json::Value)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), &s["pass"]))
        .collect();
    let names: Vec<&str> = steps.iter().map(|s| s.0).collect();
    assert_eq!(
        names,
        [
            "parity",
            "adapter",
            "batch",
            "lora",
            "gradient",
            "train",
            "placement"
        ]
    );
    for (name, pass) in &steps {
        assert_ne!(pass.as_bool(), Some(false), "{name} failed: {stdout}");
    }
    // The kept model speaks the default model's tokenizer.
    let out = run(&[
        "generate",
        "--model",
        kept.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "3",
        "--threads",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_fails_with(
        &run(&[
            "check",
            "--model",
            kept.to_str().unwrap(),
            "--device",
            "nosuchdevice",
        ]),
        "nosuchdevice",
    );
}

/// `svfit check --random tiny --arch X --write-model M` for every family:
/// a random model of the family's tensors and keys with the default
/// model's tokenizer, which `generate` runs; an unknown family is a
/// one-line error naming the supported list. (The check's steps on such a
/// model: `check_runs_every_step_on_the_cpu`, on llama.)
#[test]
fn check_writes_a_random_model_of_every_family() {
    let _machine = crate::common::shared();
    let dir = temp_dir("check-arch");
    let model = common::default_model();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_svfit"))
            .args(args)
            .env("SVFIT_HOME", dir.path())
            .output()
            .expect("run svfit")
    };
    let write = |arch: &str, out: &Path| {
        run(&[
            "check",
            "--model",
            model.to_str().unwrap(),
            "--random",
            "tiny",
            "--arch",
            arch,
            "--write-model",
            out.to_str().unwrap(),
        ])
    };
    for &arch in svfit::model::SUPPORTED_ARCHITECTURES {
        let path = dir.path().join(format!("{arch}.gguf"));
        let out = write(arch, &path);
        assert!(
            out.status.success(),
            "--arch {arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gguf = svfit::ggml::gguf::GgufFile::open(&path).unwrap();
        let config = svfit::model::understand(&gguf).unwrap();
        assert_eq!(config.arch.name(), arch);
        assert_eq!(config.n_vocab, 49152, "the default model's vocabulary");
        let out = generate_with(&path, &["--prompt", "Hello", "--max-tokens", "3"]);
        assert!(
            out.status.success(),
            "generate on {arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = dir.path().join("gpt2.gguf");
    assert_fails_with(
        &write("gpt2", &path),
        "unsupported architecture (supported: llama, qwen2, qwen3, gemma2, gemma3, phi3)",
    );
    assert!(!path.exists());
}
