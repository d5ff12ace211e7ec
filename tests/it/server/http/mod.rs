//! The OpenAI-compatible HTTP API over real loopback connections, driven by
//! the official `openai` Python package (installed by `scripts/bootstrap`)
//! and by plain HTTP: answers equal `svfit generate --adapter` and the
//! gRPC API's, log-probabilities equal the log-softmax of `svfit logits`,
//! and every refusal has its status and an OpenAI-shaped body.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use svfit::server;
use svfit::server::pb;

use super::common::serve::*;
use super::common::temp_dir;

mod files;
pub(crate) mod jobs;
mod structured;
mod tools;

/// The Python with `openai` that `scripts/bootstrap` installs
/// (`$SVFIT_TEST_PYTHON` overrides it).
fn python() -> PathBuf {
    let python = std::env::var_os("SVFIT_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| svfit::home::home_dir().join("venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/bootstrap (it installs the openai package)",
        python.display()
    );
    python
}

/// Runs `calls` through the `openai` package; one result per call.
pub(crate) fn openai_calls(base_url: &str, ca: Option<&Path>, calls: Vec<Value>) -> Vec<Value> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/server/http/openai_client.py");
    let plan = json!({"base_url": base_url, "ca": ca, "calls": calls});
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(plan.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) fn call(endpoint: &str, key: &str, params: Value) -> Value {
    json!({"endpoint": endpoint, "key": key, "params": params})
}

/// Asserts an OpenAI-shaped error of `status` and returns its object.
fn openai_error(status: u16, got: &(u16, hyper::HeaderMap, String)) -> Value {
    assert_eq!(got.0, status, "{}", got.2);
    let body: Value = serde_json::from_str(&got.2).unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    error.clone()
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    row.iter().map(|&l| l as f64 - max - z.ln()).collect()
}

fn npy(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header..].to_vec()
}

/// `svfit logits` of `text` with `adapter`: the token ids and the
/// log-softmax of every row.
fn cli_logprobs(dir: &Path, adapter: &Path, text: &str) -> (Vec<u32>, Vec<Vec<f64>>) {
    let b = base();
    let (out, ids) = (dir.join("l.npy"), dir.join("ids.npy"));
    let status = Command::new(env!("CARGO_BIN_EXE_svfit"))
        .args(["logits", "--threads", "2", "--text", text])
        .arg("--model")
        .arg(&b.model)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(&out)
        .arg("--ids-out")
        .arg(&ids)
        .env("SVFIT_HOME", &b.home)
        .status()
        .unwrap();
    assert!(status.success());
    let ids: Vec<u32> = npy(&ids)
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let logits = svfit::tensorfile::f32s(&npy(&out));
    let vocab = logits.len() / ids.len();
    (ids, logits.chunks(vocab).map(log_softmax).collect())
}

