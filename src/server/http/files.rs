//! OpenAI's files API for fine-tuning data: `POST /v1/files` (multipart:
//! `purpose` and `file`), `GET /v1/files` (`?purpose=`, `limit`, `order`,
//! `after`),
//! `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
//! `DELETE /v1/files/{id}`. A caller sees its own tenant's files only (an
//! admin key's are its own too); `server/files.rs` checks and keeps them.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Status;

use super::{json_body, ApiError, HttpState};
use crate::server::openai;

/// The multipart body a file may come in: the file at its limit plus room
/// for the other field and the part headers.
pub(super) fn body_limit(state: &HttpState) -> usize {
    state.shared.limits.file_bytes + (64 << 10)
}

/// `POST /v1/files`.
pub(super) async fn create(
    State(state): State<HttpState>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let mut multipart =
        multipart.map_err(|e| openai::invalid("file", format!("a multipart form: {e}")))?;
    let _turn = state.shared.files.turn().await?;
    let timeout = state.shared.config.upload_timeout;
    let read = tokio::time::timeout(timeout, async {
        let (mut purpose, mut file) = (None, None);
        while let Some(field) = multipart.next_field().await.map_err(too_large)? {
            match field.name().unwrap_or("") {
                "purpose" => purpose = Some(field.text().await.map_err(too_large)?),
                "file" => {
                    let name = field.file_name().unwrap_or("file.jsonl").to_string();
                    file = Some((name, field.bytes().await.map_err(too_large)?.to_vec()));
                }
                other => {
                    return Err(openai::invalid(
                        other,
                        "unknown field (purpose and file are taken)",
                    ))
                }
            }
        }
        Ok((purpose, file))
    });
    let (purpose, file) = read.await.map_err(|_| {
        openai::invalid(
            "file",
            format!("the upload did not arrive within {} s", timeout.as_secs()),
        )
    })??;
    let purpose = purpose.ok_or_else(|| openai::invalid("purpose", "required"))?;
    let (filename, bytes) = file.ok_or_else(|| openai::invalid("file", "required"))?;
    let shared = &state.shared;
    let object = shared
        .files
        .create(shared, &caller.tenant, &filename, &purpose, bytes)
        .await?;
    Ok((StatusCode::OK, json_body(&object)).into_response())
}

/// A multipart body that broke off or went over the limit.
fn too_large(e: axum::extract::multipart::MultipartError) -> Status {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Status::out_of_range(format!("file: {}", e.body_text()))
    } else {
        openai::invalid("file", e.body_text())
    }
}

/// `GET /v1/files`: the caller's files, newest first.
pub(super) async fn list(
    State(state): State<HttpState>,
    headers: HeaderMap,
    query: Result<Query<std::collections::HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let Query(query) = query.map_err(|e| openai::invalid("query", e.body_text()))?;
    let mut purpose = None;
    let mut limit = 10_000;
    let mut ascending = false;
    let mut after = None;
    for (key, value) in &query {
        match key.as_str() {
            "purpose" => purpose = Some(value.clone()),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| openai::invalid("limit", "expected 1 to 10000"))?
            }
            "order" => {
                ascending = match value.as_str() {
                    "asc" => true,
                    "desc" => false,
                    _ => return Err(openai::invalid("order", "expected asc or desc").into()),
                }
            }
            "after" => after = Some(value.clone()),
            other => return Err(openai::invalid(other, "unknown query parameter").into()),
        }
    }
    // Newest first, or oldest first with `order=asc`; a page starts after
    // the file `after` names.
    let mut files = state.shared.files.list(&caller.tenant).await?;
    if let Some(p) = purpose {
        files.retain(|f| f["purpose"] == p.as_str());
    }
    if ascending {
        files.reverse();
    }
    let body = super::list_page(files, limit, after)?;
    Ok((StatusCode::OK, json_body(&body)).into_response())
}

/// `GET /v1/files/{id}`.
pub(super) async fn one(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let object = state.shared.files.get(&caller.tenant, &id).await?;
    Ok((StatusCode::OK, json_body(&object)).into_response())
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded.
pub(super) async fn content(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let bytes = state.shared.files.content(&caller.tenant, &id).await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`.
pub(super) async fn delete(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    state.shared.files.delete(&caller.tenant, &id).await?;
    let body = json!({"id": id, "object": "file", "deleted": true});
    Ok((StatusCode::OK, json_body(&body)).into_response())
}
