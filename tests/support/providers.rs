//! A loopback mock of the providers' own APIs (Anthropic, Gemini, Baidu,
//! DashScope, Ollama, Azure), serving the recorded examples in
//! `tests/fixtures/providers/<provider>/`. Each provider lives under
//! `/<provider>/` with its real paths below that, checks its real
//! authentication, and records every request it receives.
//!
//! Which example answers: a model name containing `-fail` → `error.json`
//! (with the provider's error status), `-blocked` → `blocked.json`, an
//! embeddings path → `embeddings.json`, a streaming request → `stream.*`
//! (sent in small pieces), a request with tools → `tools.json`, otherwise
//! `chat.json`. Baidu's `/oauth/2.0/token` issues access tokens and counts
//! the exchanges.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};

/// Keys the mock accepts, per provider (Baidu: `API_KEY|SECRET_KEY`).
pub const KEYS: &[(&str, &str)] = &[
    ("anthropic", "sk-ant-test-key"),
    ("gemini", "gm-test-key"),
    ("baidu", "ak-test|sk-test"),
    ("qwen", "ds-test-key"),
    ("ollama", ""),
    ("azure", "az-test-key"),
];

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Provider segment of the path.
    pub provider: String,
    /// Path below the provider, with the query string.
    pub path: String,
    /// Headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// JSON body (`Null` when none or not JSON).
    pub body: Value,
}

struct ProviderState {
    fixtures: PathBuf,
    requests: Mutex<Vec<Recorded>>,
    token_exchanges: AtomicUsize,
    token_ttl_secs: AtomicU64,
    issued: Mutex<Vec<String>>,
}

/// The running mock.
pub struct ProviderMock {
    addr: std::net::SocketAddr,
    state: Arc<ProviderState>,
}

impl ProviderMock {
    /// Start on `127.0.0.1:0`.
    pub async fn start() -> Self {
        let state = Arc::new(ProviderState {
            fixtures: super::root().join("tests/fixtures/providers"),
            requests: Mutex::new(Vec::new()),
            token_exchanges: AtomicUsize::new(0),
            token_ttl_secs: AtomicU64::new(2_592_000),
            issued: Mutex::new(Vec::new()),
        });
        let app = Router::new().route("/{provider}/{*rest}", any(handle)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        Self { addr, state }
    }

    /// Base URL of `provider`'s API on this mock.
    pub fn base_url(&self, provider: &str) -> String {
        format!("http://{}/{provider}", self.addr)
    }

    /// Requests received so far for `provider`.
    pub fn requests(&self, provider: &str) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").iter().filter(|r| r.provider == provider).cloned().collect()
    }

    /// How many Baidu token exchanges were served.
    pub fn token_exchanges(&self) -> usize {
        self.state.token_exchanges.load(Ordering::SeqCst)
    }

    /// Lifetime of the Baidu tokens issued from now on.
    pub fn set_token_ttl(&self, secs: u64) {
        self.state.token_ttl_secs.store(secs, Ordering::SeqCst);
    }
}

fn key_of(provider: &str) -> &'static str {
    KEYS.iter().find(|(p, _)| *p == provider).map_or("", |(_, k)| k)
}

fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).expect("status");
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The provider's answer to a request with bad credentials, or `None`.
fn refuse(state: &ProviderState, provider: &str, path: &str, query: &str, headers: &HeaderMap) -> Option<Response> {
    let key = key_of(provider);
    let ok = match provider {
        "anthropic" => {
            header_value(headers, "x-api-key") == key && !header_value(headers, "anthropic-version").is_empty()
        }
        "gemini" => header_value(headers, "x-goog-api-key") == key,
        "azure" => header_value(headers, "api-key") == key && query_param(query, "api-version").is_some(),
        "qwen" => header_value(headers, "authorization") == format!("Bearer {key}"),
        "baidu" if path.starts_with("/oauth/") => true,
        "baidu" => {
            let token = query_param(query, "access_token").unwrap_or_default();
            state.issued.lock().expect("lock").last().is_some_and(|t| t == token)
        }
        _ => true,
    };
    if ok {
        return None;
    }
    Some(match provider {
        "anthropic" => json_response(
            401,
            json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
        ),
        "gemini" => json_response(
            400,
            json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT", "details": [{"reason": "API_KEY_INVALID"}]}}),
        ),
        "baidu" => {
            json_response(200, json!({"error_code": 110, "error_msg": "Access token invalid or no longer valid"}))
        }
        "qwen" => json_response(401, json!({"code": "InvalidApiKey", "message": "Invalid API-key provided."})),
        _ => json_response(
            401,
            json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}),
        ),
    })
}

