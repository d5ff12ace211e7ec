//! The OpenAI-compatible HTTP API (`--http-addr`), beside gRPC on the same
//! engine, store, API keys, limits and metrics:
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: `model` names an
//!   adapter (`tenant/id` for admin keys) or the base model; answers whole
//!   or as server-sent events. The body becomes a gRPC `GenerateRequest`
//!   (`openai.rs`) and passes the same validation and submission
//!   (`inference::submit`).
//! - `GET /v1/models`, `GET /v1/models/{id}`: the base and the caller's
//!   adapters (`?limit=N&after=ID` pages through them; `http/models.rs`).
//! - `/v1/files`: OpenAI's files API for fine-tuning data (`http/files.rs`,
//!   kept by `server/files.rs`).
//! - `/v1/fine_tuning/jobs`: OpenAI's fine-tuning API (`http/jobs.rs`,
//!   kept and run by `server/jobs`).
//! - `GET /health`: 200 while serving, 503 once draining or stopped.
//!
//! Errors have OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`, with the status of the gRPC code the same failure gets.
//! Connections are bounded like gRPC's (`listener.rs`); TLS uses the
//! server's certificate. A client that leaves (a dropped stream or
//! connection) drops the request's event channel, and the engine cancels
//! its sequence at the next step.

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::auth::{Authenticate, Caller};
use super::inference::{self, engine_gone, usage_and_timings, Submitted};
use super::openai::{self, Answer, Endpoint, Parsed};
use super::{failure_status, Api, Shared};

mod files;
mod jobs;
mod models;
use crate::engine::Event;
use crate::store::unix_now;

/// How long a client may take to send its request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct HttpState {
    shared: Arc<Shared>,
    auth: Authenticate,
    /// The `model` that selects the base model.
    base_model: String,
    /// The base model's `created`: when the server started (Unix seconds).
    started: u64,
}

