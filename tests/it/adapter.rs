//! Adapter files on the tiny model: `svfit adapter init | perturb | inspect`
//! round-trip, and corrupt, truncated, wrong-base, wrong-rank and NaN-holding
//! adapters are refused with errors that name the cause.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use svfit::adapter::Adapter;

pub(crate) fn svfit(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(args)
        .env("SVFIT_HOME", home)
        .env_remove("SVFIT_MODEL")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: Output, cause: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a refusal naming '{cause}'");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(cause),
        "want '{cause}': {stderr}"
    );
}

#[test]
fn init_perturb_inspect_and_every_bad_adapter() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    let home = dir.path().join("home");
    let m = model.to_str().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (a, b) = (path("a.safetensors"), path("b.safetensors"));

    ok(svfit(
        &home,
        &[
            "adapter",
            "init",
            "--model",
            m,
            "--targets",
            "q,v",
            "--rank",
            "rank:8",
            "--out",
            &a,
        ],
    ));
    let identity = ok(svfit(&home, &["adapter", "inspect", &a, "--model", m]));
    assert!(identity.contains("blk.1.attn_v"), "{identity}");
    assert!(
        identity.contains(" 0.00000"),
        "identity has zero deltas: {identity}"
    );
    ok(svfit(
        &home,
        &[
            "adapter", "perturb", &a, "--scale", "0.05", "--seed", "1", "--out", &b, "--model", m,
        ],
    ));
    let perturbed = Adapter::read(Path::new(&b)).unwrap();
    let base = Adapter::read(Path::new(&a)).unwrap();
    assert_eq!(perturbed.sigma.len(), 4, "2 layers × q, v");
    for ((_, p), (_, s)) in perturbed.sigma.iter().zip(&base.sigma) {
        assert_eq!(p.len(), 8);
        let rel: f32 = p
            .iter()
            .zip(s)
            .map(|(x, y)| ((x - y) / y).abs())
            .sum::<f32>()
            / 8.0;
        assert!(rel > 0.005 && rel < 0.2, "deltas around 5% of S, got {rel}");
    }
    assert!(ok(svfit(&home, &["adapter", "inspect", &b, "--model", m])).contains("svfit.perturbed"));

    // Corrupt and truncated files.
    let bytes = std::fs::read(&b).unwrap();
    let bad = path("bad.safetensors");
    std::fs::write(&bad, b"not an adapter at all").unwrap();
    refused(
        svfit(&home, &["adapter", "inspect", &bad, "--model", m]),
        "not a safetensors adapter",
    );
    std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
    refused(
        svfit(&home, &["adapter", "inspect", &bad, "--model", m]),
        "not a safetensors adapter",
    );

    // NaN in a sigma.
    let mut nan = perturbed.clone();
    nan.sigma[2].1[3] = f32::NAN;
    nan.write(Path::new(&bad)).unwrap();
    refused(
        svfit(&home, &["adapter", "inspect", &bad, "--model", m]),
        "tensor 'blk.1.attn_q.sigma': value 3 is NaN",
    );

    // Wrong rank.
    let mut short = perturbed.clone();
    short.sigma[1].1.pop();
    short.write(Path::new(&bad)).unwrap();
    refused(
        svfit(&home, &["adapter", "inspect", &bad, "--model", m]),
        "tensor 'blk.0.attn_v.sigma': length 7, expected the factor rank 8",
    );

    // Missing tensor.
    let mut missing = perturbed.clone();
    missing.sigma.remove(0);
    missing.write(Path::new(&bad)).unwrap();
    refused(
        svfit(&home, &["adapter", "inspect", &bad, "--model", m]),
        "tensor 'blk.0.attn_q.sigma': missing",
    );

    // Wrong base: another model (different weights, same shapes).
    let other = dir.path().join("other.gguf");
    common::write_model_seeded(&other, &common::TINY, 43);
    refused(
        svfit(
            &home,
            &["adapter", "inspect", &b, "--model", other.to_str().unwrap()],
        ),
        "metadata 'svfit.base_sha256' is",
    );

    // Wrong format tag.
    let mut tagged = bytes.clone();
    let at = tagged.windows(9).position(|w| w == b"adapter/1").unwrap();
    tagged[at + 8] = b'9';
    std::fs::write(&bad, &tagged).unwrap();
    refused(
        svfit(&home, &["adapter", "inspect", &bad, "--model", m]),
        "'svfit.format' is 'adapter/9'",
    );
}

