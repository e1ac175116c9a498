//! Console sign-in: `POST /api/session` exchanges the admin token (or a
//! user's own API key) for an `HttpOnly`, `SameSite=Strict` cookie;
//! `GET` tells who is signed in (and the CSRF token state-changing calls
//! must echo in `x-csrf-token`); `DELETE` signs out. Wrong credentials
//! are counted per client address and refused with 429 past the limit.

use std::net::IpAddr;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{client_ip, identify, identify_hash, missing, presented_key};
use super::body;
use super::params::json_body;
use crate::billing::Caller;
use crate::console::sessions::{COOKIE, Role, Session, cookie_value};
use crate::error::ApiError;
use crate::state::{AppState, hashes_equal, secret_hash};

/// Header carrying the session's CSRF token on state-changing calls.
pub const CSRF_HEADER: &str = "x-csrf-token";

fn refused(status: StatusCode, code: &'static str, message: &str) -> ApiError {
    ApiError::new(status, "invalid_request_error", Some(code), message)
}

/// Whether `Origin` (when the browser sent one) names this very host, as
/// the client reached it: `Host`, or `X-Forwarded-Host` from a proxy in
/// front that rewrites `Host`.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
    [header::HOST.as_str(), "x-forwarded-host"]
        .iter()
        .filter_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .any(|host| !host.is_empty() && origin_host.eq_ignore_ascii_case(host.trim()))
}

/// The console session of a request, if it carries the cookie: an unknown
/// or expired one is refused (401), and so is a state-changing call whose
/// CSRF token is missing or wrong, or that comes from another origin (403).
pub fn session_of(state: &AppState, headers: &HeaderMap, method: &Method) -> Result<Option<Session>, ApiError> {
    let Some(id) = cookie_value(headers) else { return Ok(None) };
    let session = state.sessions.get(id).ok_or_else(|| {
        refused(StatusCode::UNAUTHORIZED, "session_expired", "Your session has expired; sign in again.")
    })?;
    if !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let echoed = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        let csrf_ok = hashes_equal(&secret_hash(echoed), &secret_hash(&session.csrf));
        if !csrf_ok || !same_origin(headers) {
            let msg = "This request did not come from the console page (missing or wrong CSRF token).";
            return Err(refused(StatusCode::FORBIDDEN, "csrf_failed", msg));
        }
    }
    Ok(Some(session))
}

/// The caller of a self-service route (`/api/self…`): an API key in the
/// headers, or a console session signed in with one.
pub struct SelfAuthed(pub Caller);

impl FromRequestParts<AppState> for SelfAuthed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = client_ip(parts);
        if let Some(key) = presented_key(&parts.headers) {
            return identify(state, key, ip).map(SelfAuthed);
        }
        match session_of(state, &parts.headers, &parts.method)? {
            Some(Session { role: Role::User { key_hash }, .. }) => identify_hash(state, &key_hash, ip).map(SelfAuthed),
            Some(_) => Err(refused(
                StatusCode::FORBIDDEN,
                "not_a_user",
                "The self-service view needs a user's own API key; you signed in as the administrator.",
            )),
            None => Err(missing()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    /// The admin token or a user's API key.
    token: String,
}

/// The client's address (unspecified when the router is served without
/// connection info, as in some tests).
pub struct ClientIp(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(parts).unwrap_or(IpAddr::from([0, 0, 0, 0]))))
    }
}

fn cookie(state: &AppState, headers: &HeaderMap, value: &str, max_age: u64) -> HeaderValue {
    let tls = state.config.console.secure_cookie
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let secure = if tls { "; Secure" } else { "" };
    let raw = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&raw).unwrap_or_else(|_| HeaderValue::from_static("wasmgate_session=; Max-Age=0"))
}

fn describe(state: &AppState, s: &Session) -> Value {
    let mut out = json!({
        "object": "session",
        "csrf_token": s.csrf,
        "expires_at": s.expires_at_ms / 1000,
        "quota_per_dollar": state.billing.pricing.table().quota_per_dollar,
    });
    match &s.role {
        Role::Admin => out["role"] = json!("admin"),
        Role::User { key_hash } => {
            out["role"] = json!("user");
            if let Ok(Caller { account: Some(a), .. }) = identify_hash(state, key_hash, None) {
                out["user_id"] = json!(a.user_id);
                out["token_id"] = json!(a.token.id);
            }
        }
    }
    out
}

/// `POST /api/session` `{"token": "…"}`
pub async fn sign_in(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some(wait) = state.sessions.blocked(ip) {
        let msg = format!("Too many failed sign-ins from your address; try again in {wait} s.");
        let mut error = refused(StatusCode::TOO_MANY_REQUESTS, "too_many_sign_in_attempts", &msg);
        error.retry_after = Some(u32::try_from(wait).unwrap_or(u32::MAX));
        return Err(error);
    }
    if !same_origin(&headers) {
        return Err(refused(StatusCode::FORBIDDEN, "csrf_failed", "Sign in from the console page itself."));
    }
    let input: SignIn = json_body(&body::take(raw)?)?;
    let key = input.token.trim();
    let role = if hashes_equal(&secret_hash(key), &state.admin_hash) {
        Some(Role::Admin)
    } else {
        match identify(&state, key, Some(ip)) {
            Ok(Caller { account: Some(_), .. }) => Some(Role::User { key_hash: secret_hash(key) }),
            Ok(_) => {
                let msg = "This key comes from the configuration file and has no account to show; \
                           sign in with the admin token or a key created in the console.";
                return Err(refused(StatusCode::UNAUTHORIZED, "no_account", msg));
            }
            Err(refusal) if refusal.code != Some("invalid_api_key") => return Err(refusal),
            Err(_) => None,
        }
    };
    let Some(role) = role else {
        state.sessions.failed(ip);
        tracing::warn!(%ip, "console sign-in refused: wrong token");
        let msg = "Wrong token: sign in with the admin token or one of your API keys.";
        return Err(refused(StatusCode::UNAUTHORIZED, "invalid_credentials", msg));
    };
    let (id, session) = state.sessions.open(role);
    let mut response = Json(describe(&state, &session)).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie(&state, &headers, &id, state.sessions.ttl_secs()));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /api/session`: who is signed in.
pub async fn current(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    match session_of(&state, &headers, &Method::GET)? {
        Some(s) => {
            let mut response = Json(describe(&state, &s)).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(response)
        }
        None => Err(refused(StatusCode::UNAUTHORIZED, "not_signed_in", "Not signed in.")),
    }
}

/// `DELETE /api/session`: sign out (the cookie is cleared either way).
pub async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    session_of(&state, &headers, &Method::DELETE)?;
    if let Some(id) = cookie_value(&headers) {
        state.sessions.close(id);
    }
    let mut response = Json(json!({"object": "session", "signed_out": true})).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie(&state, &headers, "", 0));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header"));
        }
        h
    }

    #[test]
    fn the_origin_must_be_the_host_the_client_reached() {
        assert!(same_origin(&headers(&[("host", "gw.example:3000")])), "no Origin: not a browser's cross-site call");
        assert!(same_origin(&headers(&[("host", "gw.example:3000"), ("origin", "http://gw.example:3000")])));
        assert!(!same_origin(&headers(&[("host", "gw.example:3000"), ("origin", "http://evil.example")])));
        let proxied =
            [("host", "127.0.0.1:3000"), ("x-forwarded-host", "gw.example"), ("origin", "https://gw.example")];
        assert!(same_origin(&headers(&proxied)));
        assert!(!same_origin(&headers(&[("origin", "https://gw.example")])), "no host to compare with");
    }
}
