//! Three `svfit serve` replicas behind nginx, configured by the shipped
//! `deploy/nginx/svfit.conf` (only the addresses replaced), sharing one
//! S3-compatible store (moto's server, which `scripts/bootstrap` installs):
//! writes through one replica are what the others serve on the next
//! request; requests for one adapter stay on one replica; a replica killed
//! with -9 under load fails only the requests it was running; a replica
//! drained with SIGTERM under load fails none; the store restarted mid-run
//! leaves cached adapters served and refuses uploads cleanly until it is
//! back. Prints the figures. `threads` checks that the store's version
//! checks against moto start no threads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::common::serve::*;
use super::common::temp_dir;
use super::{exited, start_process, Process};
use svfit::server::pb;
use svfit::server::pb::adapters_client::AdaptersClient;
use svfit::server::pb::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

mod jobs;
mod threads;

const BUCKET: &str = "svfit-cluster";
const REPLICAS: usize = 3;
/// Adapters the load spreads over.
const ADAPTERS: usize = 8;
const TOKENS: u32 = 6;
/// Concurrent clients of the load (half unary, half streaming).
const CLIENTS: usize = 6;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A helper process, stopped when dropped: SIGTERM first (nginx's master
/// then stops its workers, which SIGKILL would orphan), SIGKILL after 5 s.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A program that `scripts/bootstrap` installs.
fn installed(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run scripts/bootstrap (it installs {what})",
        path.display()
    );
    path
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(name)).unwrap())
}

/// Waits until something listens on `addr`.
async fn listening(addr: SocketAddr, what: &str) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// moto's S3 server on `port`, with the bucket created. moto keeps objects
/// in memory: a restarted one is empty.
async fn s3(dir: &Path, port: u16, run: usize) -> Daemon {
    let moto = installed(
        svfit::home::home_dir().join("venv/bin/moto_server"),
        "moto's S3 server",
    );
    let child = Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log_file(dir, &format!("moto-{run}.log")))
        .stderr(log_file(dir, &format!("moto-{run}.err")))
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    listening(local(port), "moto").await;
    let (status, _, body) = http(local(port), "PUT", &format!("/{BUCKET}"), &[], "").await;
    assert_eq!(status, 200, "creating the bucket: {body}");
    daemon
}

/// One replica: its ports stay the same across restarts, as a pod's
/// service name does.
struct Replica {
    grpc: u16,
    http: u16,
    process: Option<Process>,
}

/// `n` replicas on the store at `s3_port`, started.
fn start_replicas(n: usize, s3_port: u16) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = (0..n)
        .map(|_| Replica {
            grpc: free_port(),
            http: free_port(),
            process: None,
        })
        .collect();
    for r in &mut replicas {
        r.start(s3_port);
    }
    replicas
}

impl Replica {
    fn start(&mut self, s3_port: u16) {
        let b = base();
        let mut command = Command::new(env!("CARGO_BIN_EXE_svfit"));
        command
            .arg("serve")
            .args(["--addr", &local(self.grpc).to_string()])
            .args(["--http-addr", &local(self.http).to_string()])
            .args(["--metrics-addr", "127.0.0.1:0", "--threads", "1"])
            .args(["--tenant-rate", "0", "--drain-timeout", "30"])
            .arg("--model")
            .arg(&b.model)
            .args(b.targets_args())
            .args(["--adapters", &format!("s3://{BUCKET}/adapters")])
            .env("SVFIT_HOME", &b.home)
            .env("RUST_LOG", "warn")
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{s3_port}"))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
        self.process = Some(start_process(command));
    }

    fn process(&mut self) -> &mut Process {
        self.process.as_mut().expect("the replica runs")
    }

