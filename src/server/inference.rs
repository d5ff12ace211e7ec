//! The Inference service: a request is validated (`validation.rs`), its
//! adapter resolved from the store and its prompt tokenized off the async
//! threads, then it goes to the engine, whose events are streamed back.
//! Each request ends with one log line (`request` target).

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::validation::{self, AdapterChoice, Prompt, ValidRequest};
use super::{
    auth, blocking, failure_status, pb, store_status, submit_status, Api, InFlight, Shared,
};
use crate::adapter::AdapterDeltas;
use crate::engine::{Event, Job};
use crate::generate;
use crate::store::StoreError;

pub(super) struct InferenceService(pub(super) Arc<Shared>);

/// A submitted request: its engine events and what identifies it.
pub(super) struct Submitted {
    pub(super) events: mpsc::UnboundedReceiver<Event>,
    pub(super) request_id: String,
    tenant: String,
    pub(super) adapter_version: String,
    api: Api,
    /// Counted until the answer is complete (drain waits for it).
    _in_flight: InFlight,
}

impl InferenceService {
    async fn submit(&self, req: Request<pb::GenerateRequest>) -> Result<Submitted, Status> {
        let caller = auth::caller(&req);
        let (metadata, _, body) = req.into_parts();
        submit(&self.0, Api::Grpc, caller, |caller, limits| {
            validation::validate(body, &metadata, caller, limits)
        })
        .await
    }
}

/// Runs a request of either API: `check` turns it into a [`ValidRequest`]
/// for `caller`; then the adapter comes from the store, the prompt is
/// tokenized off the async threads, and the job goes to the engine. A
/// refusal is counted and logged here.
pub(super) async fn submit(
    shared: &Arc<Shared>,
    api: Api,
    caller: Result<auth::Caller, Status>,
    check: impl FnOnce(&auth::Caller, &validation::Limits) -> Result<ValidRequest, Status>,
) -> Result<Submitted, Status> {
    shared.stats.request(api);
    let in_flight = InFlight::new(&shared.stats.in_flight);
    let tenant = caller
        .as_ref()
        .map(|c| c.tenant.clone())
        .unwrap_or_default();
    let result = match caller {
        Ok(caller) => match check(&caller, &shared.limits) {
            Ok(valid) => submit_valid(shared, api, caller, valid, in_flight).await,
            Err(status) => Err(status),
        },
        Err(status) => Err(status),
    };
    if let Err(status) = &result {
        shared.stats.error(api);
        tracing::info!(
            target: "request",
            api = api.as_str(),
            tenant,
            code = ?status.code(),
            error = status.message(),
            "refused"
        );
    }
    result
}

