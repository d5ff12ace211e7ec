//! Prometheus metrics in the OpenMetrics text format (encoded by the
//! `prometheus-client` crate), served by axum on their own address
//! (`--metrics-addr`): `GET /metrics` (and, as always, any other request)
//! answers with all of them. The registry is built once, at start: the
//! per-API request counters ([`ServerStats`](super::ServerStats)) and the
//! engine's latency histograms are handles the server and the engine
//! update as they run; the engine's and the store's other counters and
//! gauges live in their own atomics, which [`EngineAndStore`] reads at
//! each scrape.
//! At most [`MAX_CONNECTIONS`] are served at once (more wait in the
//! kernel's backlog), a client that sends no request within
//! [`READ_TIMEOUT`] is dropped, and so is one that does not take the
//! answer within as long, so scrapers cannot hold the port.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::listener::Counted;
use super::Shared;
use crate::engine;
use crate::prefix_cache::PrefixStats;
use crate::store::CacheStats;

const MAX_CONNECTIONS: usize = 32;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Starts the metrics listener; returns its address and its task (which
/// holds the engine until aborted).
pub(super) async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let scrapes = Scrapes {
        incoming: super::listener::incoming(listener, "metrics", MAX_CONNECTIONS),
        addr: local,
    };
    let registry = Arc::new(registry(shared));
    // Scrapers configured with another path (or none) are answered too.
    let router = Router::new()
        .route("/metrics", any(scrape))
        .fallback(scrape)
        .with_state(registry);
    let task = tokio::spawn(async move {
        // Never fails: accept errors are retried by the accept loop.
        let _ = axum::serve(scrapes, router).await;
    });
    Ok((local, task))
}

/// Every metric, as text; the connection closes after it.
async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    (
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CONNECTION, "close"),
        ],
        out,
    )
}

/// The registry of every metric: the handles, and the collector of the
/// values that live in the engine's and the store's atomics.
fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    let stats = &shared.stats;
    registry.register(
        "svfit_requests",
        "inference requests received, by API (grpc, http)",
        stats.requests.clone(),
    );
    registry.register(
        "svfit_request_errors",
        "inference requests refused before running, by API",
        stats.errors.clone(),
    );
    let latency = &shared.engine.stats().latency;
    for (name, help, histogram) in [
        (
            "svfit_time_to_first_token_seconds",
            "time from a request's arrival to its first generated token",
            &latency.time_to_first_token,
        ),
        (
            "svfit_inter_token_latency_seconds",
            "time between two generated tokens of a request",
            &latency.inter_token,
        ),
        (
            "svfit_step_duration_seconds",
            "time of one engine step (a batch decoded)",
            &latency.step,
        ),
    ] {
        registry.register(name, help, histogram.clone());
    }
    registry.register_collector(Box::new(EngineAndStore(shared)));
    registry
}

/// The counters and gauges whose values live in the engine's and the
/// store's atomics, read at each scrape.
struct EngineAndStore(Arc<Shared>);

impl std::fmt::Debug for EngineAndStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineAndStore")
    }
}