    async fn clients(&self) -> (InferenceClient<Channel>, AdaptersClient<Channel>) {
        let channel = Channel::from_shared(format!("http://{}", local(self.grpc)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (
            InferenceClient::new(channel.clone()),
            AdaptersClient::new(channel),
        )
    }

    /// A counter of the replica's metrics.
    async fn metric(&mut self, name: &str) -> f64 {
        metric_at(self.process().metrics, name).await
    }
}

/// The lines between `begin` and `end` (markers kept) replaced by `lines`.
fn replace_between(text: &str, begin: &str, end: &str, lines: &[String]) -> String {
    let start = text
        .find(begin)
        .unwrap_or_else(|| panic!("{begin} missing"));
    let start = start + text[start..].find('\n').unwrap() + 1;
    let stop = start + text[start..].find(end).unwrap();
    let stop = text[..stop].rfind('\n').unwrap() + 1;
    format!("{}{}\n{}", &text[..start], lines.join("\n"), &text[stop..])
}

/// nginx with the shipped configuration, listening on `grpc` and `http`,
/// its logs in `dir`.
async fn nginx(dir: &Path, grpc: u16, http: u16, replicas: &[Replica]) -> Daemon {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/svfit.conf");
    let conf = std::fs::read_to_string(shipped).unwrap();
    let servers = |port: fn(&Replica) -> u16| -> Vec<String> {
        replicas
            .iter()
            .map(|r| {
                format!(
                    "    server 127.0.0.1:{} max_fails=1 fail_timeout=10s;",
                    port(r)
                )
            })
            .collect()
    };
    let conf = replace_between(
        &conf,
        "# BEGIN grpc replicas",
        "# END grpc replicas",
        &servers(|r| r.grpc),
    );
    let conf = replace_between(
        &conf,
        "# BEGIN http replicas",
        "# END http replicas",
        &servers(|r| r.http),
    );
    let logs = dir.display();
    let conf = conf
        .replace(
            "listen 50050 http2;",
            &format!("listen 127.0.0.1:{grpc} http2;"),
        )
        .replace("listen 8080;", &format!("listen 127.0.0.1:{http};"))
        .replace("/var/log/nginx/", &format!("{logs}/"));
    std::fs::write(dir.join("svfit.conf"), conf).unwrap();
    let temp = dir.join("nginx-temp");
    std::fs::create_dir_all(&temp).unwrap();
    let temp = temp.display();
    let main = format!(
        "daemon off;\nworker_processes 1;\npid {logs}/nginx.pid;\nerror_log {logs}/nginx-error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  client_body_temp_path {temp}/body;\n  proxy_temp_path {temp}/proxy;\n  \
         fastcgi_temp_path {temp}/fastcgi;\n  uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n  \
         include {logs}/svfit.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let binary = [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("nginx"));
    let child = Command::new(binary)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(log_file(dir, "nginx.out"))
        .stderr(log_file(dir, "nginx.err"))
        .spawn()
        .expect("nginx runs (scripts/bootstrap installs nginx-light)");
    let daemon = Daemon(child);
    listening(local(grpc), "nginx").await;
    daemon
}

/// One line of nginx's gRPC access log.
struct Logged {
    adapter: String,
    /// Every replica nginx tried, in order (more than one: retried).
    upstreams: Vec<String>,
}

fn access_log(dir: &Path) -> Vec<Logged> {
    let text = std::fs::read_to_string(dir.join("svfit-grpc.log")).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("/svfit.v1.Inference/"))
        .map(|l| {
            let field = |name: &str, next: &str| {
                let from = l.find(name).unwrap() + name.len();
                let to = from + l[from..].find(next).unwrap();
                l[from..to].to_string()
            };
            Logged {
                adapter: field("adapter=", " "),
                upstreams: field("upstream=", " upstream_status=")
                    .split(", ")
                    .map(str::to_string)
                    .collect(),
            }
        })
        .collect()
}

/// A request with the routing header nginx hashes on.
fn routed(adapter: &str, prompt: &str) -> Request<pb::GenerateRequest> {
    let mut request = Request::new(greedy(adapter, prompt, TOKENS));
    request
        .metadata_mut()
        .insert("x-svfit-adapter", adapter.parse().unwrap());
    request.set_timeout(Duration::from_secs(60));
    request
}

fn adapter_name(i: usize) -> String {
    format!("a{i}")
}

#[derive(Clone, Copy, Debug)]
struct Outcome {
    started: Instant,
    error: Option<Code>,
}

/// Closed-loop clients through nginx until stopped: even ones unary, odd
/// ones streaming, each request on the next of the adapters.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(nginx: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..CLIENTS)
            .map(|c| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let channel = Channel::from_shared(format!("http://{nginx}"))
                        .unwrap()
                        .connect_lazy();
                    let mut client = InferenceClient::new(channel);
                    let mut outcomes = Vec::new();
                    let mut next = c;
                    while !stop.load(Relaxed) {
                        let request = routed(&adapter_name(next % ADAPTERS), PROMPTS[0]);
                        next += 1;
                        let started = Instant::now();
                        let result = if c % 2 == 0 {
                            client.generate(request).await.map(|_| ())
                        } else {
                            streamed(&mut client, request).await
                        };
                        outcomes.push(Outcome {
                            started,
                            error: result.err().map(|s| s.code()),
                        });
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, clients }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Relaxed);
        let mut all = Vec::new();
        for client in self.clients {
            all.extend(client.await.unwrap());
        }
        all
    }
}