async fn submit_valid(
    shared: &Arc<Shared>,
    api: Api,
    caller: auth::Caller,
    valid: ValidRequest,
    in_flight: InFlight,
) -> Result<Submitted, Status> {
    let arrived = Instant::now();
    let ValidRequest {
        adapter,
        prompt,
        sampling,
        max_tokens,
        stop,
        deadline,
        logprobs,
        constraint,
    } = valid;
    let (deltas, adapter_version) = resolve(shared, adapter).await?;
    // Tokenizing and compiling the constraint (bounded by llguidance's
    // limits) run off the async threads and off the engine's.
    let blocking = shared.clone();
    let (prompt, constraint) = tokio::task::spawn_blocking(move || {
        let tokenizer = &blocking.tokenizer;
        let prompt = match prompt {
            Prompt::Text(text) => tokenizer.encode(&text, true),
            Prompt::Chat(messages) => tokenizer
                .apply_chat_template(&messages, true)
                .map(|text| tokenizer.encode(&text, true))
                .map_err(|e| Status::invalid_argument(format!("chat: {e}")))?,
        };
        let constraint = match constraint {
            None => None,
            Some(spec) => Some(
                blocking
                    .constraints()?
                    .compile(&spec)
                    .map_err(|e| Status::invalid_argument(format!("constraint: {e}")))?,
            ),
        };
        Ok::<_, Status>((prompt, constraint))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    let (tx, events) = mpsc::unbounded_channel();
    let request_id = format!(
        "{:x}-{}",
        shared.started.elapsed().as_micros(),
        shared.stats.next_id.fetch_add(1, Relaxed)
    );
    shared
        .engine
        .submit(Job {
            request: generate::Request {
                prompt,
                max_tokens,
                stop,
                sampling,
                adapter: Default::default(),
            },
            tenant: caller.tenant.clone(),
            adapter: deltas,
            events: tx,
            deadline,
            arrived,
            logprobs,
            constraint,
        })
        .map_err(submit_status)?;
    Ok(Submitted {
        events,
        request_id,
        tenant: caller.tenant,
        adapter_version,
        api,
        _in_flight: in_flight,
    })
}

/// The deltas the engine runs with and the version string the client sees
/// ("" for the base).
async fn resolve(
    shared: &Arc<Shared>,
    choice: AdapterChoice,
) -> Result<(Option<Arc<AdapterDeltas>>, String), Status> {
    let shared = shared.clone();
    match choice {
        AdapterChoice::Base => Ok((None, String::new())),
        AdapterChoice::One(tenant, id) => {
            let stored =
                match shared.store.get(&tenant, &id).await {
                    Err(StoreError::NotFound(e)) => import_dropped_lora(&shared, &tenant, &id)
                        .await?
                        .ok_or_else(|| store_status(StoreError::NotFound(e)))?,
                    got => got.map_err(store_status)?,
                };
            let version = format!("{}@v{}", stored.id, stored.version);
            Ok((Some(stored.deltas.clone()), version))
        }
        AdapterChoice::Mix(parts) => {
            let mut stored = Vec::with_capacity(parts.len());
            for (tenant, id, weight) in parts {
                let part = shared.store.get(&tenant, &id).await;
                stored.push((part.map_err(store_status)?, weight));
            }
            let version = stored
                .iter()
                .map(|(s, w)| format!("{}@v{}*{w}", s.id, s.version))
                .collect::<Vec<_>>()
                .join("+");
            let max_rank = shared.config.engine.lora.rank;
            let mixed = blocking(move || Ok(shared.store.mix(&stored))).await?;
            // LoRAs mix side by side: their ranks add up.
            if let Some((prefix, u)) = mixed.lora.iter().find(|(_, u)| u.rank > max_rank) {
                return Err(Status::invalid_argument(format!(
                    "the mix's LoRAs have rank {} together on {prefix}; this server serves \
                     ranks up to {max_rank} (--lora-rank)",
                    u.rank
                )));
            }
            Ok((Some(mixed), version))
        }
    }
}

/// A LoRA dropped into the local adapters directory as llama.cpp or PEFT
/// keep it — `DIR/<tenant>/<id>.gguf` (a GGUF LoRA) or `DIR/<tenant>/<id>/`
/// (a PEFT directory) — imported on first use: checked against the base
/// and stored as `<id>.safetensors` (an svfit LoRA file, version 1), which
/// is served from then on. `None` when there is none (or the store is
/// not a local directory). `tenant` and `id` are checked names.
async fn import_dropped_lora(
    shared: &Arc<Shared>,
    tenant: &str,
    id: &str,
) -> Result<Option<Arc<crate::store::Stored>>, Status> {
    let config = &shared.config;
    if config.adapters.contains("://") {
        return Ok(None);
    }
    let dir = std::path::Path::new(&config.adapters).join(tenant);
    let (gguf, peft) = (dir.join(format!("{id}.gguf")), dir.join(id));
    let peft_config = peft.join("adapter_config.json");
    let (data, peft_text) = if gguf.is_file() {
        (gguf, None)
    } else if peft_config.is_file() {
        let text = std::fs::read_to_string(&peft_config)
            .map_err(|e| Status::invalid_argument(format!("{id}: adapter_config.json: {e}")))?;
        (peft.join("adapter_model.safetensors"), Some(text))
    } else {
        return Ok(None);
    };
    let (model, sha) = (config.model.clone(), config.factors.base_sha256.clone());
    let bytes = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&data).map_err(|e| {
            let name = data.file_name().unwrap_or_default().to_string_lossy();
            Status::invalid_argument(format!("the dropped LoRA's {name}: {e}"))
        })?;
        crate::lora::stored::import_bytes(&bytes, peft_text.as_deref(), &model, &sha)
            .map_err(|e| Status::invalid_argument(format!("not a LoRA of this base: {e}")))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    let stored = shared
        .store
        .put(tenant, id, bytes)
        .await
        .map_err(store_status)?;
    tracing::info!(tenant, adapter = id, "imported a dropped LoRA");
    Ok(Some(stored))
}

/// Usage and timings of the `Done` event.
pub(super) fn usage_and_timings(event: &Event) -> Option<(pb::Usage, pb::Timings, &'static str)> {
    match event {
        Event::Done {
            finish,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            queue,
            time_to_first_token,
            total,
        } => Some((
            pb::Usage {
                prompt_tokens: *prompt_tokens as u32,
                completion_tokens: *completion_tokens as u32,
                cached_tokens: *cached_tokens as u32,
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

/// What the engine says when it drops a request without a last event: it
/// stopped.
pub(super) fn engine_gone() -> Status {
    Status::unavailable("the engine stopped")
}

/// A `request` log line of the submitted request `$s`: its API, id, tenant
/// and adapter version, then the fields and message given.
macro_rules! request_line {
    ($s:expr, $($rest:tt)+) => {
        tracing::info!(
            target: "request",
            api = $s.api.as_str(),
            request_id = $s.request_id,
            tenant = $s.tenant,
            adapter = $s.adapter_version,
            $($rest)+
        )
    };
}

impl Submitted {
    /// The request's one log line, when it ends.
    pub(super) fn log_done(&self, usage: &pb::Usage, timings: &pb::Timings, finish: &str) {
        request_line!(
            self,
            prompt_tokens = usage.prompt_tokens,
            cached_tokens = usage.cached_tokens,
            completion_tokens = usage.completion_tokens,
            finish,
            queue_ms = format!("{:.1}", timings.queue_ms),
            ttft_ms = format!("{:.1}", timings.time_to_first_token_ms),
            total_ms = format!("{:.1}", timings.total_ms),
            "done"
        );
    }

    /// The next engine event; `None` once `client_left` resolves first
    /// (dropping the events then cancels the sequence at the engine's next
    /// step). An engine that ends without a last event is an error, logged.
    pub(super) async fn next_event(
        &mut self,
        client_left: impl std::future::Future<Output = ()>,
    ) -> Option<Result<Event, Status>> {
        let event = tokio::select! {
            event = self.events.recv() => event,
            _ = client_left => return None,
        };
        Some(event.ok_or_else(|| {
            let status = engine_gone();
            self.log_failed(&status);
            status
        }))
    }

    /// The request's one log line, when it fails after its submission.
    pub(super) fn log_failed(&self, status: &Status) {
        request_line!(
            self,
            code = ?status.code(),
            error = status.message(),
            "failed"
        );
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut submitted = self.submit(req).await?;
        let mut response = pb::GenerateResponse {
            request_id: submitted.request_id.clone(),
            adapter_version: submitted.adapter_version.clone(),
            ..Default::default()
        };
        while let Some(event) = submitted.events.recv().await {
            if let Some((usage, timings, finish)) = usage_and_timings(&event) {
                submitted.log_done(&usage, &timings, finish);
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
                Event::Failed(failure) => {
                    let status = failure_status(&failure);
                    submitted.log_failed(&status);
                    return Err(status);
                }
                Event::Done { .. } => unreachable!("handled above"),
            }
        }
        let status = engine_gone();
        submitted.log_failed(&status);
        Err(status)
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let mut submitted = self.submit(req).await?;
        let (tx, rx) = mpsc::channel::<Result<pb::GenerateChunk, Status>>(16);
        tokio::spawn(async move {
            loop {
                let event = match submitted.next_event(tx.closed()).await {
                    None => return,
                    Some(Ok(event)) => event,
                    Some(Err(status)) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let mut chunk = pb::GenerateChunk {
                    request_id: submitted.request_id.clone(),
                    adapter_version: submitted.adapter_version.clone(),
                    ..Default::default()
                };
                let mut last = false;
                if let Some((usage, timings, finish)) = usage_and_timings(&event) {
                    submitted.log_done(&usage, &timings, finish);
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
                    Event::Failed(failure) => {
                        last = true;
                        let status = failure_status(&failure);
                        submitted.log_failed(&status);
                        Err(status)
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
        _req: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let shared = &self.0;
        let stats = shared.engine.stats();
        let config = shared.engine.config();
        let key = shared.store.key();
        Ok(Response::new(pb::ModelInfoResponse {
            model: shared.base_model(),
            sha256: key.base_sha256.clone(),
            targets: key.targets.to_string(),
            rank_policy: key.policy.to_string(),
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
            max_tokens_default: shared.limits.max_tokens_default as u32,
            active_sequences: stats.active.load(Relaxed) as u32,
            queued_requests: stats.queued.load(Relaxed) as u32,
        }))
    }
}
