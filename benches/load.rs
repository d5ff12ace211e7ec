//! Multi-tenant load test: `svfit serve` (in-process, real gRPC over
//! loopback) versus llama.cpp's own HTTP server (`llama-server`, started as a
//! child process) serving the same traffic on the same model and threads.
//!
//! llama-server runs with stock settings: one slot per client, continuous
//! batching, the per-tenant LoRAs (rank 8 on q and v, written by this bench
//! as GGUF LoRA files) loaded at start and named per request; it batches
//! slots together only when their LoRA sets are equal. Each request is a
//! streaming completion on a fresh connection with `cache_prompt: false`.
//! `scripts/build-llama-server` builds it (llama.cpp's release build with
//! its default CPU kernels); pass `--llama-server PATH` or set
//! `SVFIT_LLAMA_SERVER` to use another build.
//!
//! `cargo bench --bench load -- --scenario NAME [options]`
//!
//! Scenarios: `base` (no adapters), `one` (every request on one adapter),
//! `many` (64 adapters, all resident; svfit also runs the `base` traffic in
//! the same run, for the cost of adapters), `cold` (1,000 adapters, a host cache
//! and slot pool smaller than the working set: cold loads from the store;
//! a cache of 20 adapters and 16 slots; svfit only, plus the measured cost of one
//! cold load), `mix` (each request
//! a weighted mix of two of 64 adapters; svfit only), `lora` (the `many`
//! traffic with 64 LoRAs in place of SVFit adapters: the rank-8 q,v GGUF
//! LoRAs llama-server gets, imported by svfit (`adapter import`'s path) and
//! served from 64 LoRA slots; svfit also runs the `many` traffic with SVFit
//! adapters in the same run), `soak` (the `many`
//! traffic twice on svfit: alone, then with a hostile tenant beside it that
//! sends one malformed or abusive request after another, the catalogue the
//! trust tests send (`tests/common/hostile.rs`: non-ASCII stop strings,
//! huge lists, extreme numbers, other tenants' and unknown adapters,
//! over-long prompts, odd metadata); reports the hostile requests' codes, any
//! INTERNAL or UNAVAILABLE among them, and the ordinary traffic's
//! throughput and latency with the attack relative to without),
//! `shared-prefix` (64 tenants, each with its adapter and its own
//! ~500-token system prompt; each request a chat of that system prompt and
//! one short question) and `multi-turn` (conversations of 5 turns on a
//! short system prompt, each turn sent with the answers so far): both run
//! twice on svfit, with the prefix cache and without (`--prefix-cache-mb`,
//! default 1024, for the first run), and `structured` (the `many` traffic
//! with half of the requests, at random, constrained by a JSON schema, in
//! turns with the same traffic unconstrained on the same server, as
//! `--api http` takes turns; reports the throughput ratio, its median over
//! the rounds, and the time the constrained turns' steps spent masking),
//! and `job` (the `many` traffic in turns without and with a fine-tuning
//! job running in the server, created through its OpenAI API before each
//! job turn and cancelled after, at `--train-share`; reports throughput
//! and TTFT with the job relative to without, per round and overall, and
//! the job's steps per second beside the traffic).
//!
//! Options: `--clients N` (concurrent streaming clients, default 8),
//! `--seconds S` (per engine, default 40), `--requests N` (stop after N
//! instead), `--rate R` (open loop: Poisson arrivals at R requests/s
//! instead of closed loop), `--prompt-words N` (default 30), `--gen N`
//! (tokens per request, default 32), `--threads N`, `--model PATH`,
//! `--device cpu|cuda|...` (the in-process server's device, default cpu),
//! `--addr HOST:PORT` (drive a running server instead of starting one,
//! e.g. nginx in front of replicas, `scripts/cluster`; its adapters must
//! exist, or `--upload` uploads them first), `--no-llama`, `--llama-server PATH`,
//! `--weights auto|keep|q8_0|f16` (svfit's layout, default auto), `--json FILE`,
//! `--prefill-budget N` (prompt tokens the engine starts per step, default
//! 512), `--hostile-pace-ms N` (soak: the hostile client's pause between
//! requests, default 10), `--api grpc|http` (`http` also runs the same
//! traffic through svfit's OpenAI-compatible HTTP API, in the same run
//! right after gRPC: streaming `/v1/completions`, a fresh connection per
//! request as for llama-server; default grpc).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use svfit::adapter::Adapter;
use svfit::engine::EngineConfig;
use svfit::factors::{self, FactorsKey, SingularValues};
use svfit::ggml::gguf::{GgufFile, GgufWriter};
use svfit::ggml::{self, Type};
use svfit::model::{LoadOptions, WeightFormat};
use svfit::rng::Rng;
use svfit::server::pb::adapters_client::AdaptersClient;
use svfit::server::pb::inference_client::InferenceClient;
use svfit::server::pb::{self, generate_request::Input};
use svfit::store::{AdapterStore, LocalDir, PinLimits};
use tokio::sync::mpsc;

mod common;
#[path = "../tests/common/hostile.rs"]
#[allow(
    dead_code,
    reason = "the soak counts answers; the wanted codes are the tests'"
)]
mod hostile;
#[path = "load/job.rs"]
mod job;

use common::{exit, fail};

const SCENARIOS: [&str; 11] = [
    "base",
    "one",
    "many",
    "lora",
    "cold",
    "mix",
    "soak",
    "shared-prefix",
    "multi-turn",
    "structured",
    "job",
];

/// The options (see the top of this file).
#[derive(Clone, clap::Parser)]
#[command(
    name = "load",
    about = "svfit's multi-tenant load test (see benches/load.rs)"
)]
struct Options {
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS))]
    scenario: String,
    /// Concurrent streaming clients
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds per engine
    #[arg(long, default_value_t = 40.0)]
    seconds: f64,
    /// Stop after this many requests instead
    #[arg(long)]
    requests: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 30)]
    prompt_words: usize,
    /// Tokens generated per request
    #[arg(long, default_value_t = 32)]
    gen: u32,
    #[arg(long, default_value_t = svfit::model::default_threads())]
    threads: usize,
    #[arg(long, default_value_os_t = svfit::home::default_model_path())]
    model: PathBuf,
    /// The in-process server's compute device (cpu, cuda, ...)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Drive a running server (or nginx in front of replicas) instead
    #[arg(long)]
    addr: Option<String>,
    /// Leave llama-server out
    #[arg(long = "no-llama", action = clap::ArgAction::SetFalse)]
    llama: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    prefill_budget: usize,
    /// The soak scenario's hostile client's pause between requests (ms)
    #[arg(long = "hostile-pace-ms", default_value = "10", value_parser = millis)]
    hostile_pace: Duration,
    #[arg(long, default_value = "auto")]
    weights: WeightFormat,
    /// The batched kernels where the CPU runs them (0: ggml's products)
    #[arg(long = "batch-kernels", env = "SVFIT_BATCH_KERNELS", value_name = "1|0",
          default_value = "1", value_parser = common::on_unless_zero, action = clap::ArgAction::Set)]
    batch_kernels: bool,
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Also drive svfit through its HTTP API (`--api http`)
    #[arg(long = "api", value_name = "grpc|http", default_value = "grpc",
          value_parser = api_is_http, action = clap::ArgAction::Set)]
    http: bool,
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mb: usize,
    /// With --addr: upload the scenario's adapters first
    #[arg(long, requires = "addr")]
    upload: bool,
    /// The `job` scenario's --train-share
    #[arg(long, default_value_t = svfit::server::jobs::JobsConfig::default().share)]
    train_share: f64,
    /// Passed by `cargo bench`
    #[arg(long, hide = true)]
    bench: bool,
}

fn millis(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1e3))
        .ok_or_else(|| format!("{s} is not a number of milliseconds"))
}

