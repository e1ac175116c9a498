//! Bearer-token checks for `/v1` (gateway tokens) and `/api` (admin token).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::{AppState, hashes_equal, secret_hash};

/// The presented key: `Authorization: Bearer KEY`, or `api-key` /
/// `x-api-key` as Azure- and Anthropic-style clients send it.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let key = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v);
        return Some(key.trim()).filter(|k| !k.is_empty());
    }
    ["api-key", "x-api-key"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

fn missing() -> ApiError {
    let mut e = ApiError::unauthorized(
        "You didn't provide an API key. You need to provide your API key in an Authorization header \
         using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    );
    e.code = None;
    e
}

/// Who is calling `/v1`: set by [`require_token`].
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's group (which channels serve it).
    pub group: Arc<str>,
}

/// Require a valid gateway token. Tokens are looked up by their SHA-256, so
/// lookup time says nothing about the secret.
pub async fn require_token(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let group = match presented_key(req.headers()) {
        None => return missing().into_response(),
        Some(key) => state.token_groups.get(&secret_hash(key)).cloned(),
    };
    match group {
        Some(group) => {
            req.extensions_mut().insert(Caller { group });
            next.run(req).await
        }
        None => ApiError::unauthorized("Incorrect API key provided.").into_response(),
    }
}

/// Require the admin token.
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match presented_key(req.headers()) {
        None => missing().into_response(),
        Some(key) if hashes_equal(&secret_hash(key), &state.admin_hash) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_admin_token"),
            "Incorrect admin token.",
        )
        .into_response(),
    }
}
