//! A tiny Phi-3 (random weights, the default model's tokenizer) behind
//! both APIs, with adapters on every linear matrix: each target a part of
//! a fused matrix (q, k, v of `attn_qkv`, gate and up of `ffn_up`). Sixteen
//! tenants decoded in shared batches, each answer equal to the same
//! request alone and to `svfit generate --adapter`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use svfit::adapter::Adapter;
use svfit::factors::{self, FactorsKey};
use svfit::ggml::gguf::GgufFile;
use svfit::model::{random, Arch};
use svfit::server;

use super::common::serve::*;
use super::common::{self, temp_dir};

const N_ADAPTERS: u64 = 16;
const TOKENS: u32 = 6;
const PROMPT: &str = "The capital of France is";

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

/// A tiny phi3 with the default model's tokenizer, as `svfit check
/// --random tiny --arch phi3 --write-model` writes it.
fn tiny_phi3(path: &Path) {
    let source = GgufFile::open(&common::default_model()).unwrap();
    let n_vocab = source
        .get_arr_len("tokenizer.ggml.tokens")
        .unwrap()
        .unwrap();
    let shape = random::Shape {
        n_vocab,
        ..random::Shape::tiny(Arch::Phi3)
    };
    random::write(path, &shape, &random::Types::Mixed, Some(&source), 7).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phi3_serves_adapters_of_fused_matrices_in_shared_batches() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-phi3");
    let model = dir.path().join("phi3.gguf");
    tiny_phi3(&model);
    let home = dir.path().join("home");
    let key = FactorsKey::for_model(&model, "all-linear", "energy:0.99", "f16").unwrap();
    let singular =
        factors::read_singular_values(&factors::ensure(&model, &key, &home).unwrap(), &key)
            .unwrap();
    let mut config = config(dir.path());
    config.model = model.clone();
    config.factors = key.clone();
    config.home = home.clone();
    config.engine.max_sequences = N_ADAPTERS as usize;
    config.engine.adapter_slots = N_ADAPTERS as usize;
    config.engine.kv_cells = 16 * 64;
    config.engine.context = 64;
    let files: Vec<PathBuf> = (0..N_ADAPTERS)
        .map(|i| {
            let a = Adapter::perturbed(&key, &singular, 0.3, 200 + i);
            write(Path::new(&config.adapters), "default", &format!("p{i}"), &a)
        })
        .collect();
    let running = server::start(config).await.unwrap();
    let (client, _) = clients(&running).await;

    // All at once over gRPC, each on its own adapter.
    let tasks: Vec<_> = (0..N_ADAPTERS)
        .map(|i| {
            let mut client = client.clone();
            let request = greedy(&format!("p{i}"), PROMPT, TOKENS);
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
        tokens / steps >= 4.0,
        "{N_ADAPTERS} requests were not decoded in shared batches: {tokens} tokens in {steps} steps"
    );
    let distinct: std::collections::HashSet<&String> = together.iter().collect();
    assert!(
        distinct.len() > 2,
        "adapters give different answers: {distinct:?}"
    );

    // Each equals the same request alone, and the CLI for some of them.
    let mut client = client.clone();
    for i in [0, 9, 15] {
        let alone = client
            .generate(greedy(&format!("p{i}"), PROMPT, TOKENS))
            .await
            .unwrap()
            .into_inner()
            .text;
        assert_eq!(
            together[i as usize], alone,
            "adapter p{i}: batched vs alone"
        );
        let cli = generate(&home, &model, &files[i as usize]);
        assert_eq!(alone, cli, "adapter p{i}: server vs svfit generate");
    }

    // The OpenAI API: the same answer as a completion.
    let addr = running.http_addr.expect("HTTP API on");
    let body = json!({"model": "p9", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0});
    let (status, _, text) = http(addr, "POST", "/v1/completions", &[], &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["choices"][0]["text"], together[9], "{text}");
    running.stop().await;
}
