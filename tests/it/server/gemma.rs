//! The real Gemma 3 270M (another family, K-quants, a 262k vocabulary)
//! behind both APIs: 64 tenants' adapters decoded in shared batches, each
//! answer equal to the same request alone, and `svfit generate --adapter`
//! as the oracle for some of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use svfit::adapter::Adapter;
use svfit::factors::{self, FactorsKey};
use svfit::server;

use super::common::serve::*;
use super::common::{self, temp_dir};

pub(super) const TOKENS: u32 = 6;
pub(super) const PROMPT: &str = "The capital of France is";

/// `svfit generate` with `adapter`, greedy: the oracle.
fn generate(home: &Path, model: &Path, adapter: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(["generate", "--threads", "2", "--temperature", "0"])
        .args(["--max-tokens", &TOKENS.to_string(), "--prompt", PROMPT])
        .arg("--model")
        .arg(model)
        .arg("--adapter")
        .arg(adapter)
        .env("SVFIT_HOME", home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

/// One family's server with many adapters decoded in shared batches.
pub(super) struct SharedBatches<'a> {
    pub model: &'a Path,
    pub targets: &'a str,
    pub n_adapters: u64,
    /// The adapters' ids are `{prefix}{i}`, their seeds `seed + i`.
    pub prefix: &'a str,
    pub seed: u64,
    /// Tokens per decode step the batches must reach.
    pub tokens_per_step: f64,
    /// Fewer distinct answers than this fail.
    pub distinct: usize,
    /// Adapters checked batched = alone = `svfit generate`.
    pub probes: [u64; 3],
}

/// Serves `s.n_adapters` adapters, asks them all at once over gRPC and
/// checks the batches were shared, the answers differ, and the probes'
/// answers equal the same request alone and the CLI. Returns the server
/// and the answers.
pub(super) async fn serve_in_shared_batches(
    dir: &Path,
    s: &SharedBatches<'_>,
) -> (server::Running, Vec<String>) {
    let (model, n) = (s.model.to_path_buf(), s.n_adapters);
    let home = dir.join("home");
    let key = FactorsKey::for_model(&model, s.targets, "energy:0.99", "f16").unwrap();
    let singular =
        factors::read_singular_values(&factors::ensure(&model, &key, &home).unwrap(), &key)
            .unwrap();
    let mut config = config(dir);
    config.model = model.clone();
    config.factors = key.clone();
    config.home = home.clone();
    config.engine.max_sequences = n as usize;
    config.engine.adapter_slots = n as usize;
    config.engine.kv_cells = n as usize * 64;
    config.engine.context = 64;
    let id = |i: u64| format!("{}{i}", s.prefix);
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let a = Adapter::perturbed(&key, &singular, 0.3, s.seed + i);
            write(Path::new(&config.adapters), "default", &id(i), &a)
        })
        .collect();
    let running = server::start(config).await.unwrap();
    let (client, _) = clients(&running).await;

    // All at once over gRPC, each on its own adapter.
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut client = client.clone();
            let request = greedy(&id(i), PROMPT, TOKENS);
            tokio::spawn(async move { client.generate(request).await.unwrap().into_inner().text })
        })
        .collect();
    let mut together = Vec::new();
    for task in tasks {
        together.push(task.await.unwrap());
    }
    let steps = metric(&running, "svfit_steps_total").await;
    let tokens = metric(&running, "svfit_batch_tokens_total").await;
    eprintln!(
        "{steps} steps, {tokens} tokens: {:.1} per step",
        tokens / steps
    );
    assert!(
        tokens / steps >= s.tokens_per_step,
        "{n} requests were not decoded in shared batches: {tokens} tokens in {steps} steps"
    );
    let distinct: std::collections::HashSet<&String> = together.iter().collect();
    assert!(
        distinct.len() > s.distinct,
        "adapters give different answers: {distinct:?}"
    );

    // Each equals the same request alone, and the CLI for some of them.
    let mut client = client.clone();
    for i in s.probes {
        let alone = client
            .generate(greedy(&id(i), PROMPT, TOKENS))
            .await
            .unwrap()
            .into_inner()
            .text;
        assert_eq!(
            together[i as usize],
            alone,
            "adapter {}: batched vs alone",
            id(i)
        );
        let cli = generate(&home, &model, &files[i as usize]);
        assert_eq!(alone, cli, "adapter {}: server vs svfit generate", id(i));
    }
    (running, together)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemma_serves_64_adapters_in_shared_batches() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-gemma");
    let model = common::gemma_model();
    let shared = SharedBatches {
        model: &model,
        targets: "q,v",
        n_adapters: 64,
        prefix: "g",
        seed: 100,
        tokens_per_step: 8.0,
        distinct: 4,
        probes: [0, 17, 63],
    };
    let (running, together) = serve_in_shared_batches(dir.path(), &shared).await;

    // The OpenAI API: the same answer as a completion, and a chat answer
    // in Gemma's own turns (the file has no template).
    let addr = running.http_addr.expect("HTTP API on");
    let body = json!({"model": "g17", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0});
    let (status, _, text) = http(addr, "POST", "/v1/completions", &[], &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["choices"][0]["text"], together[17], "{text}");
    let chat = json!({"model": "g3", "max_tokens": TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a color."}]});
    let (status, _, text) =
        http(addr, "POST", "/v1/chat/completions", &[], &chat.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{text}"
    );
    running.stop().await;
}
