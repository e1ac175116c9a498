//! `/api/users` and `/api/tokens`: the same conventions as `/api/channels`
//! (JSON bodies, unknown fields refused, errors naming the field, `page` /
//! `per_page`). Balances shown are the live ones; a token's full key is in
//! the answer to its creation only.

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::body;
use super::params::{json_body, optional_u64, paged, paging, path_id};
use crate::billing::Live;
use crate::billing::accounts::{AccountError, Role, Status, TokenRecord, UserRecord};
use crate::error::ApiError;
use crate::state::AppState;

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::NotFound(what) => {
                let code = if what == "token" { "token_not_found" } else { "user_not_found" };
                ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some(code), format!("No such {what}."))
            }
            AccountError::Invalid(field, message) => ApiError::bad_request(message).param(&field),
            AccountError::Backend(error) if crate::store::is_unavailable(&error) => {
                crate::billing::storage_unavailable()
            }
            AccountError::Backend(error) => {
                tracing::error!(%error, "account store failed");
                ApiError::internal()
            }
        }
    }
}

fn invalid(field: &str, message: &str) -> AccountError {
    AccountError::Invalid(field.to_string(), format!("`{field}` {message}"))
}

/// Apply a `name` field: trimmed, 1 to 64 characters, required on create
/// and replace.
pub(super) fn set_name(name: Option<String>, required: bool, target: &mut String) -> Result<(), AccountError> {
    match name.map(|n| n.trim().to_string()) {
        Some(n) if n.is_empty() || n.chars().count() > 64 => Err(invalid("name", "must be 1 to 64 characters")),
        Some(n) => {
            *target = n;
            Ok(())
        }
        None if required => Err(invalid("name", "is required")),
        None => Ok(()),
    }
}

/// A user as the API shows it, with live balances.
fn user_view(live: &Live, u: &UserRecord) -> Value {
    let live = live.user(u.id);
    json!({
        "id": u.id, "object": "user", "name": u.name, "role": u.role, "group": u.group, "status": u.status,
        "quota": live.balance, "used_quota": live.used, "request_count": live.requests,
        "reserved_quota": live.reserved, "created_at": u.created_at,
    })
}

/// A token as the API shows it (never the key).
pub fn token_view(live: &Live, t: &TokenRecord) -> Value {
    let live = live.token(t.id);
    json!({
        "id": t.id, "object": "token", "name": t.name, "user_id": t.user_id, "key": t.key_hint,
        "status": t.status, "expires_at": t.expires_at, "unlimited_quota": t.unlimited_quota,
        "remain_quota": if t.unlimited_quota { Value::Null } else { json!(live.balance) },
        "used_quota": live.used, "models": t.models, "subnets": t.subnets,
        "rpm": t.rpm, "tpm": t.tpm, "concurrency": t.concurrency, "streams": t.streams, "created_at": t.created_at,
    })
}

/// Body of `POST`/`PUT`/`PATCH /api/users`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserInput {
    name: Option<String>,
    role: Option<Role>,
    group: Option<String>,
    /// Remaining quota; setting it records the difference as an adjustment.
    quota: Option<i64>,
    status: Option<Status>,
}

impl UserInput {
    fn apply(self, u: &mut UserRecord, required: bool) -> Result<(), AccountError> {
        set_name(self.name, required, &mut u.name)?;
        if let Some(g) = self.group {
            if g.is_empty() || !g.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
                return Err(invalid("group", "must be letters, digits, `-`, `_` or `.`"));
            }
            u.group = g;
        }
        if let Some(r) = self.role {
            u.role = r;
        }
        if let Some(s) = self.status {
            u.status = s;
        }
        Ok(())
    }
}

/// `GET /api/users?q=&group=&page=&per_page=`
pub async fn list_users(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let paging = paging(&query)?;
    let set = state.billing.accounts.snapshot();
    let q = query.get("q").map(|q| q.to_lowercase());
    let matching: Vec<_> = set
        .users
        .values()
        .filter(|u| q.as_deref().is_none_or(|q| u.name.to_lowercase().contains(q)))
        .filter(|u| query.get("group").is_none_or(|g| &u.group == g))
        .collect();
    let live = state.billing.live(matching.iter().map(|u| u.id).collect(), Vec::new()).await?;
    Ok(Json(paged(&matching, paging, |u| user_view(&live, u))))
}

/// `POST /api/users`
pub async fn create_user(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let input: UserInput = json_body(&body::take(raw)?)?;
    let quota = input.quota.unwrap_or(0);
    if quota < 0 {
        return Err(ApiError::bad_request("`quota` must be ≥ 0").param("quota"));
    }
    let mut user = UserRecord::default();
    input.apply(&mut user, true)?;
    user.quota = quota;
    let user = state.billing.accounts.create_user(user)?;
    if !state.billing.is_shared() {
        state.billing.ledger.open_user(user.id, user.quota);
    }
    tracing::info!(user = user.id, name = %user.name, quota, "user created");
    Ok((StatusCode::CREATED, Json(user_view(&state.billing.live(vec![user.id], Vec::new()).await?, &user))))
}

