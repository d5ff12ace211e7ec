//! A tenant cannot stop, starve or corrupt the server: hostile and
//! concurrent requests against a real server over loopback (in-process,
//! or the `svfit serve` binary where a process must be killed or starved
//! of file descriptors), real adapter files on disk. Each test checks that
//! the bad input gets a clean gRPC error and that another tenant's
//! ordinary request keeps its answer (and its latency) during and after.

#[cfg(feature = "s3")]
mod cluster;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common;
use common::serve::*;
use common::{hostile, temp_dir};
use svfit::adapter::Adapter;
use svfit::server::pb::adapters_client::AdaptersClient;
use svfit::server::pb::inference_client::InferenceClient;
use svfit::server::pb::{self, generate_request::Input};
use svfit::server::{self, Running};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Pause of the hostile client between two requests.
const PACE_MS: u64 = 10;

/// Bob's ordinary request: its answer and how long it took.
async fn bobs_request(infer: &mut InferenceClient<Channel>) -> (String, Duration) {
    let start = Instant::now();
    let text = infer
        .generate(with_key(greedy("style", PROMPTS[0], MAX_TOKENS), "kb"))
        .await
        .unwrap()
        .into_inner()
        .text;
    (text, start.elapsed())
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A `GenerateRequest` whose prompt is arbitrary bytes: the proto's field
/// 3 as `bytes`, to send what a typed client cannot (invalid UTF-8).
#[derive(Clone, PartialEq, prost::Message)]
struct RawPrompt {
    #[prost(bytes = "vec", tag = "3")]
    prompt: Vec<u8>,
}

async fn raw_generate(channel: Channel, prompt: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/svfit.v1.Inference/Generate");
    let codec = tonic_prost::ProstCodec::<RawPrompt, pb::GenerateResponse>::default();
    let mut request = Request::new(RawPrompt { prompt });
    request
        .metadata_mut()
        .insert("authorization", "Bearer ka".parse().unwrap());
    grpc.unary(request, path, codec).await.map(|_| ())
}

fn alice(body: pb::GenerateRequest) -> Request<pb::GenerateRequest> {
    with_key(body, "ka")
}

/// The adapters alice's hostile requests name (`tests/common/hostile.rs`).
const ALICES: hostile::Names = hostile::Names {
    own: "style",
    own_qualified: "alice/style",
    other_tenants: "bob/style",
    unknown: "nothing",
};

/// The hostile catalogue as alice's requests.
fn attacks() -> impl Iterator<Item = (hostile::Attack, Request<pb::GenerateRequest>)> {
    hostile::attacks(&ALICES).into_iter().map(|attack| {
        let request = attack.request(Some("ka"));
        (attack, request)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_clean_errors_and_neighbours_keep_their_answers() {
    let _machine = common::alone();
    let dir = temp_dir("trust-hostile");
    let config = keyed_config(dir.path());
    let adapters = PathBuf::from(&config.adapters);
    write(&adapters, "alice", "style", &adapter(1));
    write(&adapters, "bob", "style", &adapter(2));
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let channel = Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut before = Vec::new();
    let mut answer = String::new();
    for _ in 0..3 {
        let (text, took) = bobs_request(&mut infer).await;
        answer = text;
        before.push(took);
    }

    // Every attack, once each, checked; then again in a loop while bob
    // asks, and bob afterwards.
    for (attack, request) in attacks() {
        let got = match infer.generate(request).await {
            Ok(_) => Code::Ok,
            Err(status) => {
                assert!(
                    status.message().len() < 1000,
                    "{}: a {}-byte message",
                    attack.name,
                    status.message().len()
                );
                status.code()
            }
        };
        assert_eq!(got, attack.want, "{}", attack.name);
    }
    let invalid = raw_generate(channel.clone(), b"caf\xff\xfe".to_vec())
        .await
        .unwrap_err();
    assert_eq!(
        invalid.code(),
        Code::InvalidArgument,
        "{}",
        invalid.message()
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        let mut infer = infer.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (_, request) in attacks() {
                    let _ = infer.generate(request).await;
                    // One client, one request after another: on two cores
                    // a client that never pauses takes a core from the
                    // engine whatever it sends (a flood is rate limiting's
                    // job, not the validation layer's).
                    tokio::time::sleep(Duration::from_millis(PACE_MS)).await;
                }
                let _ = raw_generate(channel.clone(), vec![0xff; 64]).await;
            }
        })
    };
    let mut during = Vec::new();
    for _ in 0..3 {
        let (text, took) = bobs_request(&mut infer).await;
        assert_eq!(text, answer, "bob's answer during the attack");
        during.push(took);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.await.unwrap();
    let mut after = Vec::new();
    for _ in 0..3 {
        let (text, took) = bobs_request(&mut infer).await;
        assert_eq!(text, answer, "bob's answer after the attack");
        after.push(took);
    }
    let (before, during, after) = (median(before), median(during), median(after));
    eprintln!("bob's latency: before {before:?}, during {during:?}, after {after:?}");
    assert!(during <= 2 * before, "during {during:?} vs {before:?}");
    assert!(after <= 2 * before, "after {after:?} vs {before:?}");
    assert_eq!(
        metric(&running, "svfit_requests_failed_total").await,
        0.0,
        "no request failed inside the engine"
    );
    running.stop().await;
}

/// The sigma vectors of `n` distinct adapters and their files' bytes.
fn uploads(dir: &Path, n: u64) -> Vec<(Adapter, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let a = adapter(1000 + i);
            let (_, bytes) = file_bytes(dir, &format!("up{i}.safetensors"), &a);
            (a, bytes)
        })
        .collect()
}