fn api_is_http(s: &str) -> Result<bool, String> {
    match s {
        "grpc" => Ok(false),
        "http" => Ok(true),
        other => Err(format!("--api must be grpc or http, not {other}")),
    }
}

/// How the bench talks to svfit.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Grpc,
    Http,
    /// gRPC, the traffic without its constraints (`structured`).
    Free,
    /// gRPC, with a fine-tuning job running (`job`).
    Job,
}

/// Rounds of gRPC and HTTP turns with `--api http`, and of constrained and
/// unconstrained turns in `structured`.
const HTTP_ROUNDS: usize = 4;

fn parse_args() -> Options {
    let mut o = <Options as clap::Parser>::parse();
    o.model = svfit::home::resolve_model(Some(&o.model)).unwrap_or_else(fail);
    if o.http && o.addr.is_some() {
        exit("--api http drives an in-process server; drop --addr");
    }
    if o.http && CHAT_SCENARIOS.contains(&o.scenario.as_str()) {
        exit("--api http runs the completion scenarios, not the chat ones");
    }
    if o.http && o.scenario == "structured" {
        exit("--api http does not run the structured scenario (gRPC only)");
    }
    o
}

/// What one request asks for.
#[derive(Clone)]
enum Which {
    Base,
    Adapter(usize),
    Mix(usize, usize),
}

#[derive(Clone)]
struct Job {
    which: Which,
    prompt: String,
    /// A chat instead of the raw prompt: its system prompt and user turns,
    /// sent one request per turn with the answers so far (`shared-prefix`,
    /// `multi-turn`).
    chat: Option<(String, Vec<String>)>,
    /// The answer must follow [`STRUCTURED_SCHEMA`] (`structured`).
    constrained: bool,
}

/// The JSON schema of half of `structured`'s requests: an object whose
/// `story` is at least 1,000 characters, so that no answer completes
/// before `--gen` tokens (every request generates as many tokens as the
/// unconstrained traffic's).
const STRUCTURED_SCHEMA: &str = r#"{"type": "object", "properties": {"title": {"type": "string", "maxLength": 60}, "story": {"type": "string", "minLength": 1000}}, "required": ["title", "story"], "additionalProperties": false}"#;

/// The scenarios whose requests are chats.
const CHAT_SCENARIOS: [&str; 2] = ["shared-prefix", "multi-turn"];

/// Tenants (adapters) of the chat scenarios.
const CHAT_TENANTS: usize = 64;

/// Words of a tenant's system prompt in `shared-prefix` (about 500 tokens).
const SHARED_SYSTEM_WORDS: usize = 420;

/// The traffic of a scenario: an endless, seeded sequence of requests.
struct Traffic {
    adapters: usize,
    scenario: String,
    /// Whether `structured`'s requests keep their constraints.
    constrain: bool,
    words: usize,
    rng: Rng,
}

const WORDS: &[&str] = &[
    "river", "market", "engine", "garden", "letter", "window", "mountain", "signal", "winter",
    "planet", "harbor", "forest", "lantern", "bridge", "meadow", "violin", "castle", "desert",
    "ocean", "silver", "thunder", "village", "compass", "orchard", "library", "canyon",
];

impl Traffic {
    fn new(o: &Options, adapters: usize) -> Self {
        Traffic {
            adapters: adapters.max(1),
            scenario: o.scenario.clone(),
            constrain: true,
            words: o.prompt_words,
            rng: Rng::new(1),
        }
    }

    fn next(&mut self) -> Job {
        let mut pick = |n: usize| (self.rng.next_u64() % n as u64) as usize;
        let which = match self.scenario.as_str() {
            "base" => Which::Base,
            "one" => Which::Adapter(0),
            "mix" => {
                // Two different adapters: a mix names each adapter once.
                let first = pick(self.adapters);
                let other = (first + 1 + pick(self.adapters.max(2) - 1)) % self.adapters;
                Which::Mix(first, other)
            }
            _ => Which::Adapter(pick(self.adapters)),
        };
        let mut prompt = String::from("Tell a short story about");
        for _ in 0..self.words {
            prompt.push(' ');
            prompt.push_str(WORDS[pick(WORDS.len())]);
        }
        prompt.push('.');
        // Every other request on average, the same ones in both runs.
        let constrained = self.scenario == "structured" && pick(2) == 0 && self.constrain;
        let chat = match self.scenario.as_str() {
            // A tenant's ~500-token system prompt, and one short question.
            "shared-prefix" => {
                let tenant = pick(CHAT_TENANTS);
                let system = system_prompt(tenant, SHARED_SYSTEM_WORDS);
                Some((tenant, system, vec![self.question(6)]))
            }
            // A conversation of 5 turns on a short system prompt.
            "multi-turn" => {
                let tenant = pick(CHAT_TENANTS);
                let turns = (0..5).map(|_| self.question(10)).collect();
                Some((tenant, system_prompt(tenant, 40), turns))
            }
            _ => None,
        };
        match chat {
            Some((tenant, system, turns)) => Job {
                which: Which::Adapter(tenant),
                prompt: String::new(),
                chat: Some((system, turns)),
                constrained,
            },
            None => Job {
                which,
                prompt,
                chat: None,
                constrained,
            },
        }
    }

    /// A user question of `words` random words.
    fn question(&mut self, words: usize) -> String {
        let mut q = String::from("Tell me about");
        for _ in 0..words {
            q.push(' ');
            q.push_str(WORDS[(self.rng.next_u64() % WORDS.len() as u64) as usize]);
        }
        q.push('.');
        q
    }
}

/// Tenant `tenant`'s system prompt: `words` words, always the same.
fn system_prompt(tenant: usize, words: usize) -> String {
    let mut rng = Rng::new(1000 + tenant as u64);
    let mut text = format!("You are the assistant of customer {tenant}. Facts you know:");
    for _ in 0..words {
        text.push(' ');
        text.push_str(WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]);
    }
    text.push('.');
    text
}

/// Timings of one finished request.
struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
    /// From sending the request to its last token.
    total: Duration,
}

/// Collects a request's token arrival times into a [`Sample`].
struct Timer {
    start: Instant,
    last: Instant,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: usize,
}

impl Timer {
    fn new() -> Self {
        let now = Instant::now();
        Timer {
            start: now,
            last: now,
            ttft: None,
            gaps: Vec::new(),
            tokens: 0,
        }
    }

    /// `n` tokens arrived at `now`.
    fn tokens(&mut self, now: Instant, n: usize) {
        match self.ttft {
            None => self.ttft = Some(now - self.start),
            Some(_) => self.gaps.push(now - self.last),
        }
        self.last = now;
        self.tokens += n;
    }

    fn finish(self) -> Sample {
        Sample {
            ttft: self.ttft.unwrap_or_else(|| self.start.elapsed()),
            gaps: self.gaps,
            tokens: self.tokens,
            total: self.last - self.start,
        }
    }
}

struct Report {
    engine: String,
    scenario: String,
    clients: usize,
    requests: usize,
    seconds: f64,
    requests_per_s: f64,
    tokens_per_s: f64,
    ttft_ms: [f64; 3],
    itl_ms: [f64; 3],
    e2e_ms: [f64; 3],
    extra: Vec<(String, f64)>,
}

