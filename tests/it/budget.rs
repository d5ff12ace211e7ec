//! The memory budget of a server (`svfit serve --dry-run`): the compute
//! buffers stay under the bound it counts, and a configuration over the
//! limit is refused at start, with the budget, before any weight loads.

use crate::common;

use std::process::Command;

use svfit::factors::{self, FactorsKey};
use svfit::model::{compute_bytes_bound, Batch, LoadOptions, Model};

#[test]
fn compute_buffers_stay_under_their_bound() {
    let _machine = common::shared();
    let model_path = common::default_model();
    let dir = common::temp_dir("budget");
    let key = FactorsKey::for_model(&model_path, "q,v", "energy:0.99", "f16").unwrap();
    let path = factors::ensure(&model_path, &key, &dir.path().join("home")).unwrap();
    let mut model = Model::load(&model_path, &LoadOptions::default()).unwrap();
    model
        .attach_factor_file(
            &factors::FactorFile::open(&path, &key).unwrap(),
            2,
            svfit::ggml::Type::Q8_0,
        )
        .unwrap();
    let (chunk, prompt) = (512, 1536);
    let mut cache = model.new_cache(4 * prompt).unwrap();
    for seq in 0..4 {
        cache.reserve(seq, prompt).unwrap();
    }
    // Sequence 0 prefills in chunks beside three decoding sequences, one
    // of them on the adapter slot (the SVFit branch runs).
    let mut worst = (0, 0);
    for (step, start) in (0..prompt).step_by(chunk).enumerate() {
        let mut batch = Batch::new();
        let tokens: Vec<u32> = (0..chunk as u32).map(|t| 100 + t % 1000).collect();
        batch.add_sequence(&tokens, start, 0, false);
        for seq in 1..4 {
            batch.add(7 + seq, step, seq, true);
        }
        batch.set_adapter(1, 1);
        model.decode(&mut cache, &batch).unwrap();
        let actual = model.compute_bytes() as u64;
        let bound = compute_bytes_bound(model.config(), batch.len(), 4, chunk, start + chunk);
        eprintln!("step {step}: {actual} bytes of compute buffers, bound {bound}");
        assert!(actual <= bound, "step {step}: {actual} > {bound}");
        worst = (actual, bound);
    }
    assert!(
        worst.1 < 3 * worst.0,
        "a bound that tells something: {worst:?}"
    );
}

/// `svfit serve` on the default model and `base()`'s factors with `args`,
/// in a home with those factors.
fn serve(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(["serve", "--addr", "127.0.0.1:0", "--http-addr", "none"])
        .arg("--model")
        .arg(common::default_model())
        .args(common::serve::base().targets_args())
        .args(args)
        .env("SVFIT_HOME", home)
        .output()
        .unwrap()
}

#[test]
fn a_configuration_over_the_limit_is_refused_with_its_budget() {
    let _machine = common::shared();
    let home = common::serve::base().home.clone();
    let dry = serve(&home, &["--dry-run", "--memory-limit", "64G"]);
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    for line in [
        "weights",
        "factors",
        "KV cache",
        "compute",
        "prefix cache",
        "total",
        "fits",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    assert!(stdout.contains("ranks of the cached factors"), "{stdout}");

    let small = serve(&home, &["--dry-run", "--memory-limit", "500M"]);
    assert_eq!(
        small.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&small.stdout)
    );

    // Refused at start: before the weights load, before it listens.
    let start = std::time::Instant::now();
    let refused = serve(
        &home,
        &["--memory-limit", "500M", "--metrics-addr", "127.0.0.1:0"],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("more than the 500 MB it may use (--memory-limit)")
            && stderr.contains("KV cache")
            && stderr.contains("lower --kv-cells"),
        "{stderr}"
    );
    assert!(!stderr.contains("serving on"), "{stderr}");
    // Shrinking what the budget names makes it fit.
    let fits = serve(
        &home,
        &[
            "--dry-run",
            "--memory-limit",
            "500M",
            "--prefix-cache-mb",
            "0",
        ]
        .into_iter()
        .chain([
            "--adapter-cache-mb",
            "8",
            "--lora-slots",
            "0",
            "--kv-cells",
            "4096",
            "--ctx",
            "1024",
        ])
        .collect::<Vec<_>>(),
    );
    assert!(
        fits.status.success(),
        "{}",
        String::from_utf8_lossy(&fits.stdout)
    );
    eprintln!("refused in {:?}", start.elapsed());

    for bad in ["lots", "0", "-1G"] {
        let out = serve(&home, &["--dry-run", &format!("--memory-limit={bad}")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--memory-limit"),
            "{stderr}"
        );
    }
}

/// The process's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_stays_within_its_budget() {
    use common::serve::{adapter, base, channel, greedy, start_process, write};
    use svfit::server::pb::inference_client::InferenceClient;
    let _machine = common::shared();
    let dir = common::temp_dir("budget-rss");
    let adapters = dir.path().join("adapters");
    for i in 0..4 {
        write(&adapters, "default", &format!("a{i}"), &adapter(i));
    }
    let flags = [
        "--ctx",
        "1024",
        "--kv-cells",
        "4096",
        "--max-sequences",
        "4",
        "--prefix-cache-mb",
        "16",
        "--adapter-cache-mb",
        "8",
        "--adapters",
        adapters.to_str().unwrap(),
    ];
    let home = base().home.clone();
    let dry = serve(&home, &[&["--dry-run"][..], &flags].concat());
    let stdout = String::from_utf8_lossy(&dry.stdout);
    let total: f64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("total"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let budget = (total * (1 << 20) as f64) as u64;

    let mut command = Command::new(env!("CARGO_BIN_EXE_svfit"));
    command
        .args(["serve", "--addr", "127.0.0.1:0", "--http-addr", "none"])
        .args(["--metrics-addr", "127.0.0.1:0", "--threads", "2"])
        .arg("--model")
        .arg(common::default_model())
        .args(common::serve::base().targets_args())
        .args(flags)
        .env("SVFIT_HOME", &home);
    let server = start_process(command);
    // Long prompts on four adapters at once: the largest steps, the KV
    // cache and the prefix cache in use.
    let client = InferenceClient::new(channel(server.addr).await);
    let words: Vec<String> = (0..330).map(|i| format!("w{}", i % 97)).collect();
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let mut client = client.clone();
            let prompt = format!("{i} {}", words.join(" "));
            tokio::spawn(async move {
                let request = greedy(&format!("a{}", i % 4), &prompt, 8);
                client.generate(request).await.map(|_| ())
            })
        })
        .collect();
    for r in requests {
        let r = r.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    let peak = peak_rss(server.child.id());
    eprintln!("peak RSS {peak} bytes, budget {budget}");
    assert!(
        peak <= budget,
        "peak RSS {peak} over the budget {budget}:\n{stdout}"
    );
}
