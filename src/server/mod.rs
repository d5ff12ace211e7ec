//! `svfit serve`: the gRPC server (proto/svfit/v1/svfit.proto). This file
//! starts it (factors, model, engine, store, listeners, health, reflection,
//! TLS) and maps failures to gRPC codes. A request passes through:
//! the accept loop (`listener.rs`), the codec (`codec.rs`: undecodable
//! requests are INVALID_ARGUMENT), the auth interceptor (`auth.rs`: the
//! caller into the request's extensions), then the service — `inference.rs`
//! (checks in `validation.rs`, adapters from the store and tokenization off
//! the async threads, then the engine) or `adapters.rs` (the store).
//! Prometheus metrics are served over plain HTTP (`metrics.rs`).

mod adapters;
pub mod auth;
pub mod budget;
pub mod codec;
mod files;
mod http;
mod inference;
pub mod jobs;
mod listener;
mod metrics;
pub mod openai;
pub mod validation;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::Status;
use tonic_health::server::HealthReporter;

use crate::engine::{Engine, EngineConfig, Failure, SubmitError};
use crate::factors::{self, FactorsKey};
use crate::ggml::gguf::GgufFile;
use crate::ggml::Type;
use crate::model::{self, LoadOptions, LoraBranch, Model, Tokenizer};
use crate::store::{AdapterStore, PinLimits, StoreError};
use adapters::AdaptersService;
use auth::{Authenticate, Keys, TenantRate};
use inference::InferenceService;
use validation::Limits;

/// How long running requests get to finish when the engine has died, and
/// open streams after a drain.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The generated gRPC code and the descriptor set served by reflection.
pub mod pb {
    tonic::include_proto!("svfit.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/svfit_descriptor.bin"));
}

use pb::adapters_server::AdaptersServer;
use pb::inference_server::InferenceServer;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub model: PathBuf,
    pub load: LoadOptions,
    /// The factors adapters must be made for, and the cache directory that
    /// holds (or receives) them.
    pub factors: FactorsKey,
    pub home: PathBuf,
    /// Where adapters live: a directory, or an object store URL (with the
    /// `object-store` / `s3` features).
    pub adapters: String,
    pub adapter_cache_bytes: usize,
    pub engine: EngineConfig,
    /// Request limits; `max_tokens` is cut to the engine's context.
    pub limits: Limits,
    /// Adapters one tenant may pin.
    pub pins_per_tenant: usize,
    /// Open gRPC connections at most.
    pub max_connections: usize,
    /// Requests per second of one tenant on average (0: no limit), and
    /// at once.
    pub tenant_rate: f64,
    pub tenant_burst: f64,
    /// Time an upload may take once its turn has come (uploads are
    /// buffered a few at a time).
    pub upload_timeout: std::time::Duration,
    pub api_keys: Option<PathBuf>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub metrics_addr: Option<SocketAddr>,
    /// The OpenAI-compatible HTTP API (`None`: off).
    pub http_addr: Option<SocketAddr>,
    /// Listen beyond loopback without API keys.
    pub allow_remote: bool,
    /// The memory the server may hold (`None`: the least of the cgroup's
    /// limit and the memory available at start); a configuration whose
    /// [`budget`] is larger is refused at start.
    pub memory_limit: Option<u64>,
    /// Fine-tuning jobs: how many run here, their share of the compute,
    /// their leases and quotas.
    pub jobs: jobs::JobsConfig,
}

/// The API a request came through (a label of metrics and request logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Grpc,
    Http,
}

impl Api {
    pub const ALL: [Api; 2] = [Api::Grpc, Api::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Http => "http",
        }
    }

    fn label(self) -> ApiLabel {
        vec![("api", self.as_str())]
    }
}

/// The label set of a per-API metric: `api="grpc"` or `api="http"`.
type ApiLabel = Vec<(&'static str, &'static str)>;

/// Request counters of the API layer, per API (metric handles, which the
/// metrics registry shares).
pub struct ServerStats {
    requests: Family<ApiLabel, Counter>,
    errors: Family<ApiLabel, Counter>,
    pub next_id: AtomicU64,
    /// Requests of both APIs from arrival until their answer is complete.
    in_flight: Arc<AtomicUsize>,
}

