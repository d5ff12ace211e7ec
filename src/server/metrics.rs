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
    registry.register_collector(Box::new(EngineAndStore(shared)));
    registry
}

/// Whether a reading only goes up.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// The values of one scrape: engine, store and prefix cache as of now.
struct Sources<'a> {
    engine: &'a engine::Stats,
    cache: CacheStats,
    prefix: PrefixStats,
}

/// One metric read from [`Sources`]: its exposed name, kind, help and value.
type Reading = (&'static str, Kind, &'static str, fn(&Sources) -> f64);

const READINGS: [Reading; 27] = {
    use Kind::{Counter, Gauge};
    [
        (
            "svfit_requests_finished_total",
            Counter,
            "requests that completed",
            |s| s.engine.requests_finished.load(Relaxed) as f64,
        ),
        (
            "svfit_requests_cancelled_total",
            Counter,
            "requests cancelled (client gone or deadline)",
            |s| s.engine.requests_cancelled.load(Relaxed) as f64,
        ),
        (
            "svfit_requests_failed_total",
            Counter,
            "requests failed in the engine",
            |s| s.engine.requests_failed.load(Relaxed) as f64,
        ),
        (
            "svfit_generated_tokens_total",
            Counter,
            "tokens generated",
            |s| s.engine.tokens_generated.load(Relaxed) as f64,
        ),
        (
            "svfit_prompt_tokens_total",
            Counter,
            "prompt tokens prefilled",
            |s| s.engine.prompt_tokens.load(Relaxed) as f64,
        ),
        (
            "svfit_queue_depth",
            Gauge,
            "requests waiting for admission",
            |s| s.engine.queued.load(Relaxed) as f64,
        ),
        (
            "svfit_active_sequences",
            Gauge,
            "sequences being decoded",
            |s| s.engine.active.load(Relaxed) as f64,
        ),
        (
            "svfit_batch_sequences",
            Gauge,
            "sequences in the last decode step",
            |s| s.engine.last_batch_sequences.load(Relaxed) as f64,
        ),
        ("svfit_steps_total", Counter, "decode steps", |s| {
            s.engine.steps.load(Relaxed) as f64
        }),
        (
            "svfit_step_seconds_total",
            Counter,
            "time spent in decode steps",
            |s| s.engine.step_micros.load(Relaxed) as f64 / 1e6,
        ),
        (
            "svfit_batch_tokens_total",
            Counter,
            "tokens decoded over all steps",
            |s| s.engine.batch_tokens.load(Relaxed) as f64,
        ),
        (
            "svfit_adapter_cache_hits_total",
            Counter,
            "host adapter cache hits",
            |s| s.cache.hits as f64,
        ),
        (
            "svfit_adapter_cache_misses_total",
            Counter,
            "host adapter cache misses",
            |s| s.cache.misses as f64,
        ),
        (
            "svfit_adapter_cache_evictions_total",
            Counter,
            "host adapter cache evictions",
            |s| s.cache.evictions as f64,
        ),
        (
            "svfit_adapter_loads_total",
            Counter,
            "adapter files read and validated",
            |s| s.cache.loads as f64,
        ),
        (
            "svfit_adapter_store_checks_total",
            Counter,
            "adapter version checks against the store (one per request)",
            |s| s.cache.checks as f64,
        ),
        (
            "svfit_adapter_store_check_seconds_total",
            Counter,
            "time spent in adapter version checks",
            |s| s.cache.check_seconds,
        ),
        (
            "svfit_adapter_served_store_unreachable_total",
            Counter,
            "requests served a cached adapter while the store was unreachable",
            |s| s.cache.served_unreachable as f64,
        ),
        (
            "svfit_adapter_cache_bytes",
            Gauge,
            "bytes of deltas in the host cache",
            |s| s.cache.bytes as f64,
        ),
        (
            "svfit_adapter_slot_loads_total",
            Counter,
            "adapters written into device slots",
            |s| s.engine.slot_loads.load(Relaxed) as f64,
        ),
        (
            "svfit_adapter_slot_evictions_total",
            Counter,
            "device slots taken from an unused adapter",
            |s| s.engine.slot_evictions.load(Relaxed) as f64,
        ),
        (
            "svfit_prefix_cache_lookups_total",
            Counter,
            "prompts looked up in the prefix cache",
            |s| s.prefix.lookups as f64,
        ),
        (
            "svfit_prefix_cache_hits_total",
            Counter,
            "prompts that reused cached KV blocks",
            |s| s.prefix.hits as f64,
        ),
        (
            "svfit_prefix_cached_tokens_total",
            Counter,
            "prompt tokens taken from the prefix cache instead of prefilled",
            |s| s.prefix.cached_tokens as f64,
        ),
        (
            "svfit_prefix_cache_evictions_total",
            Counter,
            "KV blocks evicted from the prefix cache",
            |s| s.prefix.evicted_blocks as f64,
        ),
        (
            "svfit_prefix_cache_blocks",
            Gauge,
            "KV blocks in the prefix cache",
            |s| s.prefix.blocks as f64,
        ),
        (
            "svfit_prefix_cache_bytes",
            Gauge,
            "bytes of KV blocks in the prefix cache",
            |s| s.prefix.bytes as f64,
        ),
    ]
};

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
        let sources = Sources {
            engine,
            cache: self.0.store.cache_stats(),
            prefix: engine.prefix(),
        };
        for (name, kind, help, read) in READINGS {
            let value = read(&sources);
            // As `Registry::register` writes help (a collector's is taken
            // as given).
            let help = &format!("{help}.");
            match (kind, name.strip_suffix("_total")) {
                // The encoder adds `_total` to counters' names.
                (Kind::Counter, Some(name)) => {
                    let counter = ConstCounter::new(value);
                    counter.encode(encoder.encode_descriptor(
                        name,
                        help,
                        None,
                        counter.metric_type(),
                    )?)?;
                }
                _ => {
                    let gauge = ConstGauge::new(value);
                    gauge.encode(encoder.encode_descriptor(
                        name,
                        help,
                        None,
                        gauge.metric_type(),
                    )?)?;
                }
            }
        }
        Ok(())
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

    /// The answer's clock starts at its first byte.
    fn answer(&mut self) {
        if !self.answering {
            self.answering = true;
            self.deadline.as_mut().reset(Instant::now() + READ_TIMEOUT);
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
        let this = self.get_mut();
        this.answer();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending if this.expired(cx) => timed_out(),
            written => written,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.answer();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending if this.expired(cx) => timed_out(),
            flushed => flushed,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.answer();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending if this.expired(cx) => timed_out(),
            shut => shut,
        }
    }
}
