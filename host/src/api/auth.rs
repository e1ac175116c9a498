//! Bearer-token checks for `/v1` (gateway tokens) and `/api` (admin token).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;

use crate::billing::accounts::Status;
use crate::billing::{Account, Caller};
use crate::console::sessions::Role;
use crate::error::ApiError;
use crate::state::{AppState, hashes_equal, secret_hash};
use crate::store::unix_now;

/// The presented key: `Authorization: Bearer KEY` (the scheme in any
/// case, RFC 9110), or `api-key` / `x-api-key` / `x-goog-api-key` as
/// Azure-, Anthropic- and Gemini-style clients send it. An `Authorization` header without the
/// `Bearer` scheme presents nothing.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let (scheme, key) = v.split_once([' ', '\t'])?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        return Some(key.trim()).filter(|k| !k.is_empty());
    }
    ["api-key", "x-api-key", "x-goog-api-key"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// No credentials at all: OpenAI's answer.
pub fn missing() -> ApiError {
    let mut e = ApiError::unauthorized(
        "You didn't provide an API key. You need to provide your API key in an Authorization header \
         using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    );
    e.code = None;
    e
}

fn refused(status: StatusCode, code: &'static str, message: &str) -> ApiError {
    ApiError::new(status, "invalid_request_error", Some(code), message)
}

/// Whether `ip` is inside one of `subnets` (addresses or CIDR blocks).
fn ip_allowed(ip: Option<IpAddr>, subnets: &[String]) -> bool {
    if subnets.is_empty() {
        return true;
    }
    let Some(ip) = ip else { return false };
    subnets.iter().any(|s| match s.parse::<IpNet>() {
        Ok(net) => net.contains(&ip),
        Err(_) => s.parse::<IpAddr>().is_ok_and(|a| a == ip),
    })
}

/// Who is calling, or the response refusing them: a token created through
/// the API (checked for status, expiry, owner and client address), else a
/// token from the configuration file.
pub fn identify(state: &AppState, key: &str, ip: Option<IpAddr>) -> Result<Caller, ApiError> {
    identify_hash(state, &secret_hash(key), ip)
}

/// [`identify`] by the key's SHA-256 (a console session keeps only that).
pub fn identify_hash(state: &AppState, hash: &[u8; 32], ip: Option<IpAddr>) -> Result<Caller, ApiError> {
    let accounts = state.billing.accounts.snapshot();
    if let Some((token, user)) = accounts.by_key_hash(hash) {
        if token.status != Status::Enabled {
            return Err(refused(StatusCode::UNAUTHORIZED, "token_disabled", "This API key has been disabled."));
        }
        if token.expires_at.is_some_and(|at| at <= unix_now()) {
            return Err(refused(StatusCode::UNAUTHORIZED, "token_expired", "This API key has expired."));
        }
        if user.status != Status::Enabled {
            let msg = "This key is associated with a deactivated account.";
            return Err(refused(StatusCode::UNAUTHORIZED, "account_deactivated", msg));
        }
        if !ip_allowed(ip, &token.subnets) {
            let msg = "This API key is not allowed from your IP address.";
            return Err(refused(StatusCode::FORBIDDEN, "ip_not_allowed", msg));
        }
        let account = Account { user_id: user.id, token: token.clone() };
        return Ok(Caller { group: Arc::from(user.group.as_str()), account: Some(account), config_token: None });
    }
    match state.token_groups.get(hash) {
        Some((group, index)) => Ok(Caller { group: group.clone(), account: None, config_token: Some(*index) }),
        None => Err(ApiError::unauthorized("Incorrect API key provided.")),
    }
}

/// The client's address, when the server recorded it (tests may serve the
/// router without it).
pub fn client_ip(parts: &Parts) -> Option<IpAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

/// The authenticated caller of a `/v1` (or `/api/self`) handler: a valid
/// gateway token is required. Tokens are looked up by their SHA-256, so
/// lookup time says nothing about the secret. (An extractor rather than a
/// middleware layer: no boxed future per request.)
pub struct Authed(pub Caller);

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_key(&parts.headers).ok_or_else(missing)?;
        identify(state, key, client_ip(parts)).map(Authed)
    }
}

/// The caller of a Gemini-style route: a gateway token in the headers
/// [`Authed`] reads, or in the `key` query parameter as Google's clients
/// may send it.
pub struct GeminiAuthed(pub Caller);

impl FromRequestParts<AppState> for GeminiAuthed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let from_query = || {
            parts
                .uri
                .query()
                .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("key=")).filter(|k| !k.is_empty()))
        };
        let key = presented_key(&parts.headers).or_else(from_query).ok_or_else(missing)?;
        let key = key.to_string();
        identify(state, &key, client_ip(parts)).map(GeminiAuthed)
    }
}

/// Require the admin token, or a console session signed in with it
/// (whose state-changing calls carry its CSRF token).
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match presented_key(req.headers()) {
        Some(key) if hashes_equal(&secret_hash(key), &state.admin_hash) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_admin_token"),
            "Incorrect admin token.",
        )
        .into_response(),
        None => match super::session::session_of(&state, req.headers(), req.method()) {
            Ok(Some(s)) if s.role == Role::Admin => next.run(req).await,
            Ok(Some(_)) => ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("not_an_admin"),
                "This page needs the admin token; you signed in with a user's key.",
            )
            .into_response(),
            Ok(None) => missing().into_response(),
            Err(refused) => refused.into_response(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(value: &str) -> Option<String> {
        let mut h = HeaderMap::new();
        h.insert("authorization", value.parse().expect("header"));
        presented_key(&h).map(str::to_string)
    }

    #[test]
    fn bearer_in_any_case_and_never_a_bare_key() {
        assert_eq!(key("Bearer sk-a").as_deref(), Some("sk-a"));
        assert_eq!(key("bEaReR   sk-a ").as_deref(), Some("sk-a"));
        assert_eq!(key("BEARER\tsk-a").as_deref(), Some("sk-a"));
        assert_eq!(key("sk-a"), None);
        assert_eq!(key("Basic c2stYQ=="), None);
        assert_eq!(key("Bearer "), None);
    }
}