impl Default for ServerStats {
    /// Every API's counters at 0, so a scrape lists them before any request.
    fn default() -> Self {
        let stats = ServerStats {
            requests: Family::default(),
            errors: Family::default(),
            next_id: AtomicU64::default(),
            in_flight: Arc::default(),
        };
        for api in Api::ALL {
            let _ = stats.requests.get_or_create(&api.label());
            let _ = stats.errors.get_or_create(&api.label());
        }
        stats
    }
}

/// Counts one request in flight while it lives.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl ServerStats {
    fn request(&self, api: Api) {
        self.requests.get_or_create(&api.label()).inc();
    }

    /// A request refused before it ran.
    fn error(&self, api: Api) {
        self.errors.get_or_create(&api.label()).inc();
    }
}

/// One row of [`factors::rank_summary`]: a target kind and its ranks
/// (min, mean, max).
type RankSummary = (&'static str, usize, f64, usize);

struct Shared {
    engine: Engine,
    store: AdapterStore,
    tokenizer: Arc<Tokenizer>,
    limits: Limits,
    stats: ServerStats,
    config: ServeConfig,
    ranks: Vec<RankSummary>,
    started: Instant,
    /// Compiles requests' constraints: the vocabulary's token trie, built
    /// at the first constrained request (or why it could not be).
    constraints: std::sync::OnceLock<Result<crate::constraint::Compiler, String>>,
    /// The files API's files (fine-tuning data).
    files: files::Files,
    /// Fine-tuning jobs, shared with their runner threads.
    jobs: Arc<jobs::Jobs>,
}

impl Shared {
    /// The constraint compiler, built on first use (blocking: call off the
    /// async threads).
    fn constraints(&self) -> Result<&crate::constraint::Compiler, Status> {
        self.constraints
            .get_or_init(|| {
                crate::constraint::Compiler::new(&self.tokenizer).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Status::internal(format!("constrained decoding is unavailable: {e}")))
    }
}

/// A server that is listening: its address and a way to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The HTTP API; it stops with the gRPC server.
    http_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    health: HealthReporter,
    engine: Engine,
    in_flight: Arc<AtomicUsize>,
    /// Told to stop with the server: a running fine-tuning job stops after
    /// its turn, to be resumed from its checkpoint.
    runners: jobs::runner::Runners,
}

impl Drop for Running {
    /// The metrics listener holds the engine: without it, the engine
    /// thread (and its compute threads) end once the last request has.
    fn drop(&mut self) {
        self.runners.stop();
        if let Some(task) = &self.metrics_task {
            task.abort();
        }
        if let Some(task) = &self.http_task {
            task.abort();
        }
    }
}

impl Running {
    /// Stops accepting requests and waits for the server to finish.
    pub async fn stop(mut self) {
        self.runners.stop();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        self.stop_http().await;
        self.runners.join().await;
    }

    /// Waits up to [`DRAIN`] for the HTTP API's open connections (it was
    /// told to stop with the gRPC server), then cuts them.
    async fn stop_http(&mut self) {
        if let Some(task) = &mut self.http_task {
            if tokio::time::timeout(DRAIN, &mut *task).await.is_err() {
                task.abort();
            }
        }
    }

    /// Stops this replica's fine-tuning runners and waits until they have
    /// left their jobs (each stops after its current turn; its job resumes
    /// from its checkpoint, here after a restart or on another replica).
    pub async fn stop_jobs(&mut self) {
        self.runners.join().await;
    }

    /// Serves until the server fails or stops; an error when the engine
    /// stopped (the process should exit non-zero and be restarted).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await?
    }

    /// Shuts down without dropping a request (SIGTERM in a rolling
    /// restart). At once: health turns NOT_SERVING, so probes take the
    /// replica out; both listeners close, so new connections are refused
    /// (a proxy tries its next replica); and open HTTP/2 connections get
    /// GOAWAY (HTTP/1 ones close once idle), so clients and proxies open
    /// new streams elsewhere. Requests already accepted run to the end,
    /// for at most `deadline`; the engine refuses anything after that and
    /// the server stops. Returns how many requests were cut off.
    pub async fn drain(mut self, deadline: std::time::Duration) -> usize {
        self.runners.stop();
        not_serving(&self.health).await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let until = Instant::now() + deadline;
        let busy = |r: &Self| r.in_flight.load(Relaxed) > 0 || r.engine.load() > 0;
        while busy(&self) && Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.engine.drain();
        let cut = self.engine.load();
        tracing::info!(cut_off = cut, "drained");
        // Streams that never end (a health watch) do not hold the process.
        if tokio::time::timeout(DRAIN, &mut self.task).await.is_err() {
            self.task.abort();
        }
        self.stop_http().await;
        self.runners.join().await;
        cut
    }
}

