//! The gRPC server over real loopback connections, on the default model,
//! against `svfit generate --adapter` as the oracle: concurrent tenants,
//! hot swap, eviction, cancellation, isolation, no cross-adapter reuse,
//! error codes, health and reflection.

use crate::common;
mod gemma;
pub(crate) mod http;
mod lora;
mod metrics;
mod phi3;
mod prefix;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::serve::*;
use common::temp_dir;
use svfit::server;
use svfit::server::pb;
use svfit::server::pb::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tenants_get_their_own_adapters() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-tenants");
    let mut config = config(dir.path());
    let keys = dir.path().join("keys.txt");
    let mut key_lines = String::from("# key tenant\n");
    let mut files = Vec::new();
    for t in 0..8 {
        key_lines.push_str(&format!("key{t} tenant{t}\n"));
        files.push(write(
            Path::new(&config.adapters),
            &format!("tenant{t}"),
            "style",
            &adapter(t),
        ));
    }
    std::fs::write(&keys, key_lines).unwrap();
    config.api_keys = Some(keys);
    let running = server::start(config).await.unwrap();
    let (client, _) = clients(&running).await;

    // 16 clients: 8 tenants x 2 prompts, half streaming, all at once.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        for (p, prompt) in PROMPTS.iter().enumerate() {
            let mut client = client.clone();
            let request = with_key(greedy("style", prompt, MAX_TOKENS), &format!("key{t}"));
            tasks.push(tokio::spawn(async move {
                let text = if p == 0 {
                    stream_text(&mut client, request).await.0
                } else {
                    client.generate(request).await.unwrap().into_inner().text
                };
                (t, p, text)
            }));
        }
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let distinct: std::collections::HashSet<&String> = answers.iter().map(|a| &a.2).collect();
    assert!(distinct.len() > 8, "adapters give different answers");
    for (t, p, text) in &answers {
        let want = cli(Some(&files[*t as usize]), PROMPTS[*p], MAX_TOKENS);
        assert_eq!(text, &want, "tenant {t}, prompt {p}");
    }
    // The latency histograms: one first token per request, one gap per
    // later token, one step time per step.
    let first_tokens = metric(&running, "svfit_time_to_first_token_seconds_count").await;
    assert_eq!(first_tokens, 16.0);
    assert_eq!(
        metric(&running, "svfit_inter_token_latency_seconds_count").await,
        metric(&running, "svfit_generated_tokens_total").await - first_tokens
    );
    assert_eq!(
        metric(&running, "svfit_step_duration_seconds_count").await,
        metric(&running, "svfit_steps_total").await
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_upload_delete_list_and_restart() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-swap");
    let config = config(dir.path());
    let running = server::start(config.clone()).await.unwrap();
    let (mut infer, mut admin) = clients(&running).await;
    let (v1_path, v1) = file_bytes(dir.path(), "v1.safetensors", &adapter(101));
    let (v2_path, v2) = file_bytes(dir.path(), "v2.safetensors", &adapter(102));

    let info = upload(&mut admin, "swap", v1).await.unwrap();
    assert_eq!((info.id.as_str(), info.version), ("swap", 1));
    // A long stream on version 1; version 2 arrives after its first token.
    let long = 40;
    let mut stream = infer
        .generate_stream(greedy("swap", PROMPTS[0], long))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.adapter_version, "swap@v1");
    let info = upload(&mut admin, "swap", v2).await.unwrap();
    assert_eq!(info.version, 2);
    let mut text = first.text;
    while let Some(chunk) = stream.message().await.unwrap() {
        text.push_str(&chunk.text);
    }
    assert_eq!(
        text,
        cli(Some(&v1_path), PROMPTS[0], long),
        "stream kept v1"
    );
    let next = infer
        .generate(greedy("swap", PROMPTS[0], long))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.adapter_version, "swap@v2");
    assert_eq!(
        next.text,
        cli(Some(&v2_path), PROMPTS[0], long),
        "next uses v2"
    );

    // List, get, delete.
    upload(&mut admin, "other", std::fs::read(&v1_path).unwrap())
        .await
        .unwrap();
    let list = admin
        .list(pb::ListAdaptersRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.adapters.len(), 1);
    assert_eq!(list.adapters[0].id, "other");
    let page2 = admin
        .list(pb::ListAdaptersRequest {
            page_size: 1,
            page_token: list.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.adapters[0].id, "swap");
    assert_eq!(page2.adapters[0].version, 2);
    assert!(page2.next_page_token.is_empty());
    let r = |id: &str| pb::AdapterRef {
        id: id.into(),
        tenant: String::new(),
    };
    admin.delete(r("other")).await.unwrap();
    assert_eq!(
        admin.get(r("other")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        infer
            .generate(greedy("other", PROMPTS[0], 4))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    running.stop().await;

    // A restart keeps what was uploaded.
    let running = server::start(config).await.unwrap();
    let (mut infer, mut admin) = clients(&running).await;
    assert_eq!(admin.get(r("swap")).await.unwrap().into_inner().version, 2);
    let again = infer
        .generate(greedy("swap", PROMPTS[0], long))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.text, next.text);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_cache_evicts_and_stays_correct() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-evict");
    let mut config = config(dir.path());
    // Room for two adapters' deltas on the host and two device slots.
    let one = adapter(0)
        .sigma
        .iter()
        .map(|(p, s)| p.len() + 4 * s.len())
        .sum::<usize>();
    config.adapter_cache_bytes = 2 * one + one / 2;
    config.engine.adapter_slots = 2;
    let files: Vec<PathBuf> = (0..6)
        .map(|t| {
            write(
                Path::new(&config.adapters),
                "default",
                &format!("t{t}"),
                &adapter(200 + t),
            )
        })
        .collect();
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let want: Vec<String> = files.iter().map(|f| cli(Some(f), PROMPTS[1], 8)).collect();
    for round in 0..2 {
        for (t, want) in want.iter().enumerate() {
            let got = infer
                .generate(greedy(&format!("t{t}"), PROMPTS[1], 8))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(&got.text, want, "round {round}, tenant {t}");
        }
    }
    // Pins: with two slots, one adapter may be pinned, not two.
    let (_, mut admin) = clients(&running).await;
    let pin = |id: &str, pinned: bool| pb::PinRequest {
        id: id.into(),
        tenant: String::new(),
        pinned,
    };
    assert!(
        admin
            .pin(pin("t0", true))
            .await
            .unwrap()
            .into_inner()
            .pinned
    );
    assert_eq!(
        admin.pin(pin("t1", true)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    for (t, want) in want.iter().enumerate() {
        let got = infer
            .generate(greedy(&format!("t{t}"), PROMPTS[1], 8))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.text, want, "pinned round, tenant {t}");
    }
    assert!(
        !admin
            .pin(pin("t0", false))
            .await
            .unwrap()
            .into_inner()
            .pinned
    );
    let evictions = metric(&running, "svfit_adapter_cache_evictions_total").await;
    let slot_evictions = metric(&running, "svfit_adapter_slot_evictions_total").await;
    eprintln!("host evictions {evictions}, slot evictions {slot_evictions}");
    assert!(evictions >= 8.0, "host cache evictions: {evictions}");
    assert!(slot_evictions >= 8.0, "slot evictions: {slot_evictions}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_stream_frees_its_sequence() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-cancel");
    let running = server::start(config(dir.path())).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let mut stream = infer
        .generate_stream(greedy("", ENDLESS, 2000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    stream.message().await.unwrap().unwrap();
    let info = infer
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.active_sequences, 1);
    drop(stream);
    let start = Instant::now();
    loop {
        let info = infer
            .model_info(pb::ModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        if info.active_sequences == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "sequence not freed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("freed after {:?}", start.elapsed());
    assert_eq!(
        metric(&running, "svfit_requests_cancelled_total").await,
        1.0
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_cannot_touch_each_others_adapters() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-isolation");
    let config = keyed_config(dir.path());
    let running = server::start(config).await.unwrap();
    let (mut infer, mut admin) = clients(&running).await;
    let (_, bytes) = file_bytes(dir.path(), "secret.safetensors", &adapter(300));

    let chunks = upload_chunks("secret", &bytes);
    admin
        .upload(with_key(tokio_stream::iter(chunks), "kb"))
        .await
        .unwrap();
    let r = |id: &str, tenant: &str| pb::AdapterRef {
        id: id.into(),
        tenant: tenant.into(),
    };
    // Alice can neither use, see, list nor delete it.
    assert_eq!(
        code(
            infer
                .generate(with_key(greedy("secret", PROMPTS[0], 2), "ka"))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            infer
                .generate(with_key(greedy("bob/secret", PROMPTS[0], 2), "ka"))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(admin.get(with_key(r("secret", ""), "ka")).await),
        Code::NotFound
    );
    assert_eq!(
        code(admin.get(with_key(r("secret", "bob"), "ka")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(admin.delete(with_key(r("secret", ""), "ka")).await),
        Code::NotFound
    );
    assert_eq!(
        code(admin.delete(with_key(r("secret", "bob"), "ka")).await),
        Code::PermissionDenied
    );
    let alice = admin
        .list(with_key(pb::ListAdaptersRequest::default(), "ka"))
        .await
        .unwrap()
        .into_inner();
    assert!(alice.adapters.is_empty());
    let bob_as_alice = pb::ListAdaptersRequest {
        tenant: "bob".into(),
        ..Default::default()
    };
    assert_eq!(
        code(admin.list(with_key(bob_as_alice, "ka")).await),
        Code::PermissionDenied
    );
    // Bob uses it; the admin sees it.
    infer
        .generate(with_key(greedy("secret", PROMPTS[0], 2), "kb"))
        .await
        .unwrap();
    let all = admin
        .list(with_key(pb::ListAdaptersRequest::default(), "kroot"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.adapters.len(), 1);
    assert_eq!(all.adapters[0].tenant, "bob");
    // No key, or a wrong one.
    assert_eq!(
        code(infer.generate(greedy("", PROMPTS[0], 2)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            infer
                .generate(with_key(greedy("", PROMPTS[0], 2), "nope"))
                .await
        ),
        Code::Unauthenticated
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_prompt_never_reuses_another_adapters_state() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-reuse");
    let config = config(dir.path());
    let a = write(Path::new(&config.adapters), "default", "a", &adapter(400));
    let b = write(Path::new(&config.adapters), "default", "b", &adapter(401));
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let want_a = cli(Some(&a), PROMPTS[1], MAX_TOKENS);
    let want_b = cli(Some(&b), PROMPTS[1], MAX_TOKENS);
    let want_base = cli(None, PROMPTS[1], MAX_TOKENS);
    assert!(want_a != want_b && want_a != want_base);
    for (adapter, want) in [
        ("", &want_base),
        ("a", &want_a),
        ("b", &want_b),
        ("a", &want_a),
        ("", &want_base),
        ("a", &want_a),
    ] {
        let got = infer
            .generate(greedy(adapter, PROMPTS[1], MAX_TOKENS))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.text, want, "adapter '{adapter}'");
    }
    // The adapter may also come as request metadata; the body wins.
    let mut r = Request::new(greedy("", PROMPTS[1], MAX_TOKENS));
    r.metadata_mut()
        .insert("x-svfit-adapter", "b".parse().unwrap());
    assert_eq!(infer.generate(r).await.unwrap().into_inner().text, want_b);
    let mut r = Request::new(greedy("a", PROMPTS[1], MAX_TOKENS));
    r.metadata_mut()
        .insert("x-svfit-adapter", "b".parse().unwrap());
    assert_eq!(infer.generate(r).await.unwrap().into_inner().text, want_a);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_of_several_prefill_chunks_runs_every_chunk_with_its_adapter() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-long-prompt");
    let config = config(dir.path());
    // A strong adapter, so that the keys and values of the first chunks
    // matter to the answer.
    let mut strong = adapter(410);
    let mut rng = svfit::rng::Rng::new(411);
    for v in strong.sigma.iter_mut().flat_map(|(_, s)| s.iter_mut()) {
        *v *= 1.0 + rng.normal();
    }
    let a = write(Path::new(&config.adapters), "default", "a", &strong);
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    // Over 1,000 tokens: three prefill chunks of at most 512, the facts
    // in the first one.
    let mut prompt = String::from("My name is Ada and I live in Lisbon. ");
    for i in 0..330 {
        prompt.push_str(&format!("Note {i}. "));
    }
    prompt.push_str("What is my name and where do I live?");
    let want = cli(Some(&a), &prompt, 16);
    let got = infer
        .generate(greedy("a", &prompt, 16))
        .await
        .unwrap()
        .into_inner();
    eprintln!("{want:?} / {:?}", got.text);
    assert!(got.usage.unwrap().prompt_tokens > 1024);
    assert_eq!(got.text, want);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_has_its_code() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-errors");
    let mut config = config(dir.path());
    config.engine.context = 64;
    config.engine.max_sequences = 1;
    config.engine.queue_limit = 1;
    let running = server::start(config).await.unwrap();
    let (mut infer, mut admin) = clients(&running).await;
    assert_eq!(
        code(infer.generate(greedy("ghost", "hi", 2)).await),
        Code::NotFound
    );
    assert_eq!(
        code(infer.generate(greedy("", "", 2)).await),
        Code::InvalidArgument
    );
    let long = "word ".repeat(200);
    assert_eq!(
        code(infer.generate(greedy("", &long, 2)).await),
        Code::InvalidArgument
    );
    let mut bad = greedy("", "hi", 2);
    bad.sampling = Some(pb::Sampling {
        top_p: Some(2.0),
        ..Default::default()
    });
    assert_eq!(code(infer.generate(bad).await), Code::InvalidArgument);
    assert_eq!(
        code(infer.generate(greedy("../x", "hi", 2)).await),
        Code::InvalidArgument
    );
    let mut no_input = greedy("", "hi", 2);
    no_input.input = None;
    assert_eq!(code(infer.generate(no_input).await), Code::InvalidArgument);

    // Uploads: NaN, another base, garbage.
    let mut nan = adapter(500);
    nan.sigma[3].1[7] = f32::NAN;
    let (_, bytes) = file_bytes(dir.path(), "nan.safetensors", &nan);
    let status = upload(&mut admin, "nan", bytes).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("NaN"), "{}", status.message());
    let mut other = adapter(501);
    other.base_sha256 = "0".repeat(64);
    let (_, bytes) = file_bytes(dir.path(), "other.safetensors", &other);
    let status = upload(&mut admin, "other", bytes).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    let status = upload(&mut admin, "junk", b"not an adapter".to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert_eq!(
        admin
            .get(pb::AdapterRef {
                id: "nan".into(),
                tenant: String::new()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "a refused upload leaves nothing behind"
    );

    // A full queue: one sequence runs, one waits, the next is refused.
    let mut running_stream = infer
        .generate_stream(greedy("", "Count to a thousand:", 50))
        .await
        .unwrap()
        .into_inner();
    running_stream.message().await.unwrap();
    let mut waiting = infer.clone();
    let waiter = tokio::spawn(async move { waiting.generate(greedy("", "Hello", 2)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        code(infer.generate(greedy("", "Hello", 2)).await),
        Code::ResourceExhausted
    );
    drop(running_stream);
    waiter.await.unwrap().unwrap();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_answer() {
    let _machine = crate::common::shared();
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = temp_dir("server-health");
    let running = server::start(config(dir.path())).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "svfit.v1.Inference", "svfit.v1.Adapters"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, 1, "'{service}' is SERVING");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "svfit.v1.Inference",
        "svfit.v1.Adapters",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadline_cancels_the_request() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-deadline");
    let running = server::start(config(dir.path())).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let mut request = Request::new(greedy("", ENDLESS, 2000));
    request.set_timeout(Duration::from_millis(300));
    let status = infer.generate(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let start = Instant::now();
    while metric(&running, "svfit_active_sequences").await > 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "sequence not freed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        metric(&running, "svfit_requests_cancelled_total").await,
        1.0
    );
    running.stop().await;
}

/// One tenant's flood does not starve another: admission is round-robin
/// over tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_tenant_does_not_starve_others() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-fair");
    let mut config = config(dir.path());
    config.engine.max_sequences = 2;
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "ka alice\nkb bob\n").unwrap();
    config.api_keys = Some(keys);
    let running = server::start(config).await.unwrap();
    let (infer, _) = clients(&running).await;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..16 {
        let (mut client, done) = (infer.clone(), done_tx.clone());
        tokio::spawn(async move {
            let r = with_key(greedy("", PROMPTS[0], 24), "ka");
            client.generate(r).await.unwrap();
            let _ = done.send(format!("alice{i}"));
        });
    }
    // Bob comes once alice's flood waits behind her two running requests.
    let start = Instant::now();
    while metric(&running, "svfit_queue_depth").await < 12.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "alice's requests never queued"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (mut client, done) = (infer.clone(), done_tx.clone());
    tokio::spawn(async move {
        client
            .generate(with_key(greedy("", PROMPTS[0], 24), "kb"))
            .await
            .unwrap();
        let _ = done.send("bob".to_string());
    });
    drop(done_tx);
    let mut order = Vec::new();
    while let Some(name) = done_rx.recv().await {
        order.push(name);
    }
    let bob = order.iter().position(|n| n == "bob").unwrap();
    eprintln!("bob finished {} of {}", bob + 1, order.len());
    assert!(bob <= 4, "bob waited behind alice's flood: {order:?}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_serves_and_plaintext_is_refused() {
    let _machine = crate::common::shared();
    use tonic::transport::{Certificate, ClientTlsConfig};
    let dir = temp_dir("server-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, &key_pem).unwrap();
    let mut config = config(dir.path());
    config.tls = Some((cert_path, key_path));
    let running = server::start(config).await.unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", running.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut infer = InferenceClient::new(channel);
    let out = infer
        .generate(greedy("", PROMPTS[1], 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.usage.unwrap().completion_tokens, 4);
    let (mut plain, _) = clients(&running).await;
    assert!(plain.model_info(pb::ModelInfoRequest {}).await.is_err());
    running.stop().await;
}

/// The object-store adapter backend: `memory://` by default, or the URL in
/// `SVFIT_TEST_OBJECT_URL` (e.g. `s3://bucket/prefix` against an S3 mock,
/// with the `s3` feature and `AWS_*` variables).
#[cfg(feature = "object-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_store_adapters_round_trip() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-objects");
    let mut config = config(dir.path());
    config.adapters =
        std::env::var("SVFIT_TEST_OBJECT_URL").unwrap_or_else(|_| "memory:///adapters".into());
    let running = server::start(config).await.unwrap();
    let (mut infer, mut admin) = clients(&running).await;
    let (v1_path, v1) = file_bytes(dir.path(), "v1.safetensors", &adapter(600));
    let (v2_path, v2) = file_bytes(dir.path(), "v2.safetensors", &adapter(601));
    assert_eq!(upload(&mut admin, "obj", v1).await.unwrap().version, 1);
    let got = infer
        .generate(greedy("obj", PROMPTS[1], MAX_TOKENS))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.text, cli(Some(&v1_path), PROMPTS[1], MAX_TOKENS));
    assert_eq!(upload(&mut admin, "obj", v2).await.unwrap().version, 2);
    let got = infer
        .generate(greedy("obj", PROMPTS[1], MAX_TOKENS))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.adapter_version, "obj@v2");
    assert_eq!(got.text, cli(Some(&v2_path), PROMPTS[1], MAX_TOKENS));
    let list = admin
        .list(pb::ListAdaptersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.adapters.len(), 1);
    let r = pb::AdapterRef {
        id: "obj".into(),
        tenant: String::new(),
    };
    admin.delete(r.clone()).await.unwrap();
    assert_eq!(admin.get(r).await.unwrap_err().code(), Code::NotFound);
    running.stop().await;
}

/// Runs `svfit ARGS PATHS --model M` with the shared home; asserts success.
fn svfit_ok(args: &[&str], paths: &[&Path]) {
    let b = base();
    let out = Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(args)
        .args(paths)
        .arg("--model")
        .arg(&b.model)
        .env("SVFIT_HOME", &b.home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "svfit {args:?}: {stderr}");
}

/// Greedy continuation of `prompt` by llama.cpp on the GGUF at `model`.
fn llama_cpp_greedy(model: &Path, prompt: &str, max_tokens: usize) -> String {
    use svfit::model::{Batch, Tokenizer};
    let tokenizer = Tokenizer::load(model).unwrap();
    let reference = common::reference(model);
    let mut session = reference.session(512, 1, 2).unwrap();
    let ids = tokenizer.encode(prompt, true);
    let mut batch = Batch::new();
    batch.add_sequence(&ids, 0, 0, true);
    let mut logits = session.decode(&batch).unwrap();
    let mut out = Vec::new();
    for i in 0..max_tokens {
        let next = svfit::sampling::argmax(logits.row(logits.n_rows() - 1));
        if tokenizer.is_eog(next) {
            break;
        }
        out.push(next);
        batch.clear();
        batch.add(next, ids.len() + i, 0, true);
        logits = session.decode(&batch).unwrap();
    }
    tokenizer.decode(&out)
}

/// An adapter made by `svfit train` is an ordinary adapter: the server
/// serves it as `svfit generate --adapter` answers, and llama.cpp running
/// `svfit merge` of it answers the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trained_adapter_serves_and_merges() {
    let _machine = crate::common::shared();
    let dir = temp_dir("server-trained");
    let data = dir.path().join("colors.jsonl");
    let lines: Vec<String> = [
        "sky", "grass", "snow", "coal", "blood", "sun", "leaf", "milk",
    ]
    .iter()
    .zip([
        "blue", "green", "white", "black", "red", "yellow", "green", "white",
    ])
    .map(|(thing, color)| {
        serde_json::json!({
            "prompt": format!("What color is {thing}? One word."),
            "completion": color,
        })
        .to_string()
    })
    .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let config = config(dir.path());
    let adapter = dir.path().join("out/colors.safetensors");
    let mut train = vec![
        "train",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--epochs",
        "2",
    ];
    train.extend(["--batch", "4", "--lr", "0.05", "--ctx", "128"]);
    // For the factors `config` serves (q,v, not the CLI's default targets).
    let targets = base().targets_args();
    train.extend(targets.iter().map(String::as_str));
    train.push("--data");
    svfit_ok(&train, &[&data, Path::new("--out"), &adapter]);

    // The chat prompt, rendered as the trainer renders it.
    let prompt =
        "<|im_start|>user\nWhat color is snow? One word.<|im_end|>\n<|im_start|>assistant\n";
    let want = cli(Some(&adapter), prompt, MAX_TOKENS);
    assert_ne!(
        want,
        cli(None, prompt, MAX_TOKENS),
        "training changed nothing"
    );

    let stored = Path::new(&config.adapters).join("default/colors.safetensors");
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    std::fs::copy(&adapter, &stored).unwrap();
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let got = infer
        .generate(greedy("colors", prompt, MAX_TOKENS))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.text, want);
    running.stop().await;

    let merged = dir.path().join("merged.gguf");
    svfit_ok(
        &["merge", "--type", "f32", "--adapter"],
        &[&adapter, Path::new("--out"), &merged],
    );
    assert_eq!(llama_cpp_greedy(&merged, prompt, MAX_TOKENS as usize), want);
}
