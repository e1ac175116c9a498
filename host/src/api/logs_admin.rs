//! Usage logs: `GET /api/logs` and `/api/logs/stats` for admins,
//! `GET /api/self` and `/api/self/logs` for a user with their own token,
//! and the price table at `/api/pricing`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use bytes::Bytes;
use serde_json::{Value, json};

use super::body;
use super::params::{json_body, list_json, number, optional_u64, paging};
use super::session::SelfAuthed;
use crate::billing::Caller;
use crate::billing::logs::{LogFilter, LogKind, page_before, query, stats};
use crate::billing::pricing::PricingConfig;
use crate::error::ApiError;
use crate::state::AppState;

/// The longest a request's rows can be made after its id: its total
/// timeout plus the longest stream.
fn longest_request_ms(state: &AppState) -> u64 {
    let u = &state.config.upstream;
    u.total_timeout_secs.saturating_add(u.max_stream_secs).saturating_mul(1000)
}

fn filter(q: &HashMap<String, String>) -> Result<LogFilter, ApiError> {
    let kind = match q.get("type").map(String::as_str) {
        None => None,
        Some("consume") => Some(LogKind::Consume),
        Some("error") => Some(LogKind::Error),
        Some("topup") => Some(LogKind::Topup),
        Some(_) => return Err(ApiError::bad_request("`type` must be `consume`, `error` or `topup`").param("type")),
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
        status: optional_u64(q, "status")?
            .map(|s| {
                u16::try_from(s).map_err(|_| ApiError::bad_request("`status` must be an HTTP status").param("status"))
            })
            .transpose()?,
    })
}

/// The log and its rollups (fetched for each use: the store may be reopened).
fn log_trees(state: &AppState) -> Result<(sled::Tree, sled::Tree), ApiError> {
    let unavailable = |_| crate::billing::storage_unavailable();
    Ok((state.billing.logs().map_err(unavailable)?, state.billing.log_rollups().map_err(unavailable)?))
}

/// Most rows one cursor page carries.
const MAX_LIMIT: usize = 500;

/// A page of rows: by cursor (`before_id`, `limit`: fast at any depth,
/// no total) when either is given, else by number (`page`, `per_page`,
/// with the matching total).
async fn page(state: &AppState, f: LogFilter, q: &HashMap<String, String>) -> Result<Json<Value>, ApiError> {
    let f = f.around_request(longest_request_ms(state));
    let (logs, rollups) = log_trees(state)?;
    if q.contains_key("before_id") || q.contains_key("limit") {
        let before = optional_u64(q, "before_id")?;
        let limit = number(q, "limit", 50)?.min(MAX_LIMIT);
        let (rows, more) = tokio::task::spawn_blocking(move || page_before(&logs, &rollups, &f, before, limit))
            .await
            .map_err(|_| ApiError::internal())?;
        let next = if more { rows.last().map(|r| r.id) } else { None };
        let data: Vec<Value> = rows.iter().map(|r| json!(r)).collect();
        return Ok(Json(json!({"object": "list", "data": data, "has_more": more, "next_before_id": next})));
    }
    let paging = paging(q)?;
    let (rows, total) = tokio::task::spawn_blocking(move || query(&logs, &rollups, &f, paging.0, paging.1))
        .await
        .map_err(|_| ApiError::internal())?;
    let data = rows.iter().map(|r| json!(r)).collect();
    Ok(Json(list_json(data, total, paging)))
}

/// `GET /api/logs?start_ms=&end_ms=&user_id=&token=&token_id=&channel_id=&model=&type=&request_id=&status=`
/// `&before_id=&limit=` (or `&page=&per_page=`) — newest first.
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

pub fn own_account(caller: &Caller) -> Result<&crate::billing::Account, ApiError> {
    caller.account.as_ref().ok_or_else(|| {
        ApiError::bad_request("This token is from the configuration file and has no account.").param("authorization")
    })
}

/// `GET /api/self`: the caller's user and token, with live balances.
pub async fn me(State(state): State<AppState>, SelfAuthed(caller): SelfAuthed) -> Result<Json<Value>, ApiError> {
    let acct = own_account(&caller)?;
    let live = state.billing.live(vec![acct.user_id], vec![acct.token.id]).await?;
    let (user, token) = (live.user(acct.user_id), live.token(acct.token.id));
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
    SelfAuthed(caller): SelfAuthed,
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

/// Most rows one CSV export carries.
const MAX_EXPORT: usize = 100_000;

/// One CSV cell: quoted when it holds a separator, a quote or a line
/// break; a leading `=`, `+`, `-` or `@` is defused so a spreadsheet
/// never runs it as a formula.
fn cell(out: &mut String, value: &str) {
    let defused = value.starts_with(['=', '+', '-', '@']);
    if defused || value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        if defused {
            out.push('\'');
        }
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn csv(rows: &[crate::billing::logs::LogRow]) -> String {
    const HEAD: &str = "id,at_ms,type,request_id,user_id,token_name,channel_id,model,upstream_model,\
                        prompt_tokens,completion_tokens,cached_tokens,quota,latency_ms,ttft_ms,stream,status,error_or_note\n";
    let mut out = String::with_capacity(HEAD.len() + rows.len() * 160);
    out.push_str(HEAD);
    for r in rows {
        let kind = match r.kind {
            LogKind::Consume => "consume",
            LogKind::Error => "error",
            LogKind::Topup => "topup",
        };
        let opt = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
        let fields = [
            r.id.to_string(),
            r.at_ms.to_string(),
            kind.to_string(),
            r.request_id.clone(),
            opt(r.user_id),
            r.token_name.clone(),
            r.channel_id.to_string(),
            r.model.clone(),
            r.upstream_model.clone(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.cached_tokens.to_string(),
            r.quota.to_string(),
            r.latency_ms.to_string(),
            opt(r.ttft_ms),
            r.stream.to_string(),
            r.status.to_string(),
            r.error_kind.clone().or_else(|| r.note.clone()).unwrap_or_default(),
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            cell(&mut out, f);
        }
        out.push('\n');
    }
    out
}

/// `GET /api/logs/export?…&limit=` (the filters of `/api/logs`): the
/// matching rows as CSV, newest first, at most 100,000.
pub async fn export(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let f = filter(&q)?.around_request(longest_request_ms(&state));
    let limit = number(&q, "limit", MAX_EXPORT)?.min(MAX_EXPORT);
    let (logs, rollups) = log_trees(&state)?;
    let body = tokio::task::spawn_blocking(move || csv(&page_before(&logs, &rollups, &f, None, limit).0))
        .await
        .map_err(|_| ApiError::internal())?;
    let headers = [
        (axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8"),
        (axum::http::header::CONTENT_DISPOSITION, "attachment; filename=\"wasmgate-logs.csv\""),
    ];
    Ok((headers, body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_formulas_defused() {
        let mut out = String::new();
        cell(&mut out, "a,b");
        out.push('|');
        cell(&mut out, "=cmd()");
        out.push('|');
        cell(&mut out, "say \"hi\"");
        assert_eq!(out, "\"a,b\"|\"'=cmd()\"|\"say \"\"hi\"\"\"");
    }
}
