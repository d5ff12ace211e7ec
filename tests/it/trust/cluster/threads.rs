//! The object store's version check (one `HEAD` per request, here on
//! moto's S3 server) runs on the caller's runtime: 1,000 of them start no
//! thread and no runtime. (The store once had a runtime of its own and
//! blocked on it from a new thread per call.)
//!
//! The threads counted are the process's (`/proc/self/status`), so the
//! checks run in a child process of the test binary, where nothing else
//! runs: in this one, other tests start and end threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use super::{free_port, s3, BUCKET};
use crate::common::serve::*;

use svfit::store::object::Objects;
use svfit::store::{AdapterStore, PinLimits};

const CHECKS: usize = 1000;
/// Checks in flight at once: a thread per call would show as this many
/// more threads while they run.
const CONCURRENT: usize = 8;

/// Threads of this process now.
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line["Threads:".len()..].trim().parse().unwrap()
}

/// Samples the thread count until dropped and keeps the highest, so that
/// threads that live only as long as one call are seen too.
struct Peak {
    highest: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl Peak {
    fn start() -> Self {
        let (highest, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let sampler = {
            let (highest, stop) = (highest.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    highest.fetch_max(threads(), Relaxed);
                    std::thread::sleep(Duration::from_micros(100));
                }
            })
        };
        Peak {
            highest,
            stop,
            sampler: Some(sampler),
        }
    }

    fn highest(mut self) -> usize {
        self.stop.store(true, Relaxed);
        self.sampler.take().unwrap().join().unwrap();
        self.highest.load(Relaxed)
    }
}

/// Runs [`version_checks_in_this_process`] alone in a child process.
#[test]
fn object_store_version_checks_start_no_threads() {
    let _machine = crate::common::shared();
    let test = "trust::cluster::threads::version_checks_in_this_process";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in a child process ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The child's figures, for the log.
    for line in stdout.lines().filter(|l| l.contains("threads before")) {
        println!("{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in a child process by object_store_version_checks_start_no_threads"]
async fn version_checks_in_this_process() {
    let dir = crate::common::temp_dir("cluster-threads");
    let port = free_port();
    let _moto = s3(dir.path(), port, 0).await;
    let options = [
        ("aws_endpoint", format!("http://127.0.0.1:{port}")),
        ("aws_allow_http", "true".into()),
        ("aws_access_key_id", "test".into()),
        ("aws_secret_access_key", "test".into()),
        ("aws_region", "us-east-1".into()),
    ];
    let objects = Objects::open_with(
        &format!("s3://{BUCKET}/threads"),
        options.map(|(k, v)| (k.to_string(), v)),
    )
    .unwrap();
    let b = base();
    let store = Arc::new(AdapterStore::open(
        Box::new(objects),
        b.key.clone(),
        b.singular.clone(),
        1 << 30,
        PinLimits {
            total: 0,
            per_tenant: 0,
        },
    ));
    let (_, bytes) = file_bytes(dir.path(), "a.safetensors", &adapter(700));
    assert_eq!(store.put("t", "a", bytes).await.unwrap().version, 1);
    // Checks as the server runs them, several at once: the first loads
    // the file (validated on the blocking pool, whose thread then idles),
    // and the client opens its pooled connections.
    let checks = |n: usize| {
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    for _ in 0..n {
                        assert_eq!(store.get("t", "a").await.unwrap().version, 1);
                    }
                })
            })
            .collect();
        async move {
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    checks(4).await;
    let peak = Peak::start();
    let before = threads();
    let stats = store.cache_stats();
    checks(CHECKS / CONCURRENT).await;
    let after = threads();
    let highest = peak.highest();
    let checked = store.cache_stats().checks - stats.checks;
    println!("threads before {before}, after {after}, at most {highest} during {checked} checks");
    assert_eq!(checked, CHECKS as u64);
    assert_eq!(store.cache_stats().hits - stats.hits, CHECKS as u64);
    // No slack: the HTTP client (reqwest on hyper) keeps its pooled
    // connections as tasks of this runtime, not threads, and resolves no
    // name for an IP address; a cache hit uses no blocking pool. Idle
    // blocking-pool threads may end meanwhile, which only lowers the count.
    assert!(
        after <= before,
        "{CHECKS} version checks grew the threads from {before} to {after}"
    );
    // The peak is what catches a thread per call: such a thread ends with
    // its call, so the count after the checks is back where it was.
    assert!(
        highest <= before,
        "{CHECKS} version checks ran with up to {highest} threads (from {before})"
    );
}
