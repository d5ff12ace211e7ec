//! `svfit serve`: the gRPC server (proto/svfit/v1/svfit.proto). Inference
//! requests are checked, their adapters resolved from the store (read and
//! validated off the engine thread) and handed to the engine, whose events
//! are streamed back; adapter management goes to the store. Health and
//! reflection services let `grpcurl` and Kubernetes probes work without the
//! proto files; Prometheus metrics are served over plain HTTP.

pub mod auth;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{AdapterDeltas, Engine, EngineConfig, Event, SubmitError};
use crate::factors::{self, FactorsKey};
use crate::generate;
use crate::ggml::Type;
use crate::model::tokenizer::Message;
use crate::model::{LoadOptions, Model, Tokenizer};
use crate::sampling::SamplingParams;
use crate::store::{AdapterStore, StoreError, Stored};
use auth::{Caller, Keys};

/// The generated gRPC code and the descriptor set served by reflection.
pub mod pb {
    tonic::include_proto!("svfit.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/svfit_descriptor.bin"));
}

use pb::adapters_server::{Adapters, AdaptersServer};
use pb::inference_server::{Inference, InferenceServer};

/// Largest adapter upload accepted.
const MAX_UPLOAD: usize = 64 << 20;

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
    pub max_tokens_default: usize,
    pub api_keys: Option<PathBuf>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub metrics_addr: Option<SocketAddr>,
    /// Listen beyond loopback without API keys.
    pub allow_remote: bool,
}

/// Request counters of the gRPC layer.
#[derive(Default)]
pub struct ServerStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub next_id: AtomicU64,
}

struct Shared {
    engine: Engine,
    store: AdapterStore,
    tokenizer: Arc<Tokenizer>,
    keys: Option<Keys>,
    stats: ServerStats,
    config: ServeConfig,
    ranks: Vec<(&'static str, usize, f64, usize)>,
    started: Instant,
}

/// A server that is listening: its address and a way to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    /// Stops accepting requests and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Serves until the server fails or stops.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await??;
        Ok(())
    }
}

/// Loads the model and factors, opens the store and starts listening.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    let keys = config.api_keys.as_deref().map(Keys::load).transpose()?;
    if keys.is_none() && !config.addr.ip().is_loopback() && !config.allow_remote {
        anyhow::bail!(
            "refusing to listen on {} without --api-keys: use a loopback address, an API key \
             file, or --allow-remote",
            config.addr
        );
    }
    let setup = config.clone();
    let (engine, store, tokenizer, ranks) = tokio::task::spawn_blocking(move || {
        let config = setup;
        let path = factors::ensure(&config.model, &config.factors, &config.home)?;
        let factor_set = factors::read_factors(&path, &config.factors)?;
        let singular = factors::read_singular_values(&path, &config.factors)?;
        let ranks = factors::rank_summary(
            &singular
                .iter()
                .map(|(t, s)| (t.clone(), s.len()))
                .collect::<Vec<_>>(),
        );
        let mut model = Model::load(&config.model, &config.load)?;
        model.attach_factors(&factor_set, config.engine.adapter_slots + 1, Type::Q8_0)?;
        let tokenizer = Arc::new(Tokenizer::load(&config.model)?);
        let engine = Engine::start(model, tokenizer.clone(), config.engine.clone())?;
        let store = AdapterStore::open(
            crate::store::backend(&config.adapters)?,
            config.factors.clone(),
            singular,
            config.adapter_cache_bytes,
        );
        anyhow::Ok((engine, store, tokenizer, ranks))
    })
    .await??;

    let shared = Arc::new(Shared {
        engine,
        store,
        tokenizer,
        keys,
        stats: ServerStats::default(),
        config: config.clone(),
        ranks,
        started: Instant::now(),
    });

    let metrics_addr = match config.metrics_addr {
        Some(addr) => Some(metrics::serve(addr, shared.clone()).await?),
        None => None,
    };

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

    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &config.tls {
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(cert).map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?,
            std::fs::read(key).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?,
        );
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InferenceServer::new(InferenceService(shared.clone())))
        .add_service(
            AdaptersServer::new(AdaptersService(shared.clone())).max_decoding_message_size(8 << 20),
        );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = signal.await;
    }));
    log(&[
        ("event", "listening".into()),
        ("addr", addr.to_string()),
        ("model", config.model.display().to_string()),
        ("factors", config.factors.id()),
    ]);
    Ok(Running {
        addr,
        metrics_addr,
        shutdown: Some(shutdown),
        task,
    })
}

