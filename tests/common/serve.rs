//! Fixtures of the server tests (`tests/it/server.rs`, `tests/it/trust.rs`): the
//! default model's factors in a shared home, random adapters, a server
//! config, loopback clients, and `svfit generate` as the oracle.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use svfit::adapter::Adapter;
use svfit::engine::EngineConfig;
use svfit::factors::{self, FactorsKey, SingularValues};
use svfit::model::{LoadOptions, WeightFormat};
use svfit::server::pb::adapters_client::AdaptersClient;
use svfit::server::pb::inference_client::InferenceClient;
use svfit::server::pb::{self, generate_request::Input};
use svfit::server::{Running, ServeConfig};
use tonic::transport::Channel;
use tonic::{Code, Request};

pub const MAX_TOKENS: u32 = 12;

/// The factors of the default model, computed once into a home shared by
/// every test of this file (and by the CLI runs used as the oracle).
pub struct Base {
    pub home: PathBuf,
    pub model: PathBuf,
    pub key: FactorsKey,
    pub singular: SingularValues,
}

pub fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let home = std::env::temp_dir().join("svfit-test-server-home");
        let model = super::default_model();
        let key = FactorsKey::for_model(&model, "q,v", "energy:0.99", "f16").unwrap();
        let path = factors::ensure(&model, &key, &home).unwrap();
        let singular = factors::read_singular_values(&path, &key).unwrap();
        Base {
            home,
            model,
            key,
            singular,
        }
    })
}

impl Base {
    /// `--targets` of these factors, for a `svfit serve` process that serves
    /// the adapters made here (`q,v`, not the CLI's default targets).
    pub fn targets_args(&self) -> [String; 2] {
        ["--targets".into(), self.key.targets.to_string()]
    }
}

/// An adapter with sigma = S (1 + scale z).
pub fn adapter(seed: u64) -> Adapter {
    let b = base();
    Adapter::perturbed(&b.key, &b.singular, 0.3, seed)
}

pub fn write(dir: &Path, tenant: &str, id: &str, a: &Adapter) -> PathBuf {
    let path = dir.join(tenant).join(format!("{id}.safetensors"));
    a.write(&path).unwrap();
    path
}

pub fn config(dir: &Path) -> ServeConfig {
    let b = base();
    ServeConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        model: b.model.clone(),
        // As `svfit serve` (and the `svfit generate` the tests compare
        // with) loads it by default.
        load: LoadOptions {
            device: "cpu".into(),
            threads: 2,
            weights: WeightFormat::Auto,
            ..LoadOptions::default()
        },
        factors: b.key.clone(),
        home: b.home.clone(),
        adapters: dir.join("adapters").to_string_lossy().into_owned(),
        adapter_cache_bytes: 64 << 20,
        engine: EngineConfig {
            max_sequences: 16,
            context: 4096,
            kv_cells: 8192,
            adapter_slots: 16,
            queue_limit: 256,
            tenant_queue_limit: 64,
            prefill_budget: 512,
            prefix_cache_bytes: 256 << 20,
            lora: svfit::engine::LoraConfig::default(),
        },
        limits: svfit::server::validation::Limits {
            max_tokens_default: 64,
            ..Default::default()
        },
        pins_per_tenant: 4,
        max_connections: 1024,
        tenant_rate: 0.0,
        tenant_burst: 0.0,
        upload_timeout: std::time::Duration::from_secs(60),
        api_keys: None,
        tls: None,
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        http_addr: Some("127.0.0.1:0".parse().unwrap()),
        allow_remote: false,
        memory_limit: None,
        jobs: Default::default(),
    }
}

/// [`config`] with API keys: `ka` for alice, `kb` for bob, `kroot` for an
/// admin.
pub fn keyed_config(dir: &Path) -> ServeConfig {
    let mut config = config(dir);
    let keys = dir.join("keys.txt");
    std::fs::write(&keys, "ka alice\nkb bob\nkroot *\n").unwrap();
    config.api_keys = Some(keys);
    config
}

pub async fn clients(running: &Running) -> (InferenceClient<Channel>, AdaptersClient<Channel>) {
    let url = format!("http://{}", running.addr);
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    (
        InferenceClient::new(channel.clone()),
        AdaptersClient::new(channel),
    )
}

