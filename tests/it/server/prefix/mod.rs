//! The prefix cache: a prompt whose start was seen before gets exactly the
//! logits of a cold prefill (to the bit, alone and batched), cached KV never
//! crosses adapters, versions, mixes or tenants, and the cache keeps to its
//! memory bound.

use std::path::PathBuf;

use svfit::factors;
use svfit::ggml::Type;
use svfit::model::{Batch, LoadOptions, Model, Tokenizer, WeightFormat};
use svfit::prefix_cache::BLOCK;
use svfit::server;
use svfit::server::pb;

use super::common::serve::*;
use super::common::temp_dir;

/// A prompt of several blocks and a tail (about 200 tokens).
fn long_prompt() -> String {
    let mut text = String::from("<|im_start|>system\nYou answer questions about the sea. ");
    for i in 0..24 {
        text.push_str(&format!(
            "Fact {i}: the ocean covers much of the planet and holds life. "
        ));
    }
    text.push_str(
        "<|im_end|>\n<|im_start|>user\nName one ocean.<|im_end|>\n<|im_start|>assistant\n",
    );
    text
}

/// Greedy: the largest logit.
fn argmax(row: &[f32]) -> u32 {
    svfit::sampling::argmax(row)
}

#[test]
fn a_cached_prefix_gives_the_logits_of_a_cold_prefill_to_the_bit() {
    let _machine = crate::common::shared();
    let b = base();
    let mut model = Model::load(
        &b.model,
        &LoadOptions {
            device: "cpu".into(),
            threads: 2,
            weights: WeightFormat::Auto,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let path = factors::ensure(&b.model, &b.key, &b.home).unwrap();
    let factor_set = factors::read_factors(&path, &b.key).unwrap();
    model.attach_factors(&factor_set, 3, Type::Q8_0).unwrap();
    model
        .set_adapter(1, &adapter(41).deltas(&b.singular))
        .unwrap();
    let tokenizer = Tokenizer::load(&b.model).unwrap();
    let prompt = tokenizer.encode(&long_prompt(), true);
    let other = tokenizer.encode("The three most important things about the ocean are", true);
    let blocks = (prompt.len() - 1) / BLOCK;
    assert!(blocks >= 2, "{} tokens", prompt.len());
    let cached = blocks * BLOCK;
    let mut cache = model.new_cache(8192).unwrap();
    let steps = 6;

    // Runs `seq` from its cells on: the rest of the prompt (logits of every
    // token), then `steps` greedy tokens, beside `extra` (another sequence's
    // prompt) when given. Returns every row of `seq`.
    let mut run = |cache: &mut svfit::model::KvCache,
                   seq: u32,
                   from: usize,
                   extra: Option<(u32, &[u32])>|
     -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        let mut batch = Batch::new();
        if let Some((s, tokens)) = extra {
            batch.add_sequence(tokens, 0, s, false);
            batch.set_adapter(s, 2);
        }
        for (k, &t) in prompt[from..].iter().enumerate() {
            batch.add(t, from + k, seq, true);
        }
        batch.set_adapter(seq, 1);
        let logits = model.decode(cache, &batch).unwrap();
        let n = prompt.len() - from;
        let first = logits.n_rows() - n;
        rows.extend((first..first + n).map(|r| logits.row(r).to_vec()));
        for step in 0..steps {
            let token = argmax(rows.last().unwrap());
            batch.clear();
            batch.add(token, prompt.len() + step, seq, true);
            batch.set_adapter(seq, 1);
            rows.push(model.decode(cache, &batch).unwrap().row(0).to_vec());
        }
        rows
    };
    let reserve = prompt.len() + steps + 1;
    cache.reserve(0, reserve).unwrap();
    let cold = run(&mut cache, 0, 0, None);
    let cold_tail = &cold[cached..];

    // The cells of the cached blocks, as the prefix cache keeps them.
    let exported = cache.export(0, 0, cached).unwrap();
    let block_bytes = cache.bytes_per_cells(BLOCK);
    assert_eq!(exported.len(), blocks * block_bytes);
    let blocks_bytes: Vec<Vec<u8>> = (0..blocks)
        .map(|i| cache.export(0, i * BLOCK, BLOCK).unwrap())
        .collect();

    let mut all = vec![vec![7u8; block_bytes]; blocks];
    let mut views: Vec<&mut [u8]> = all.iter_mut().map(Vec::as_mut_slice).collect();
    cache.export_blocks(0, 0, BLOCK, &mut views).unwrap();
    assert_eq!(all, blocks_bytes);
    let parts: Vec<&[u8]> = blocks_bytes.iter().map(Vec::as_slice).collect();
    // Alone.
    cache.reserve(1, reserve).unwrap();
    cache.import(1, &parts, BLOCK).unwrap();
    let hit = run(&mut cache, 1, cached, None);
    assert_eq!(hit.len(), cold_tail.len());
    for (i, (h, c)) in hit.iter().zip(cold_tail).enumerate() {
        assert!(h == c, "row {i} differs from the cold prefill");
    }
    // Batched with another sequence's cold prefill.
    cache.reserve(2, reserve).unwrap();
    cache.import(2, &parts[..1], BLOCK).unwrap();
    cache.import(2, &parts[1..], BLOCK).unwrap();
    let batched = run(&mut cache, 2, cached, Some((3, &other)));
    for (i, (h, c)) in batched.iter().zip(cold_tail).enumerate() {
        assert!(h == c, "row {i} differs from the cold prefill when batched");
    }
    // A block under another adapter would not be these cells.
    model
        .set_adapter(1, &adapter(42).deltas(&b.singular))
        .unwrap();
    cache.reserve(4, reserve).unwrap();
    let mut batch = Batch::new();
    batch.add_sequence(&prompt[..cached], 0, 4, false);
    batch.set_adapter(4, 1);
    model.decode(&mut cache, &batch).unwrap();
    assert_ne!(cache.export(4, 0, cached).unwrap(), exported);
}

/// The usage of a greedy request for `adapter` on `prompt`.
async fn ask(
    infer: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    key: &str,
    adapter: &str,
    mix: Vec<pb::MixPart>,
    prompt: &str,
) -> (String, pb::Usage) {
    let mut request = greedy(adapter, prompt, 8);
    request.mix = mix;
    let out = infer
        .generate(with_key(request, key))
        .await
        .unwrap()
        .into_inner();
    (out.text, out.usage.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_prefixes_never_cross_adapters_versions_mixes_or_tenants() {
    let _machine = crate::common::shared();
    let dir = temp_dir("prefix-isolation");
    let config = keyed_config(dir.path());
    let store = PathBuf::from(&config.adapters);
    let a = write(&store, "alice", "a", &adapter(51));
    let bob_a = write(&store, "bob", "a", &adapter(52));
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let prompt = long_prompt();
    let whole_blocks = |usage: &pb::Usage| (usage.prompt_tokens as usize - 1) / BLOCK * BLOCK;

    // The oracles: each adapter alone, from the CLI (no cache there).
    let base_answer = cli(None, &prompt, 8);
    let a_answer = cli(Some(&a), &prompt, 8);
    let bob_answer = cli(Some(&bob_a), &prompt, 8);
    assert_ne!(a_answer, base_answer);

    // llama.cpp's bug, both ways: the base after an adapter, an adapter
    // after the base, on the same prompt.
    let (text, usage) = ask(&mut infer, "ka", "a", vec![], &prompt).await;
    assert_eq!((text.as_str(), usage.cached_tokens), (a_answer.as_str(), 0));
    let (text, usage) = ask(&mut infer, "ka", "", vec![], &prompt).await;
    assert_eq!(
        (text.as_str(), usage.cached_tokens),
        (base_answer.as_str(), 0)
    );
    // Now each has its own cached blocks, and gets exactly its answer.
    let (text, usage) = ask(&mut infer, "ka", "a", vec![], &prompt).await;
    assert_eq!(text, a_answer);
    assert_eq!(usage.cached_tokens as usize, whole_blocks(&usage));
    let (text, usage) = ask(&mut infer, "ka", "", vec![], &prompt).await;
    assert_eq!(text, base_answer);
    assert!(usage.cached_tokens > 0);
    // Another tenant's adapter of the same id: its own cells.
    let (text, usage) = ask(&mut infer, "kb", "a", vec![], &prompt).await;
    assert_eq!(
        (text.as_str(), usage.cached_tokens),
        (bob_answer.as_str(), 0)
    );
    // A mix of `a` alone is another key.
    let mix = vec![pb::MixPart {
        adapter: "a".into(),
        weight: 1.0,
    }];
    let (text, usage) = ask(&mut infer, "ka", "", mix.clone(), &prompt).await;
    assert_eq!((text.as_str(), usage.cached_tokens), (a_answer.as_str(), 0));
    let (_, usage) = ask(&mut infer, "ka", "", mix, &prompt).await;
    assert!(usage.cached_tokens > 0);
    // A new version of `a`: nothing of the old one is reused.
    let (_, mut adapters) = clients(&running).await;
    let (new_path, bytes) = file_bytes(dir.path(), "newer.safetensors", &adapter(53));
    let chunks = tokio_stream::iter(upload_chunks("a", &bytes));
    adapters.upload(with_key(chunks, "ka")).await.unwrap();
    let (text, usage) = ask(&mut infer, "ka", "a", vec![], &prompt).await;
    assert_eq!(usage.cached_tokens, 0);
    assert_eq!(text, cli(Some(&new_path), &prompt, 8));
    let (text, usage) = ask(&mut infer, "ka", "a", vec![], &prompt).await;
    assert!(usage.cached_tokens > 0);
    assert_eq!(text, cli(Some(&new_path), &prompt, 8));

    assert!(metric(&running, "svfit_prefix_cache_hits_total").await >= 4.0);
    assert!(metric(&running, "svfit_prefix_cached_tokens_total").await >= 4.0 * 64.0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_distinct_prompts_stays_within_the_prefix_budget() {
    let _machine = crate::common::shared();
    let dir = temp_dir("prefix-flood");
    let mut config = config(dir.path());
    // Room for a few blocks of the default model (0.37 MB each).
    config.engine.prefix_cache_bytes = 2 << 20;
    let running = server::start(config).await.unwrap();
    let (infer, _) = clients(&running).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut infer = infer.clone();
        tasks.push(tokio::spawn(async move {
            let prompt = format!("{i} {}", long_prompt());
            infer.generate(greedy("", &prompt, 2)).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let bytes = metric(&running, "svfit_prefix_cache_bytes").await;
    assert!(bytes > 0.0 && bytes <= (2 << 20) as f64, "{bytes}");
    assert!(metric(&running, "svfit_prefix_cache_evictions_total").await > 0.0);
    running.stop().await;
}
