//! LoRAs served by the gRPC server on the default model, beside SVFit
//! adapters: a PEFT LoRA uploaded by one tenant, an SVFit adapter by
//! another and the base by a third decoded in shared batches, each answer
//! equal to the same request alone and to `svfit generate --adapter`
//! (the PEFT directory, or the mix); bad LoRAs refused by name with
//! nothing stored.

use std::collections::HashMap;
use std::path::Path;

use super::*;
use common::Rng;
use svfit::tensorfile::Entry;

const TOKENS: u32 = 16;

/// A random PEFT LoRA of rank `rank` on q and v of every layer of the
/// default model (SmolLM2: 30 layers, 576 wide, kv 192), `scale` the size
/// of B's values; written to `dir`. Returns its config's text.
fn write_peft(
    dir: &Path,
    rank: usize,
    scale: f32,
    seed: u64,
    alter: impl Fn(&mut Vec<f32>),
) -> String {
    let mut rng = Rng::new(seed);
    let mut entries = Vec::new();
    for layer in 0..30 {
        for (module, m) in [("q_proj", 576), ("v_proj", 192)] {
            let n = 576;
            let mut values = |count: usize, s: f32| -> Vec<f32> {
                (0..count).map(|_| s * rng.normal()).collect()
            };
            let a = values(rank * n, 1.0 / (n as f32).sqrt());
            let mut b = values(m * rank, scale);
            if layer == 7 && module == "v_proj" {
                alter(&mut b);
            }
            let key = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            entries.push(Entry::f32(
                format!("{key}.lora_A.weight"),
                vec![rank, n],
                &a,
            ));
            entries.push(Entry::f32(
                format!("{key}.lora_B.weight"),
                vec![m, rank],
                &b,
            ));
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    svfit::tensorfile::write(
        &dir.join("adapter_model.safetensors"),
        &entries,
        HashMap::new(),
    )
    .unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "use_rslora": false,
    })
    .to_string();
    std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
    config
}

/// Writes a PEFT LoRA into a directory; returns its config's text.
type Writer = Box<dyn Fn(&Path) -> String>;