/// Loads the model and factors, opens the store and starts listening.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    // tonic's TLS and the S3 client take the process's default crypto
    // provider, which rustls picks by itself only while exactly one is
    // compiled in. Ours is ring (Cargo.toml keeps aws-lc-rs out); installing
    // it keeps TLS working if a dependency ever brings a second. An error
    // only says a default is already set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let keys = config.api_keys.as_deref().map(Keys::load).transpose()?;
    refuse_open_remote(&config, keys.is_some())?;
    let tls_files = read_tls_files(&config)?;
    let http_tls = match (&tls_files, config.http_addr) {
        (Some((cert, key)), Some(_)) => Some(http::tls_config(cert, key)?),
        _ => None,
    };
    // Bound before the model loads: a taken port fails at once.
    let http_listener = match config.http_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--http-addr {addr}: {e}"))?,
        ),
        None => None,
    };
    let shared = load_services(config.clone()).await?;
    let runners = jobs::runner::start(&shared)?;
    let (metrics_addr, metrics_task) = match config.metrics_addr {
        Some(addr) => {
            let (addr, task) = metrics::serve(addr, shared.clone()).await?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let authenticate = Authenticate {
        keys: keys.map(Arc::new),
        rate: (config.tenant_rate > 0.0)
            .then(|| Arc::new(TenantRate::new(config.tenant_rate, config.tenant_burst))),
    };
    let (health, router) = grpc_router(&shared, tls_files.as_ref(), authenticate.clone()).await?;
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    // The HTTP API stops when gRPC does: on request or when the engine died.
    let (http_stop, mut http_stopped) = tokio::sync::watch::channel(false);
    let (http_addr, http_task) = match http_listener {
        Some(listener) => {
            let (addr, task) = http::serve(
                listener,
                shared.clone(),
                authenticate.clone(),
                http_tls,
                async move {
                    let _ = http_stopped.wait_for(|s| *s).await;
                },
            )?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let task = serve_grpc(router, listener, &shared, health.clone(), stop, http_stop);
    tracing::info!(
        %addr,
        http = http_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        model = %config.model.display(),
        factors = config.factors.id(),
        "listening"
    );
    Ok(Running {
        addr,
        metrics_addr,
        http_addr,
        shutdown: Some(shutdown),
        task,
        http_task,
        metrics_task,
        health,
        engine: shared.engine.clone(),
        in_flight: shared.stats.in_flight.clone(),
        runners,
    })
}

/// Without API keys, anyone who reaches the port is served: only loopback
/// addresses, unless `--allow-remote` says so.
fn refuse_open_remote(config: &ServeConfig, keyed: bool) -> anyhow::Result<()> {
    for addr in std::iter::once(config.addr).chain(config.http_addr) {
        if !keyed && !addr.ip().is_loopback() && !config.allow_remote {
            anyhow::bail!(
                "refusing to listen on {addr} without --api-keys: use a loopback address, an \
                 API key file, or --allow-remote"
            );
        }
    }
    Ok(())
}

/// The certificate and key of `--tls` (PEM), if any.
fn read_tls_files(config: &ServeConfig) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    config
        .tls
        .as_ref()
        .map(|(cert, key)| anyhow::Ok((read(cert)?, read(key)?)))
        .transpose()
}

/// What the services share, loaded off the async threads: the model with
/// its factors, the engine running it, and the adapter store.
async fn load_services(config: ServeConfig) -> anyhow::Result<Arc<Shared>> {
    let (engine, store, tokenizer, ranks) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let (model, singular, ranks) = load_model_and_factors(&config)?;
            // The LoRA tables are placed at the first LoRA the engine serves.
            let lora = &config.engine.lora;
            let lora_limits = (lora.slots > 0)
                .then(|| LoraBranch::limits_for(model.config(), &lora.kinds, lora.rank))
                .transpose()?;
            let tokenizer = Arc::new(Tokenizer::load(&config.model)?);
            let engine = Engine::start(model, tokenizer.clone(), config.engine.clone())?;
            let mut store = open_store(&config, &engine, singular)?;
            if let Some(limits) = lora_limits {
                store = store.serving_loras(limits, config.engine.lora.cache_bytes);
            }
            anyhow::Ok((engine, store, tokenizer, ranks))
        })
        .await??
    };
    let mut limits = config.limits.clone();
    limits.max_tokens = limits.max_tokens.min(engine.config().context);
    let files = files::Files::open(&config.adapters)?;
    let jobs = Arc::new(jobs::Jobs::open(&config.adapters, config.jobs.clone())?);
    Ok(Arc::new(Shared {
        engine,
        store,
        tokenizer,
        limits,
        stats: ServerStats::default(),
        config,
        ranks,
        started: Instant::now(),
        constraints: std::sync::OnceLock::new(),
        files,
        jobs,
    }))
}