impl Report {
    /// The report as a JSON object: seconds and rates to the millisecond,
    /// latencies to 10 µs.
    fn json(&self) -> serde_json::Value {
        let round = |x: f64, places: i32| {
            let scale = 10f64.powi(places);
            (x * scale).round() / scale
        };
        let latency = |[p50, p95, p99]: [f64; 3]| serde_json::json!({"p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2)});
        let mut report = serde_json::json!({
            "engine": self.engine,
            "scenario": self.scenario,
            "clients": self.clients,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.requests_per_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "ttft_ms": latency(self.ttft_ms),
            "itl_ms": latency(self.itl_ms),
            "e2e_ms": latency(self.e2e_ms),
        });
        for (key, value) in &self.extra {
            report[key] = serde_json::json!(value);
        }
        report
    }
}

fn percentiles(mut v: Vec<Duration>) -> [f64; 3] {
    if v.is_empty() {
        return [0.0; 3];
    }
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    [at(0.50), at(0.95), at(0.99)]
}

fn report(engine: &str, o: &Options, samples: &[Sample], elapsed: Duration) -> Report {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let secs = elapsed.as_secs_f64();
    Report {
        engine: engine.into(),
        scenario: o.scenario.clone(),
        clients: o.clients,
        requests: samples.len(),
        seconds: secs,
        requests_per_s: samples.len() as f64 / secs,
        tokens_per_s: tokens as f64 / secs,
        ttft_ms: percentiles(samples.iter().map(|s| s.ttft).collect()),
        itl_ms: percentiles(samples.iter().flat_map(|s| s.gaps.clone()).collect()),
        e2e_ms: percentiles(samples.iter().map(|s| s.total).collect()),
        extra: Vec::new(),
    }
}

/// Runs `o.clients` closed-loop clients (or Poisson arrivals with
/// `--rate`) over `send` until the time or request budget is spent.
async fn drive<F, Fut>(o: &Options, traffic: &mut Traffic, send: F) -> (Vec<Sample>, Duration)
where
    F: Fn(Job) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Vec<Sample>> + Send,
{
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.seconds);
    let budget = o.requests.unwrap_or(usize::MAX);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut issued = 0;
    let jobs: Vec<Job> = (0..budget.min(100_000)).map(|_| traffic.next()).collect();
    let jobs = Arc::new(jobs);
    match o.rate {
        None => {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for _ in 0..o.clients {
                let (send, tx, jobs, next) = (send.clone(), tx.clone(), jobs.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= jobs.len() || Instant::now() >= deadline {
                            return;
                        }
                        let sample = send(jobs[i].clone()).await;
                        if tx.send(sample).is_err() {
                            return;
                        }
                    }
                });
            }
        }
        Some(rate) => {
            let mut rng = Rng::new(7);
            let mut at = start;
            while issued < jobs.len() && at < deadline {
                let u = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                at += Duration::from_secs_f64(-u.ln() / rate);
                tokio::time::sleep_until(at.into()).await;
                let (send, tx, job) = (send.clone(), tx.clone(), jobs[issued].clone());
                tokio::spawn(async move {
                    let _ = tx.send(send(job).await);
                });
                issued += 1;
            }
        }
    }
    drop(tx);
    let mut samples = Vec::new();
    while let Some(s) = rx.recv().await {
        samples.extend(s);
    }
    (samples, start.elapsed())
}

/// Peak resident memory of this process (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    rss_field("VmHWM")
}

fn rss_mb() -> f64 {
    rss_field("VmRSS")
}

fn rss_field(name: &str) -> f64 {
    process_rss_field("self", name)
}

/// A memory field of `/proc/{pid}/status` (`VmHWM`, `VmRSS`), in MB; 0
/// where it cannot be read.
fn process_rss_field(pid: &str, name: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(name)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Base {
    key: FactorsKey,
    singular: SingularValues,
    home: PathBuf,
}

fn base(o: &Options) -> Base {
    let home = svfit::home::home_dir();
    let key = FactorsKey::for_model(&o.model, "q,v", "energy:0.99", "f16").unwrap_or_else(fail);
    let path = factors::ensure(&o.model, &key, &home).unwrap_or_else(fail);
    let singular = factors::read_singular_values(&path, &key).unwrap_or_else(fail);
    Base {
        key,
        singular,
        home,
    }
}

/// The scenario's adapter `t{i}`: random deltas of ~5% of S.
fn bench_adapter(b: &Base, i: usize) -> Adapter {
    Adapter::perturbed(&b.key, &b.singular, 0.05, i as u64 + 1)
}

/// SVFit adapters `t0 .. t{n-1}` of tenant "default", random deltas.
fn write_adapters(b: &Base, dir: &Path, n: usize) {
    for i in 0..n {
        bench_adapter(b, i)
            .write(&dir.join("default").join(format!("t{i}.safetensors")))
            .unwrap_or_else(fail);
    }
}

/// The `lora` scenario's adapters `t0`, `t1`, ...: the GGUF LoRAs
/// llama-server gets (`write_lora`, same seeds), imported as svfit LoRA
/// files.
fn write_lora_adapters(b: &Base, model: &Path, dir: &Path, n: usize) {
    let gguf = GgufFile::open(model).unwrap_or_else(fail);
    let tenant = dir.join("default");
    std::fs::create_dir_all(&tenant).unwrap_or_else(fail);
    for i in 0..n {
        let file = dir.join(format!("lora{i}.gguf"));
        write_lora(&gguf, &file, i as u64 + 1);
        let bytes = std::fs::read(&file).unwrap_or_else(fail);
        let sha = &b.key.base_sha256;
        let imported =
            svfit::lora::stored::import_bytes(&bytes, None, model, sha).unwrap_or_else(fail);
        std::fs::write(tenant.join(format!("t{i}.safetensors")), imported).unwrap_or_else(fail);
        std::fs::remove_file(&file).unwrap_or_else(fail);
    }
}

/// Uploads the scenario's adapters (`t0`, `t1`, ...) to a running server.
async fn upload_adapters(b: &Base, channel: tonic::transport::Channel, n: usize) {
    let mut admin = AdaptersClient::new(channel);
    for i in 0..n {
        let id = format!("t{i}");
        let bytes = bench_adapter(b, i).to_bytes().unwrap_or_else(fail);
        let mut chunks = vec![pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
                id: id.clone(),
                tenant: String::new(),
                peft_config: String::new(),
            })),
        }];
        chunks.extend(bytes.chunks(1 << 16).map(|piece| pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Data(piece.to_vec())),
        }));
        let mut request = tonic::Request::new(tokio_stream::iter(chunks));
        request
            .metadata_mut()
            .insert("x-svfit-adapter", id.parse().unwrap_or_else(fail));
        admin.upload(request).await.unwrap_or_else(fail);
    }
}

