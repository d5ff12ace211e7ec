//! `GET /v1/models` and `GET /v1/models/{id}`: the base model and the
//! caller's adapters (an admin's: every tenant's) as OpenAI model objects;
//! `?limit=N&after=ID` pages through them.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::Status;

use super::{json_body, ApiError, HttpState};
use crate::server::auth::Caller;
use crate::server::{adapters, openai, store_status};

/// A model object: the base, or an adapter with its version.
pub(super) fn model_object(id: &str, created: u64, owned_by: &str, version: Option<u64>) -> Value {
    let mut m = json!({"id": id, "object": "model", "created": created, "owned_by": owned_by});
    if let Some(v) = version {
        m["version"] = json!(v);
    }
    m
}

/// The query of `GET /v1/models`, `?limit=N&after=ID`, as axum's `Query`
/// decodes it; other keys are ignored.
#[derive(Deserialize)]
pub(super) struct PageQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// The page size (0: the default) and the model id to list after, from
/// the query `Query` extracted. Decoding is lossy (bytes that are not
/// UTF-8 become U+FFFD, a `%` without two hex digits stays), so `after`
/// holding either is refused: no model id does.
fn page_query(query: Result<Query<PageQuery>, QueryRejection>) -> Result<(usize, String), Status> {
    let Query(PageQuery { limit, after }) =
        query.map_err(|e| openai::invalid("query", e.body_text()))?;
    let limit = match limit {
        None => 0,
        Some(n) => n
            .parse()
            .map_err(|_| openai::invalid("limit", "expected a whole number"))?,
    };
    let after = after.unwrap_or_default();
    if after.contains(['%', char::REPLACEMENT_CHARACTER]) {
        return Err(openai::invalid(
            "after",
            "expected a model id in percent-encoded UTF-8",
        ));
    }
    Ok((limit, after))
}

/// What the caller may list: its own tenant, or every tenant for an admin
/// key of a server with keys.
fn listed_tenant(state: &HttpState, caller: &Caller) -> Option<String> {
    let all = caller.admin && state.auth.keys.is_some();
    (!all).then(|| caller.tenant.clone())
}

/// An adapter's `model` id as its caller names it.
fn adapter_model_id(caller: &Caller, tenant: &str, id: &str) -> String {
    if tenant == caller.tenant {
        id.to_string()
    } else {
        format!("{tenant}/{id}")
    }
}

/// `GET /v1/models`: a page of the model list, the base model first.
pub(super) async fn list(
    State(state): State<HttpState>,
    headers: HeaderMap,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    let (limit, after) = page_query(query)?;
    let named = listed_tenant(&state, &caller);
    // `after` is a model id as this caller sees it; pages go by tenant/id.
    let token = match after.split_once('/') {
        _ if after.is_empty() => String::new(),
        Some(_) => after.clone(),
        None => format!("{}/{after}", caller.tenant),
    };
    let first_page = after.is_empty();
    let (stored, next) = adapters::list_page(&state.shared, named, limit, token).await?;
    let mut data = Vec::with_capacity(stored.len() + 1);
    if first_page {
        data.push(state.base_model_object());
    }
    for s in &stored {
        let id = adapter_model_id(&caller, &s.tenant, &s.id);
        data.push(model_object(&id, s.created(), &s.tenant, Some(s.version)));
    }
    let last_id = data
        .last()
        .and_then(|m| m["id"].as_str())
        .map(str::to_string);
    let body = json!({
        "object": "list",
        "data": data,
        "has_more": !next.is_empty(),
        "last_id": last_id,
    });
    Ok((StatusCode::OK, json_body(&body)).into_response())
}

/// `GET /v1/models/{id}`: the base model, or one adapter.
pub(super) async fn one(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = state.caller(&headers)?;
    if id == state.base_model {
        let body = state.base_model_object();
        return Ok((StatusCode::OK, json_body(&body)).into_response());
    }
    let (tenant, name) = caller.adapter(&id)?;
    let found = state.shared.store.get(&tenant, &name).await;
    let stored = found.map_err(store_status)?;
    let body = model_object(
        &adapter_model_id(&caller, &stored.tenant, &stored.id),
        stored.created(),
        &stored.tenant,
        Some(stored.version),
    );
    Ok((StatusCode::OK, json_body(&body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// `page_query` of the query of `uri`, extracted as the route does.
    fn page(uri: &str) -> Result<(usize, String), Status> {
        let uri: axum::http::Uri = uri.parse().unwrap();
        page_query(Query::try_from_uri(&uri))
    }

    #[test]
    fn page_queries_decode_and_refuse_garbage() {
        assert_eq!(
            page("/v1/models?limit=5&after=bob%2Fa&other=1").unwrap(),
            (5, "bob/a".to_string())
        );
        assert_eq!(page("/v1/models?after=a+b").unwrap(), (0, "a b".into()));
        assert_eq!(page("/v1/models").unwrap(), (0, String::new()));
        let (whole, id) = (
            "limit: expected a whole number",
            "after: expected a model id in percent-encoded UTF-8",
        );
        for (query, message) in [
            ("limit=x", whole),
            ("limit=", whole),
            ("limit=-1", whole),
            ("after=%ff", id),
            ("after=%4", id),
        ] {
            let status = page(&format!("/v1/models?{query}")).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{query}");
            assert_eq!(status.message(), message, "{query}");
        }
        let twice = page("/v1/models?limit=1&limit=2").unwrap_err();
        assert!(twice.message().starts_with("query: "), "{twice:?}");
        assert!(twice.message().contains("limit"), "{twice:?}");
    }
}