/// One structured log line on stderr: `key=value` pairs.
fn log(fields: &[(&str, String)]) {
    let line: Vec<String> = fields
        .iter()
        .map(|(k, v)| {
            if v.contains(' ') || v.is_empty() {
                format!("{k}={v:?}")
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    eprintln!("{}", line.join(" "));
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::InvalidName { .. } | StoreError::Invalid(_) => {
            Status::invalid_argument(e.to_string())
        }
        StoreError::Mismatch(_) => Status::failed_precondition(e.to_string()),
        StoreError::Io(_) => Status::internal(e.to_string()),
    }
}

/// Runs a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)
}

/// A deadline from the `grpc-timeout` header ("100m", "5S", ...).
fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(Instant::now() + d)
}

struct InferenceService(Arc<Shared>);

/// A submitted request: its engine events and what identifies it.
struct Submitted {
    events: mpsc::UnboundedReceiver<Event>,
    request_id: String,
    adapter_version: String,
}

impl InferenceService {
    async fn submit(&self, req: Request<pb::GenerateRequest>) -> Result<Submitted, Status> {
        let shared = &self.0;
        shared.stats.requests.fetch_add(1, Relaxed);
        let result = self.submit_inner(req).await;
        if result.is_err() {
            shared.stats.errors.fetch_add(1, Relaxed);
        }
        result
    }

    async fn submit_inner(&self, req: Request<pb::GenerateRequest>) -> Result<Submitted, Status> {
        let shared = self.0.clone();
        let caller = auth::authenticate(shared.keys.as_ref(), req.metadata())?;
        let header_adapter = req
            .metadata()
            .get("x-svfit-adapter")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let deadline = deadline(req.metadata());
        let arrived = Instant::now();
        let body = req.into_inner();
        let adapter_ref = if body.adapter.is_empty() {
            header_adapter.unwrap_or_default()
        } else {
            body.adapter.clone()
        };

        // The adapter (or mix), read and validated off the async threads.
        let adapter: Option<(Arc<AdapterDeltas>, String)> = if !body.mix.is_empty() {
            if !adapter_ref.is_empty() {
                return Err(Status::invalid_argument(
                    "set either adapter or mix, not both",
                ));
            }
            let mut parts = Vec::new();
            for part in &body.mix {
                if !part.weight.is_finite() {
                    return Err(Status::invalid_argument(format!(
                        "mix weight of '{}' is not finite",
                        part.adapter
                    )));
                }
                let stored = resolve(&shared, &caller, &part.adapter).await?;
                parts.push((stored, part.weight));
            }
            let version = parts
                .iter()
                .map(|(s, w)| format!("{}@v{}*{w}", s.id, s.version))
                .collect::<Vec<_>>()
                .join("+");
            Some((shared.store.mix(&parts), version))
        } else if !adapter_ref.is_empty() {
            let stored = resolve(&shared, &caller, &adapter_ref).await?;
            Some((
                stored.deltas.clone(),
                format!("{}@v{}", stored.id, stored.version),
            ))
        } else {
            None
        };

        let prompt = match body.input {
            Some(pb::generate_request::Input::Prompt(p)) => p,
            Some(pb::generate_request::Input::Chat(chat)) => {
                if chat.messages.is_empty() {
                    return Err(Status::invalid_argument("chat has no messages"));
                }
                let messages: Vec<Message> = chat
                    .messages
                    .iter()
                    .map(|m| Message::new(&m.role, &m.content))
                    .collect();
                shared
                    .tokenizer
                    .apply_chat_template(&messages, true)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
            }
            None => return Err(Status::invalid_argument("set prompt or chat")),
        };
        let s = body.sampling.unwrap_or_default();
        let defaults = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: s.temperature.unwrap_or(defaults.temperature),
            top_k: s.top_k.map_or(defaults.top_k, |v| v as usize),
            top_p: s.top_p.unwrap_or(defaults.top_p),
            min_p: s.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: s.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: s
                .repeat_last_n
                .map_or(defaults.repeat_last_n, |v| v as usize),
            seed: s.seed.unwrap_or(defaults.seed),
        };
        let max_tokens = match body.max_tokens {
            0 => shared.config.max_tokens_default,
            n => n as usize,
        };
        let request = generate::Request {
            prompt: shared.tokenizer.encode(&prompt, true),
            max_tokens,
            stop: body.stop,
            sampling,
            adapter: 0,
        };
        let (tx, events) = mpsc::unbounded_channel();
        let request_id = format!(
            "{:x}-{}",
            shared.started.elapsed().as_micros(),
            shared.stats.next_id.fetch_add(1, Relaxed)
        );
        let (deltas, adapter_version) = match adapter {
            Some((d, v)) => (Some(d), v),
            None => (None, String::new()),
        };
        shared
            .engine
            .submit(crate::engine::Job {
                request,
                tenant: caller.tenant.clone(),
                adapter: deltas,
                events: tx,
                deadline,
                arrived,
            })
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
                SubmitError::Stopped => Status::unavailable(e.to_string()),
                SubmitError::Invalid(_) => Status::invalid_argument(e.to_string()),
            })?;
        log(&[
            ("event", "request".into()),
            ("request_id", request_id.clone()),
            ("tenant", caller.tenant),
            ("adapter", adapter_version.clone()),
        ]);
        Ok(Submitted {
            events,
            request_id,
            adapter_version,
        })
    }
}