fn request(job: &Job, gen: u32) -> pb::GenerateRequest {
    let (adapter, mix) = match job.which {
        Which::Base => (String::new(), Vec::new()),
        Which::Adapter(i) => (format!("t{i}"), Vec::new()),
        Which::Mix(i, j) => (
            String::new(),
            vec![
                pb::MixPart {
                    adapter: format!("t{i}"),
                    weight: 0.7,
                },
                pb::MixPart {
                    adapter: format!("t{j}"),
                    weight: 0.3,
                },
            ],
        ),
    };
    pb::GenerateRequest {
        adapter,
        mix,
        input: Some(Input::Prompt(job.prompt.clone())),
        sampling: Some(pb::Sampling {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: gen,
        constraint: job.constrained.then(|| pb::Constraint {
            kind: Some(pb::constraint::Kind::JsonSchema(STRUCTURED_SCHEMA.into())),
        }),
        // Never stop early: every request generates exactly `gen` tokens.
        ..Default::default()
    }
}

async fn metrics(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(fail);
    let _ = socket.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
    let mut body = String::new();
    let _ = socket.read_to_string(&mut body).await;
    body.lines()
        .filter(|l| l.starts_with("svfit_"))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A request with the `x-svfit-adapter` header a load balancer routes on
/// (deploy/nginx/svfit.conf), as clients of a replicated server send it.
fn routed(request: pb::GenerateRequest) -> tonic::Request<pb::GenerateRequest> {
    let header = request.adapter.parse().ok();
    let mut routed = tonic::Request::new(request);
    if let Some(value) = header {
        routed.metadata_mut().insert("x-svfit-adapter", value);
    }
    routed
}

/// Streams one request over gRPC: its timings and its text.
async fn stream_grpc(
    client: &mut InferenceClient<tonic::transport::Channel>,
    request: pb::GenerateRequest,
) -> (Sample, String) {
    let mut timer = Timer::new();
    let mut text = String::new();
    let mut stream = client
        .generate_stream(routed(request))
        .await
        .unwrap_or_else(fail)
        .into_inner();
    while let Some(chunk) = stream.message().await.unwrap_or_else(fail) {
        if !chunk.token_ids.is_empty() {
            timer.tokens(Instant::now(), chunk.token_ids.len());
        }
        text.push_str(&chunk.text);
    }
    (timer.finish(), text)
}

/// The adapters the soak scenario's hostile requests name (the catalogue
/// of `tests/common/hostile.rs`): the bench's tenant is `default`, its
/// adapters `t0`, `t1`, ...
const HOSTILE: hostile::Names = hostile::Names {
    own: "t1",
    own_qualified: "default/t1",
    other_tenants: "nobody/t1",
    unknown: "missing",
};

/// Counts of the hostile client's answers.
#[derive(Default)]
struct Hostile {
    sent: u64,
    ok: u64,
    refused: u64,
    /// INTERNAL or UNAVAILABLE: the server failed, not the request.
    broken: u64,
}

/// Sends hostile requests one after another until `stop` is set.
async fn hostile_client(
    mut client: InferenceClient<tonic::transport::Channel>,
    pace: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Hostile {
    let mut counts = Hostile::default();
    let attacks = hostile::attacks(&HOSTILE);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for attack in &attacks {
            let mut r = attack.request(None);
            if counts.sent % 7 == 3 {
                r.metadata_mut()
                    .insert("grpc-timeout", "123456789012S".parse().unwrap_or_else(fail));
            }
            counts.sent += 1;
            match client.generate(r).await {
                Ok(_) => counts.ok += 1,
                Err(s) if matches!(s.code(), tonic::Code::Internal | tonic::Code::Unavailable) => {
                    eprintln!("hostile request '{}' broke the server: {s:?}", attack.name);
                    counts.broken += 1;
                }
                Err(_) => counts.refused += 1,
            }
            tokio::time::sleep(pace).await;
        }
    }
    counts
}

async fn run_svfit(
    o: &Options,
    b: &Base,
    dir: &Path,
    n_adapters: usize,
    hostile: bool,
) -> Vec<Report> {
    let adapters = dir.join("adapters");
    let rss_before = rss_mb();
    let (slots, cache) = match o.scenario.as_str() {
        // A working set of 1,000 against 16 slots and 20 adapters' bytes.
        "cold" => (16, 20 * 16_251 * 4 + 20 * 2_000),
        _ => (64, 256 << 20),
    };
    let lora = o.scenario == "lora";
    let lora_config = if lora {
        svfit::engine::LoraConfig {
            slots: n_adapters,
            rank: 8,
            kinds: vec!["attn_q", "attn_v"],
            cache_bytes: 256 << 20,
        }
    } else {
        svfit::engine::LoraConfig::default()
    };
    let mut running = None;
    let addr = match &o.addr {
        Some(a) => a.clone(),
        None => {
            if lora {
                write_lora_adapters(b, &o.model, &adapters, n_adapters);
            } else if n_adapters > 0 {
                write_adapters(b, &adapters, n_adapters);
            }
            let config = svfit::server::ServeConfig {
                addr: "127.0.0.1:0".parse().unwrap_or_else(fail),
                model: o.model.clone(),
                load: LoadOptions {
                    device: o.device.clone(),
                    threads: o.threads,
                    weights: o.weights,
                    batch_kernels: o.batch_kernels,
                },
                factors: b.key.clone(),
                home: b.home.clone(),
                adapters: adapters.to_string_lossy().into_owned(),
                adapter_cache_bytes: cache,
                engine: EngineConfig {
                    max_sequences: o.clients.max(1),
                    context: 1024,
                    kv_cells: 1024 * o.clients.max(1),
                    adapter_slots: slots,
                    queue_limit: 100_000,
                    tenant_queue_limit: 100_000,
                    prefill_budget: o.prefill_budget,
                    prefix_cache_bytes: o.prefix_cache_mb << 20,
                    lora: lora_config,
                },
                limits: svfit::server::validation::Limits {
                    max_tokens_default: o.gen as usize,
                    ..Default::default()
                },
                pins_per_tenant: 4,
                max_connections: 4096,
                tenant_rate: 0.0,
                tenant_burst: 0.0,
                upload_timeout: Duration::from_secs(60),
                api_keys: None,
                tls: None,
                metrics_addr: Some("127.0.0.1:0".parse().unwrap_or_else(fail)),
                http_addr: Some("127.0.0.1:0".parse().unwrap_or_else(fail)),
                allow_remote: false,
                memory_limit: None,
                jobs: svfit::server::jobs::JobsConfig {
                    share: o.train_share,
                    ..Default::default()
                },
            };
            let r = svfit::server::start(config).await.unwrap_or_else(fail);
            let addr = r.addr.to_string();
            running = Some(r);
            addr
        }
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap_or_else(fail)
        .connect()
        .await
        .unwrap_or_else(fail);
    if o.upload {
        upload_adapters(b, channel.clone(), n_adapters).await;
    }
    let client = InferenceClient::new(channel);
    let stop_hostile = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = hostile.then(|| {
        tokio::spawn(hostile_client(
            client.clone(),
            o.hostile_pace,
            stop_hostile.clone(),
        ))
    });
    // Every adapter resident before the clock starts, as llama-server loads
    // its LoRAs at start (except in `cold`, which measures the loads). In
    // `shared-prefix` the warm-up request carries the tenant's system
    // prompt, as a server that has run for a while has seen it (with the
    // prefix cache off it warms nothing more).
    if o.scenario != "cold" {
        for i in 0..n_adapters {
            let input = match o.scenario.as_str() {
                "shared-prefix" => Input::Chat(pb::Chat {
                    messages: vec![
                        pb::ChatMessage {
                            role: "system".into(),
                            content: system_prompt(i, SHARED_SYSTEM_WORDS),
                        },
                        pb::ChatMessage {
                            role: "user".into(),
                            content: "Hello.".into(),
                        },
                    ],
                }),
                _ => Input::Prompt("Hello".into()),
            };
            let warm = pb::GenerateRequest {
                adapter: format!("t{i}"),
                input: Some(input),
                max_tokens: 1,
                ..Default::default()
            };
            client
                .clone()
                .generate(routed(warm))
                .await
                .unwrap_or_else(fail);
        }
    }
    let gen = o.gen;
    let send = move |job: Job| {
        let mut client = client.clone();
        async move {
            let Some((system, turns)) = job.chat.clone() else {
                return vec![stream_grpc(&mut client, request(&job, gen)).await.0];
            };
            // One request per turn, each with the answers so far.
            let message = |role: &str, content: String| pb::ChatMessage {
                role: role.into(),
                content,
            };
            let mut messages = vec![message("system", system)];
            let mut samples = Vec::new();
            for turn in turns {
                messages.push(message("user", turn));
                let mut r = request(&job, gen);
                r.input = Some(Input::Chat(pb::Chat {
                    messages: messages.clone(),
                }));
                let (sample, answer) = stream_grpc(&mut client, r).await;
                samples.push(sample);
                messages.push(message("assistant", answer));
            }
            samples
        }
    };
    // Engine counters before the clock starts (the warm-up's steps are not
    // the workload's).
    let before = match &running {
        Some(running) => metrics(running.metrics_addr.expect("enabled")).await,
        None => HashMap::new(),
    };
    // With --api http, both APIs take turns on this one server: rounds of
    // gRPC then HTTP (then HTTP then gRPC), the same traffic in each, so
    // that the machine's drift falls on both alike.
    let rounds = |other: Api| -> Vec<Api> {
        (0..HTTP_ROUNDS)
            .flat_map(|r| match r % 2 {
                0 => [Api::Grpc, other],
                _ => [other, Api::Grpc],
            })
            .collect()
    };
    let schedule: Vec<Api> = if o.http && !hostile {
        rounds(Api::Http)
    } else if o.scenario == "structured" && o.addr.is_none() {
        rounds(Api::Free)
    } else if o.scenario == "job" && o.addr.is_none() {
        rounds(Api::Job)
    } else {
        vec![Api::Grpc]
    };
    // The engine's counters over each kind of turn (`structured`).
    let mut counters: [HashMap<String, f64>; 4] = Default::default();
    let segment = Options {
        seconds: o.seconds * 2.0 / schedule.len().max(2) as f64,
        ..o.clone()
    };
    let http_send = running.as_ref().and_then(|r| r.http_addr).map(|addr| {
        let base_model = o
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        move |job: Job| {
            let body = openai_request(&job, gen, &base_model);
            async move { vec![stream_openai(addr.port(), &body).await] }
        }
    });
    let mut runs: [(Vec<Sample>, Duration, Vec<f64>); 4] = Default::default();
    let metrics_addr = running.as_ref().and_then(|r| r.metrics_addr);
    let http_port = running.as_ref().and_then(|r| r.http_addr).map(|a| a.port());
    let job_file = match http_port.filter(|_| schedule.contains(&Api::Job)) {
        Some(port) => Some(job::upload(port).await),
        None => None,
    };
    let (mut job_steps, mut job_seconds, mut ttft_p95) = (0u64, 0f64, [Vec::new(), Vec::new()]);
    for api in &schedule {
        let training = match (api, &job_file, http_port) {
            (Api::Job, Some(file), Some(port)) => {
                let model = o
                    .model
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                Some(job::start(port, &model.unwrap_or_default(), file).await)
            }
            _ => None,
        };
        let mut traffic = Traffic::new(o, n_adapters);
        traffic.constrain = *api != Api::Free;
        let start = match metrics_addr {
            Some(addr) if schedule.contains(&Api::Free) => metrics(addr).await,
            _ => HashMap::new(),
        };
        let (samples, elapsed) = match api {
            Api::Grpc | Api::Free | Api::Job => drive(&segment, &mut traffic, send.clone()).await,
            Api::Http => {
                let send = http_send.clone().expect("an in-process server");
                drive(&segment, &mut traffic, send).await
            }
        };
        if let Some(addr) = metrics_addr.filter(|_| !start.is_empty()) {
            for (k, v) in metrics(addr).await {
                *counters[*api as usize].entry(k.clone()).or_default() +=
                    v - start.get(&k).copied().unwrap_or(0.0);
            }
        }
        if let (Some(running), Some(port)) = (training, http_port) {
            let (steps, seconds) = job::stop(port, running).await;
            job_steps += steps;
            job_seconds += seconds;
        }
        if o.scenario == "job" {
            let p95 = percentiles(samples.iter().map(|s| s.ttft).collect())[1];
            ttft_p95[usize::from(*api == Api::Job)].push(p95);
        }
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let run = &mut runs[*api as usize];
        run.0.extend(samples);
        run.1 += elapsed;
        run.2.push(tokens as f64 / elapsed.as_secs_f64());
    }
    let engine = if hostile { "svfit+hostile" } else { "svfit" };
    let mut r = report(engine, o, &runs[0].0, runs[0].1);
    // Constrained turns against unconstrained ones: the throughput per
    // round, and the time the constrained turns' steps spent masking.
    let free = schedule.contains(&Api::Free).then(|| {
        let mut free = report("svfit-unconstrained", o, &runs[2].0, runs[2].1);
        let mut ratios: Vec<f64> = runs[0]
            .2
            .iter()
            .zip(&runs[2].2)
            .map(|(c, f)| c / f)
            .collect();
        ratios.sort_by(f64::total_cmp);
        r.extra.extend([
            (
                "over_unconstrained_round_median".into(),
                ratios[ratios.len() / 2],
            ),
            ("over_unconstrained_round_min".into(), ratios[0]),
            (
                "over_unconstrained_round_max".into(),
                ratios[ratios.len() - 1],
            ),
        ]);
        for (report, counters) in [(&mut r, &counters[0]), (&mut free, &counters[2])] {
            let get = |k: &str| counters.get(k).copied().unwrap_or(0.0);
            let steps = get("svfit_steps_total").max(1.0);
            let mask = get("svfit_constraint_mask_seconds_total");
            report.extra.extend([
                (
                    "turns_step_ms_mean".into(),
                    1e3 * get("svfit_step_seconds_total") / steps,
                ),
                ("turns_mask_ms_per_step".into(), 1e3 * mask / steps),
                (
                    "turns_mask_share_of_steps".into(),
                    mask / get("svfit_step_seconds_total").max(1e-9),
                ),
                (
                    "turns_mask_ms_per_mask".into(),
                    1e3 * mask / get("svfit_constraint_masks_total").max(1.0),
                ),
            ]);
        }
        free
    });
    let beside_job = schedule.contains(&Api::Job).then(|| {
        let mut with = report("svfit+job", o, &runs[3].0, runs[3].1);
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let throughput: Vec<f64> = runs[3]
            .2
            .iter()
            .zip(&runs[0].2)
            .map(|(j, n)| j / n)
            .collect();
        let ttft: Vec<f64> = ttft_p95[1]
            .iter()
            .zip(&ttft_p95[0])
            .map(|(j, n)| j / n)
            .collect();
        with.extra.extend([
            ("over_nojob_round_median".into(), median(throughput.clone())),
            (
                "over_nojob_round_min".into(),
                throughput.iter().copied().fold(f64::INFINITY, f64::min),
            ),
            ("ttft_p95_over_nojob_round_median".into(), median(ttft)),
            ("job_steps".into(), job_steps as f64),
            (
                "job_steps_per_s".into(),
                job_steps as f64 / job_seconds.max(1e-9),
            ),
            ("train_share".into(), o.train_share),
        ]);
        with
    });
    let mut http = schedule.contains(&Api::Http).then(|| {
        let mut http = report("svfit-http", o, &runs[1].0, runs[1].1);
        // HTTP over gRPC throughput, per round (each round runs both).
        let mut ratios: Vec<f64> = runs[1]
            .2
            .iter()
            .zip(&runs[0].2)
            .map(|(h, g)| h / g)
            .collect();
        ratios.sort_by(f64::total_cmp);
        http.extra.push((
            "http_over_grpc_round_median".into(),
            ratios[ratios.len() / 2],
        ));
        http.extra
            .push(("http_over_grpc_round_min".into(), ratios[0]));
        http.extra
            .push(("http_over_grpc_round_max".into(), ratios[ratios.len() - 1]));
        http
    });
    if let Some(attacker) = attacker {
        stop_hostile.store(true, std::sync::atomic::Ordering::Relaxed);
        let counts = attacker.await.unwrap_or_else(fail);
        r.extra.extend([
            ("hostile_requests".into(), counts.sent as f64),
            ("hostile_ok".into(), counts.ok as f64),
            ("hostile_refused".into(), counts.refused as f64),
            ("hostile_broken".into(), counts.broken as f64),
        ]);
    }
    if let Some(running) = running {
        let m = metrics(running.metrics_addr.expect("enabled")).await;
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let (hits, misses) = (
            get("svfit_adapter_cache_hits_total"),
            get("svfit_adapter_cache_misses_total"),
        );
        let during = |k: &str| get(k) - before.get(k).copied().unwrap_or(0.0);
        let steps = during("svfit_steps_total").max(1.0);
        r.extra.extend([
            (
                "step_ms_mean".into(),
                1e3 * during("svfit_step_seconds_total") / steps,
            ),
            (
                "tokens_per_step".into(),
                during("svfit_batch_tokens_total") / steps,
            ),
            ("requests_failed".into(), get("svfit_requests_failed_total")),
            (
                "mask_ms_per_step".into(),
                1e3 * during("svfit_constraint_mask_seconds_total") / steps,
            ),
            (
                "mask_ms_per_mask".into(),
                1e3 * during("svfit_constraint_mask_seconds_total")
                    / during("svfit_constraint_masks_total").max(1.0),
            ),
            (
                "adapter_cache_hit_rate".into(),
                hits / (hits + misses).max(1.0),
            ),
            ("adapter_loads".into(), get("svfit_adapter_loads_total")),
            (
                "adapter_cache_evictions".into(),
                get("svfit_adapter_cache_evictions_total"),
            ),
            ("slot_loads".into(), get("svfit_adapter_slot_loads_total")),
            (
                "adapter_cache_mb".into(),
                get("svfit_adapter_cache_bytes") / (1 << 20) as f64,
            ),
            (
                "adapter_cache_budget_mb".into(),
                cache as f64 / (1 << 20) as f64,
            ),
            (
                "prefilled_tokens".into(),
                during("svfit_prompt_tokens_total"),
            ),
            (
                "prefix_cached_tokens".into(),
                during("svfit_prefix_cached_tokens_total"),
            ),
            (
                "prefix_cache_hit_rate".into(),
                during("svfit_prefix_cache_hits_total")
                    / during("svfit_prefix_cache_lookups_total").max(1.0),
            ),
            (
                "prefix_cache_mb".into(),
                get("svfit_prefix_cache_bytes") / (1 << 20) as f64,
            ),
            ("rss_added_mb".into(), rss_mb() - rss_before),
            ("peak_rss_mb".into(), peak_rss_mb()),
        ]);
        running.stop().await;
    }
    let mut reports = vec![r];
    reports.extend(http.take());
    reports.extend(free);
    reports.extend(beside_job);
    reports
}

/// The added latency of a cold adapter: reading and validating it from the
/// store, and writing it into a slot (p50/p99 over `n` adapters). The
/// store is async: its calls run on `runtime`, from this thread.
fn cold_load_cost(
    runtime: &tokio::runtime::Handle,
    o: &Options,
    b: &Base,
    dir: &Path,
    n: usize,
) -> Vec<(String, f64)> {
    let store = AdapterStore::open(
        Box::new(LocalDir::open(&dir.join("adapters")).unwrap_or_else(fail)),
        b.key.clone(),
        b.singular.clone(),
        1,
        PinLimits {
            total: 0,
            per_tenant: 0,
        },
    );
    let path = b.key.path(&b.home);
    let factor_set = factors::read_factors(&path, &b.key).unwrap_or_else(fail);
    let mut model = svfit::model::Model::load(
        &o.model,
        &LoadOptions {
            device: "cpu".into(),
            threads: o.threads,
            weights: o.weights,
            batch_kernels: o.batch_kernels,
        },
    )
    .unwrap_or_else(fail);
    model
        .attach_factors(&factor_set, 2, Type::Q8_0)
        .unwrap_or_else(fail);
    let (mut read, mut slot) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t = Instant::now();
        let stored = runtime
            .block_on(store.get("default", &format!("t{i}")))
            .unwrap_or_else(fail);
        read.push(t.elapsed());
        let t = Instant::now();
        model
            .set_adapter(1, &stored.deltas.deltas)
            .unwrap_or_else(fail);
        slot.push(t.elapsed());
    }
    let (r, s) = (percentiles(read), percentiles(slot));
    vec![
        ("cold_read_validate_ms_p50".into(), r[0]),
        ("cold_read_validate_ms_p99".into(), r[2]),
        ("cold_slot_write_ms_p50".into(), s[0]),
        ("cold_slot_write_ms_p99".into(), s[2]),
    ]
}

/// A rank-8 LoRA on q and v as a GGUF adapter llama.cpp loads.
fn write_lora(model: &GgufFile, path: &Path, seed: u64) {
    let mut w = GgufWriter::new(256).unwrap_or_else(fail);
    // llama.cpp refuses a LoRA of another architecture than the model's.
    let arch = model
        .get_str("general.architecture")
        .unwrap_or_else(fail)
        .unwrap_or_else(|| exit("the model has no general.architecture"));
    w.set_str("general.architecture", &arch)
        .unwrap_or_else(fail);
    w.set_str("general.type", "adapter").unwrap_or_else(fail);
    w.set_str("adapter.type", "lora").unwrap_or_else(fail);
    w.set_f32("adapter.lora.alpha", 8.0).unwrap_or_else(fail);
    let mut rng = Rng::new(seed);
    let rank = 8usize;
    for info in model.tensors() {
        let is_target =
            info.name.ends_with("attn_q.weight") || info.name.ends_with("attn_v.weight");
        if !is_target {
            continue;
        }
        let (n_in, n_out) = (info.ne[0] as usize, info.ne[1] as usize);
        let mut values =
            |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| scale * rng.normal()).collect() };
        let a = values(n_in * rank, 1.0 / (n_in as f32).sqrt());
        let b = values(rank * n_out, 0.01);
        let add = |w: &mut GgufWriter, name: String, shape: [usize; 2], v: Vec<f32>| {
            let bytes = ggml::quantize(Type::F16, &v, shape[0]).unwrap_or_else(|| exit("f16"));
            w.add_tensor(&name, Type::F16, &[shape[0] as i64, shape[1] as i64], bytes)
                .unwrap_or_else(fail);
        };
        add(&mut w, format!("{}.lora_a", info.name), [n_in, rank], a);
        add(&mut w, format!("{}.lora_b", info.name), [rank, n_out], b);
    }
    w.write(path).unwrap_or_else(fail);
}

/// Where the real llama-server is: `--llama-server PATH`, else
/// `$SVFIT_LLAMA_SERVER`, else where `scripts/build-llama-server` puts it.
fn llama_server_binary(o: &Options) -> PathBuf {
    let path = o
        .llama_server
        .clone()
        .or_else(|| std::env::var_os("SVFIT_LLAMA_SERVER").map(PathBuf::from))
        .unwrap_or_else(|| {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cache/svfit-anchors/build/bin/llama-server")
        });
    if !path.exists() {
        exit(&format!(
            "no llama-server at {}: build it with scripts/build-llama-server, pass \
             --llama-server PATH, or run with --no-llama",
            path.display()
        ));
    }
    path
}

/// llama.cpp's own HTTP server, started for one run and killed after it.
struct LlamaServer {
    child: std::process::Child,
    port: u16,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts llama-server on the model with `loras` loaded (none applied until
/// a request names one), one slot per client, 1,024 context tokens per
/// slot, `o.threads` threads, stock settings otherwise; waits for /health.
async fn start_llama_server(o: &Options, dir: &Path, loras: &[PathBuf]) -> LlamaServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(fail)
        .port();
    let log = std::fs::File::create(dir.join("llama-server.log")).unwrap_or_else(fail);
    let mut command = std::process::Command::new(llama_server_binary(o));
    command
        .arg("--model")
        .arg(&o.model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--threads", &o.threads.to_string()])
        .args(["--threads-batch", &o.threads.to_string()])
        .args(["--parallel", &o.clients.max(1).to_string()])
        .args(["--ctx-size", &(1024 * o.clients.max(1)).to_string()])
        .stdout(log.try_clone().unwrap_or_else(fail))
        .stderr(log);
    if !loras.is_empty() {
        let list: Vec<String> = loras.iter().map(|p| p.display().to_string()).collect();
        command
            .arg("--lora")
            .arg(list.join(","))
            .arg("--lora-init-without-apply");
    }
    let server = LlamaServer {
        child: command.spawn().unwrap_or_else(fail),
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok((200, _)) = http(port, "GET", "/health", "").await {
            return server;
        }
        if Instant::now() > deadline {
            exit(&format!(
                "llama-server did not become healthy; see {}",
                dir.join("llama-server.log").display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An HTTP failure of a bench client: connecting, or the exchange.
type HttpError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a fresh connection to the server at `port` (as a new client
/// would) and sends one HTTP/1.1 request with a JSON body; the answer's
/// body is read from the returned response as it arrives.
async fn send_request(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, HttpError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let io = hyper_util::rt::TokioIo::new(socket);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "127.0.0.1")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))?;
    Ok(sender.send_request(request).await?)
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
async fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String), HttpError> {
    use http_body_util::BodyExt;
    let response = send_request(port, method, path, body).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// The same traffic through llama.cpp's own server: streaming completions,
/// a fresh connection per request, no prompt cache, the request's LoRA at
/// scale 1 (llama-server batches slots together only when their LoRA sets
/// are equal).
async fn run_llama(o: &Options, dir: &Path, n_adapters: usize) -> Report {
    let gguf = GgufFile::open(&o.model).unwrap_or_else(fail);
    let loras: Vec<PathBuf> = (0..n_adapters)
        .map(|i| {
            let p = dir.join(format!("lora{i}.gguf"));
            write_lora(&gguf, &p, i as u64 + 1);
            p
        })
        .collect();
    drop(gguf);
    let server = start_llama_server(o, dir, &loras).await;
    let (_, listed) = http(server.port, "GET", "/lora-adapters", "")
        .await
        .unwrap_or_else(fail);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap_or_else(fail);
    if listed.as_array().map_or(0, Vec::len) != n_adapters {
        exit(&format!(
            "llama-server lists {listed} as its LoRAs, expected {n_adapters}"
        ));
    }
    let (port, gen) = (server.port, o.gen);
    let send = move |job: Job| async move {
        let lora = match job.which {
            Which::Base => serde_json::json!([]),
            Which::Adapter(i) | Which::Mix(i, _) => serde_json::json!([{"id": i, "scale": 1.0}]),
        };
        let body = serde_json::json!({
            "prompt": job.prompt,
            "n_predict": gen,
            "temperature": 0.0,
            "stream": true,
            "cache_prompt": false,
            "return_tokens": true,
            "lora": lora,
        });
        vec![stream_completion(port, &body.to_string()).await]
    };
    let mut traffic = Traffic::new(o, n_adapters);
    let (samples, elapsed) = drive(o, &mut traffic, send).await;
    let peak = process_rss_field(&server.child.id().to_string(), "VmHWM");
    drop(server);
    let mut r = report("llama-server", o, &samples, elapsed);
    r.extra.push(("peak_rss_mb".into(), peak));
    r
}

/// The request of `job` for svfit's OpenAI-compatible API: the same
/// prompt, adapter (or mix) and greedy `gen` tokens as over gRPC.
fn openai_request(job: &Job, gen: u32, base_model: &str) -> String {
    let mut body = serde_json::json!({
        "model": base_model,
        "prompt": job.prompt,
        "max_tokens": gen,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    match job.which {
        Which::Base => {}
        Which::Adapter(i) => body["model"] = format!("t{i}").into(),
        Which::Mix(i, j) => {
            body["svfit"] = serde_json::json!({"mix": [
                {"adapter": format!("t{i}"), "weight": 0.7},
                {"adapter": format!("t{j}"), "weight": 0.3},
            ]})
        }
    }
    body.to_string()
}

/// POSTs a streaming completion to svfit's HTTP API and times its chunks
/// (one per engine step that produced text); the token count is the
/// final usage chunk's.
async fn stream_openai(port: u16, body: &str) -> Sample {
    let mut timer = Timer::new();
    let mut completion_tokens = None;
    server_sent_events(port, "/v1/completions", body, "svfit's HTTP API", |event| {
        if event == "[DONE]" {
            return true;
        }
        let event: serde_json::Value = serde_json::from_str(event).unwrap_or_else(fail);
        if event["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            timer.tokens(Instant::now(), 1);
        }
        if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
            completion_tokens = Some(n as usize);
        }
        false
    })
    .await;
    let mut sample = timer.finish();
    sample.tokens = completion_tokens.unwrap_or_else(|| exit("no usage chunk"));
    sample
}

/// POSTs a streaming completion to llama-server and times its tokens.
async fn stream_completion(port: u16, body: &str) -> Sample {
    let mut timer = Timer::new();
    server_sent_events(port, "/completion", body, "llama-server", |event| {
        let event: serde_json::Value = serde_json::from_str(event).unwrap_or_else(fail);
        let tokens = event["tokens"].as_array().map_or(0, Vec::len);
        if tokens > 0 {
            timer.tokens(Instant::now(), tokens);
        }
        event["stop"].as_bool() == Some(true)
    })
    .await;
    timer.finish()
}

/// POSTs `body` to `path` on a fresh connection and hands each
/// server-sent event's data to `on_event` until it returns true or the
/// stream ends; a status other than 200 from `server` ends the bench.
async fn server_sent_events(
    port: u16,
    path: &str,
    body: &str,
    server: &str,
    mut on_event: impl FnMut(&str) -> bool,
) {
    use http_body_util::BodyExt;
    let response = send_request(port, "POST", path, body)
        .await
        .unwrap_or_else(fail);
    if response.status() != hyper::StatusCode::OK {
        exit(&format!("{server} answered {}", response.status()));
    }
    let mut body = response.into_body();
    // Events are lines; a frame may end inside one.
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap_or_else(fail).into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let Some(event) = line.strip_prefix("data: ") else {
                continue;
            };
            if on_event(event) {
                return;
            }
        }
    }
}

fn print(reports: &[Report]) {
    println!(
        "{:<13} {:<6} {:>7} {:>8} {:>9} {:>20} {:>18} {:>22}",
        "engine",
        "scen.",
        "clients",
        "req/s",
        "tok/s",
        "TTFT ms p50/p95/p99",
        "ITL ms p50/p95/p99",
        "e2e ms p50/p95/p99"
    );
    for r in reports {
        println!(
            "{:<13} {:<6} {:>7} {:>8.2} {:>9.1} {:>20} {:>18} {:>22}",
            r.engine,
            r.scenario,
            r.clients,
            r.requests_per_s,
            r.tokens_per_s,
            format!(
                "{:.0}/{:.0}/{:.0}",
                r.ttft_ms[0], r.ttft_ms[1], r.ttft_ms[2]
            ),
            format!("{:.1}/{:.1}/{:.1}", r.itl_ms[0], r.itl_ms[1], r.itl_ms[2]),
            format!("{:.0}/{:.0}/{:.0}", r.e2e_ms[0], r.e2e_ms[1], r.e2e_ms[2]),
        );
        for (k, v) in &r.extra {
            println!("    {k}: {v:.3}");
        }
    }
}

/// The options of another svfit run of `scenario` in the same run (gRPC,
/// in process, no llama-server, no JSON).
fn same_run(o: &Options, scenario: &str) -> Options {
    Options {
        scenario: scenario.into(),
        model: o.model.clone(),
        json: None,
        addr: None,
        llama_server: None,
        http: false,
        device: o.device.clone(),
        ..o.clone()
    }
}

fn main() {
    let o = parse_args();
    let dir = std::env::temp_dir().join(format!("svfit-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(fail);
    let b = base(&o);
    let n_adapters = match o.scenario.as_str() {
        "base" => 0,
        "one" => 1,
        "cold" => 1000,
        "soak" => 64,
        _ => 64,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(fail);
    let mut reports = Vec::new();
    let mut ours = runtime.block_on(run_svfit(&o, &b, &dir, n_adapters, false));
    if o.scenario == "cold" && o.addr.is_none() {
        ours[0]
            .extra
            .extend(cold_load_cost(runtime.handle(), &o, &b, &dir, 200));
    }
    let structured = (o.scenario == "structured" && ours.len() > 1).then(|| ours.remove(1));
    let beside_job = (o.scenario == "job" && ours.len() > 1).then(|| ours.remove(1));
    let http = (ours.len() > 1).then(|| ours.remove(1));
    reports.extend(ours);
    if o.scenario == "soak" {
        reports.extend(runtime.block_on(run_svfit(&o, &b, &dir, n_adapters, true)));
        let (calm, attacked) = (&reports[0], &reports[1]);
        println!(
            "with the hostile tenant / without: throughput {:.2}x, TTFT p95 {:.2}x, ITL p95 {:.2}x",
            attacked.tokens_per_s / calm.tokens_per_s,
            attacked.ttft_ms[1] / calm.ttft_ms[1],
            attacked.itl_ms[1] / calm.itl_ms[1]
        );
    }
    // The chat scenarios again without the prefix cache, in the same run.
    if CHAT_SCENARIOS.contains(&o.scenario.as_str()) && o.addr.is_none() {
        let cold = Options {
            prefix_cache_mb: 0,
            model: o.model.clone(),
            json: None,
            addr: None,
            llama_server: None,
            ..o.clone()
        };
        let mut off = runtime
            .block_on(run_svfit(&cold, &b, &dir, n_adapters, false))
            .remove(0);
        off.engine = "svfit-nocache".into();
        let on = &reports[0];
        println!(
            "prefix cache on / off: throughput {:.2}x, TTFT p50 {:.2}x lower, TTFT p95 {:.2}x lower, \
             e2e p50 {:.2}x lower",
            on.tokens_per_s / off.tokens_per_s,
            off.ttft_ms[0] / on.ttft_ms[0],
            off.ttft_ms[1] / on.ttft_ms[1],
            off.e2e_ms[0] / on.e2e_ms[0],
        );
        reports.push(off);
    }
    // The same traffic over the HTTP API, in turns with gRPC.
    if let Some(http) = http {
        let grpc = &reports[0];
        println!(
            "svfit HTTP API / gRPC: throughput {:.3}x (median of {HTTP_ROUNDS} rounds {:.3}x), \
             TTFT p95 {:.2}x, e2e p95 {:.2}x",
            http.tokens_per_s / grpc.tokens_per_s,
            http.extra[0].1,
            http.ttft_ms[1] / grpc.ttft_ms[1],
            http.e2e_ms[1] / grpc.e2e_ms[1]
        );
        reports.push(http);
    }
    // Constrained and unconstrained turns of the same traffic.
    if let Some(free) = structured {
        let on = &reports[0];
        let get = |r: &Report, k: &str| {
            r.extra
                .iter()
                .find(|(n, _)| n == k)
                .map_or(f64::NAN, |e| e.1)
        };
        println!(
            "svfit half JSON-schema / unconstrained: throughput {:.3}x (median of {HTTP_ROUNDS} rounds \
             {:.3}x, {:.3}-{:.3}x), e2e p95 {:.2}x; masks {:.2} ms per step ({:.1}% of the steps' \
             time), {:.3} ms per mask",
            on.tokens_per_s / free.tokens_per_s,
            get(on, "over_unconstrained_round_median"),
            get(on, "over_unconstrained_round_min"),
            get(on, "over_unconstrained_round_max"),
            on.e2e_ms[1] / free.e2e_ms[1],
            get(on, "turns_mask_ms_per_step"),
            100.0 * get(on, "turns_mask_share_of_steps"),
            get(on, "turns_mask_ms_per_mask"),
        );
        reports.push(free);
    }
    // Turns with a fine-tuning job running against turns without.
    if let Some(with) = beside_job {
        let without = &reports[0];
        let get = |k: &str| {
            with.extra
                .iter()
                .find(|(n, _)| n == k)
                .map_or(f64::NAN, |e| e.1)
        };
        println!(
            "svfit with a fine-tuning job / without (--train-share {}): throughput {:.3}x (median of \
             {HTTP_ROUNDS} rounds {:.3}x, min {:.3}x), TTFT p95 {:.2}x (round median {:.2}x); the job \
             took {:.0} steps, {:.3} steps/s",
            o.train_share,
            with.tokens_per_s / without.tokens_per_s,
            get("over_nojob_round_median"),
            get("over_nojob_round_min"),
            with.ttft_ms[1] / without.ttft_ms[1],
            get("ttft_p95_over_nojob_round_median"),
            get("job_steps"),
            get("job_steps_per_s"),
        );
        reports.push(with);
    }
    // LoRAs against SVFit adapters on the same traffic, in the same run.
    if o.scenario == "lora" && o.addr.is_none() {
        let many = same_run(&o, "many");
        let svfit_adapters = runtime
            .block_on(run_svfit(&many, &b, &dir, n_adapters, false))
            .remove(0);
        println!(
            "svfit 64 LoRAs / svfit 64 SVFit adapters: throughput {:.2}x, TTFT p95 {:.2}x, e2e p95 {:.2}x",
            reports[0].tokens_per_s / svfit_adapters.tokens_per_s,
            reports[0].ttft_ms[1] / svfit_adapters.ttft_ms[1],
            reports[0].e2e_ms[1] / svfit_adapters.e2e_ms[1]
        );
        reports.push(svfit_adapters);
    }
    // Adapters against our own base, in the same run.
    if o.scenario == "many" && o.addr.is_none() {
        let base = same_run(&o, "base");
        let ours = runtime
            .block_on(run_svfit(&base, &b, &dir, 0, false))
            .remove(0);
        // The engine's time per token of its batches, from its counters.
        let per_token = |r: &Report| {
            let get = |k: &str| {
                r.extra
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or(f64::NAN, |e| e.1)
            };
            get("step_ms_mean") / get("tokens_per_step")
        };
        println!(
            "svfit 64 adapters / svfit base: throughput {:.2}x, e2e p95 {:.2}x, engine time per token {:.2}x",
            reports[0].tokens_per_s / ours.tokens_per_s,
            reports[0].e2e_ms[1] / ours.e2e_ms[1],
            per_token(&reports[0]) / per_token(&ours)
        );
        reports.push(ours);
    }
    let comparable = ["base", "one", "many", "lora"].contains(&o.scenario.as_str());
    if o.llama && comparable {
        reports.push(runtime.block_on(run_llama(&o, &dir, n_adapters)));
        let (a, l) = (&reports[0], &reports[reports.len() - 1]);
        println!(
            "svfit / llama-server: throughput {:.2}x, TTFT p95 {:.2}x, ITL p95 {:.2}x, e2e p95 {:.2}x",
            a.tokens_per_s / l.tokens_per_s,
            a.ttft_ms[1] / l.ttft_ms[1],
            a.itl_ms[1] / l.itl_ms[1],
            a.e2e_ms[1] / l.e2e_ms[1]
        );
        let peak = |r: &Report| {
            r.extra
                .iter()
                .find(|(n, _)| n == "peak_rss_mb")
                .map_or(f64::NAN, |e| e.1)
        };
        println!(
            "peak RSS: svfit (this process, every svfit run) {:.0} MB, llama-server {:.0} MB ({:.2}x)",
            peak(a),
            peak(l),
            peak(a) / peak(l)
        );
    }
    println!(
        "model {}, --weights {}, {} threads, {} clients, {} words + {} generated tokens per request, {}",
        o.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        o.weights,
        o.threads,
        o.clients,
        o.prompt_words,
        o.gen,
        match o.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".into(),
        }
    );
    print(&reports);
    if let Some(path) = &o.json {
        let body: Vec<serde_json::Value> = reports.iter().map(Report::json).collect();
        let text = serde_json::to_string_pretty(&body).unwrap_or_else(fail);
        std::fs::write(path, text + "\n").unwrap_or_else(fail);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