/// The upload of a PEFT LoRA as `id`.
fn peft_chunks(id: &str, dir: &Path, config: &str) -> Vec<pb::UploadChunk> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let mut chunks = upload_chunks(id, &bytes);
    if let Some(pb::upload_chunk::Part::Header(h)) = &mut chunks[0].part {
        h.peft_config = config.to_string();
    }
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peft_loras_serve_beside_svfit_adapters_in_shared_batches() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-lora");
    let mut config = config(dir.path());
    let keys = dir.path().join("keys.txt");
    std::fs::write(
        &keys,
        "# key tenant\nka base-team\nkb svfit-team\nkc lora-team\n",
    )
    .unwrap();
    config.api_keys = Some(keys);
    // Room for one rank-8 LoRA (1.84 MB) in the host cache, not two: the
    // LoRAs evict each other, the SVFit adapter stays (its own budget).
    config.engine.lora.cache_bytes = 3 << 20;
    let adapters = config.adapters.clone();
    let peft = dir.path().join("peft");
    let peft_config = write_peft(&peft, 8, 0.04, 1, |_| {});
    let (svfit_path, svfit_bytes) = file_bytes(dir.path(), "sv.safetensors", &adapter(7));
    let running = server::start(config).await.unwrap();
    let (infer, mut admin) = clients(&running).await;

    let stream = tokio_stream::iter(peft_chunks("tuned", &peft, &peft_config));
    let info = admin
        .upload(with_key(stream, "kc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            info.targets.as_str(),
            info.rank_policy.as_str(),
            info.version
        ),
        ("q,v", "lora:8", 1),
        "{info:?}"
    );
    let stream = tokio_stream::iter(upload_chunks("sv", &svfit_bytes));
    admin.upload(with_key(stream, "kb")).await.unwrap();
    // Tenants own their adapters: the LoRA is not the SVFit team's.
    let theirs = infer
        .clone()
        .generate(with_key(greedy("tuned", PROMPTS[0], 4), "kb"))
        .await;
    assert_eq!(code(theirs), Code::NotFound);

    // The OpenAI API lists it, and answers with it.
    let addr = running.http_addr.expect("HTTP API on");
    let auth = [("authorization", "Bearer kc")];
    let (status, _, text) = http(addr, "GET", "/v1/models", &auth, "").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"tuned\""), "{text}");
    let body = serde_json::json!({"model": "tuned", "prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0});
    let (status, _, text) = http(addr, "POST", "/v1/completions", &auth, &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let completion: serde_json::Value = serde_json::from_str(&text).unwrap();

    // Three tenants, two prompts each, all at once.
    let cases = [("ka", ""), ("kb", "sv"), ("kc", "tuned")];
    let mut tasks = Vec::new();
    for (key, adapter) in cases {
        for prompt in PROMPTS.iter().take(2) {
            let mut client = infer.clone();
            let request = with_key(greedy(adapter, prompt, TOKENS), key);
            tasks.push(tokio::spawn(async move {
                client.generate(request).await.unwrap().into_inner().text
            }));
        }
    }
    let mut together = Vec::new();
    for task in tasks {
        together.push(task.await.unwrap());
    }
    let steps = metric(&running, "svfit_steps_total").await;
    let tokens = metric(&running, "svfit_batch_tokens_total").await;
    assert!(
        tokens / steps >= 3.0,
        "not decoded in shared batches: {tokens} tokens in {steps} steps"
    );
    let mut client = infer.clone();
    for (i, (key, adapter)) in cases.iter().enumerate() {
        for (p, prompt) in PROMPTS.iter().take(2).enumerate() {
            let alone = client
                .generate(with_key(greedy(adapter, prompt, TOKENS), key))
                .await
                .unwrap()
                .into_inner()
                .text;
            assert_eq!(
                together[2 * i + p],
                alone,
                "{adapter:?}, prompt {p}: batched vs alone"
            );
        }
    }
    // The oracle: `svfit generate` with the PEFT directory itself, and with
    // the SVFit file.
    assert_eq!(together[4], cli(Some(&peft), PROMPTS[0], TOKENS));
    assert_eq!(together[2], cli(Some(&svfit_path), PROMPTS[0], TOKENS));
    assert_ne!(together[4], together[0], "the LoRA changes the answer");
    assert_eq!(
        completion["choices"][0]["text"], together[4],
        "the OpenAI API's answer"
    );

    // A mix of an SVFit adapter and a LoRA (one tenant owns both).
    let stream = tokio_stream::iter(peft_chunks("tuned", &peft, &peft_config));
    admin.upload(with_key(stream, "kb")).await.unwrap();
    let request = pb::GenerateRequest {
        mix: vec![
            pb::MixPart {
                adapter: "sv".into(),
                weight: 0.5,
            },
            pb::MixPart {
                adapter: "tuned".into(),
                weight: 1.5,
            },
        ],
        ..greedy("", PROMPTS[0], TOKENS)
    };
    let mixed = client
        .generate(with_key(request, "kb"))
        .await
        .unwrap()
        .into_inner()
        .text;
    let mix = format!("{}=0.5,{}=1.5", svfit_path.display(), peft.display());
    let cli_mix = cli_with(&["--mix".as_ref(), mix.as_ref()], PROMPTS[0], TOKENS);
    assert_eq!(mixed, cli_mix, "the mix, served and by the CLI");

    // LoRAs mix side by side: ranks 8 and 12 make 20, above --lora-rank.
    let wide = dir.path().join("wide");
    let wide_config = write_peft(&wide, 12, 0.02, 5, |_| {});
    let stream = tokio_stream::iter(peft_chunks("wide", &wide, &wide_config));
    admin.upload(with_key(stream, "kb")).await.unwrap();
    let request = pb::GenerateRequest {
        mix: vec![
            pb::MixPart {
                adapter: "tuned".into(),
                weight: 1.0,
            },
            pb::MixPart {
                adapter: "wide".into(),
                weight: 1.0,
            },
        ],
        ..greedy("", PROMPTS[0], 4)
    };
    let status = client.generate(with_key(request, "kb")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("rank 20"), "{}", status.message());

    // A PEFT directory and a GGUF LoRA dropped into the adapters
    // directory are imported on first use.
    let tenant_dir = Path::new(&adapters).join("lora-team");
    write_peft(&tenant_dir.join("dropped"), 8, 0.04, 1, |_| {});
    let dropped = client
        .generate(with_key(greedy("dropped", PROMPTS[0], TOKENS), "kc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        dropped.text, together[4],
        "the same LoRA, dropped as a PEFT directory"
    );
    assert_eq!(dropped.adapter_version, "dropped@v1");
    assert!(tenant_dir.join("dropped.safetensors").is_file());
    std::fs::write(tenant_dir.join("broken.gguf"), b"GGUF not really").unwrap();
    let status = client
        .generate(with_key(greedy("broken", PROMPTS[0], 4), "kc"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    eprintln!("a broken dropped LoRA: {}", status.message());
    assert!(!status.message().contains("/tmp"), "{}", status.message());

    assert!(
        metric(&running, "svfit_adapter_cache_evictions_total").await >= 2.0,
        "LoRAs beyond --lora-cache-mb are evicted"
    );

    // Bad LoRAs: refused by name, nothing stored.
    let bad = dir.path().join("bad");
    let cases: [(&str, Writer, &str); 3] = [
        (
            "rank",
            Box::new(|d| write_peft(d, 32, 0.01, 2, |_| {})),
            "rank 32",
        ),
        (
            "nan",
            Box::new(|d| write_peft(d, 4, 0.01, 3, |b| b[5] = f32::NAN)),
            "NaN",
        ),
        (
            "config",
            Box::new(|d| write_peft(d, 4, 0.01, 4, |_| {}).replace("\"r\":4", "\"r\":2")),
            "rank",
        ),
    ];
    for (name, write, named) in cases {
        let d = bad.join(name);
        let config = write(&d);
        let stream = tokio_stream::iter(peft_chunks(name, &d, &config));
        let status = admin.upload(with_key(stream, "kc")).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains(named),
            "{name}: {}",
            status.message()
        );
        let get = admin
            .get(with_key(
                pb::AdapterRef {
                    id: name.into(),
                    tenant: String::new(),
                },
                "kc",
            ))
            .await;
        assert_eq!(code(get), Code::NotFound, "{name} was stored");
    }
    running.stop().await;
}
