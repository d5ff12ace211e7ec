//! Prometheus metrics in the OpenMetrics text format (encoded by the
//! `prometheus-client` crate), over plain HTTP on their own address
//! (`--metrics-addr`): any GET answers with all of them. Counters and
//! gauges are read from the engine's, store's and API's atomics at each
//! scrape; latencies are histograms the engine fills as it runs.
//! At most [`MAX_CONNECTIONS`] are served at once (more wait in the
//! kernel's backlog), and a client that sends no request within
//! [`READ_TIMEOUT`] is dropped, so scrapers cannot hold the port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::{Api, Shared};

const MAX_CONNECTIONS: usize = 32;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the metrics listener; returns its address and its task (which
/// holds the engine until aborted).
pub(super) async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = connections.clone().acquire_owned().await else {
                return;
            };
            let mut socket = super::listener::accept(&listener, "metrics").await;
            let shared = shared.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // The request line and headers; the answer does not depend on them.
                let mut buf = [0u8; 4096];
                match tokio::time::timeout(READ_TIMEOUT, socket.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                let body = render(&shared);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let reply = async {
                    socket.write_all(head.as_bytes()).await?;
                    socket.write_all(body.as_bytes()).await
                };
                let _ = tokio::time::timeout(READ_TIMEOUT, reply).await;
            });
        }
    });
    Ok((local, task))
}

/// Every metric, as text.
pub(super) fn render(shared: &Shared) -> String {
    let e = shared.engine.stats();
    let c = shared.store.cache_stats();
    let p = e.prefix();
    let steps = e.steps.load(Relaxed);
    let metrics: [(&str, &str, &str, f64); 27] = [
        (
            "svfit_requests_finished_total",
            "counter",
            "requests that completed",
            e.requests_finished.load(Relaxed) as f64,
        ),
        (
            "svfit_requests_cancelled_total",
            "counter",
            "requests cancelled (client gone or deadline)",
            e.requests_cancelled.load(Relaxed) as f64,
        ),
        (
            "svfit_requests_failed_total",
            "counter",
            "requests failed in the engine",
            e.requests_failed.load(Relaxed) as f64,
        ),
        (
            "svfit_generated_tokens_total",
            "counter",
            "tokens generated",
            e.tokens_generated.load(Relaxed) as f64,
        ),
        (
            "svfit_prompt_tokens_total",
            "counter",
            "prompt tokens prefilled",
            e.prompt_tokens.load(Relaxed) as f64,
        ),
        (
            "svfit_queue_depth",
            "gauge",
            "requests waiting for admission",
            e.queued.load(Relaxed) as f64,
        ),
        (
            "svfit_active_sequences",
            "gauge",
            "sequences being decoded",
            e.active.load(Relaxed) as f64,
        ),
        (
            "svfit_batch_sequences",
            "gauge",
            "sequences in the last decode step",
            e.last_batch_sequences.load(Relaxed) as f64,
        ),
        ("svfit_steps_total", "counter", "decode steps", steps as f64),
        (
            "svfit_step_seconds_total",
            "counter",
            "time spent in decode steps",
            e.step_micros.load(Relaxed) as f64 / 1e6,
        ),
        (
            "svfit_batch_tokens_total",
            "counter",
            "tokens decoded over all steps",
            e.batch_tokens.load(Relaxed) as f64,
        ),
        (
            "svfit_adapter_cache_hits_total",
            "counter",
            "host adapter cache hits",
            c.hits as f64,
        ),
        (
            "svfit_adapter_cache_misses_total",
            "counter",
            "host adapter cache misses",
            c.misses as f64,
        ),
        (
            "svfit_adapter_cache_evictions_total",
            "counter",
            "host adapter cache evictions",
            c.evictions as f64,
        ),
        (
            "svfit_adapter_loads_total",
            "counter",
            "adapter files read and validated",
            c.loads as f64,
        ),
        (
            "svfit_adapter_store_checks_total",
            "counter",
            "adapter version checks against the store (one per request)",
            c.checks as f64,
        ),
        (
            "svfit_adapter_store_check_seconds_total",
            "counter",
            "time spent in adapter version checks",
            c.check_seconds,
        ),
        (
            "svfit_adapter_served_store_unreachable_total",
            "counter",
            "requests served a cached adapter while the store was unreachable",
            c.served_unreachable as f64,
        ),
        (
            "svfit_adapter_cache_bytes",
            "gauge",
            "bytes of deltas in the host cache",
            c.bytes as f64,
        ),
        (
            "svfit_adapter_slot_loads_total",
            "counter",
            "adapters written into device slots",
            e.slot_loads.load(Relaxed) as f64,
        ),
        (
            "svfit_adapter_slot_evictions_total",
            "counter",
            "device slots taken from an unused adapter",
            e.slot_evictions.load(Relaxed) as f64,
        ),
        (
            "svfit_prefix_cache_lookups_total",
            "counter",
            "prompts looked up in the prefix cache",
            p.lookups as f64,
        ),
        (
            "svfit_prefix_cache_hits_total",
            "counter",
            "prompts that reused cached KV blocks",
            p.hits as f64,
        ),
        (
            "svfit_prefix_cached_tokens_total",
            "counter",
            "prompt tokens taken from the prefix cache instead of prefilled",
            p.cached_tokens as f64,
        ),
        (
            "svfit_prefix_cache_evictions_total",
            "counter",
            "KV blocks evicted from the prefix cache",
            p.evicted_blocks as f64,
        ),
        (
            "svfit_prefix_cache_blocks",
            "gauge",
            "KV blocks in the prefix cache",
            p.blocks as f64,
        ),
        (
            "svfit_prefix_cache_bytes",
            "gauge",
            "bytes of KV blocks in the prefix cache",
            p.bytes as f64,
        ),
    ];
    let mut registry = Registry::default();
    let per_api = [
        (
            "svfit_requests",
            "inference requests received, by API (grpc, http)",
            false,
        ),
        (
            "svfit_request_errors",
            "inference requests refused before running, by API",
            true,
        ),
    ];
    for (name, help, errors) in per_api {
        let family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        for api in Api::ALL {
            let (requests, refused) = shared.stats.counts(api);
            let value = if errors { refused } else { requests };
            family
                .get_or_create(&vec![("api", api.as_str())])
                .inc_by(value);
        }
        registry.register(name, help, family);
    }
    for (name, kind, help, value) in metrics {
        // The encoder adds `_total` to counters' names.
        match name.strip_suffix("_total") {
            Some(name) if kind == "counter" => {
                let counter = Counter::<f64, AtomicU64>::default();
                counter.inc_by(value);
                registry.register(name, help, counter);
            }
            _ => {
                let gauge = Gauge::<f64, AtomicU64>::default();
                gauge.set(value);
                registry.register(name, help, gauge);
            }
        }
    }
    let latency = &e.latency;
    registry.register(
        "svfit_time_to_first_token_seconds",
        "time from a request's arrival to its first generated token",
        latency.time_to_first_token.clone(),
    );
    registry.register(
        "svfit_inter_token_latency_seconds",
        "time between two generated tokens of a request",
        latency.inter_token.clone(),
    );
    registry.register(
        "svfit_step_duration_seconds",
        "time of one engine step (a batch decoded)",
        latency.step.clone(),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}