/// Temporary files left in the store's directories.
fn temp_files(adapters: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for tenant in std::fs::read_dir(adapters).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(tenant.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if file.file_name().to_string_lossy().contains(".tmp.") {
                out.push(file.path());
            }
        }
    }
    out
}

/// The stored file of `tenant/id` is one complete upload: its sigmas are
/// one of `uploads`'. Returns its version.
fn is_one_upload(adapters: &Path, tenant: &str, id: &str, uploads: &[(Adapter, Vec<u8>)]) -> u64 {
    let path = adapters.join(tenant).join(format!("{id}.safetensors"));
    let stored = Adapter::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        uploads.iter().any(|(a, _)| a.sigma == stored.sigma),
        "{} is not one of the uploads",
        path.display()
    );
    stored.info[svfit::store::VERSION_KEY].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_of_one_id_get_increasing_versions_and_complete_files() {
    let _machine = common::shared();
    let dir = temp_dir("trust-uploads");
    concurrent_uploads(config(dir.path()), dir.path(), true).await;
}

/// The same through the object-store backend (`memory://`, whose
/// conditional puts are those of S3's `If-Match`).
#[cfg(feature = "object-store")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_to_an_object_store_get_increasing_versions() {
    let _machine = common::shared();
    let dir = temp_dir("trust-uploads-objects");
    let mut config = config(dir.path());
    config.adapters = "memory://".into();
    concurrent_uploads(config, dir.path(), false).await;
}