async fn streamed(
    client: &mut InferenceClient<Channel>,
    request: Request<pb::GenerateRequest>,
) -> Result<(), tonic::Status> {
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut finished = false;
    while let Some(chunk) = stream.message().await? {
        finished |= !chunk.finish_reason.is_empty();
    }
    if finished {
        Ok(())
    } else {
        Err(tonic::Status::unknown("the stream ended without a finish"))
    }
}

fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| o.error.is_some()).collect()
}

/// The version string a replica serves for `id`, or the refusal's code.
async fn served(replica: &Replica, id: &str) -> Result<(String, String), Code> {
    let (mut infer, _) = replica.clients().await;
    infer
        .generate(greedy(id, PROMPTS[0], TOKENS))
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.adapter_version, r.text)
        })
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_behind_nginx_share_one_s3_store() {
    let _machine = crate::common::alone();
    let dir = temp_dir("cluster");
    let dir = dir.path();
    let s3_port = free_port();
    let mut store = s3(dir, s3_port, 0).await;
    let mut replicas = start_replicas(REPLICAS, s3_port);
    let (front_grpc, front_http) = (free_port(), free_port());
    let _nginx = nginx(dir, front_grpc, front_http, &replicas).await;
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| file_bytes(dir, &format!("up{i}.safetensors"), &adapter(100 + i)).1)
        .collect();
    let mut report = Vec::new();

    // Read-your-writes: after Upload or Delete returns on one replica,
    // every replica serves that version on its next request.
    let (mut checks, mut stale) = (0, 0);
    for round in 0..3 {
        let (_, mut admin) = replicas[round].clients().await;
        let version = upload(&mut admin, "shared", files[round].clone())
            .await
            .unwrap()
            .version;
        let want = format!("shared@v{version}");
        let mut texts = BTreeSet::new();
        for r in &replicas {
            let (got, text) = served(r, "shared").await.unwrap();
            checks += 1;
            stale += usize::from(got != want);
            texts.insert(text);
        }
        assert_eq!(
            texts.len(),
            1,
            "round {round}: replicas answered differently"
        );
    }
    let (_, mut admin) = replicas[1].clients().await;
    admin
        .delete(pb::AdapterRef {
            id: "shared".into(),
            tenant: String::new(),
        })
        .await
        .unwrap();
    for r in &replicas {
        checks += 1;
        stale += usize::from(served(r, "shared").await != Err(Code::NotFound));
    }
    assert_eq!(
        stale, 0,
        "{stale} of {checks} checks served a stale version"
    );
    report.push(format!(
        "cross-replica staleness: {stale} of {checks} requests right after Upload/Delete returned"
    ));

    // Affinity: each adapter's requests land on one replica.
    let nginx_grpc = local(front_grpc);
    let channel = Channel::from_shared(format!("http://{nginx_grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut front = InferenceClient::new(channel.clone());
    let mut front_admin = AdaptersClient::new(channel);
    for i in 0..ADAPTERS {
        let bytes = file_bytes(dir, "a.safetensors", &adapter(200 + i as u64)).1;
        upload(&mut front_admin, &adapter_name(i), bytes)
            .await
            .unwrap();
    }
    for _ in 0..4 {
        for i in 0..ADAPTERS {
            front
                .generate(routed(&adapter_name(i), PROMPTS[0]))
                .await
                .unwrap();
        }
    }
    let mut placement: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in access_log(dir) {
        placement
            .entry(line.adapter)
            .or_default()
            .extend(line.upstreams);
    }
    for (adapter, upstreams) in &placement {
        assert_eq!(upstreams.len(), 1, "{adapter} went to {upstreams:?}");
    }
    let mut per_replica: BTreeMap<&String, usize> = BTreeMap::new();
    for upstreams in placement.values() {
        *per_replica.entry(upstreams.first().unwrap()).or_default() += 1;
    }
    report.push(format!(
        "affinity: 4 requests for each of {ADAPTERS} adapters, each adapter on one replica; adapters per replica: {per_replica:?}"
    ));

    // The cost of coherence: one version check (a HEAD) per request.
    let mut costs = Vec::new();
    for r in &mut replicas {
        let seconds = r.metric("svfit_adapter_store_check_seconds_total").await;
        let checks = r.metric("svfit_adapter_store_checks_total").await;
        costs.push(format!("{:.2} ms", 1e3 * seconds / checks.max(1.0)));
    }
    report.push(format!(
        "version check per request (HEAD on moto, requests one at a time): {}",
        costs.join(", ")
    ));

    // kill -9 under load: only requests running on that replica may fail.
    let busiest = per_replica
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(addr, _)| addr.rsplit(':').next().unwrap().parse::<u16>().unwrap())
        .unwrap();
    let victim = replicas.iter().position(|r| r.grpc == busiest).unwrap();
    let logged_before = access_log(dir).len();
    let load = Load::start(nginx_grpc);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Dead once reaped: its sockets are closed from then on.
    let kill_sent = Instant::now();
    replicas[victim].process().child.kill().unwrap();
    replicas[victim].process().child.wait().unwrap();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = load.finish().await;
    let failed = failures(&outcomes);
    let relative = |o: &&Outcome| {
        format!(
            "{:?} at {:+.1} ms",
            o.error.unwrap(),
            (o.started.max(kill_sent) - o.started.min(kill_sent)).as_secs_f64()
                * 1e3
                * if o.started >= kill_sent { 1.0 } else { -1.0 }
        )
    };
    let after: Vec<_> = failed
        .iter()
        .filter(|o| o.started > killed_at)
        .map(relative)
        .collect();
    assert!(
        after.is_empty(),
        "requests started after the replica died ({:.1} ms after the kill) failed: {after:?}",
        (killed_at - kill_sent).as_secs_f64() * 1e3
    );
    let logged = access_log(dir);
    let retried = logged[logged_before..]
        .iter()
        .filter(|l| l.upstreams.len() > 1)
        .count();
    let mut served_by: BTreeMap<String, usize> = BTreeMap::new();
    for l in &logged[logged_before..] {
        *served_by
            .entry(l.upstreams.last().unwrap().clone())
            .or_default() += 1;
    }
    let before_kill_ms: Vec<String> = failed.iter().map(relative).collect();
    report.push(format!(
        "kill -9 of replica {victim} under load ({CLIENTS} clients): {} requests, {} failed, started relative to the kill: {} \
         (those it was running), 0 failed after it; {retried} retried by nginx on another replica; served per replica: {served_by:?}",
        outcomes.len(),
        failed.len(),
        before_kill_ms.join(", "),
    ));
    replicas[victim].start(s3_port);

    // SIGTERM under load: the replica drains, nothing fails.
    let drained = (victim + 1) % REPLICAS;
    let logged_before = access_log(dir).len();
    let load = Load::start(nginx_grpc);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = replicas[drained].process().child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exit = exited(&mut replicas[drained].process().child).await;
    assert!(
        exit.success(),
        "the drained replica exits cleanly: {exit:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcomes = load.finish().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "requests failed during the drain: {failed:?}"
    );
    let retried = access_log(dir)[logged_before..]
        .iter()
        .filter(|l| l.upstreams.len() > 1)
        .count();
    report.push(format!(
        "SIGTERM drain of replica {drained} under load: {} requests, 0 failed, {retried} moved by nginx to another replica",
        outcomes.len()
    ));
    replicas[drained].start(s3_port);

    // The store goes down: cached adapters keep being served, uploads
    // fail cleanly; after its restart, uploads work again.
    let mut versions = Vec::new();
    for r in &replicas {
        for i in 0..ADAPTERS {
            versions.push(served(r, &adapter_name(i)).await.unwrap().0);
        }
    }
    drop(store);
    let mut during = Vec::new();
    for r in &replicas {
        for i in 0..ADAPTERS {
            during.push(served(r, &adapter_name(i)).await.unwrap().0);
        }
    }
    assert_eq!(
        during, versions,
        "the cached versions, while the store is down"
    );
    for i in 0..ADAPTERS {
        front
            .generate(routed(&adapter_name(i), PROMPTS[0]))
            .await
            .unwrap();
    }
    let (_, mut admin) = replicas[0].clients().await;
    let refused = upload(&mut admin, "later", files[3].clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert_eq!(
        served(&replicas[1], "never-cached").await,
        Err(Code::Unavailable)
    );
    let mut from_cache = 0.0;
    for r in &mut replicas {
        from_cache += r
            .metric("svfit_adapter_served_store_unreachable_total")
            .await;
    }
    assert!(from_cache >= (REPLICAS * ADAPTERS) as f64, "{from_cache}");
    store = s3(dir, s3_port, 1).await;
    let version = upload(&mut admin, "later", files[3].clone())
        .await
        .unwrap()
        .version;
    for r in &replicas {
        assert_eq!(
            served(r, "later").await.unwrap().0,
            format!("later@v{version}")
        );
        // moto keeps objects in memory: the restarted store is empty, and
        // what it no longer has is no longer served.
        assert_eq!(served(r, "a0").await, Err(Code::NotFound));
    }
    report.push(format!(
        "store down: {from_cache} requests served from replicas' caches, uploads refused with UNAVAILABLE; \
         after its restart: upload v{version} served by every replica"
    ));

    // The HTTP API through the same configuration.
    let completion = |adapter: &str| {
        serde_json::json!({"model": adapter, "prompt": PROMPTS[0], "max_tokens": 2}).to_string()
    };
    let completions = |adapter: &'static str, body: String| async move {
        let header = [("x-svfit-adapter", adapter)];
        http(local(front_http), "POST", "/v1/completions", &header, &body).await
    };
    let (status, _, answer) = completions("later", completion("later")).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, _) = completions("a1", completion("a1")).await;
    assert_eq!(status, 404, "a1 is gone with the old store");
    drop(store);
    // Straight to stderr, past the test harness's capture: CI logs show
    // the figures of a passing run too.
    let figures = format!("cluster figures:\n  {}\n", report.join("\n  "));
    std::io::Write::write_all(&mut std::io::stderr(), figures.as_bytes()).unwrap();
}