impl Collector for EngineAndStore {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let engine = self.0.engine.stats();
        let cache = self.0.store.cache_stats();
        for (name, help, value) in readings(engine, &cache, &engine.prefix()) {
            // As `Registry::register` writes help (a collector's is taken
            // as given).
            let help = &format!("{help}.");
            // The encoder adds `_total` to counters' names.
            let (name, metric): (_, &dyn EncodeMetric) = match name.strip_suffix("_total") {
                Some(name) => (name, &ConstCounter::new(value)),
                None => (name, &ConstGauge::new(value)),
            };
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

/// A metric read at each scrape: its exposed name, help and value. A name
/// that ends in `_total` is a counter's, any other a gauge's.
type Reading = (&'static str, &'static str, f64);

/// The counters and gauges of the engine `e`, the store's cache `c` and the
/// prefix cache `p` as of now, in the order exposed, a metric a line.
#[rustfmt::skip]
fn readings(e: &engine::Stats, c: &CacheStats, p: &PrefixStats) -> [Reading; 29] {
    [
        ("svfit_requests_finished_total", "requests that completed", e.requests_finished.value()),
        ("svfit_requests_cancelled_total", "requests cancelled (client gone or deadline)", e.requests_cancelled.value()),
        ("svfit_requests_failed_total", "requests failed in the engine", e.requests_failed.value()),
        ("svfit_generated_tokens_total", "tokens generated", e.tokens_generated.value()),
        ("svfit_prompt_tokens_total", "prompt tokens prefilled", e.prompt_tokens.value()),
        ("svfit_queue_depth", "requests waiting for admission", e.queued.value()),
        ("svfit_active_sequences", "sequences being decoded", e.active.value()),
        ("svfit_batch_sequences", "sequences in the last decode step", e.last_batch_sequences.value()),
        ("svfit_steps_total", "decode steps", e.steps.value()),
        ("svfit_step_seconds_total", "time spent in decode steps", e.step_micros.value() / 1e6),
        ("svfit_batch_tokens_total", "tokens decoded over all steps", e.batch_tokens.value()),
        ("svfit_constraint_masks_total", "token masks of constrained sequences", e.masks.value()),
        ("svfit_constraint_mask_seconds_total", "time spent computing and applying token masks (within the steps)", e.mask_micros.value() / 1e6),
        ("svfit_adapter_cache_hits_total", "host adapter cache hits", c.hits.value()),
        ("svfit_adapter_cache_misses_total", "host adapter cache misses", c.misses.value()),
        ("svfit_adapter_cache_evictions_total", "host adapter cache evictions", c.evictions.value()),
        ("svfit_adapter_loads_total", "adapter files read and validated", c.loads.value()),
        ("svfit_adapter_store_checks_total", "adapter version checks against the store (one per request)", c.checks.value()),
        ("svfit_adapter_store_check_seconds_total", "time spent in adapter version checks", c.check_seconds.value()),
        ("svfit_adapter_served_store_unreachable_total", "requests served a cached adapter while the store was unreachable", c.served_unreachable.value()),
        ("svfit_adapter_cache_bytes", "bytes of deltas in the host cache", c.bytes.value()),
        ("svfit_adapter_slot_loads_total", "adapters written into device slots", e.slot_loads.value()),
        ("svfit_adapter_slot_evictions_total", "device slots taken from an unused adapter", e.slot_evictions.value()),
        ("svfit_prefix_cache_lookups_total", "prompts looked up in the prefix cache", p.lookups.value()),
        ("svfit_prefix_cache_hits_total", "prompts that reused cached KV blocks", p.hits.value()),
        ("svfit_prefix_cached_tokens_total", "prompt tokens taken from the prefix cache instead of prefilled", p.cached_tokens.value()),
        ("svfit_prefix_cache_evictions_total", "KV blocks evicted from the prefix cache", p.evicted_blocks.value()),
        ("svfit_prefix_cache_blocks", "KV blocks in the prefix cache", p.blocks.value()),
        ("svfit_prefix_cache_bytes", "bytes of KV blocks in the prefix cache", p.bytes.value()),
    ]
}

/// A counter or a gauge of the engine or the store, as a metric's value.
trait Value {
    fn value(&self) -> f64;
}

impl Value for AtomicU64 {
    fn value(&self) -> f64 {
        self.load(Relaxed) as f64
    }
}

impl Value for AtomicUsize {
    fn value(&self) -> f64 {
        self.load(Relaxed) as f64
    }
}

impl Value for u64 {
    fn value(&self) -> f64 {
        *self as f64
    }
}

impl Value for usize {
    fn value(&self) -> f64 {
        *self as f64
    }
}

impl Value for f64 {
    fn value(&self) -> f64 {
        *self
    }
}

/// The metrics port's connections for axum: from the bounded accept loop,
/// each under [`Deadlines`].
struct Scrapes {
    incoming: ReceiverStream<Result<Counted, std::io::Error>>,
    addr: SocketAddr,
}

impl axum::serve::Listener for Scrapes {
    type Io = Deadlines<Counted>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.next().await {
            Some(Ok(connection)) => (Deadlines::new(connection), self.addr),
            // The accept loop ended: no more connections, ever.
            _ => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A connection that fails (and so is closed) when its request has not
/// arrived within [`READ_TIMEOUT`] of the accept, or its answer has not
/// gone out within as long once it began.
struct Deadlines<T> {
    io: T,
    deadline: Pin<Box<Sleep>>,
    answering: bool,
}

impl<T> Deadlines<T> {
    fn new(io: T) -> Self {
        Deadlines {
            io,
            deadline: Box::pin(tokio::time::sleep(READ_TIMEOUT)),
            answering: false,
        }
    }

    /// Whether the deadline has passed (if not, `cx` is woken when it does).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }

    /// `poll` of the connection for the answer, failed once the answer's
    /// deadline has passed; the answer's clock starts at its first byte.
    fn poll_answer<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>>
    where
        T: Unpin,
    {
        if !self.answering {
            self.answering = true;
            self.deadline.as_mut().reset(Instant::now() + READ_TIMEOUT);
        }
        match poll(Pin::new(&mut self.io), cx) {
            Poll::Pending if self.expired(cx) => timed_out(),
            done => done,
        }
    }
}

fn timed_out<R>() -> Poll<std::io::Result<R>> {
    Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()))
}

impl<T: AsyncRead + Unpin> AsyncRead for Deadlines<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            // Once answering, only the answer's deadline counts.
            Poll::Pending if !this.answering && this.expired(cx) => timed_out(),
            read => read,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Deadlines<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .poll_answer(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().poll_answer(cx, T::poll_flush)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().poll_answer(cx, T::poll_shutdown)
    }
}