/// `GET /api/users/{id}`
pub async fn get_user(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let set = state.billing.accounts.snapshot();
    let user = set.users.get(&id).ok_or(AccountError::NotFound("user"))?;
    Ok(Json(user_view(&state.billing.live(vec![user.id], Vec::new()).await?, user)))
}

async fn modify_user(
    state: AppState,
    id: String,
    raw: Result<Bytes, BytesRejection>,
    required: bool,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let mut input: UserInput = json_body(&body::take(raw)?)?;
    let quota = input.quota.take();
    if quota.is_some_and(|q| q < 0) {
        return Err(ApiError::bad_request("`quota` must be ≥ 0").param("quota"));
    }
    let mut input = Some(input);
    let user = state.billing.accounts.update_user(id, &mut |u| match input.take() {
        Some(i) => i.apply(u, required),
        None => Ok(()),
    })?;
    if let Some(target) = quota {
        let delta = state.billing.set_balance(Some(id), None, target).map_err(|e| {
            tracing::error!(error = %e, user = id, "a quota change could not be recorded");
            crate::billing::storage_unavailable()
        })?;
        tracing::info!(user = id, delta, "user quota set");
    }
    Ok(Json(user_view(&state.billing.live(vec![user.id], Vec::new()).await?, &user)))
}

/// `PUT /api/users/{id}`
pub async fn replace_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    modify_user(state, id, raw, true).await
}

/// `PATCH /api/users/{id}`
pub async fn patch_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    modify_user(state, id, raw, false).await
}

/// `DELETE /api/users/{id}`: the user and their tokens (log rows stay).
pub async fn delete_user(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let tokens: Vec<u64> =
        state.billing.accounts.snapshot().tokens.values().filter(|t| t.user_id == id).map(|t| t.id).collect();
    state.billing.accounts.delete_user(id)?;
    state.billing.ledger.close(Some(id), None);
    for t in tokens {
        state.billing.ledger.close(None, Some(t));
    }
    Ok(Json(json!({"id": id, "object": "user", "deleted": true})))
}

/// Body of `POST /api/users/{id}/topup`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUp {
    /// Quota to add (negative deducts).
    amount: i64,
    /// Why; shown in the usage log.
    #[serde(default)]
    note: String,
}

/// `POST /api/users/{id}/topup` `{"amount": …, "note": "…"}`: add to (or
/// deduct from) a user's balance, recorded in the usage log as a `topup`
/// row with the note.
pub async fn top_up(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let input: TopUp = json_body(&body::take(raw)?)?;
    if input.amount == 0 {
        return Err(ApiError::bad_request("`amount` must not be 0").param("amount"));
    }
    if input.note.chars().count() > 500 {
        return Err(ApiError::bad_request("`note` must be at most 500 characters").param("note"));
    }
    let set = state.billing.accounts.snapshot();
    let user = set.users.get(&id).ok_or(AccountError::NotFound("user"))?;
    state.billing.top_up(id, input.amount, input.note.trim()).map_err(|e| {
        tracing::error!(error = %e, user = id, "a top-up could not be recorded");
        crate::billing::storage_unavailable()
    })?;
    tracing::info!(user = id, amount = input.amount, "user topped up");
    Ok(Json(user_view(&state.billing.live(vec![user.id], Vec::new()).await?, user)))
}

/// Body of `POST`/`PUT`/`PATCH /api/tokens`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenInput {
    name: Option<String>,
    user_id: Option<u64>,
    status: Option<Status>,
    expires_at: Option<u64>,
    /// The token's own quota; absent or `null` with `unlimited_quota`.
    remain_quota: Option<i64>,
    unlimited_quota: Option<bool>,
    models: Option<Vec<String>>,
    subnets: Option<Vec<String>>,
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrency: Option<u32>,
    streams: Option<u32>,
}

impl TokenInput {
    fn apply(self, t: &mut TokenRecord, required: bool) -> Result<(), AccountError> {
        set_name(self.name, required, &mut t.name)?;
        if let Some(s) = self.status {
            t.status = s;
        }
        if self.expires_at.is_some() {
            t.expires_at = self.expires_at;
        }
        if let Some(u) = self.unlimited_quota {
            t.unlimited_quota = u;
        }
        if let Some(models) = self.models {
            if models.iter().any(|m| m.trim().is_empty()) {
                return Err(invalid("models", "must not contain empty names"));
            }
            t.models = models;
        }
        if let Some(subnets) = self.subnets {
            for (i, s) in subnets.iter().enumerate() {
                if s.parse::<ipnet::IpNet>().is_err() && s.parse::<std::net::IpAddr>().is_err() {
                    return Err(invalid(&format!("subnets[{i}]"), "must be an IP address or a CIDR block"));
                }
            }
            t.subnets = subnets;
        }
        for (name, zero) in [
            ("rpm", self.rpm == Some(0)),
            ("tpm", self.tpm == Some(0)),
            ("concurrency", self.concurrency == Some(0)),
            ("streams", self.streams == Some(0)),
        ] {
            if zero {
                return Err(invalid(name, "must be at least 1 (omit it for the default)"));
            }
        }
        (t.rpm, t.tpm, t.concurrency) = (self.rpm.or(t.rpm), self.tpm.or(t.tpm), self.concurrency.or(t.concurrency));
        t.streams = self.streams.or(t.streams);
        Ok(())
    }
}

