//! Usage logs: `GET /api/logs` and `/api/logs/stats` for admins,
//! `GET /api/self` and `/api/self/logs` for a user with their own token,
//! and the price table at `/api/pricing`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use bytes::Bytes;
use serde_json::{Value, json};

use super::auth::Authed;
use super::body;
use super::params::{json_body, list_json, optional_u64, paging};
use crate::billing::Caller;
use crate::billing::logs::{LogFilter, LogKind, query, stats};
use crate::billing::pricing::PricingConfig;
use crate::error::ApiError;
use crate::state::AppState;

fn filter(q: &HashMap<String, String>) -> Result<LogFilter, ApiError> {
    let kind = match q.get("type").map(String::as_str) {
        None => None,
        Some("consume") => Some(LogKind::Consume),
        Some("error") => Some(LogKind::Error),
        Some(_) => return Err(ApiError::bad_request("`type` must be `consume` or `error`").param("type")),
    };
    Ok(LogFilter {
        start_ms: optional_u64(q, "start_ms")?,
        end_ms: optional_u64(q, "end_ms")?,
        user_id: optional_u64(q, "user_id")?,
        token_id: optional_u64(q, "token_id")?,
        token_name: q.get("token").cloned(),
        channel_id: optional_u64(q, "channel_id")?,
        model: q.get("model").cloned(),
        kind,
        request_id: q.get("request_id").cloned(),
    })
}

async fn page(state: &AppState, f: LogFilter, q: &HashMap<String, String>) -> Result<Json<Value>, ApiError> {
    let paging = paging(q)?;
    let tree = state.billing.logs().map_err(|_| crate::billing::storage_unavailable())?;
    let (rows, total) = tokio::task::spawn_blocking(move || query(&tree, &f, paging.0, paging.1))
        .await
        .map_err(|_| ApiError::internal())?;
    let data = rows.iter().map(|r| json!(r)).collect();
    Ok(Json(list_json(data, total, paging)))
}

/// `GET /api/logs?start_ms=&end_ms=&user_id=&token=&token_id=&channel_id=&model=&type=&request_id=&page=&per_page=`
/// — newest first.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let f = filter(&q)?;
    page(&state, f, &q).await
}

/// `GET /api/logs/stats?by=day|model|channel|user|token` (same filters).
pub async fn summary(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let by = q.get("by").cloned().unwrap_or_else(|| "day".into());
    if !["day", "model", "channel", "user", "token"].contains(&by.as_str()) {
        return Err(ApiError::bad_request("`by` must be day, model, channel, user or token").param("by"));
    }
    let f = filter(&q)?;
    let tree = state.billing.logs().map_err(|_| crate::billing::storage_unavailable())?;
    let sums = tokio::task::spawn_blocking(move || stats(&tree, &f, &by)).await.map_err(|_| ApiError::internal())?;
    Ok(Json(json!({"object": "stats", "data": sums})))
}

fn own_account(caller: &Caller) -> Result<&crate::billing::Account, ApiError> {
    caller.account.as_ref().ok_or_else(|| {
        ApiError::bad_request("This token is from the configuration file and has no account.").param("authorization")
    })
}

/// `GET /api/self`: the caller's user and token, with live balances.
pub async fn me(State(state): State<AppState>, Authed(caller): Authed) -> Result<Json<Value>, ApiError> {
    let acct = own_account(&caller)?;
    let user = state.billing.ledger.user(acct.user_id);
    let token = state.billing.ledger.token(acct.token.id);
    Ok(Json(json!({
        "object": "self", "user_id": acct.user_id, "group": &*caller.group,
        "quota": user.balance, "used_quota": user.used, "request_count": user.requests,
        "token": {"id": acct.token.id, "name": acct.token.name, "unlimited_quota": acct.token.unlimited_quota,
                  "remain_quota": if acct.token.unlimited_quota { Value::Null } else { json!(token.balance) },
                  "used_quota": token.used, "expires_at": acct.token.expires_at},
    })))
}

/// `GET /api/self/logs`: the caller's own rows (all their tokens).
pub async fn my_logs(
    State(state): State<AppState>,
    Authed(caller): Authed,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let acct = own_account(&caller)?;
    let mut f = filter(&q)?;
    f.user_id = Some(acct.user_id);
    page(&state, f, &q).await
}

/// `GET /api/pricing`
pub async fn get_pricing(State(state): State<AppState>) -> Json<Value> {
    Json(json!(*state.billing.pricing.table()))
}

/// `PUT /api/pricing`: replace the table durably.
pub async fn put_pricing(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let table: PricingConfig = json_body(&body::take(raw)?)?;
    state.billing.pricing.set(table).map_err(|(field, message)| ApiError::bad_request(message).param(&field))?;
    Ok(Json(json!(*state.billing.pricing.table())))
}

/// `DELETE /api/pricing`: back to the configuration's table.
pub async fn reset_pricing(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.billing.pricing.reset().map_err(|_| ApiError::internal())?;
    Ok(Json(json!(*state.billing.pricing.table())))
}
