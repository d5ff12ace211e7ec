//! OpenAI's fine-tuning API: `POST /v1/fine_tuning/jobs`,
//! `GET /v1/fine_tuning/jobs` (`limit`, `after`), `GET …/jobs/{id}`,
//! `GET …/jobs/{id}/events` and `…/checkpoints` (newest first, `limit`,
//! `after`), `POST …/jobs/{id}/cancel`. A caller sees its own tenant's
//! jobs only; `server/jobs` keeps and runs them.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tonic::Status;

use super::{json_body, list_page, random_seed, ApiError, HttpState};
use crate::server::jobs::request;
use crate::server::{openai, store_status};
use crate::store::StoreError;

type PageQuery = Result<Query<HashMap<String, String>>, QueryRejection>;

/// `POST /v1/fine_tuning/jobs`.
pub(super) async fn create(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| openai::invalid("body", format!("not JSON: {e}")))?;
    let request = request::parse(&body, random_seed() % (i32::MAX as u64 + 1))?;
    let shared = &state.shared;
    // The base model, or an SVFit adapter of the caller's to train on.
    let init = if request.model == state.base_model {
        None
    } else {
        let not_tunable = |why: &str| {
            openai::invalid(
                "model",
                format!(
                    "'{}' {why}: name the base model '{}' or one of your SVFit adapters",
                    crate::store::shown(&request.model),
                    state.base_model
                ),
            )
        };
        match shared.store.get(&caller.tenant, &request.model).await {
            Ok(stored) if stored.adapter.is_lora() => {
                return Err(not_tunable("is a LoRA, which is not trained here").into())
            }
            Ok(stored) => Some((stored.id.clone(), stored.version)),
            Err(StoreError::NotFound(_) | StoreError::InvalidName { .. }) => {
                return Err(not_tunable("is not a model of yours").into())
            }
            Err(e) => return Err(store_status(e).into()),
        }
    };
    let mut examples = 0;
    for (param, file) in [
        ("training_file", Some(&request.training_file)),
        ("validation_file", request.validation_file.as_ref()),
    ] {
        let Some(file) = file else { continue };
        let object = shared
            .files
            .get(&caller.tenant, file)
            .await
            .map_err(|e| openai::invalid(param, e.message()))?;
        if param == "training_file" {
            examples = object["svfit"]["examples"].as_u64().unwrap_or(0);
        }
    }
    let job = shared
        .jobs
        .create(&caller.tenant, request, examples, init)
        .await?;
    Ok((StatusCode::OK, json_body(&job)).into_response())
}

/// `limit` and `after` of a list request.
fn page(query: PageQuery, default: usize) -> Result<(usize, Option<String>), Status> {
    let Query(query) = query.map_err(|e| openai::invalid("query", e.body_text()))?;
    let mut limit = default;
    let mut after = None;
    for (key, value) in query {
        match key.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| openai::invalid("limit", "expected 1 to 1000"))?
            }
            "after" => after = Some(value),
            // OpenAI's list takes a metadata filter; none is applied here.
            k if k.starts_with("metadata") => {}
            other => return Err(openai::invalid(other, "unknown query parameter")),
        }
    }
    Ok((limit, after))
}

/// `GET /v1/fine_tuning/jobs`.
pub(super) async fn list(
    State(state): State<HttpState>,
    headers: HeaderMap,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let (limit, after) = page(query, 20)?;
    let jobs = state.shared.jobs.list(&caller.tenant).await?;
    Ok((StatusCode::OK, json_body(&list_page(jobs, limit, after)?)).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub(super) async fn one(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let job = state.shared.jobs.get(&caller.tenant, &id).await?;
    Ok((StatusCode::OK, json_body(&job)).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: newest first.
pub(super) async fn events(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let (limit, after) = page(query, 20)?;
    let mut events = state.shared.jobs.events(&caller.tenant, &id).await?;
    events.reverse();
    Ok((StatusCode::OK, json_body(&list_page(events, limit, after)?)).into_response())
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: newest first.
pub(super) async fn checkpoints(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: PageQuery,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let (limit, after) = page(query, 10)?;
    let job = state.shared.jobs.get(&caller.tenant, &id).await?;
    let mut checkpoints = job["svfit"]["checkpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    checkpoints.reverse();
    let body = list_page(checkpoints, limit, after)?;
    Ok((StatusCode::OK, json_body(&body)).into_response())
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let job = state.shared.jobs.cancel(&caller.tenant, &id).await?;
    Ok((StatusCode::OK, json_body(&job)).into_response())
}