/// The current version of an adapter the caller may use.
async fn resolve(
    shared: &Arc<Shared>,
    caller: &Caller,
    reference: &str,
) -> Result<Arc<Stored>, Status> {
    let (tenant, id) = caller.adapter(reference)?;
    let shared = shared.clone();
    blocking(move || shared.store.get(&tenant, &id)).await
}

fn usage_and_timings(event: &Event) -> Option<(pb::Usage, pb::Timings, &'static str)> {
    match event {
        Event::Done {
            finish,
            prompt_tokens,
            completion_tokens,
            queue,
            time_to_first_token,
            total,
        } => Some((
            pb::Usage {
                prompt_tokens: *prompt_tokens as u32,
                completion_tokens: *completion_tokens as u32,
            },
            pb::Timings {
                queue_ms: queue.as_secs_f64() * 1e3,
                time_to_first_token_ms: time_to_first_token.as_secs_f64() * 1e3,
                total_ms: total.as_secs_f64() * 1e3,
            },
            finish.as_str(),
        )),
        _ => None,
    }
}

fn failed(message: &str) -> Status {
    if message.contains("deadline") {
        Status::deadline_exceeded(message.to_string())
    } else {
        Status::internal(message.to_string())
    }
}

fn log_done(id: &str, adapter: &str, usage: &pb::Usage, timings: &pb::Timings, finish: &str) {
    log(&[
        ("event", "done".into()),
        ("request_id", id.to_string()),
        ("adapter", adapter.to_string()),
        ("prompt_tokens", usage.prompt_tokens.to_string()),
        ("completion_tokens", usage.completion_tokens.to_string()),
        ("finish", finish.to_string()),
        ("queue_ms", format!("{:.1}", timings.queue_ms)),
        ("ttft_ms", format!("{:.1}", timings.time_to_first_token_ms)),
        ("total_ms", format!("{:.1}", timings.total_ms)),
    ]);
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let Submitted {
            mut events,
            request_id,
            adapter_version,
        } = self.submit(req).await?;
        let mut response = pb::GenerateResponse {
            request_id,
            adapter_version,
            ..Default::default()
        };
        while let Some(event) = events.recv().await {
            if let Some((usage, timings, finish)) = usage_and_timings(&event) {
                log_done(
                    &response.request_id,
                    &response.adapter_version,
                    &usage,
                    &timings,
                    finish,
                );
                response.usage = Some(usage);
                response.timings = Some(timings);
                response.finish_reason = finish.into();
                return Ok(Response::new(response));
            }
            match event {
                Event::Text { text, tokens, .. } => {
                    response.text.push_str(&text);
                    response.token_ids.extend(tokens);
                }
                Event::Failed(message) => return Err(failed(&message)),
                Event::Done { .. } => unreachable!("handled above"),
            }
        }
        Err(Status::internal("the engine dropped the request"))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let Submitted {
            mut events,
            request_id,
            adapter_version,
        } = self.submit(req).await?;
        let (tx, rx) = mpsc::channel::<Result<pb::GenerateChunk, Status>>(16);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    // The client left: dropping `events` cancels the
                    // sequence at the engine's next step.
                    _ = tx.closed() => return,
                };
                let Some(event) = event else {
                    let _ = tx
                        .send(Err(Status::internal("the engine dropped the request")))
                        .await;
                    return;
                };
                let mut chunk = pb::GenerateChunk {
                    request_id: request_id.clone(),
                    adapter_version: adapter_version.clone(),
                    ..Default::default()
                };
                let mut last = false;
                if let Some((usage, timings, finish)) = usage_and_timings(&event) {
                    log_done(&request_id, &adapter_version, &usage, &timings, finish);
                    chunk.usage = Some(usage);
                    chunk.timings = Some(timings);
                    chunk.finish_reason = finish.into();
                    last = true;
                }
                let item = match event {
                    Event::Text { text, tokens, .. } => {
                        chunk.text = text;
                        chunk.token_ids = tokens;
                        Ok(chunk)
                    }
                    Event::Failed(message) => {
                        last = true;
                        Err(failed(&message))
                    }
                    Event::Done { .. } => Ok(chunk),
                };
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn model_info(
        &self,
        req: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let shared = &self.0;
        auth::authenticate(shared.keys.as_ref(), req.metadata())?;
        let stats = shared.engine.stats();
        let config = shared.engine.config();
        Ok(Response::new(pb::ModelInfoResponse {
            model: shared
                .config
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: shared.store.key().base_sha256.clone(),
            targets: shared.store.key().targets.to_string(),
            rank_policy: shared.store.key().policy.to_string(),
            ranks: shared
                .ranks
                .iter()
                .map(|&(kind, min, mean, max)| pb::TargetRank {
                    kind: kind.into(),
                    min: min as u32,
                    mean,
                    max: max as u32,
                })
                .collect(),
            context: config.context as u32,
            max_sequences: config.max_sequences as u32,
            adapter_slots: config.adapter_slots as u32,
            max_tokens_default: shared.config.max_tokens_default as u32,
            active_sequences: stats.active.load(Relaxed) as u32,
            queued_requests: stats.queued.load(Relaxed) as u32,
        }))
    }
}