/// Starts the HTTP API on `listener`, at most `max_connections` open at
/// once; the task ends after `shutdown`, once open connections finish.
pub(super) fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    auth: Authenticate,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let addr = listener.local_addr()?;
    let max_connections = shared.config.max_connections;
    let state = HttpState {
        base_model: shared.base_model(),
        started: unix_now().saturating_sub(shared.started.elapsed().as_secs()),
        shared,
        auth,
    };
    let file_body_limit = files::body_limit(&state);
    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route(
            "/v1/files",
            post(files::create)
                .get(files::list)
                .layer(DefaultBodyLimit::max(file_body_limit)),
        )
        .route("/v1/files/{id}", get(files::one).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/fine_tuning/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/fine_tuning/jobs/{id}", get(jobs::one))
        .route("/v1/fine_tuning/jobs/{id}/events", get(jobs::events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(jobs::checkpoints),
        )
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::one))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(state);
    let connections = Connections::start(listener, addr, max_connections, tls);
    let task = tokio::spawn(async move {
        axum::serve(connections, router.into_make_service())
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((addr, task))
}

/// The TLS configuration of the HTTP API from PEM files.
pub(super) fn tls_config(cert: &[u8], key: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection's byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Accepted connections for axum: from the bounded accept loop, through
/// TLS handshakes (each in its own task, so a slow one holds no other).
struct Connections {
    ready: mpsc::Receiver<Box<dyn Io>>,
    addr: SocketAddr,
}

impl Connections {
    fn start(
        listener: tokio::net::TcpListener,
        addr: SocketAddr,
        limit: usize,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let (tx, ready) = mpsc::channel::<Box<dyn Io>>(16);
        let mut incoming = super::listener::incoming(listener, "http", limit);
        tokio::spawn(async move {
            use tokio_stream::StreamExt;
            loop {
                // Ends when axum drops the listener (a stop or drain), which
                // ends the accept loop and closes the port at once.
                let connection = tokio::select! {
                    next = incoming.next() => next,
                    _ = tx.closed() => return,
                };
                let Some(Ok(connection)) = connection else {
                    return;
                };
                let Some(config) = &tls else {
                    if tx.send(Box::new(connection)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake = acceptor.accept(connection);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Box::new(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        Connections { ready, addr }
    }
}

impl axum::serve::Listener for Connections {
    type Io = Box<dyn Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(io) => (io, self.addr),
            // The accept loop ended: no more connections, ever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// An error in OpenAI's shape.
struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        ApiError(status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = &self.0;
        let (http, kind, code) = match status.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", None),
            Code::NotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error", None),
            Code::Aborted => (StatusCode::CONFLICT, "server_error", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let retry_after = (http == StatusCode::TOO_MANY_REQUESTS).then(|| {
            status
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("1")
                .to_string()
        });
        let mut response = (http, json_body(&error_body(status, kind, code))).into_response();
        if let Some(Ok(v)) = retry_after.map(|s| HeaderValue::from_str(&s)) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// `{"error": {...}}` for `status`; `param` is the field a validation
/// message starts with, in the OpenAI request's terms.
fn error_body(status: &Status, kind: &str, code: Option<&str>) -> Value {
    let message = status.message();
    let param =
        if message.starts_with("invalid adapter id") || message.starts_with("invalid tenant") {
            Some("model")
        } else {
            message
                .split_once(": ")
                .map(|(field, _)| field)
                .filter(|f| !f.is_empty() && !f.contains(' '))
                .map(|f| match f {
                    "chat" => "messages",
                    "mix" => "svfit.mix",
                    other => other,
                })
        };
    let param = (status.code() == Code::InvalidArgument)
        .then_some(param)
        .flatten();
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

fn json_body(value: &Value) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
}

/// 413 for a body over the limit; 400 for a body that did not arrive.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    let too_large = || {
        let status = Status::invalid_argument(format!(
            "the request body is larger than any valid request ({limit} bytes)"
        ));
        let body = error_body(&status, "invalid_request_error", Some("request_too_large"));
        (StatusCode::PAYLOAD_TOO_LARGE, json_body(&body)).into_response()
    };
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                Err(too_large())
            } else {
                Err(
                    ApiError(Status::invalid_argument(format!("reading the body: {e}")))
                        .into_response(),
                )
            }
        }
        Err(_) => Err(ApiError(Status::invalid_argument(format!(
            "the body did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        )))
        .into_response()),
    }
}

impl HttpState {
    /// The caller of a request from `Authorization: Bearer KEY` (or
    /// `x-api-key`), held to its tenant's request rate.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, Status> {
        self.auth
            .caller(&MetadataMap::from_headers(headers.clone()))
    }

    /// The base model's model object.
    fn base_model_object(&self) -> Value {
        models::model_object(&self.base_model, self.started, "svfit", None)
    }

    /// The largest body a valid request can have: every byte of the
    /// largest valid request written as a six-byte JSON escape.
    fn body_limit(&self) -> usize {
        6 * self.shared.limits.max_message_bytes()
    }
}

async fn chat(State(state): State<HttpState>, headers: HeaderMap, body: Body) -> Response {
    generate(state, Endpoint::Chat, headers, body).await
}

async fn completions(State(state): State<HttpState>, headers: HeaderMap, body: Body) -> Response {
    generate(state, Endpoint::Completions, headers, body).await
}

/// A page of `items` (in the list's order) as an OpenAI list object: the
/// items after the one whose id is `after`, at most `limit`.
fn list_page(mut items: Vec<Value>, limit: usize, after: Option<String>) -> Result<Value, Status> {
    if let Some(after) = after {
        let at = items.iter().position(|i| i["id"] == after.as_str());
        let at = at.ok_or_else(|| openai::invalid("after", "no such id in this list"))?;
        items.drain(..=at);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    let id = |i: Option<&Value>| i.map(|i| i["id"].clone());
    Ok(serde_json::json!({
        "object": "list", "data": items, "has_more": has_more,
        "first_id": id(items.first()), "last_id": id(items.last()),
    }))
}

/// A random number: the seed of requests that set none (OpenAI's answers
/// vary unless a seed is given), and file ids.
pub(super) fn random_seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

async fn generate(
    state: HttpState,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Authentication comes before the body is read: a refused request
    // costs next to nothing. Its refusal is counted by `submit`.
    let caller = state.caller(&headers);
    let bytes = match &caller {
        Ok(c) => match read_body(body, state.body_limit()).await {
            Ok(bytes) => bytes,
            Err(response) => {
                let stats = &state.shared.stats;
                stats.request(Api::Http);
                stats.error(Api::Http);
                tracing::info!(
                    target: "request",
                    api = Api::Http.as_str(),
                    tenant = c.tenant,
                    status = response.status().as_u16(),
                    "refused: the body was too large or did not arrive"
                );
                return response;
            }
        },
        Err(_) => Bytes::new(),
    };
    let mut parsed = None;
    let submitted = inference::submit(&state.shared, Api::Http, caller, |caller, limits| {
        let mut p = openai::parse(endpoint, &bytes, &state.base_model)?;
        let sampling = p.body.sampling.get_or_insert_with(Default::default);
        sampling.seed.get_or_insert_with(random_seed);
        let (body, logprobs) = (p.body.clone(), p.logprobs);
        parsed = Some(p);
        let mut valid = super::validation::validate(body, &MetadataMap::new(), caller, limits)?;
        valid.logprobs = logprobs;
        Ok(valid)
    })
    .await;
    let submitted = match submitted {
        Ok(s) => s,
        Err(status) => return ApiError(constraint_param(status, parsed.as_ref())).into_response(),
    };
    let parsed = parsed.expect("set when the request parsed");
    if parsed.stream {
        stream(state, endpoint, parsed, submitted)
    } else {
        whole(state, endpoint, parsed, submitted).await
    }
}

/// A refused constraint in the request's terms: the `tools` (whose
/// grammar it was) or the `response_format`.
fn constraint_param(status: Status, parsed: Option<&Parsed>) -> Status {
    let message = status.message();
    let Some(rest) = [
        "constraint.json_schema",
        "constraint.lark",
        "constraint.regex",
        "constraint",
    ]
    .iter()
    .find_map(|field| message.strip_prefix(field)?.strip_prefix(": ")) else {
        return status;
    };
    let param = match parsed {
        Some(p) if p.tool_calls => "tools",
        _ => "response_format",
    };
    Status::new(status.code(), format!("{param}: {rest}"))
}

/// The bytes of a token (for log-probabilities).
fn piece_of(state: &HttpState) -> impl Fn(u32) -> Vec<u8> + Send + 'static {
    let tokenizer = state.shared.tokenizer.clone();
    move |t| tokenizer.piece(t).to_vec()
}

/// Collects the whole answer. Dropping this future (the client left)
/// drops the events, which cancels the sequence.
async fn whole(
    state: HttpState,
    endpoint: Endpoint,
    parsed: Parsed,
    mut submitted: Submitted,
) -> Response {
    let answer = Answer {
        endpoint,
        id: &submitted.request_id.clone(),
        created: unix_now(),
        model: &parsed.model,
    };
    let piece = piece_of(&state);
    let mut text = String::new();
    let mut logprobs = None;
    let mut offset = 0;
    while let Some(event) = submitted.events.recv().await {
        if let Some((usage, timings, finish)) = usage_and_timings(&event) {
            submitted.log_done(&usage, &timings, finish);
            let usage = openai::usage(&usage);
            let mut answer_text = std::mem::take(&mut text);
            let mut calls = Vec::new();
            if parsed.tool_calls {
                let mut read = openai::Calls::default();
                let mut pieces = read.read(&answer_text);
                pieces.extend(read.end());
                let mut split = openai::ToolAnswer::default();
                split.add(pieces);
                (answer_text, calls) = (split.content, split.calls);
            }
            let body = answer.response(&answer_text, &calls, logprobs, finish, usage);
            return (StatusCode::OK, json_body(&body)).into_response();
        }
        match event {
            Event::Text {
                text: t,
                logprobs: lp,
                ..
            } => {
                text.push_str(&t);
                if parsed.logprobs.is_some() {
                    openai::append_logprobs(
                        &mut logprobs,
                        answer.logprobs(&lp, &mut offset, &piece),
                    );
                }
            }
            Event::Failed(failure) => {
                let status = failure_status(&failure);
                submitted.log_failed(&status);
                return ApiError(status).into_response();
            }
            Event::Done { .. } => unreachable!("handled above"),
        }
    }
    let status = engine_gone();
    submitted.log_failed(&status);
    ApiError(status).into_response()
}

/// Server-sent events: one chunk per engine event, then `data: [DONE]`.
/// A failure after the stream began is an `{"error": ...}` event.
fn stream(
    state: HttpState,
    endpoint: Endpoint,
    parsed: Parsed,
    mut submitted: Submitted,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let piece = piece_of(&state);
    tokio::spawn(async move {
        let id = submitted.request_id.clone();
        let answer = Answer {
            endpoint,
            id: &id,
            created: unix_now(),
            model: &parsed.model,
        };
        let send = |value: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Bytes::from(format!("data: {value}\n\n"))))
                    .await
                    .is_ok()
            }
        };
        let usage_slot = || parsed.include_usage.then_some(Value::Null);
        if endpoint == Endpoint::Chat && !send(answer.role_chunk(usage_slot())).await {
            return;
        }
        let mut offset = 0;
        let mut calls = parsed.tool_calls.then(openai::Calls::default);
        loop {
            let event = match submitted.next_event(tx.closed()).await {
                None => return,
                Some(Ok(event)) => event,
                Some(Err(status)) => {
                    let _ = send(error_body(&status, "server_error", None)).await;
                    return;
                }
            };
            if let Some((usage, timings, finish)) = usage_and_timings(&event) {
                submitted.log_done(&usage, &timings, finish);
                let usage = openai::usage(&usage);
                let mut last = Vec::new();
                let mut called = false;
                if let Some(calls) = &mut calls {
                    for piece in calls.end() {
                        last.push(answer.piece_chunk(&piece, None, usage_slot()));
                    }
                    called = calls.called();
                }
                let finish = openai::finish_reason(finish, called);
                last.push(answer.chunk(None, None, Some(finish), usage_slot()));
                if parsed.include_usage {
                    last.push(answer.usage_chunk(usage));
                }
                for chunk in last {
                    if !send(chunk).await {
                        return;
                    }
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                return;
            }
            let chunks = match event {
                Event::Text { text, logprobs, .. } => {
                    let logprobs = parsed
                        .logprobs
                        .is_some()
                        .then(|| answer.logprobs(&logprobs, &mut offset, &piece));
                    match &mut calls {
                        None => vec![answer.chunk(Some(&text), logprobs, None, usage_slot())],
                        Some(calls) => {
                            // The log-probabilities ride on the first chunk
                            // (or an empty one, while a call's text is held).
                            let mut logprobs = logprobs;
                            let mut chunks: Vec<Value> = calls
                                .read(&text)
                                .iter()
                                .map(|p| answer.piece_chunk(p, logprobs.take(), usage_slot()))
                                .collect();
                            if let Some(lp) = logprobs {
                                chunks.push(answer.chunk(None, Some(lp), None, usage_slot()));
                            }
                            chunks
                        }
                    }
                }
                Event::Failed(failure) => {
                    let status = failure_status(&failure);
                    submitted.log_failed(&status);
                    let _ = send(error_body(&status, "server_error", None)).await;
                    return;
                }
                Event::Done { .. } => unreachable!("handled above"),
            };
            for chunk in chunks {
                if !send(chunk).await {
                    return;
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn health(State(state): State<HttpState>) -> Response {
    if state.shared.engine.accepting() {
        (StatusCode::OK, "serving\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n").into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError(Status::not_found(
        "no such endpoint (POST /v1/chat/completions, POST /v1/completions, GET /v1/models, \
         /v1/files)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_openai_param() {
        let body = error_body(
            &Status::invalid_argument("chat: no messages"),
            "invalid_request_error",
            None,
        );
        assert_eq!(body["error"]["param"], json!("messages"));
        let body = error_body(&Status::not_found("adapter 'x' not found"), "x", None);
        assert_eq!(body["error"]["param"], Value::Null);
    }
}