fn npy_f32(path: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    svfit::tensorfile::f32s(&bytes[10 + header..])
}

/// The CLI around adapters on the default model: `--adapter` and `--mix`
/// on `logits` and `generate`, `merge` to a GGUF that llama.cpp and our
/// engine load with its tokenizer, and bad adapters or mixes refused.
#[test]
fn adapters_on_the_command_line() {
    let _machine = crate::common::shared();
    let dir = common::temp_dir("cli-adapters");
    let home = dir.path().join("home");
    let m = common::default_model();
    let m = m.to_str().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (id, a, b) = (
        path("id.safetensors"),
        path("a.safetensors"),
        path("b.safetensors"),
    );
    ok(svfit(
        &home,
        // q,v (the default targets are v,down): the checks below name q.
        &[
            "adapter",
            "init",
            "--model",
            m,
            "--targets",
            "q,v",
            "--out",
            &id,
        ],
    ));
    for (out, seed) in [(&a, "1"), (&b, "2")] {
        ok(svfit(
            &home,
            &[
                "adapter", "perturb", &id, "--scale", "0.2", "--seed", seed, "--out", out,
                "--model", m,
            ],
        ));
    }
    let text = "The capital of France is";
    let logits = |name: &str, extra: &[&str]| {
        let out = path(name);
        let mut args = vec!["logits", "--model", m, "--text", text, "--out", &out];
        args.extend_from_slice(extra);
        ok(svfit(&home, &args));
        npy_f32(&out)
    };
    let base = logits("base.npy", &[]);
    let with_a = logits("a.npy", &["--adapter", &a]);
    let with_id = logits("id.npy", &["--adapter", &id]);
    assert_eq!(with_id, base, "the identity adapter is the base model");
    assert_ne!(with_a, base, "an adapter changes the logits");
    // 0.5 d + 0.5 d = d exactly: the mix path gives A's logits to the bit.
    let half_half = format!("{a}=0.5,{a}=0.5");
    assert_eq!(logits("aa.npy", &["--mix", &half_half]), with_a);
    let ab = format!("{a}=1,{b}=1");
    let with_ab = logits("ab.npy", &["--mix", &ab]);
    assert_ne!(with_ab, with_a);

    // Generation with an adapter runs and is deterministic.
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--chat",
            "Name a color.",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        ok(svfit(&home, &args))
    };
    let first = generate(&["--adapter", &a]);
    assert!(!first.trim().is_empty());
    assert_eq!(generate(&["--adapter", &a]), first);

    // Merge: metadata and tokenizer kept, loadable by our engine.
    let merged = path("merged.gguf");
    let stderr = svfit(
        &home,
        &["merge", "--model", m, "--adapter", &a, "--out", &merged],
    );
    assert!(
        stderr.status.success(),
        "{}",
        String::from_utf8_lossy(&stderr.stderr)
    );
    let gguf = svfit::ggml::gguf::GgufFile::open(Path::new(&merged)).unwrap();
    assert!(gguf
        .get_str("svfit.merged.adapters")
        .unwrap()
        .unwrap()
        .contains("a.safetensors"));
    assert_eq!(
        gguf.tensor("blk.3.attn_q.weight").unwrap().ty,
        svfit::ggml::Type::F16
    );
    let out = ok(svfit(
        &home,
        &[
            "generate",
            "--model",
            &merged,
            "--chat",
            "Name a color.",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ],
    ));
    assert!(!out.trim().is_empty());

    // Export: a GGUF LoRA llama.cpp loads (tests/it/svfit.rs runs it) and
    // a PEFT directory with Hugging Face's names; a missing adapter, rank 0
    // and an unwritable place are refused.
    let export = |format: &str, out: &str, extra: &[&str]| {
        let mut args = vec!["adapter", "export", "--model", m, "--adapter", &a];
        args.extend(["--format", format, "--out", out]);
        args.extend_from_slice(extra);
        svfit(&home, &args)
    };
    let lora = path("a-lora.gguf");
    let said = export("gguf-lora", &lora, &[]);
    assert!(
        said.status.success(),
        "{}",
        String::from_utf8_lossy(&said.stderr)
    );
    assert!(String::from_utf8_lossy(&said.stderr).contains("update dropped: 0.000e0"));
    let gguf = svfit::ggml::gguf::GgufFile::open(Path::new(&lora)).unwrap();
    assert_eq!(
        gguf.get_str("general.type").unwrap().as_deref(),
        Some("adapter")
    );
    assert!(gguf.tensor("blk.3.attn_q.weight.lora_a").is_some());
    let peft = path("a-peft");
    ok(export("peft", &peft, &["--rank", "4"]));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&peft).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(config["rank_pattern"]["model.layers.3.self_attn.q_proj"], 4);
    let header =
        svfit::tensorfile::read_header(&Path::new(&peft).join("adapter_model.safetensors"))
            .unwrap();
    assert!(header
        .tensors
        .iter()
        .any(|t| t.name == "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"));
    refused(
        svfit(
            &home,
            &[
                "adapter", "export", "--model", m, "--format", "peft", "--out", &peft,
            ],
        ),
        "name the adapter to export",
    );
    let zero = export("peft", &peft, &["--rank", "0"]);
    assert!(!zero.status.success() && String::from_utf8_lossy(&zero.stderr).contains("--rank"));
    refused(
        export("gguf-lora", &path("no-such-dir/a.gguf"), &[]),
        "no-such-dir",
    );

    // Bad adapters and mixes.
    let mut nan = Adapter::read(Path::new(&a)).unwrap();
    nan.sigma[5].1[0] = f32::NAN;
    let bad = path("nan.safetensors");
    nan.write(Path::new(&bad)).unwrap();
    refused(
        svfit(
            &home,
            &["generate", "--model", m, "--prompt", "x", "--adapter", &bad],
        ),
        "value 0 is NaN",
    );
    let bad_weight = format!("{a}=heavy");
    refused(
        svfit(
            &home,
            &[
                "logits",
                "--model",
                m,
                "--text",
                text,
                "--out",
                &path("x.npy"),
                "--mix",
                &bad_weight,
            ],
        ),
        "--mix weight 'heavy' is not a finite number",
    );
    let other = path("rank8.safetensors");
    ok(svfit(
        &home,
        &[
            "adapter",
            "init",
            "--model",
            m,
            "--targets",
            "q,v",
            "--rank",
            "rank:8",
            "--out",
            &other,
        ],
    ));
    let mixed = format!("{a}=0.5,{other}=0.5");
    refused(
        svfit(
            &home,
            &[
                "merge",
                "--model",
                m,
                "--mix",
                &mixed,
                "--out",
                &path("y.gguf"),
            ],
        ),
        "adapters in a mix must share their factors",
    );
    refused(
        svfit(
            &home,
            &[
                "merge",
                "--model",
                m,
                "--adapter",
                &a,
                "--type",
                "q3",
                "--out",
                &path("y.gguf"),
            ],
        ),
        "invalid merge type 'q3'",
    );
    refused(
        svfit(&home, &["merge", "--model", m, "--out", &path("y.gguf")]),
        "name the adapter to merge",
    );
    assert!(
        !Path::new(&path("y.gguf")).exists(),
        "nothing written on error"
    );
}