/// The model with its factors attached (computed if missing), the
/// singular values adapters are checked against, and the rank summary.
fn load_model_and_factors(
    config: &ServeConfig,
) -> anyhow::Result<(Model, factors::SingularValues, Vec<RankSummary>)> {
    // A file the engine does not fully understand is refused before its
    // factors are computed.
    let gguf = GgufFile::open(&config.model)?;
    model::understand(&gguf)?;
    let path = factors::ensure(&config.model, &config.factors, &config.home)?;
    let factor_file = factors::FactorFile::open(&path, &config.factors)?;
    let budget = budget::of(config, &gguf, Some(&factor_file))?;
    drop(gguf);
    budget::check(&budget, budget::limit(config.memory_limit).as_ref())?;
    let singular = factor_file.singular_values()?;
    let ranks = factors::rank_summary(
        &singular
            .iter()
            .map(|(t, s)| (t.clone(), s.len()))
            .collect::<Vec<_>>(),
    );
    let mut model = Model::load(&config.model, &config.load)?;
    model.attach_factor_file(&factor_file, config.engine.adapter_slots + 1, Type::Q8_0)?;
    Ok((model, singular, ranks))
}

/// The adapter store of `--adapters`, with pins bounded by the engine's
/// slots.
fn open_store(
    config: &ServeConfig,
    engine: &Engine,
    singular: factors::SingularValues,
) -> anyhow::Result<AdapterStore> {
    // One slot always stays unpinned, so unpinned adapters can run.
    let pins = PinLimits {
        total: engine.config().adapter_slots.saturating_sub(1),
        per_tenant: config.pins_per_tenant,
    };
    Ok(AdapterStore::open(
        crate::store::backend(&config.adapters)?,
        config.factors.clone(),
        singular,
        config.adapter_cache_bytes,
        pins,
    ))
}

/// The gRPC router: health (both svfit services SERVING), reflection, and
/// svfit's services behind `authenticate`; keepalive and TLS.
async fn grpc_router(
    shared: &Arc<Shared>,
    tls_files: Option<&(Vec<u8>, Vec<u8>)>,
    authenticate: Authenticate,
) -> anyhow::Result<(HealthReporter, tonic::transport::server::Router)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    health
        .set_serving::<AdaptersServer<AdaptersService>>()
        .await;
    // Reflection v1, and v1alpha for older grpcurl versions.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Keepalive pings find dead peers, so their connections (and
    // connection permits) are freed.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    if let Some((cert, key)) = tls_files {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // A request larger than any valid one is refused before it is
            // decoded (OUT_OF_RANGE).
            InferenceServer::new(InferenceService(shared.clone()))
                .max_decoding_message_size(shared.limits.max_message_bytes()),
            authenticate.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AdaptersServer::new(AdaptersService::new(shared.clone()))
                .max_decoding_message_size(adapters::MAX_MESSAGE),
            authenticate,
        ));
    Ok((health, router))
}

