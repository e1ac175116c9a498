//! `/api/self/tokens`: a user's own API keys, from the self-service view —
//! list, create (within the bounds the administrator set: a number of
//! keys per user, a quota no larger than the user's balance) and revoke.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::accounts_admin::{issue, remove_token, set_name, token_view};
use super::body;
use super::logs_admin::own_account;
use super::params::{json_body, path_id};
use super::session::SelfAuthed;
use crate::billing::accounts::{AccountError, TokenRecord};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::unix_now;

/// Body of `POST /api/self/tokens`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    /// Unix seconds; absent: never.
    expires_at: Option<u64>,
    /// The key's own quota; absent: it spends the user's balance only.
    remain_quota: Option<i64>,
}

/// `GET /api/self/tokens`
pub async fn list(State(state): State<AppState>, SelfAuthed(caller): SelfAuthed) -> Result<Json<Value>, ApiError> {
    let user = own_account(&caller)?.user_id;
    let set = state.billing.accounts.snapshot();
    let mine: Vec<_> = set.tokens.values().filter(|t| t.user_id == user).collect();
    let live = state.billing.live(Vec::new(), mine.iter().map(|t| t.id).collect()).await?;
    let data: Vec<Value> = mine.into_iter().map(|t| token_view(&live, t)).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `POST /api/self/tokens`
pub async fn create(
    State(state): State<AppState>,
    SelfAuthed(caller): SelfAuthed,
    raw: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let user = own_account(&caller)?.user_id;
    let input: NewToken = json_body(&body::take(raw)?)?;
    let owned = state.billing.accounts.snapshot().tokens.values().filter(|t| t.user_id == user).count();
    let most = state.config.console.max_tokens_per_user as usize;
    if owned >= most {
        let msg = format!("You already have {owned} keys, the most allowed; revoke one first.");
        return Err(ApiError::bad_request(msg).param("name"));
    }
    let balance = state.billing.live(vec![user], Vec::new()).await?.user(user).balance;
    if let Some(q) = input.remain_quota
        && !(0..=balance.max(0)).contains(&q)
    {
        let msg = format!("`remain_quota` must be between 0 and your balance ({balance})");
        return Err(ApiError::bad_request(msg).param("remain_quota"));
    }
    if input.expires_at.is_some_and(|at| at <= unix_now()) {
        return Err(ApiError::bad_request("`expires_at` must be in the future").param("expires_at"));
    }
    let mut name = String::new();
    set_name(Some(input.name), true, &mut name)?;
    let token = TokenRecord {
        user_id: user,
        name,
        expires_at: input.expires_at,
        unlimited_quota: input.remain_quota.is_none(),
        remain_quota: input.remain_quota.unwrap_or(0),
        ..TokenRecord::default()
    };
    Ok((StatusCode::CREATED, Json(issue(&state, token).await?)))
}

/// `DELETE /api/self/tokens/{id}`: revoke one of the caller's own keys
/// (another user's is "not found", never "forbidden").
pub async fn revoke(
    State(state): State<AppState>,
    SelfAuthed(caller): SelfAuthed,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = own_account(&caller)?.user_id;
    let id = path_id(&id)?;
    let mine = state.billing.accounts.snapshot().tokens.get(&id).is_some_and(|t| t.user_id == user);
    if !mine {
        return Err(AccountError::NotFound("token").into());
    }
    remove_token(&state, id)
}
