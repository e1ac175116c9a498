//! `/api/channels`: list (search, filters, pages), create, read, replace,
//! patch, delete and test channels. Keys are masked in every answer.
//! Changes apply to the next request; nothing needs a restart.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Value, json};

use super::body;
use crate::channels::{Channel, ChannelRecord, ChannelStatus, FieldError, Mode, StoreError, parse_input};
use crate::error::ApiError;
use crate::relay::probe;
use crate::state::AppState;
use crate::store::unix_now;

const DEFAULT_PER_PAGE: usize = 20;
const MAX_PER_PAGE: usize = 100;

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::bad_request(e.message).param(&e.field)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => not_found(id),
            StoreError::Invalid(f) => f.into(),
            StoreError::Backend(error) => {
                tracing::error!(%error, "channel store failed");
                ApiError::internal()
            }
        }
    }
}

fn not_found(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("channel_not_found"),
        format!("No channel with id {id}."),
    )
}

fn channel_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request("`id` must be a channel id (a positive integer)").param("id"))
}

fn number(query: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, ApiError> {
    match query.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| ApiError::bad_request(format!("`{name}` must be a positive integer")).param(name)),
    }
}

/// `GET /api/channels?q=&adapter=&group=&status=&tag=&model=&page=&per_page=`
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let page = number(&query, "page", 1)?;
    let per_page = number(&query, "per_page", DEFAULT_PER_PAGE)?.min(MAX_PER_PAGE);
    let status = match query.get("status").map(String::as_str) {
        None => None,
        Some("enabled") => Some(ChannelStatus::Enabled),
        Some("disabled") => Some(ChannelStatus::Disabled),
        Some(_) => return Err(ApiError::bad_request("`status` must be `enabled` or `disabled`").param("status")),
    };
    let snapshot = state.channels.snapshot();
    let field = |name: &str| query.get(name).map(String::as_str);
    let matching: Vec<&ChannelRecord> = snapshot
        .records
        .values()
        .map(AsRef::as_ref)
        .filter(|r| field("q").is_none_or(|q| r.matches(q)))
        .filter(|r| field("adapter").is_none_or(|a| r.adapter == a))
        .filter(|r| field("group").is_none_or(|g| r.groups.iter().any(|x| x == g)))
        .filter(|r| field("tag").is_none_or(|t| r.tags.iter().any(|x| x == t)))
        .filter(|r| field("model").is_none_or(|m| r.models.iter().any(|x| x == m)))
        .filter(|r| status.is_none_or(|s| r.status == s))
        .collect();
    let total = matching.len();
    let data: Vec<Value> =
        matching.into_iter().skip((page - 1) * per_page).take(per_page).map(|r| r.masked()).collect();
    Ok(Json(json!({"object": "list", "data": data, "total": total, "page": page, "per_page": per_page})))
}

/// `POST /api/channels`
pub async fn create(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let input = parse_input(&body::take(raw)?)?;
    let mut rec = ChannelRecord::default();
    input.apply(&mut rec, Mode::Create)?;
    let rec = state.channels.create(rec)?;
    tracing::info!(channel = rec.id, name = %rec.name, adapter = %rec.adapter, "channel created");
    Ok((StatusCode::CREATED, Json(rec.masked())))
}

/// `GET /api/channels/{id}`
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = channel_id(&id)?;
    let snapshot = state.channels.snapshot();
    let rec = snapshot.records.get(&id).ok_or_else(|| not_found(id))?;
    let mut view = rec.masked();
    let stats = state.routing.stats.view(id);
    view["stats"] = json!({
        "latency_ms": stats.latency_ms, "ttft_ms": stats.ttft_ms, "error_rate": stats.error_rate,
        "in_flight": stats.in_flight, "consecutive_failures": stats.consecutive_failures,
    });
    Ok(Json(view))
}

async fn modify(
    state: AppState,
    id: String,
    raw: Result<Bytes, BytesRejection>,
    mode: Mode,
) -> Result<Json<Value>, ApiError> {
    let id = channel_id(&id)?;
    let mut input = Some(parse_input(&body::take(raw)?)?);
    let rec = state.channels.update(id, &mut |rec| match input.take() {
        Some(input) => input.apply(rec, mode),
        None => Ok(()),
    })?;
    tracing::info!(channel = id, ?mode, "channel changed");
    Ok(Json(rec.masked()))
}

/// `PUT /api/channels/{id}`: replace every field (keys kept when absent).
pub async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    modify(state, id, raw, Mode::Replace).await
}

/// `PATCH /api/channels/{id}`: change the fields given.
pub async fn patch(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    modify(state, id, raw, Mode::Patch).await
}

/// `DELETE /api/channels/{id}`
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = channel_id(&id)?;
    let rec = state.channels.delete(id)?;
    tracing::info!(channel = id, name = %rec.name, "channel deleted");
    Ok(Json(json!({"id": id, "object": "channel", "deleted": true})))
}

/// `POST /api/channels/{id}/test`: send the adapter's probe, record the
/// response time.
pub async fn test(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = channel_id(&id)?;
    let rec = state.channels.snapshot().records.get(&id).cloned().ok_or_else(|| not_found(id))?;
    let outcome = probe(&state, &Channel::from_record(&rec)).await;
    let now = unix_now();
    state.channels.update(id, &mut |r| {
        r.test_time = Some(now);
        if outcome.success {
            r.response_time_ms = Some(outcome.time_ms);
        }
        Ok(())
    })?;
    tracing::info!(channel = id, success = outcome.success, time_ms = outcome.time_ms, "channel tested");
    let mut out = serde_json::to_value(&outcome).map_err(|_| ApiError::internal())?;
    out["channel_id"] = json!(id);
    Ok(Json(out))
}