/// Serves gRPC on `listener` until `stop`, or until the engine thread is
/// gone: then health says NOT_SERVING first, running requests get DRAIN
/// to finish, and the task ends with an error so that the process exits
/// non-zero and its supervisor restarts it. Either way the HTTP API is
/// told to stop (`http_stop`).
fn serve_grpc(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    shared: &Shared,
    health: HealthReporter,
    stop: tokio::sync::oneshot::Receiver<()>,
    http_stop: tokio::sync::watch::Sender<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (died, mut engine_died) = tokio::sync::oneshot::channel::<()>();
    let engine = shared.engine.clone();
    let signal = async move {
        tokio::select! {
            _ = stop => {}
            _ = engine.stopped() => {
                tracing::error!("the engine stopped; health is NOT_SERVING and the server exits");
                not_serving(&health).await;
                let _ = died.send(());
            }
        }
        let _ = http_stop.send(true);
    };
    let serve = router.serve_with_incoming_shutdown(
        listener::incoming(listener, "grpc", shared.config.max_connections),
        signal,
    );
    tokio::spawn(async move {
        tokio::pin!(serve);
        let failed = tokio::select! {
            result = &mut serve => {
                result?;
                engine_died.try_recv().is_ok()
            }
            // Streams that never end (a health watch) do not hold the
            // process once the engine is gone.
            Ok(()) = &mut engine_died => {
                let _ = tokio::time::timeout(DRAIN, &mut serve).await;
                true
            }
        };
        if failed {
            anyhow::bail!("the engine stopped");
        }
        Ok(())
    })
}

impl Shared {
    /// The base model's name in both APIs: its file name.
    fn base_model(&self) -> String {
        self.config
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Health says NOT_SERVING for both svfit services.
async fn not_serving(health: &HealthReporter) {
    health
        .set_not_serving::<InferenceServer<InferenceService>>()
        .await;
    health
        .set_not_serving::<AdaptersServer<AdaptersService>>()
        .await;
}

/// The gRPC status of a store failure. I/O failures are the server's:
/// the client hears only that, the log gets the cause.
fn store_status(e: StoreError) -> Status {
    let message = e.to_string();
    match e {
        StoreError::NotFound(_) => Status::not_found(message),
        StoreError::InvalidName { .. } | StoreError::Invalid(_) => {
            Status::invalid_argument(message)
        }
        StoreError::Mismatch(_) | StoreError::PinBudget { .. } => {
            Status::failed_precondition(message)
        }
        StoreError::PinQuota { .. } => Status::resource_exhausted(message),
        StoreError::Conflict(_) => Status::aborted(message),
        StoreError::Internal(_) => Status::internal(message),
        // Mostly transient (an object store that is restarting or
        // unreachable): UNAVAILABLE tells clients to retry.
        StoreError::Io { .. } => {
            tracing::error!(error = message, "adapter store");
            Status::unavailable("the adapter store failed or is unreachable; retry later (the server log has the cause)")
        }
    }
}

/// The gRPC status of a request the engine could not finish.
fn failure_status(failure: &Failure) -> Status {
    let message = failure.to_string();
    match failure {
        Failure::DeadlineExceeded => Status::deadline_exceeded(message),
        Failure::Invalid(_) | Failure::Constraint(_) => Status::invalid_argument(message),
        Failure::AdapterLoad(_) | Failure::Decode(_) | Failure::Panicked(_) => {
            Status::internal(message)
        }
    }
}

fn submit_status(e: SubmitError) -> Status {
    let message = e.to_string();
    match e {
        SubmitError::QueueFull(_) | SubmitError::TenantQueueFull(_) => {
            Status::resource_exhausted(message)
        }
        SubmitError::Stopped | SubmitError::Draining => Status::unavailable(message),
        SubmitError::Invalid(_) => Status::invalid_argument(message),
    }
}

/// Runs CPU work of the store (a mix of adapters) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)
}
