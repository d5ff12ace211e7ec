//! `svfit factorize` on the tiny model: the factor file has the names,
//! shapes and metadata of METHOD.md §2, reconstructs the weights, is reused
//! from the cache, and bad options are refused.

use crate::common;

use std::process::Command;

use svfit::factors::{self, Factor, RankPolicy};
use svfit::ggml::gguf::GgufFile;

fn factorize(
    home: &std::path::Path,
    model: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(["factorize", "--model", model.to_str().unwrap()])
        .args(extra)
        .env("SVFIT_HOME", home)
        .output()
        .unwrap()
}

#[test]
fn factor_file_reconstructs_the_weights_and_is_cached() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    let home = dir.path().join("home");
    let out = factorize(
        &home,
        &model,
        &["--targets", "q,v,down", "--rank", "full", "--dtype", "f32"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for kind in ["attn_q", "attn_v", "ffn_down"] {
        assert!(stdout.contains(kind), "ranks per kind printed: {stdout}");
    }
    let files: Vec<_> = std::fs::read_dir(home.join("factors"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.metadata().clone().unwrap();
    assert_eq!(info["svfit.format"], "factors/1");
    assert_eq!(info["svfit.targets"], "q,v,down");
    assert_eq!(info["svfit.rank_policy"], "full");
    assert_eq!(
        info["svfit.base_sha256"],
        svfit::home::sha256_file(&model).unwrap()
    );

    // W ≈ U diag(S) Vt for a quantized (q8_0) and an f16 weight.
    let gguf = GgufFile::open(&model).unwrap();
    for name in ["blk.1.ffn_down", "blk.0.attn_q"] {
        let (w, m, n) = factors::read_matrix(&gguf, &format!("{name}.weight")).unwrap();
        let tensor = |t: &str| -> (Vec<usize>, Vec<f32>) {
            let v = st.tensor(&format!("{name}.{t}")).unwrap();
            (v.shape().to_vec(), svfit::tensorfile::f32s(v.data()))
        };
        let ((us, u), (ss, s), (vs, vt)) = (tensor("U"), tensor("S"), tensor("Vt"));
        let r = ss[0];
        assert_eq!((us, vs), (vec![m, r], vec![r, n]));
        assert_eq!(r, m.min(n));
        let max_err = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                let x: f32 = (0..r).map(|l| u[i * r + l] * s[l] * vt[l * n + j]).sum();
                (x - w[ij]).abs()
            })
            .fold(0f32, f32::max);
        assert!(max_err < 1e-4, "{name}: max reconstruction error {max_err}");
    }

    let again = factorize(
        &home,
        &model,
        &["--targets", "q,v,down", "--rank", "full", "--dtype", "f32"],
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already cached"));
}

#[test]
fn energy_rank_follows_the_policy_on_real_weights() {
    let _machine = crate::common::shared();
    let (_dir, model) = common::tiny_model();
    let gguf = GgufFile::open(&model).unwrap();
    let (w, m, n) = factors::read_matrix(&gguf, "blk.0.ffn_gate.weight").unwrap();
    let full = Factor::of_matrix(&w, m, n, RankPolicy::Full).unwrap();
    let f = Factor::of_matrix(&w, m, n, RankPolicy::Energy(0.9)).unwrap();
    let energy = |s: &[f32]| s.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
    let total = energy(&full.s);
    assert!(energy(&f.s) >= 0.9 * total * (1.0 - 1e-9));
    assert!(
        energy(&f.s[..f.rank() - 1]) < 0.9 * total,
        "smallest such rank"
    );
}

#[test]
fn bad_options_are_refused() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    for (args, cause) in [
        (["--targets", "q,x"], "invalid targets"),
        (["--rank", "energy:1.5"], "invalid rank policy"),
        (["--dtype", "bf16"], "invalid dtype"),
    ] {
        let out = factorize(dir.path(), &model, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.starts_with("error: ") && stderr.contains(cause),
            "{stderr}"
        );
    }
}

#[test]
fn a_killed_factorization_resumes_and_writes_the_same_file() {
    let _machine = crate::common::shared();
    let model = common::default_model();
    let dir = common::temp_dir("resume");
    let args = ["--targets", "q,v", "--jobs", "2"];
    let key = factors::FactorsKey::for_model(&model, "q,v", "energy:0.99", "f16").unwrap();

    let clean = dir.path().join("clean");
    let out = factorize(&clean, &model, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Killed (SIGKILL) once a few matrices are done.
    let home = dir.path().join("killed");
    let (path, partial) = (key.path(&home), factors::partial_dir(&key.path(&home)));
    let mut child = Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(["factorize", "--model", model.to_str().unwrap()])
        .args(args)
        .env("SVFIT_HOME", &home)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let parts = |dir: &std::path::Path| {
        std::fs::read_dir(dir).map_or(0, |d| {
            d.filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with("blk.") && name.ends_with(".safetensors")
            })
            .count()
        })
    };
    while parts(&partial) < 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = parts(&partial);
    assert!(
        !path.exists() && (3..60).contains(&left),
        "{left} of 60 left"
    );

    let out = factorize(&home, &model, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("({left} resumed)")), "{stderr}");
    assert!(!partial.exists(), "the finished matrices are removed");
    assert!(
        std::fs::read(&path).unwrap() == std::fs::read(key.path(&clean)).unwrap(),
        "the resumed file equals the uninterrupted one"
    );
}

#[test]
fn a_damaged_factor_file_is_refused_with_its_reason() {
    let _machine = crate::common::shared();
    let (dir, model) = common::tiny_model();
    let home = dir.path().join("home");
    let out = factorize(&home, &model, &["--targets", "q,v"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = factors::FactorsKey::for_model(&model, "q,v", "energy:0.99", "f16").unwrap();
    let bytes = std::fs::read(key.path(&home)).unwrap();
    assert_eq!(
        factors::read_factors(&key.path(&home), &key).unwrap().len(),
        4
    );
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut wrong_dtype = bytes.clone();
    let at = String::from_utf8_lossy(&bytes[8..8 + header])
        .find("F16")
        .unwrap();
    wrong_dtype[8 + at..8 + at + 3].copy_from_slice(b"I16");
    for (damaged, reason) in [
        (bytes[..bytes.len() - 1].to_vec(), "the tensors end at byte"),
        (bytes[..header / 2].to_vec(), "header of"),
        (huge, "header of"),
        (wrong_dtype, "expected F32 or F16"),
    ] {
        let path = dir.path().join("damaged.safetensors");
        std::fs::write(&path, &damaged).unwrap();
        let err = factors::read_factors(&path, &key).unwrap_err().to_string();
        assert!(
            err.contains("not a valid factor file") && err.contains(reason),
            "{err}"
        );
    }
}
