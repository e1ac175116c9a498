//! A real OpenAI-compatible mock upstream on 127.0.0.1:0 (axum), used by the
//! integration tests and the benchmark. It records what it receives and
//! answers in OpenAI's exact shapes. Models whose name starts with `hold`
//! stream their first chunk, then wait for `release()` before the rest.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

/// Shared state of one mock.
#[derive(Default)]
pub struct MockState {
    /// Requests received.
    pub hits: AtomicU64,
    /// The last request body, parsed.
    pub last_body: Mutex<Option<Value>>,
    /// The last request's headers.
    pub last_headers: Mutex<Option<HeaderMap>>,
    /// Releases held streams.
    pub release: Notify,
    /// Name reported in responses (to tell mocks apart).
    pub name: String,
}

/// A running mock upstream.
pub struct MockUpstream {
    /// Bound address.
    pub addr: SocketAddr,
    /// Its state.
    pub state: Arc<MockState>,
}

impl MockUpstream {
    /// Start a mock named `name` on 127.0.0.1:0.
    pub async fn start(name: &str) -> Self {
        let state = Arc::new(MockState { name: name.to_string(), ..Default::default() });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    /// Base URL to configure a channel with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Let every held stream continue.
    pub fn release(&self) {
        self.state.release.notify_waiters();
        self.state.release.notify_one();
    }

    /// Requests received so far.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }
}

fn usage() -> Value {
    json!({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
           "prompt_tokens_details": {"cached_tokens": 3}})
}

async fn record(state: &MockState, headers: &HeaderMap, body: &Bytes) -> Value {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    *state.last_body.lock().await = Some(value.clone());
    *state.last_headers.lock().await = Some(headers.clone());
    value
}

fn last_user_text(body: &Value) -> String {
    body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("").to_string()
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    let model = req["model"].as_str().unwrap_or("").to_string();
    let text = format!("echo: {}", last_user_text(&req));
    if req["stream"].as_bool() == Some(true) {
        let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
        return sse(state, model.clone(), chat_chunks(&model, &text, include_usage));
    }
    let body = json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000u64, "model": model,
        "system_fingerprint": state.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": usage(),
    });
    axum::Json(body).into_response()
}

fn chat_chunks(model: &str, text: &str, include_usage: bool) -> Vec<Value> {
    let base = |choices: Value| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
               "model": model, "system_fingerprint": "mock", "choices": choices})
    };
    let mut out =
        vec![base(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]))];
    for word in text.split_inclusive(' ') {
        out.push(base(json!([{"index": 0, "delta": {"content": word}, "finish_reason": null}])));
    }
    out.push(base(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])));
    if include_usage {
        let mut last = base(json!([]));
        last["usage"] = usage();
        out.push(last);
    }
    out
}

/// Stream `chunks` as SSE; `hold*` models pause after the first chunk.
fn sse(state: Arc<MockState>, model: String, chunks: Vec<Value>) -> Response {
    let hold = model.starts_with("hold");
    let stream = async_stream(state, chunks, hold);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("sse response")
}

fn async_stream(
    state: Arc<MockState>,
    chunks: Vec<Value>,
    hold: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    let frames: Vec<Bytes> = chunks
        .into_iter()
        .map(|c| Bytes::from(format!("data: {c}\n\n")))
        .chain(std::iter::once(Bytes::from_static(b"data: [DONE]\n\n")))
        .collect();
    futures_util::stream::unfold((frames.into_iter(), 0usize), move |(mut it, i)| {
        let state = state.clone();
        async move {
            if hold && i == 1 {
                // Hold the rest until the test releases it (bounded).
                let _ = tokio::time::timeout(Duration::from_secs(10), state.release.notified()).await;
            }
            it.next().map(|f| (Ok(f), (it, i + 1)))
        }
    })
}

async fn completions(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    let model = req["model"].as_str().unwrap_or("").to_string();
    let prompt = req["prompt"].as_str().unwrap_or("").to_string();
    if req["stream"].as_bool() == Some(true) {
        let chunk = |text: &str, finish: Value| {
            json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000u64, "model": model,
                   "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]})
        };
        let mut chunks = vec![chunk("echo:", Value::Null), chunk(&format!(" {prompt}"), json!("stop"))];
        if req["stream_options"]["include_usage"].as_bool() == Some(true) {
            chunks.push(json!({"id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000u64,
                               "model": model, "choices": [], "usage": usage()}));
        }
        return sse(state, model.clone(), chunks);
    }
    axum::Json(json!({
        "id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000u64, "model": model,
        "choices": [{"text": format!("echo: {prompt}"), "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": usage(),
    }))
    .into_response()
}

async fn embeddings(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    let inputs = match &req["input"] {
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8]}))
        .collect();
    axum::Json(json!({"object": "list", "data": data, "model": req["model"],
                      "usage": {"prompt_tokens": 4, "total_tokens": 4}}))
    .into_response()
}

async fn models(State(state): State<Arc<MockState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    axum::Json(
        json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "mock"}]}),
    )
    .into_response()
}
