//! A tiny Phi-3 (random weights, the default model's tokenizer) behind
//! both APIs, with adapters on every linear matrix: each target a part of
//! a fused matrix (q, k, v of `attn_qkv`, gate and up of `ffn_up`). Sixteen
//! tenants decoded in shared batches, each answer equal to the same
//! request alone and to `svfit generate --adapter`.

use std::path::Path;

use serde_json::{json, Value};
use svfit::ggml::gguf::GgufFile;
use svfit::model::{random, Arch};

use super::common::serve::*;
use super::common::{self, temp_dir};
use super::gemma::{serve_in_shared_batches, SharedBatches, PROMPT, TOKENS};

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
    let shared = SharedBatches {
        model: &model,
        targets: "all-linear",
        n_adapters: 16,
        prefix: "p",
        seed: 200,
        tokens_per_step: 4.0,
        distinct: 2,
        probes: [0, 9, 15],
    };
    let (running, together) = serve_in_shared_batches(dir.path(), &shared).await;

    // The OpenAI API: the same answer as a completion.
    let addr = running.http_addr.expect("HTTP API on");
    let body = json!({"model": "p9", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0});
    let (status, _, text) = http(addr, "POST", "/v1/completions", &[], &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["choices"][0]["text"], together[9], "{text}");
    running.stop().await;
}