fn baidu_token(state: &ProviderState, query: &str) -> Response {
    let (ak, sk) = key_of("baidu").split_once('|').expect("baidu key");
    if query_param(query, "client_id") != Some(ak) || query_param(query, "client_secret") != Some(sk) {
        return json_response(401, json!({"error": "invalid_client", "error_description": "unknown client id"}));
    }
    let n = state.token_exchanges.fetch_add(1, Ordering::SeqCst) + 1;
    let mut body: Value = read_json(&state.fixtures.join("baidu/token.json"));
    let token = format!("24.mock-token-{n}");
    body["access_token"] = json!(token);
    body["expires_in"] = json!(state.token_ttl_secs.load(Ordering::SeqCst));
    state.issued.lock().expect("lock").push(token);
    json_response(200, body)
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("fixture JSON")
}

fn is_stream(provider: &str, path: &str, headers: &HeaderMap, body: &Value) -> bool {
    match provider {
        "gemini" => path.contains(":streamGenerateContent"),
        "qwen" => header_value(headers, "x-dashscope-sse") == "enable",
        _ => body.get("stream").and_then(Value::as_bool) == Some(true),
    }
}

/// Send `bytes` in 16-byte pieces, as a real stream arrives.
fn streamed(bytes: Vec<u8>, content_type: &'static str) -> Response {
    let pieces: Vec<Result<Bytes, std::io::Error>> = bytes.chunks(16).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let stream = futures_util::stream::iter(pieces);
    ([(header::CONTENT_TYPE, content_type)], Body::from_stream(stream)).into_response()
}

async fn handle(
    State(state): State<Arc<ProviderState>>,
    Path((provider, rest)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/{rest}");
    let query = query.unwrap_or_default();
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.requests.lock().expect("lock").push(Recorded {
        provider: provider.clone(),
        path: if query.is_empty() { path.clone() } else { format!("{path}?{query}") },
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        body: json_body.clone(),
    });
    if let Some(refusal) = refuse(&state, &provider, &path, &query, &headers) {
        return refusal;
    }
    if provider == "baidu" && path == "/oauth/2.0/token" {
        return baidu_token(&state, &query);
    }
    // A little latency, so that concurrent requests really overlap.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let dir = state.fixtures.join(&provider);
    let haystack = format!("{path} {json_body}");
    if haystack.contains("-fail") {
        let status = if provider == "baidu" { 200 } else { 400 };
        return json_response(status, read_json(&dir.join("error.json")));
    }
    if haystack.contains("-blocked") {
        return json_response(200, read_json(&dir.join("blocked.json")));
    }
    if path.contains("embed") {
        return json_response(200, read_json(&dir.join("embeddings.json")));
    }
    if is_stream(&provider, &path, &headers, &json_body) {
        if provider == "ollama" {
            return streamed(std::fs::read(dir.join("stream.ndjson")).expect("fixture"), "application/x-ndjson");
        }
        return streamed(std::fs::read(dir.join("stream.sse")).expect("fixture"), "text/event-stream");
    }
    if json_body.to_string().contains("\"tools\"") {
        return json_response(200, read_json(&dir.join("tools.json")));
    }
    json_response(200, read_json(&dir.join("chat.json")))
}
