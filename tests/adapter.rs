//! Adapter files on the tiny model: `svfit adapter init | perturb | inspect`
//! round-trip, and corrupt, truncated, wrong-base, wrong-rank and NaN-holding
//! adapters are refused with errors that name the cause.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use svfit::adapter::Adapter;

fn svfit(home: &Path, args: &[&str]) -> Output {
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
    common::write_tiny_model(
        &other,
        &common::TinySpec {
            seed: 43,
            ..common::TINY
        },
    );
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