const PROMPT: &str = PROMPTS[0];
const FRUIT: &str =
    "Name a fruit that grows on trees in warm countries, and say why people like it.";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_client_answers_equal_the_cli_and_grpc() {
    let _machine = crate::common::shared();
    let dir = temp_dir("http-openai");
    let config = keyed_config(dir.path());
    let store = PathBuf::from(&config.adapters);
    let a1 = write(&store, "alice", "a1", &adapter(31));
    write(&store, "bob", "b1", &adapter(32));
    let base_model = base_model();
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;

    // The oracles: `svfit generate --adapter` and the gRPC answers.
    let oracle = cli(Some(&a1), PROMPT, MAX_TOKENS);
    let grpc = infer
        .generate(with_key(greedy("a1", PROMPT, MAX_TOKENS), "ka"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.text, oracle);
    let grpc_usage = grpc.usage.unwrap();
    let mut chat_request = greedy("a1", "", MAX_TOKENS);
    chat_request.input = Some(pb::generate_request::Input::Chat(pb::Chat {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: FRUIT.into(),
        }],
    }));
    let grpc_chat = infer
        .generate(with_key(chat_request, "ka"))
        .await
        .unwrap()
        .into_inner();
    let grpc_chat_usage = grpc_chat.usage.unwrap();
    // A stop string from the middle of the answer.
    let words: Vec<&str> = oracle.split_whitespace().collect();
    let stop = words[words.len() / 2];
    let before_stop = &oracle[..oracle.find(stop).unwrap()];

    let completion = |extra: Value| {
        let mut p =
            json!({"model": "a1", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        call("completions", "ka", p)
    };
    let chat = |extra: Value| {
        let mut p = json!({"model": "a1", "messages": [{"role": "user", "content": FRUIT}],
                           "max_tokens": MAX_TOKENS, "temperature": 0});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        call("chat", "ka", p)
    };
    let message = json!([{"role": "user", "content": "x"}]);
    let mut mix = completion(json!({"model": base_model}));
    mix["extra_body"] = json!({"svfit": {"mix": [{"adapter": "a1", "weight": 1.0}]}});
    let calls = vec![
        completion(json!({})),
        completion(json!({"stream": true, "stream_options": {"include_usage": true}})),
        chat(json!({})),
        chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
        completion(json!({"logprobs": 3})),
        chat(json!({"logprobs": true, "top_logprobs": 2})),
        completion(json!({"stop": [stop]})),
        mix,
        call(
            "completions",
            "wrong",
            json!({"model": "a1", "prompt": "x"}),
        ),
        call(
            "chat",
            "ka",
            json!({"model": "bob/b1", "messages": message}),
        ),
        call("chat", "ka", json!({"model": "b1", "messages": message})),
        call(
            "chat",
            "ka",
            json!({"model": "a1", "messages": message, "n": 2}),
        ),
        call(
            "completions",
            "ka",
            json!({"model": "a1", "prompt": "x".repeat(4 << 20)}),
        ),
        call("models", "ka", json!({})),
        call("models", "kroot", json!({})),
        call("model", "ka", json!({"id": "a1"})),
        call(
            "chat",
            "kb",
            json!({"model": base_model, "messages": message, "max_tokens": 1}),
        ),
    ];
    let url = format!("http://{}/v1", running.http_addr.unwrap());
    let r = tokio::task::spawn_blocking(move || openai_calls(&url, None, calls))
        .await
        .unwrap();

    let usage = json!({
        "prompt_tokens": grpc_usage.prompt_tokens,
        "completion_tokens": grpc_usage.completion_tokens,
        "total_tokens": grpc_usage.prompt_tokens + grpc_usage.completion_tokens,
    });
    let chat_usage = json!({
        "prompt_tokens": grpc_chat_usage.prompt_tokens,
        "completion_tokens": grpc_chat_usage.completion_tokens,
        "total_tokens": grpc_chat_usage.prompt_tokens + grpc_chat_usage.completion_tokens,
    });
    let finish = |ours: &str| svfit::server::openai::finish_reason(ours, false).to_string();
    let (finish, chat_finish) = (
        finish(&grpc.finish_reason),
        finish(&grpc_chat.finish_reason),
    );
    for (i, (text, usage, finish)) in [
        (&oracle, &usage, &finish),
        (&oracle, &usage, &finish),
        (&grpc_chat.text, &chat_usage, &chat_finish),
        (&grpc_chat.text, &chat_usage, &chat_finish),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(r[i]["status"], 200, "call {i}: {}", r[i]);
        assert_eq!(r[i]["text"].as_str(), Some(text.as_str()), "call {i}");
        let usage_of = |u: &Value| {
            json!({"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                   "total_tokens": u["total_tokens"]})
        };
        assert_eq!(&usage_of(&r[i]["usage"]), usage, "call {i}");
        assert_eq!(r[i]["finish"].as_str(), Some(finish.as_str()), "call {i}");
    }
    assert!(r[1]["chunks"].as_u64().unwrap() > 2, "streamed in pieces");
    // The chat's prompt was seen (over gRPC, with this adapter): its whole
    // blocks came from the prefix cache, and usage says so.
    let cached = (grpc_chat_usage.prompt_tokens as u64 - 1) / 16 * 16;
    assert!(cached > 0);
    for i in [2, 3] {
        assert_eq!(
            r[i]["usage"]["prompt_tokens_details"]["cached_tokens"],
            json!(cached),
            "call {i}"
        );
    }
    assert_eq!(r[0]["object"], "text_completion");
    assert_eq!(r[2]["object"], "chat.completion");

    // Log-probabilities: the log-softmax of `svfit logits` over the prompt
    // and the answer, at the positions that predicted each answer token.
    let (ids, rows) = cli_logprobs(dir.path(), &a1, &format!("{PROMPT}{oracle}"));
    let prompt_len = grpc_usage.prompt_tokens as usize;
    assert_eq!(
        &ids[prompt_len..],
        &grpc.token_ids[..],
        "the answer re-tokenizes alike"
    );
    let lp = &r[4]["logprobs"];
    assert_eq!(r[4]["text"].as_str(), Some(oracle.as_str()));
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), grpc.token_ids.len());
    let mut worst = 0f64;
    for (i, (&token, got)) in grpc.token_ids.iter().zip(token_logprobs).enumerate() {
        let row = &rows[prompt_len - 1 + i];
        worst = worst.max((got.as_f64().unwrap() - row[token as usize]).abs());
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let top: Vec<f64> = lp["top_logprobs"][i]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(!top.is_empty() && top.len() <= 3);
        for v in top {
            assert!(
                sorted[..3].iter().any(|s| (s - v).abs() < 1e-4),
                "{v} not in {:?}",
                &sorted[..3]
            );
        }
    }
    eprintln!("largest logprob difference from svfit logits: {worst:e}");
    assert!(worst < 1e-4, "{worst}");
    let chat_lp = r[5]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(chat_lp.len() as u32, grpc_chat_usage.completion_tokens);
    assert_eq!(chat_lp[0]["top_logprobs"].as_array().unwrap().len(), 2);

    // A stop string cuts the answer before it.
    assert_eq!(r[6]["text"].as_str(), Some(before_stop));
    assert_eq!(r[6]["finish"], "stop");
    // A mix of one adapter at weight 1 is that adapter.
    assert_eq!(r[7]["text"].as_str(), Some(oracle.as_str()), "{}", r[7]);

    // Refusals: status, exception class and an OpenAI error object.
    for (i, status, exception) in [
        (8, 401, "AuthenticationError"),
        (9, 403, "PermissionDeniedError"),
        (10, 404, "NotFoundError"),
        (11, 400, "BadRequestError"),
        (12, 413, "APIStatusError"),
    ] {
        assert_eq!(r[i]["status"], status, "call {i}: {}", r[i]);
        assert_eq!(r[i]["exception"], exception, "call {i}");
        assert!(r[i]["error"]["message"].is_string(), "call {i}: {}", r[i]);
        assert!(r[i]["error"]["type"].is_string(), "call {i}: {}", r[i]);
    }
    assert_eq!(r[11]["error"]["param"], "n");

    // Models: the base and the caller's adapters; an admin sees all.
    assert_eq!(r[13]["ids"], json!([base_model, "a1"]));
    assert_eq!(r[14]["ids"], json!([base_model, "alice/a1", "bob/b1"]));
    assert_eq!(r[15]["ids"], json!(["a1"]));
    assert_eq!(r[15]["version"], 1);
    assert_eq!(r[16]["status"], 200, "{}", r[16]);

    // Both APIs are counted, each by its label.
    assert!(metric(&running, "svfit_requests_total{api=\"http\"}").await >= 13.0);
    assert_eq!(
        metric(&running, "svfit_requests_total{api=\"grpc\"}").await,
        2.0
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_http_errors_cancellation_and_drain() {
    let _machine = crate::common::shared();
    let dir = temp_dir("http-plain");
    let running = server::start(config(dir.path())).await.unwrap();
    let addr = running.http_addr.unwrap();
    let post = |path: &'static str, body: String| async move {
        http(addr, "POST", path, &[], &body).await
    };

    let e = openai_error(400, &post("/v1/completions", "{".into()).await);
    assert_eq!(e["type"], "invalid_request_error");
    let e = openai_error(
        400,
        &post("/v1/chat/completions", json!({"model": "x"}).to_string()).await,
    );
    assert_eq!(e["param"], "messages");
    let e = openai_error(
        400,
        &post(
            "/v1/completions",
            json!({"model": "x", "prompt": "y", "frequency_penalty": 1}).to_string(),
        )
        .await,
    );
    assert_eq!(e["param"], "frequency_penalty");
    let e = openai_error(
        400,
        &post(
            "/v1/completions",
            json!({"model": "a b", "prompt": "y"}).to_string(),
        )
        .await,
    );
    assert_eq!(e["param"], "model");
    openai_error(
        404,
        &post(
            "/v1/completions",
            json!({"model": "nobody", "prompt": "y"}).to_string(),
        )
        .await,
    );
    openai_error(404, &http(addr, "GET", "/v2/elsewhere", &[], "").await);
    let huge = json!({"model": "x", "prompt": "é".repeat(1 << 20)}).to_string();
    let e = openai_error(413, &post("/v1/completions", huge).await);
    assert_eq!(e["code"], "request_too_large");
    let (status, _, body) = http(addr, "GET", "/health", &[], "").await;
    assert_eq!((status, body.as_str()), (200, "serving\n"));

    // A dropped streaming client frees its sequence.
    let stream_request = |max_tokens: u32| {
        let body = json!({"model": base_model(), "prompt": ENDLESS,
                          "max_tokens": max_tokens, "temperature": 0, "stream": true});
        hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/v1/completions"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.request(stream_request(2000)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap()));
    }
    assert_eq!(metric(&running, "svfit_active_sequences").await, 1.0);
    drop(body);
    drop(client);
    let start = Instant::now();
    while metric(&running, "svfit_active_sequences").await != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "sequence not freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        metric(&running, "svfit_requests_cancelled_total").await,
        1.0
    );

    // Draining: the port closes at once (a proxy moves on to another
    // replica); the running request is cut at the drain's deadline.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.request(stream_request(2000)).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    let drained = tokio::spawn(running.drain(Duration::from_secs(2)));
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "new connections were still accepted while draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(drained.await.unwrap(), 1, "the endless request was cut");
}

/// The base model's name, as `/v1/models` lists it.
fn base_model() -> String {
    base()
        .model
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_tenant_rates_over_http() {
    let _machine = crate::common::shared();
    let dir = temp_dir("http-tls");
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut config = config(dir.path());
    config.tls = Some((cert_path.clone(), key_path));
    config.tenant_rate = 0.001;
    config.tenant_burst = 2.0;
    let running = server::start(config).await.unwrap();
    let base = base_model();
    let ask = call(
        "completions",
        "",
        json!({"model": base, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}),
    );
    let url = format!("https://{}/v1", running.http_addr.unwrap());
    let r = tokio::task::spawn_blocking(move || {
        openai_calls(&url, Some(&cert_path), vec![ask.clone(), ask.clone(), ask])
    })
    .await
    .unwrap();
    assert_eq!(r[0]["status"], 200, "{}", r[0]);
    assert_eq!(r[0]["usage"]["completion_tokens"], 2);
    assert_eq!(r[1]["status"], 200, "{}", r[1]);
    assert_eq!(r[2]["status"], 429, "{}", r[2]);
    assert_eq!(r[2]["exception"], "RateLimitError");
    assert!(
        r[2]["retry_after"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    running.stop().await;
}
