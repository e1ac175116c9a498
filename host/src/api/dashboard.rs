//! `GET /api/dashboard?range=hour|day|week` (admins) and
//! `GET /api/self/dashboard` (a user's own usage): chart series, totals
//! and top lists read from the usage rollups, plus — for admins — channel
//! health by state, plugins loaded and the billing writer's lag.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use serde_json::{Value, json};

use super::session::SelfAuthed;
use crate::billing::dashboard::{Range, figures};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::unix_now_ms;

fn range(q: &HashMap<String, String>) -> Result<Range, ApiError> {
    let raw = q.get("range").map_or("day", String::as_str);
    Range::parse(raw).ok_or_else(|| ApiError::bad_request("`range` must be hour, day or week").param("range"))
}

async fn read(state: &AppState, range: Range, user: Option<u64>) -> Result<Value, ApiError> {
    let rollups = state.billing.log_rollups().map_err(|_| crate::billing::storage_unavailable())?;
    let figures = tokio::task::spawn_blocking(move || figures(&rollups, range, unix_now_ms(), user))
        .await
        .map_err(|_| ApiError::internal())?;
    Ok(json!(figures))
}

/// `GET /api/dashboard`
pub async fn admin(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let mut out = read(&state, range(&q)?, None).await?;
    let snapshot = state.channels.snapshot();
    let by_state = super::status::channels_by_state(&snapshot);
    let plugins = state.registry.snapshot();
    let writer = state.billing.writer.gauges();
    out["object"] = json!("dashboard");
    out["channels"] = json!({"total": snapshot.records.len(), "by_status": by_state});
    out["plugins"] = json!({"adapters": plugins.adapters.len(), "routers": plugins.routers.len()});
    out["billing"] = json!({
        "pending_rows": writer.pending,
        "last_commit_age_ms": writer.last_commit_age.as_millis() as u64,
        "journal_bytes": writer.journal_bytes,
    });
    Ok(Json(out))
}

/// `GET /api/self/dashboard`: the signed-in user's own series and totals.
pub async fn own(
    State(state): State<AppState>,
    SelfAuthed(caller): SelfAuthed,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let account = super::logs_admin::own_account(&caller)?;
    let mut out = read(&state, range(&q)?, Some(account.user_id)).await?;
    out["object"] = json!("dashboard");
    Ok(Json(out))
}