/// 20 concurrent uploads of one id, 3 rounds, with Gets running; with
/// `local_files`, the stored file is checked too.
async fn concurrent_uploads(config: svfit::server::ServeConfig, dir: &Path, local_files: bool) {
    let adapters = PathBuf::from(&config.adapters);
    let files = uploads(dir, 20);
    let running = server::start(config).await.unwrap();
    let (_, mut admin) = clients(&running).await;
    let first = upload(&mut admin, "shared", files[0].1.clone())
        .await
        .unwrap();
    assert_eq!(first.version, 1);

    // Readers that must never fail while uploads land.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, mut admin) = (stop.clone(), admin.clone());
            tokio::spawn(async move {
                let mut reads = 0;
                let mut last = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let info = admin
                        .get(pb::AdapterRef {
                            id: "shared".into(),
                            tenant: String::new(),
                        })
                        .await
                        .expect("a Get during uploads");
                    assert!(info.get_ref().version >= last, "versions never go back");
                    last = info.get_ref().version;
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    let mut highest = first.version;
    for round in 0..3 {
        let tasks: Vec<_> = files
            .iter()
            .map(|(_, bytes)| {
                let (mut admin, bytes) = (admin.clone(), bytes.clone());
                tokio::spawn(async move { upload(&mut admin, "shared", bytes).await })
            })
            .collect();
        let mut versions = Vec::new();
        for task in tasks {
            let info = task.await.unwrap().expect("every upload succeeds");
            versions.push(info.version);
        }
        let distinct: HashSet<u64> = versions.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            versions.len(),
            "round {round}: {versions:?}"
        );
        let (low, high) = (
            *distinct.iter().min().unwrap(),
            *distinct.iter().max().unwrap(),
        );
        assert!(low > highest, "round {round}: versions increase");
        assert_eq!(high - low + 1, versions.len() as u64, "no version skipped");
        highest = high;
        let got = admin
            .get(pb::AdapterRef {
                id: "shared".into(),
                tenant: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(got.get_ref().version, highest, "the last version is served");
        if local_files {
            let stored = is_one_upload(&adapters, "default", "shared", &files);
            assert_eq!(stored, highest, "the last version is the stored one");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0);
    }
    if local_files {
        assert_eq!(temp_files(&adapters), Vec::<PathBuf>::new());
    }
    running.stop().await;
}

/// `svfit serve` as a child process: its addresses, and its stderr kept
/// drained (lines go to the returned receiver after the start).
fn spawn_server(adapters: &Path, rust_log: &str, shell_prefix: &str) -> Process {
    let b = base();
    let exe = env!("CARGO_BIN_EXE_svfit");
    let mut args: Vec<String> = [
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--threads",
        "2",
        // The uploaders of the kill test go faster than a tenant may.
        "--tenant-rate",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--model".into(), b.model.display().to_string()]);
    args.extend(b.targets_args());
    args.extend(["--adapters".into(), adapters.display().to_string()]);
    let mut command = if shell_prefix.is_empty() {
        let mut c = Command::new(exe);
        c.args(&args);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("{shell_prefix}; exec \"$0\" \"$@\""))
            .arg(exe)
            .args(&args);
        c
    };
    // An empty `rust_log`: the server's default filter.
    if rust_log.is_empty() {
        command.env_remove("RUST_LOG");
    } else {
        command.env("RUST_LOG", rust_log);
    }
    command.env("SVFIT_HOME", &b.home);
    start_process(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_concurrent_uploads_leaves_every_adapter_readable() {
    let _machine = common::shared();
    use rand_like::Draws;
    let dir = temp_dir("trust-kill");
    let adapters = dir.path().join("adapters");
    let files = uploads(dir.path(), 6);
    let ids = ["a", "b"];
    let mut acknowledged = [0u64; 2];
    let mut draws = Draws(7);
    let rounds = 30;
    for round in 0..=rounds {
        let mut server = spawn_server(&adapters, "warn", "");
        // The restart: every adapter readable, one complete upload, no
        // acknowledged version lost, no temporary file left.
        assert_eq!(
            temp_files(&adapters),
            Vec::<PathBuf>::new(),
            "round {round}"
        );
        let mut admin = AdaptersClient::new(channel(server.addr).await);
        for (k, id) in ids.iter().enumerate() {
            match admin
                .get(pb::AdapterRef {
                    id: id.to_string(),
                    tenant: String::new(),
                })
                .await
            {
                Ok(info) => {
                    let version = is_one_upload(&adapters, "default", id, &files);
                    assert_eq!(info.get_ref().version, version);
                    assert!(
                        version >= acknowledged[k],
                        "round {round}: {id} lost a version"
                    );
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::NotFound, "round {round}: {status:?}");
                    assert_eq!(acknowledged[k], 0, "round {round}: {id} was uploaded");
                }
            }
        }
        if round == rounds {
            let _ = server.child.kill();
            let _ = server.child.wait();
            break;
        }
        let (tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (mut admin, tx) = (admin.clone(), tx.clone());
                let plan: Vec<(usize, usize)> = (0..50)
                    .map(|i| ((w + i) % ids.len(), (w * 7 + i) % files.len()))
                    .collect();
                let files: Vec<Vec<u8>> = files.iter().map(|(_, b)| b.clone()).collect();
                tokio::spawn(async move {
                    for (k, f) in plan {
                        match upload(&mut admin, ids[k], files[f].clone()).await {
                            Ok(info) => {
                                let _ = tx.send((k, info.version));
                            }
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(draws.below(400))).await;
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        for writer in writers {
            writer.await.unwrap();
        }
        while let Ok((k, version)) = acks.try_recv() {
            acknowledged[k] = acknowledged[k].max(version);
        }
    }
    eprintln!("acknowledged versions after {rounds} rounds: {acknowledged:?}");
    assert!(acknowledged.iter().all(|&v| v > 0));
}

/// A tiny seeded generator for the test's random delays.
mod rand_like {
    pub struct Draws(pub u64);

    impl Draws {
        pub fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
            (self.0 >> 33) % n
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pin_upload_delete_cycles_never_hold_slots_and_pins_have_quotas() {
    let _machine = common::shared();
    let dir = temp_dir("trust-pins");
    let mut config = keyed_config(dir.path());
    // Three slots: two may be pinned, one tenant may pin one.
    config.engine.adapter_slots = 3;
    config.pins_per_tenant = 1;
    let adapters = PathBuf::from(&config.adapters);
    for b in 0..3 {
        write(&adapters, "bob", &format!("b{b}"), &adapter(500 + b));
    }
    let running = server::start(config).await.unwrap();
    let (mut infer, mut admin) = clients(&running).await;
    let pin = |id: &str, pinned: bool, key: &str| {
        with_key(
            pb::PinRequest {
                id: id.into(),
                tenant: String::new(),
                pinned,
            },
            key,
        )
    };
    let bytes = |seed| {
        let (_, b) = file_bytes(dir.path(), "pin.safetensors", &adapter(seed));
        b
    };
    let upload_as = |client: &mut AdaptersClient<Channel>, id: &str, bytes: Vec<u8>, key: &str| {
        let mut client = client.clone();
        let request = with_key(tokio_stream::iter(upload_chunks(id, &bytes)), key);
        async move { client.upload(request).await.map(|r| r.into_inner()) }
    };
    // Bob's requests must never wait for a slot for long.
    let bob = |b: u64| {
        let mut r = with_key(greedy(&format!("b{}", b % 3), PROMPTS[1], 2), "kb");
        r.set_timeout(Duration::from_secs(60));
        r
    };

    upload_as(&mut admin, "a", bytes(600), "ka").await.unwrap();
    admin.pin(pin("a", true, "ka")).await.unwrap();
    for cycle in 0..8u64 {
        let mut request = with_key(greedy("a", PROMPTS[1], 2), "ka");
        request.set_timeout(Duration::from_secs(60));
        let alice = infer.generate(request).await.unwrap().into_inner();
        assert!(
            alice.adapter_version.starts_with("a@v"),
            "{}",
            alice.adapter_version
        );
        let info = upload_as(&mut admin, "a", bytes(601 + cycle), "ka")
            .await
            .unwrap();
        assert!(
            admin
                .pin(pin("a", true, "ka"))
                .await
                .unwrap()
                .into_inner()
                .pinned
        );
        if cycle % 3 == 2 {
            admin
                .delete(with_key(
                    pb::AdapterRef {
                        id: "a".into(),
                        tenant: String::new(),
                    },
                    "ka",
                ))
                .await
                .unwrap();
            upload_as(&mut admin, "a", bytes(700 + cycle), "ka")
                .await
                .unwrap();
            admin.pin(pin("a", true, "ka")).await.unwrap();
        } else {
            assert!(info.version >= 2);
        }
        for b in 0..3 {
            let got = infer.generate(bob(cycle + b)).await;
            assert!(got.is_ok(), "cycle {cycle}: bob's b{b}: {got:?}");
        }
    }

    // Quotas: alice has her one pin; bob still gets his; the admin cannot
    // pin past the total (slots less one).
    upload_as(&mut admin, "a2", bytes(800), "ka").await.unwrap();
    assert_eq!(
        code(admin.pin(pin("a2", true, "ka")).await),
        Code::ResourceExhausted
    );
    assert!(
        admin
            .pin(pin("b0", true, "kb"))
            .await
            .unwrap()
            .into_inner()
            .pinned
    );
    upload_as(&mut admin, "c", bytes(801), "kroot")
        .await
        .unwrap();
    assert_eq!(
        code(admin.pin(pin("c", true, "kroot")).await),
        Code::FailedPrecondition
    );
    // Two pinned adapters in use, and the third slot serves every other.
    for b in 0..6 {
        infer.generate(bob(b)).await.unwrap();
        let mut request = with_key(greedy("c", PROMPTS[1], 2), "kroot");
        request.set_timeout(Duration::from_secs(60));
        infer.generate(request).await.unwrap();
    }
    running.stop().await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_in_one_sequence_fails_only_that_request() {
    let _machine = common::shared();
    use svfit::engine::fault;
    let dir = temp_dir("trust-panic");
    let mut config = keyed_config(dir.path());
    // One slot: a slot leaked by the failed request would block bob.
    config.engine.adapter_slots = 1;
    let adapters = PathBuf::from(&config.adapters);
    write(&adapters, "alice", "style", &adapter(1));
    write(&adapters, "bob", "style", &adapter(2));
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let (answer, _) = bobs_request(&mut infer).await;
    let alices = infer
        .generate(alice(greedy("style", PROMPTS[0], MAX_TOKENS)))
        .await
        .unwrap()
        .into_inner()
        .text;

    // Bob streams while alice's request (on the base) panics in the engine.
    let panicking = |adapter: &str| {
        alice(pb::GenerateRequest {
            stop: vec![fault::PANIC_SEQUENCE.into()],
            ..greedy(adapter, PROMPTS[1], MAX_TOKENS)
        })
    };
    let mut stream = infer
        .generate_stream(with_key(greedy("style", PROMPTS[0], 40), "kb"))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let failed = infer.generate(panicking("")).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{}", failed.message());
    let mut streamed = first.text;
    while let Some(chunk) = stream.message().await.unwrap() {
        streamed.push_str(&chunk.text);
    }
    assert!(streamed.starts_with(&answer), "bob's stream kept going");
    // A panic with an adapter gives back the only slot.
    let failed = infer.generate(panicking("style")).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{}", failed.message());
    for _ in 0..2 {
        assert_eq!(bobs_request(&mut infer).await.0, answer);
        let again = infer
            .generate(alice(greedy("style", PROMPTS[0], MAX_TOKENS)))
            .await
            .unwrap()
            .into_inner()
            .text;
        assert_eq!(again, alices);
    }
    assert_eq!(metric(&running, "svfit_requests_failed_total").await, 2.0);
    assert_eq!(metric(&running, "svfit_active_sequences").await, 0.0);
    running.stop().await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_engine_turns_health_not_serving_and_exits_non_zero() {
    let _machine = common::shared();
    use svfit::engine::fault;
    let dir = temp_dir("trust-dead-engine");
    let mut server = spawn_server(&dir.path().join("adapters"), "warn", "");
    let channel = channel(server.addr).await;
    let mut watch = watch_health(channel.clone()).await;
    let mut infer = InferenceClient::new(channel);
    let failed = infer
        .generate(pb::GenerateRequest {
            stop: vec![fault::KILL_ENGINE.into()],
            ..greedy("", PROMPTS[0], 4)
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{}", failed.message());
    let status = watch.message().await.unwrap().unwrap().status;
    assert_eq!(status, 2, "NOT_SERVING");
    let exit = exited(&mut server.child).await;
    assert!(!exit.success(), "{exit:?}");
    let mut log = Vec::new();
    while let Ok(line) = server.log.recv_timeout(Duration::from_secs(10)) {
        log.push(line);
    }
    assert!(
        log.iter().any(|l| l.contains("the engine stopped")),
        "{log:?}"
    );
}

/// A health watch on the Inference service, past its first SERVING.
async fn watch_health(channel: Channel) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "svfit.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1, "SERVING");
    watch
}

/// The exit status of a server process, which must come within 30 s.
async fn exited(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the process exits"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let attempt = async {
        let (_, _, body) = try_http(addr, "GET", "/metrics", &[], "").await.ok()?;
        body.contains("svfit_requests_total").then_some(body)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accept_loops_back_off_and_recover_when_descriptors_run_out() {
    let _machine = common::shared();
    let dir = temp_dir("trust-fds");
    // Few descriptors: a few hundred idle connections exhaust them.
    let mut server = spawn_server(&dir.path().join("adapters"), "warn", "ulimit -n 160");
    let pid = server.child.id();
    assert!(scrape(server.metrics).await.is_some());
    let mut idle = Vec::new();
    for _ in 0..400 {
        // Past the server's descriptors and the kernel's backlog a connect
        // hangs: stop there.
        let connect = tokio::net::TcpStream::connect(server.addr);
        match tokio::time::timeout(Duration::from_millis(300), connect).await {
            Ok(Ok(s)) => idle.push(s),
            _ => break,
        }
    }
    // Let the server hit EMFILE, then check it does not spin.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_seconds(pid) - cpu;
    eprintln!(
        "{} idle connections; the server used {spent:.2} CPU s in 2 s",
        idle.len()
    );
    assert!(
        spent < 0.5,
        "the accept loop spins: {spent:.2} CPU s in 2 s"
    );
    // One burst of metrics scrapes while starved, then recovery.
    for _ in 0..20 {
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            tokio::net::TcpStream::connect(server.metrics),
        )
        .await;
    }
    drop(idle);
    let start = Instant::now();
    while scrape(server.metrics).await.is_none() {
        assert!(start.elapsed() < Duration::from_secs(20), "metrics recover");
    }
    let mut infer = InferenceClient::new(channel(server.addr).await);
    let answer = infer.generate(greedy("", PROMPTS[1], 4)).await.unwrap();
    assert_eq!(answer.into_inner().usage.unwrap().completion_tokens, 4);
    eprintln!("recovered in {:?}", start.elapsed());
    let _ = server.child.kill();
    let _ = server.child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_limit_wait_their_turn() {
    let _machine = common::shared();
    let dir = temp_dir("trust-connections");
    let mut config = config(dir.path());
    config.max_connections = 4;
    let running: Running = server::start(config).await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(running.addr).await.unwrap());
    }
    // A fifth client's connection is not served while four are open...
    let fifth = Channel::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(500));
    let mut early = InferenceClient::new(fifth.connect_lazy());
    let refused = early.model_info(pb::ModelInfoRequest {}).await;
    assert!(refused.is_err(), "served beyond the limit");
    // ...and is once one closes.
    drop(early);
    idle.pop();
    let mut infer = InferenceClient::new(channel(running.addr).await);
    infer.model_info(pb::ModelInfoRequest {}).await.unwrap();
    drop(idle);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenant_cannot_fill_the_queue() {
    let _machine = common::shared();
    let dir = temp_dir("trust-queue");
    let mut config = keyed_config(dir.path());
    config.engine.max_sequences = 1;
    config.engine.tenant_queue_limit = 2;
    let running = server::start(config).await.unwrap();
    let (infer, _) = clients(&running).await;
    // Alice sends 8 long requests at once: one runs, two wait, the rest
    // are refused.
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let mut infer = infer.clone();
            tokio::spawn(async move {
                infer
                    .generate(alice(greedy("", PROMPTS[0], 24)))
                    .await
                    .map_err(|s| s.code())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut bob = infer.clone();
    let answer = bob
        .generate(with_key(greedy("", PROMPTS[1], 4), "kb"))
        .await
        .expect("bob is queued and served");
    assert_eq!(answer.into_inner().usage.unwrap().completion_tokens, 4);
    let mut refused = 0;
    for flood in floods {
        match flood.await.unwrap() {
            Ok(_) => {}
            Err(code) => {
                assert_eq!(code, Code::ResourceExhausted);
                refused += 1;
            }
        }
    }
    assert!(refused >= 5, "{refused} of alice's 8 refused");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_ends_with_one_log_line() {
    let _machine = common::shared();
    let dir = temp_dir("trust-log");
    let mut server = spawn_server(&dir.path().join("adapters"), "", "");
    let mut infer = InferenceClient::new(channel(server.addr).await);
    let done = infer
        .generate(greedy("", PROMPTS[1], 4))
        .await
        .unwrap()
        .into_inner();
    let refused = infer.generate(greedy("", "", 4)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let _ = server.child.kill();
    let _ = server.child.wait();
    // Everything the server wrote, up to the end of its stderr.
    let mut log = Vec::new();
    while let Ok(line) = server.log.recv_timeout(Duration::from_secs(10)) {
        log.push(line);
    }
    let lines: Vec<&String> = log.iter().filter(|l| l.contains(" request: ")).collect();
    assert_eq!(lines.len(), 2, "{log:#?}");
    eprintln!("{}\n{}", lines[0], lines[1]);
    let want = [
        format!("request_id=\"{}\"", done.request_id),
        "tenant=\"default\"".into(),
        "completion_tokens=4".into(),
        "finish=\"length\"".into(),
        "ttft_ms=".into(),
    ];
    for field in want {
        assert!(lines[0].contains(&field), "{field} in {}", lines[0]);
    }
    assert!(lines[1].contains("code=InvalidArgument"), "{}", lines[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_uploads_time_out_and_never_block_others() {
    let _machine = common::shared();
    let dir = temp_dir("trust-stalled-uploads");
    let mut config = config(dir.path());
    config.upload_timeout = Duration::from_secs(1);
    let running = server::start(config).await.unwrap();
    let (_, admin) = clients(&running).await;
    let (_, bytes) = file_bytes(dir.path(), "ok.safetensors", &adapter(900));
    // Eight uploads that send a header and a little data, then nothing.
    let mut held = Vec::new();
    let mut stalled = Vec::new();
    for i in 0..8 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
                id: format!("stalled{i}"),
                tenant: String::new(),
                peft_config: String::new(),
            })),
        })
        .await
        .unwrap();
        tx.send(pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Data(bytes[..100].to_vec())),
        })
        .await
        .unwrap();
        held.push(tx);
        let mut admin = admin.clone();
        stalled.push(tokio::spawn(async move {
            admin
                .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let info = upload(&mut admin.clone(), "fine", bytes).await.unwrap();
    assert_eq!(info.version, 1);
    eprintln!("an upload behind 8 stalled ones took {:?}", start.elapsed());
    for upload in stalled {
        let status = upload.await.unwrap().unwrap_err();
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{}",
            status.message()
        );
    }
    drop(held);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_rate_is_refused_before_decoding_and_others_are_not() {
    let _machine = common::shared();
    let dir = temp_dir("trust-rate");
    let mut config = keyed_config(dir.path());
    config.tenant_rate = 5.0;
    config.tenant_burst = 10.0;
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    // Alice floods with requests of 1 MB: past her burst they are refused
    // with RESOURCE_EXHAUSTED (not OUT_OF_RANGE: never decoded).
    let huge = || {
        alice(pb::GenerateRequest {
            input: Some(Input::Prompt("word ".repeat(200_000))),
            ..greedy("", "", 4)
        })
    };
    let mut codes = Vec::new();
    for _ in 0..30 {
        codes.push(infer.generate(huge()).await.unwrap_err());
    }
    let limited: Vec<&tonic::Status> = codes
        .iter()
        .filter(|s| s.code() == Code::ResourceExhausted)
        .collect();
    assert!(limited.len() >= 15, "{} of 30 limited", limited.len());
    assert!(limited[0].metadata().get("retry-after").is_some());
    assert!(codes[..10].iter().all(|s| s.code() == Code::OutOfRange));
    // Bob is not limited by alice's flood.
    let answer = infer
        .generate(with_key(greedy("", PROMPTS[1], 4), "kb"))
        .await
        .unwrap();
    assert_eq!(answer.into_inner().usage.unwrap().completion_tokens, 4);
    running.stop().await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_fails_to_decode_fails_only_the_sequence_at_fault() {
    let _machine = common::shared();
    use svfit::engine::fault;
    let dir = temp_dir("trust-decode");
    let config = keyed_config(dir.path());
    let adapters = PathBuf::from(&config.adapters);
    write(&adapters, "bob", "style", &adapter(2));
    let running = server::start(config).await.unwrap();
    let (mut infer, _) = clients(&running).await;
    let bobs = || with_key(greedy("style", PROMPTS[0], 40), "kb");
    let want = infer.generate(bobs()).await.unwrap().into_inner().text;

    // Two streams of bob's share every batch with alice's bad sequence.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut stream = infer.generate_stream(bobs()).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        streams.push((stream, first.text));
    }
    let failed = infer
        .generate(alice(pb::GenerateRequest {
            stop: vec![fault::INVALID_TOKEN.into()],
            ..greedy("", PROMPTS[1], 8)
        }))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{}", failed.message());
    assert!(
        failed.message().contains("decoding failed"),
        "{}",
        failed.message()
    );
    for (mut stream, mut text) in streams {
        while let Some(chunk) = stream.message().await.unwrap() {
            text.push_str(&chunk.text);
        }
        assert_eq!(text, want, "bob's stream, decoded alone for a step");
    }
    assert_eq!(metric(&running, "svfit_requests_failed_total").await, 1.0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_running_requests_then_exits() {
    let _machine = common::shared();
    let dir = temp_dir("trust-drain");
    let mut server = spawn_server(&dir.path().join("adapters"), "warn", "");
    let channel = channel(server.addr).await;
    let mut watch = watch_health(channel.clone()).await;
    let mut infer = InferenceClient::new(channel);
    let mut stream = infer
        .generate_stream(greedy("", ENDLESS, 60))
        .await
        .unwrap()
        .into_inner();
    let mut text = stream.message().await.unwrap().unwrap().text;
    let term = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        2,
        "NOT_SERVING"
    );
    // New connections are refused at once: a proxy moves on to another
    // replica, and no request is accepted only to be cut.
    let start = Instant::now();
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    while endpoint.connect().await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "new connections were still accepted while draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The running stream finishes whole.
    let mut finish = String::new();
    let mut tokens = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        text.push_str(&chunk.text);
        if let Some(usage) = chunk.usage {
            tokens = usage.completion_tokens;
            finish = chunk.finish_reason;
        }
    }
    assert_eq!((tokens, finish.as_str()), (60, "length"), "{text:?}");
    let start = Instant::now();
    let exit = exited(&mut server.child).await;
    assert!(exit.success(), "{exit:?}");
    eprintln!("exited {:?} after the stream ended", start.elapsed());
}