struct AdaptersService(Arc<Shared>);

impl AdaptersService {
    fn info(&self, stored: &Stored) -> pb::AdapterInfo {
        let a = &stored.adapter;
        pb::AdapterInfo {
            id: stored.id.clone(),
            tenant: stored.tenant.clone(),
            version: stored.version,
            bytes: stored.bytes,
            targets: a.targets.clone(),
            rank_policy: a.rank_policy.clone(),
            factors_id: a.factors_id.clone(),
            pinned: self.0.store.is_pinned(&stored.tenant, &stored.id),
            info: a.info.clone().into_iter().collect(),
        }
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        auth::authenticate(self.0.keys.as_ref(), req.metadata())
    }
}

#[tonic::async_trait]
impl Adapters for AdaptersService {
    async fn upload(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::AdapterInfo>, Status> {
        let caller = self.caller(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadChunk {
                part: Some(pb::upload_chunk::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first upload message must be the header",
                ))
            }
        };
        let tenant = caller.tenant(&header.tenant)?;
        crate::store::check_name("adapter id", &header.id).map_err(store_status)?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(pb::upload_chunk::Part::Data(data)) => {
                    if bytes.len() + data.len() > MAX_UPLOAD {
                        return Err(Status::invalid_argument(format!(
                            "adapter larger than {} MB",
                            MAX_UPLOAD >> 20
                        )));
                    }
                    bytes.extend_from_slice(&data);
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "only the first message may be a header",
                    ))
                }
            }
        }
        let shared = self.0.clone();
        let id = header.id.clone();
        let stored = blocking(move || shared.store.put(&tenant, &id, &bytes)).await?;
        log(&[
            ("event", "upload".into()),
            ("tenant", stored.tenant.clone()),
            ("adapter", format!("{}@v{}", stored.id, stored.version)),
        ]);
        Ok(Response::new(self.info(&stored)))
    }

    async fn get(&self, req: Request<pb::AdapterRef>) -> Result<Response<pb::AdapterInfo>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let tenant = caller.tenant(&r.tenant)?;
        let shared = self.0.clone();
        let stored = blocking(move || shared.store.get(&tenant, &r.id)).await?;
        Ok(Response::new(self.info(&stored)))
    }

    async fn list(
        &self,
        req: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let tenants = if r.tenant.is_empty() && caller.admin && self.0.keys.is_some() {
            self.0.store.tenants().map_err(store_status)?
        } else {
            vec![caller.tenant(&r.tenant)?]
        };
        let page_size = match r.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let mut names: Vec<(String, String)> = Vec::new();
        for t in &tenants {
            let ids = self.0.store.ids(t).map_err(store_status)?;
            names.extend(ids.into_iter().map(|id| (t.clone(), id)));
        }
        names.retain(|(t, id)| r.page_token.is_empty() || format!("{t}/{id}") > r.page_token);
        names.sort();
        let more = names.len() > page_size;
        names.truncate(page_size);
        let next_page_token = if more {
            names
                .last()
                .map(|(t, id)| format!("{t}/{id}"))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let shared = self.0.clone();
        let stored = blocking(move || {
            Ok(names
                .iter()
                .filter_map(|(t, id)| shared.store.get(t, id).ok())
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(Response::new(pb::ListAdaptersResponse {
            adapters: stored.iter().map(|s| self.info(s)).collect(),
            next_page_token,
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::AdapterRef>,
    ) -> Result<Response<pb::DeleteAdapterResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let tenant = caller.tenant(&r.tenant)?;
        let shared = self.0.clone();
        let (t, id) = (tenant.clone(), r.id.clone());
        blocking(move || shared.store.delete(&t, &id)).await?;
        log(&[
            ("event", "delete".into()),
            ("tenant", tenant),
            ("adapter", r.id),
        ]);
        Ok(Response::new(pb::DeleteAdapterResponse {}))
    }

    async fn pin(&self, req: Request<pb::PinRequest>) -> Result<Response<pb::AdapterInfo>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let tenant = caller.tenant(&r.tenant)?;
        let slots = self.0.engine.config().adapter_slots;
        if r.pinned
            && !self.0.store.is_pinned(&tenant, &r.id)
            && self.0.store.pinned_count() + 1 >= slots
        {
            // Keep one slot for everything else.
            return Err(Status::failed_precondition(format!(
                "{} adapters are pinned; the server has {slots} slots",
                self.0.store.pinned_count()
            )));
        }
        let shared = self.0.clone();
        let stored = blocking(move || shared.store.pin(&tenant, &r.id, r.pinned)).await?;
        self.0.engine.pin(&stored.deltas.key, r.pinned);
        Ok(Response::new(self.info(&stored)))
    }
}