/// `GET /api/tokens?user_id=&q=&page=&per_page=`
pub async fn list_tokens(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let paging = paging(&query)?;
    let user = optional_u64(&query, "user_id")?;
    let set = state.billing.accounts.snapshot();
    let q = query.get("q").map(|q| q.to_lowercase());
    let matching: Vec<_> = set
        .tokens
        .values()
        .filter(|t| user.is_none_or(|u| t.user_id == u))
        .filter(|t| q.as_deref().is_none_or(|q| t.name.to_lowercase().contains(q)))
        .collect();
    let live = state.billing.live(Vec::new(), matching.iter().map(|t| t.id).collect()).await?;
    Ok(Json(paged(&matching, paging, |t| token_view(&live, t))))
}

/// `POST /api/tokens`: the answer carries the full `key`, this once.
pub async fn create_token(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let input: TokenInput = json_body(&body::take(raw)?)?;
    let user_id = input.user_id.ok_or_else(|| ApiError::bad_request("`user_id` is required").param("user_id"))?;
    let remain = input.remain_quota;
    if remain.is_some_and(|q| q < 0) {
        return Err(ApiError::bad_request("`remain_quota` must be ≥ 0").param("remain_quota"));
    }
    let mut token = TokenRecord { user_id, unlimited_quota: remain.is_none(), ..TokenRecord::default() };
    input.apply(&mut token, true)?;
    token.remain_quota = remain.unwrap_or(0);
    Ok((StatusCode::CREATED, Json(issue(&state, token).await?)))
}

/// Store a new token and open its balance; the view carries the full
/// key, this once.
pub async fn issue(state: &AppState, token: TokenRecord) -> Result<Value, ApiError> {
    let (token, key) = state.billing.accounts.create_token(token)?;
    if !state.billing.is_shared() {
        state.billing.ledger.open_token(token.id, token.remain_quota);
    }
    tracing::info!(token = token.id, user = token.user_id, name = %token.name, "token created");
    let mut view = token_view(&state.billing.live(Vec::new(), vec![token.id]).await?, &token);
    view["key"] = json!(key);
    Ok(view)
}

/// `GET /api/tokens/{id}`
pub async fn get_token(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let set = state.billing.accounts.snapshot();
    let token = set.tokens.get(&id).ok_or(AccountError::NotFound("token"))?;
    Ok(Json(token_view(&state.billing.live(Vec::new(), vec![token.id]).await?, token)))
}

async fn modify_token(
    state: AppState,
    id: String,
    raw: Result<Bytes, BytesRejection>,
    required: bool,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(&id)?;
    let mut input: TokenInput = json_body(&body::take(raw)?)?;
    if input.user_id.is_some() {
        return Err(
            ApiError::bad_request("`user_id` cannot change; create a token for the other user").param("user_id")
        );
    }
    let remain = input.remain_quota.take();
    if remain.is_some_and(|q| q < 0) {
        return Err(ApiError::bad_request("`remain_quota` must be ≥ 0").param("remain_quota"));
    }
    let mut input = Some(input);
    let token = state.billing.accounts.update_token(id, &mut |t| match input.take() {
        Some(i) => i.apply(t, required),
        None => Ok(()),
    })?;
    if let Some(target) = remain {
        let delta = state.billing.set_balance(None, Some(id), target).map_err(|e| {
            tracing::error!(error = %e, token = id, "a quota change could not be recorded");
            crate::billing::storage_unavailable()
        })?;
        tracing::info!(token = id, delta, "token quota set");
    }
    Ok(Json(token_view(&state.billing.live(Vec::new(), vec![token.id]).await?, &token)))
}

/// `PUT /api/tokens/{id}`
pub async fn replace_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    modify_token(state, id, raw, true).await
}

/// `PATCH /api/tokens/{id}`
pub async fn patch_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    modify_token(state, id, raw, false).await
}

/// `DELETE /api/tokens/{id}`
pub async fn delete_token(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    remove_token(&state, path_id(&id)?)
}

/// Delete token `id` and close its balance; the answer says so.
pub(super) fn remove_token(state: &AppState, id: u64) -> Result<Json<Value>, ApiError> {
    state.billing.accounts.delete_token(id)?;
    state.billing.ledger.close(None, Some(id));
    Ok(Json(json!({"id": id, "object": "token", "deleted": true})))
}
