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
use super::params::{paged, paging, path_id};
use crate::channels::{Channel, ChannelRecord, FieldError, Mode, StoreError, parse_input};
use crate::channels::{ChannelState, EventSource};
use crate::error::ApiError;
use crate::relay::probe;
use crate::state::AppState;
use crate::store::unix_now_ms;

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
            StoreError::Backend(error) if crate::store::is_unavailable(&error) => crate::billing::storage_unavailable(),
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

/// `GET /api/channels?q=&adapter=&group=&status=&tag=&model=&page=&per_page=`
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let paging = paging(&query)?;
    let status = match query.get("status").map(String::as_str) {
        None => None,
        Some(s) if ChannelState::NAMES.contains(&s) => Some(s),
        Some(_) => {
            let msg = format!("`status` must be one of {}", ChannelState::NAMES.join(", "));
            return Err(ApiError::bad_request(msg).param("status"));
        }
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
        .filter(|r| status.is_none_or(|s| r.status.name() == s))
        .collect();
    Ok(Json(paged(&matching, paging, |r| with_stats(&state, r))))
}

/// A channel as the API shows it, with its live routing statistics.
fn with_stats(state: &AppState, rec: &ChannelRecord) -> Value {
    let mut view = rec.masked();
    let stats = state.routing.stats.view(rec.id);
    view["stats"] = json!({
        "latency_ms": stats.latency_ms, "ttft_ms": stats.ttft_ms, "error_rate": stats.error_rate,
        "in_flight": stats.in_flight, "consecutive_failures": stats.consecutive_failures,
    });
    view
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
    let id = path_id(&id)?;
    let snapshot = state.channels.snapshot();
    let rec = snapshot.records.get(&id).ok_or_else(|| not_found(id))?;
    Ok(Json(with_stats(&state, rec)))
}

async fn modify(
    state: AppState,
    id: String,
    raw: Result<Bytes, BytesRejection>,
    mode: Mode,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
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
    let id = path_id(&id)?;
    let rec = state.channels.delete(id)?;
    tracing::info!(channel = id, name = %rec.name, "channel deleted");
    Ok(Json(json!({"id": id, "object": "channel", "deleted": true})))
}

/// Probe `rec` and record the result: test time and response time always;
/// an `auto_disabled` channel that answers is enabled again (a test never
/// touches a channel an admin disabled, nor `needs_attention`).
async fn test_one(state: &AppState, rec: &ChannelRecord) -> Result<Value, ApiError> {
    let id = rec.id;
    let channel = match rec.keys.iter().position(|k| k.enabled || k.auto.is_some()) {
        Some(i) if rec.keys.iter().all(|k| !k.enabled) => Channel::with_only_key(rec, i),
        _ => Channel::from_record(rec),
    };
    let outcome = probe(state, &channel).await;
    let now = unix_now_ms();
    state.channels.update(id, &mut |r| {
        r.test_time = Some(now / 1000);
        if outcome.success {
            r.response_time_ms = Some(outcome.time_ms);
            if matches!(r.status, ChannelState::AutoDisabled { .. }) {
                r.restore(EventSource::Probe, &format!("test succeeded in {} ms", outcome.time_ms), now);
            }
        }
        Ok(())
    })?;
    tracing::info!(channel = id, success = outcome.success, time_ms = outcome.time_ms, "channel tested");
    let mut out = serde_json::to_value(&outcome).map_err(|_| ApiError::internal())?;
    out["channel_id"] = json!(id);
    Ok(out)
}

/// `POST /api/channels/{id}/test`: send the adapter's probe, record the
/// response time.
pub async fn test(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let rec = state.channels.snapshot().records.get(&id).cloned().ok_or_else(|| not_found(id))?;
    Ok(Json(test_one(&state, &rec).await?))
}

/// `POST /api/channels/test`: test every channel now, except those an admin
/// disabled, a few at a time.
pub async fn test_all(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    use futures_util::StreamExt;
    let records: Vec<_> = state
        .channels
        .snapshot()
        .records
        .values()
        .filter(|r| !matches!(r.status, ChannelState::ManuallyDisabled { .. }))
        .cloned()
        .collect();
    let concurrency = state.health.config().probe_concurrency.max(1);
    let results: Vec<Result<Value, ApiError>> = futures_util::stream::iter(records)
        .map(|r| {
            let state = state.clone();
            async move { test_one(&state, &r).await }
        })
        .buffered(concurrency)
        .collect()
        .await;
    let data = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Optional body of enable / disable: `{"note": "..."}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Note {
    #[serde(default)]
    note: String,
}

fn note(raw: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    let bytes = body::take(raw)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let n: Note =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("`note`: {e}")).param("note"))?;
    if n.note.chars().count() > 500 {
        return Err(ApiError::bad_request("`note` must be at most 500 characters").param("note"));
    }
    Ok(n.note)
}

/// `POST /api/channels/{id}/enable`: back in service from any state, with
/// the keys that were disabled automatically.
pub async fn enable(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let note = note(raw)?;
    let rec = state.channels.update(id, &mut |r| {
        r.enable_manually(&note, unix_now_ms());
        Ok(())
    })?;
    tracing::info!(channel = id, note, "channel enabled by an admin");
    Ok(Json(rec.masked()))
}

/// `POST /api/channels/{id}/disable`: out of service until an admin
/// enables it; nothing automatic ever does.
pub async fn disable(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let note = note(raw)?;
    let rec = state.channels.update(id, &mut |r| {
        r.disable_manually("admin", &note, unix_now_ms());
        Ok(())
    })?;
    tracing::info!(channel = id, note, "channel disabled by an admin");
    Ok(Json(rec.masked()))
}