pub fn greedy(adapter: &str, prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        adapter: adapter.into(),
        input: Some(Input::Prompt(prompt.into())),
        sampling: Some(pb::Sampling {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens,
        ..Default::default()
    }
}

pub fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// `svfit generate` (greedy) with `adapter` (a file, or none): the oracle.
pub fn cli(adapter: Option<&Path>, prompt: &str, max_tokens: u32) -> String {
    let args = adapter.map(|a| vec!["--adapter".as_ref(), a.as_os_str()]);
    cli_with(&args.unwrap_or_default(), prompt, max_tokens)
}

/// `svfit generate` (greedy) with the arguments `args` (`--mix ...`).
pub fn cli_with(args: &[&std::ffi::OsStr], prompt: &str, max_tokens: u32) -> String {
    let b = base();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_svfit"));
    cmd.args(["generate", "--threads", "2", "--temperature", "0"])
        .args(["--max-tokens", &max_tokens.to_string(), "--prompt", prompt])
        .arg("--model")
        .arg(&b.model)
        .args(args)
        .env("SVFIT_HOME", &b.home);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

pub async fn stream_text(
    client: &mut InferenceClient<Channel>,
    request: Request<pb::GenerateRequest>,
) -> (String, String) {
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut text = String::new();
    let mut finish = String::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        text.push_str(&chunk.text);
        if !chunk.finish_reason.is_empty() {
            finish = chunk.finish_reason;
        }
    }
    (text, finish)
}

pub async fn metric(running: &Running, name: &str) -> f64 {
    metric_at(running.metrics_addr.expect("metrics enabled"), name).await
}

/// The value of metric `name` (with its labels, if any) that the metrics
/// listener at `addr` reports.
pub async fn metric_at(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, _, body) = http(addr, "GET", "/metrics", &[], "").await;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
        .parse()
        .unwrap()
}

/// A plain HTTP/1.1 request with a JSON body and `headers`: status,
/// headers and body of the answer.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    try_http(addr, method, path, headers, body).await.unwrap()
}

/// [`http`], for a server that may not answer: the error instead of a
/// panic.
pub async fn try_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, hyper::HeaderMap, String), Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string())))?;
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// A raw prompt whose greedy continuation does not end by itself within
/// 2,000 tokens (it counts), for requests that must outlive something.
pub const ENDLESS: &str = "1, 2, 3, 4, 5,";

pub const PROMPTS: [&str; 2] = [
    "The three most important things about the ocean are",
    "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
];

pub async fn upload(
    client: &mut AdaptersClient<Channel>,
    id: &str,
    bytes: Vec<u8>,
) -> Result<pb::AdapterInfo, tonic::Status> {
    client
        .upload(tokio_stream::iter(upload_chunks(id, &bytes)))
        .await
        .map(|r| r.into_inner())
}

/// The messages of an upload of `bytes` as `id` in the caller's tenant:
/// the header, then the data in chunks of 8 kB.
pub fn upload_chunks(id: &str, bytes: &[u8]) -> Vec<pb::UploadChunk> {
    let mut chunks = vec![pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
            id: id.into(),
            tenant: String::new(),
            peft_config: String::new(),
        })),
    }];
    for piece in bytes.chunks(8192) {
        chunks.push(pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Data(piece.to_vec())),
        });
    }
    chunks
}

pub fn file_bytes(dir: &Path, name: &str, a: &Adapter) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    a.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// The code of a refused call.
pub fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => panic!("the call succeeded"),
        Err(status) => {
            eprintln!("{:?}: {}", status.code(), status.message());
            status.code()
        }
    }
}

/// An `svfit serve` process, killed when dropped.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub log: std::sync::mpsc::Receiver<String>,
}

/// Spawns `command` (an `svfit serve`) and waits until it listens: its
/// gRPC and metrics addresses come from its log, which goes on to `log`.
pub fn start_process(mut command: Command) -> Process {
    let mut child = command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                // Keep draining so the server never blocks on its log.
                continue;
            }
        }
    });
    let mut addr = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(line) = log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Some(a) = line.strip_prefix("svfit serving on ") {
            addr = Some(a.split(' ').next().unwrap().parse().unwrap());
        }
        if let Some(m) = line.strip_prefix("svfit metrics on http://") {
            let metrics = m.trim_end_matches("/metrics").parse().unwrap();
            return Process {
                child,
                addr: addr.expect("the gRPC address comes first"),
                metrics,
                log,
            };
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("svfit serve did not start");
}

impl Drop for Process {
    /// A failing test leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}
