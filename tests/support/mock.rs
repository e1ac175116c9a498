//! A real OpenAI-compatible mock upstream on 127.0.0.1:0 (axum), used by the
//! integration tests and the benchmark. It records what it receives and
//! answers in OpenAI's exact shapes. Models whose name starts with `hold`
//! stream their first chunk, then wait for `release()` before the rest;
//! `slow*` models stream forty words, one every 30 ms; `tool*` models call
//! the request's first tool (`lookup` when it names none).
//! [`MockUpstream::set_mode`] switches chat completions between healthy and
//! the failure kinds real upstreams produce, at runtime.

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

/// How the mock answers `POST /v1/chat/completions` (and, for the modes
/// that do not depend on the endpoint's shape, `/v1/embeddings`).
#[derive(Debug, Clone, Default)]
pub enum Mode {
    /// Like OpenAI.
    #[default]
    Healthy,
    /// A fixed answer: status, content type, body, optional `Retry-After`.
    Fixed { status: u16, content_type: &'static str, body: String, retry_after: Option<u32> },
    /// `200` with a JSON body cut off in the middle.
    TruncatedJson,
    /// `200`, part of the body, then the connection is dropped.
    DropMidBody,
    /// `200` event stream whose first event is an OpenAI error.
    StreamErrorEvent,
    /// Streams: the first chunk, then the connection is dropped.
    DropMidStream,
    /// Healthy, after sleeping this long.
    Slow(Duration),
    /// Answer with the first mode `n` times, then with the second.
    Times(u32, Box<Mode>, Box<Mode>),
    /// `401 invalid_api_key` for requests bearing this key; healthy otherwise.
    RejectKey(String),
    /// Healthy, but never reports usage (some OpenAI-compatible servers).
    NoUsage,
    /// A `200` event stream that never ends: chunks as fast as the client
    /// reads them, until it goes away.
    EndlessStream,
    /// A `200` event stream that ends cleanly (EOF) without `[DONE]` after
    /// a few chunks.
    CutStream,
    /// A `400` whose message quotes the request's `Host` header and its key
    /// in upper case, as some servers do.
    EchoHost,
    /// A healthy non-streamed answer whose content is this many bytes.
    Big(usize),
    /// A `200` event stream that sends its first chunk, then nothing for
    /// this long, then ends.
    StallStream(Duration),
}

impl Mode {
    /// A plain-text `503 no healthy upstream`, as Envoy sends it.
    pub fn no_healthy_upstream() -> Self {
        Mode::Fixed { status: 503, content_type: "text/plain", body: "no healthy upstream".into(), retry_after: None }
    }

    /// An nginx-style HTML `502 Bad Gateway` page.
    pub fn html_502() -> Self {
        let body = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
        Mode::Fixed { status: 502, content_type: "text/html", body: body.into(), retry_after: None }
    }

    /// `200` with an empty body.
    pub fn empty_200() -> Self {
        Mode::Fixed { status: 200, content_type: "application/json", body: String::new(), retry_after: None }
    }

    /// An OpenAI-style error with `status` and `code`.
    pub fn openai_error(status: u16, code: &str, retry_after: Option<u32>) -> Self {
        let body = json!({"error": {"message": format!("mock says {code}; key sk-upstream-secret-leak"),
            "type": "invalid_request_error", "param": null, "code": code}})
        .to_string();
        Mode::Fixed { status, content_type: "application/json", body, retry_after }
    }
}

/// Shared state of one mock.
#[derive(Default)]
pub struct MockState {
    /// How chat completions are answered.
    pub mode: std::sync::Mutex<Mode>,
    /// Requests received.
    pub hits: AtomicU64,
    /// Chat completion requests received.
    pub chat_hits: AtomicU64,
    /// Embedding requests received.
    pub embedding_hits: AtomicU64,
    /// The last request body, parsed.
    pub last_body: Mutex<Option<Value>>,
    /// The last request's headers.
    pub last_headers: Mutex<Option<HeaderMap>>,
    /// The HTTP version of the last request (the mock speaks HTTP/1.1 and
    /// HTTP/2 with prior knowledge).
    pub last_version: std::sync::Mutex<Option<axum::http::Version>>,
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
        let app = Self::app(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    /// The mock's routes over `state`.
    pub fn app(state: Arc<MockState>) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/images/generations", post(images))
            .route("/v1/audio/speech", post(speech))
            .route("/v1/audio/transcriptions", post(transcription))
            .route("/v1/audio/translations", post(transcription))
            .route("/v1/moderations", post(moderations))
            .route("/v1/rerank", post(rerank))
            .route("/v1/messages", post(anthropic_messages))
            .route("/v1/responses", post(native_responses))
            .route("/v1/models", get(models))
            .route("/release", post(release))
            .layer(axum::middleware::from_fn_with_state(state.clone(), note_version))
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(state)
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

    /// Switch how chat completions are answered.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("mode lock") = mode;
    }
}

/// The mode in force, without consuming a `Times` use.
async fn note_version(
    State(state): State<Arc<MockState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    *state.last_version.lock().expect("version lock") = Some(req.version());
    next.run(req).await
}

fn current_mode_peek(state: &MockState) -> Mode {
    state.mode.lock().expect("mode lock").clone()
}

/// The mode for this request (consuming one use of a `Times` mode).
fn current_mode(state: &MockState) -> Mode {
    let mut mode = state.mode.lock().expect("mode lock");
    match &mut *mode {
        Mode::Times(0, _, after) => {
            let next = (**after).clone();
            *mode = next.clone();
            drop(mode);
            resolve(next)
        }
        Mode::Times(n, first, _) => {
            *n -= 1;
            (**first).clone()
        }
        other => other.clone(),
    }
}

fn resolve(mode: Mode) -> Mode {
    match mode {
        Mode::Times(_, first, _) => *first,
        other => other,
    }
}

/// A body that sends `head`, waits so it is flushed, then fails (the
/// connection is dropped).
fn dropping_body(head: String) -> Body {
    let stream = futures_util::stream::unfold(Some(head), |head| async move {
        match head {
            Some(h) => Some((Ok(Bytes::from(h)), None)),
            None => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Err(std::io::Error::other("mock drops the connection")), None))
            }
        }
    });
    Body::from_stream(stream)
}

/// The failure answer for `mode`, or `None` to answer normally.
async fn failure(mode: Mode, model: &str, headers: &HeaderMap) -> Option<Response> {
    match mode {
        Mode::Healthy | Mode::Times(..) | Mode::NoUsage | Mode::Big(_) => None,
        Mode::EndlessStream => {
            let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
                "model": model, "choices": [{"index": 0, "delta": {"content": "endless ".repeat(256)}, "finish_reason": null}]});
            let frame = Bytes::from(format!("data: {chunk}\n\n"));
            let stream = futures_util::stream::repeat_with(move || Ok::<_, Infallible>(frame.clone()));
            Some(([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(stream)).into_response())
        }
        Mode::CutStream => {
            let chunks = chat_chunks(model, "cut short here", false);
            let body: String = chunks.iter().take(3).map(|c| format!("data: {c}\n\n")).collect();
            Some(([(header::CONTENT_TYPE, "text/event-stream")], body).into_response())
        }
        Mode::EchoHost => {
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let key = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let message = format!("request to {host} refused: {} is not allowed", key.to_uppercase());
            let body =
                json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
            Some((StatusCode::BAD_REQUEST, axum::Json(body)).into_response())
        }
        Mode::RejectKey(key) => {
            let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
            if auth.ends_with(&key) {
                Box::pin(failure(Mode::openai_error(401, "invalid_api_key", None), model, headers)).await
            } else {
                None
            }
        }
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Mode::Fixed { status, content_type, body, retry_after } => {
            let mut builder = Response::builder()
                .status(StatusCode::from_u16(status).expect("status"))
                .header(header::CONTENT_TYPE, content_type);
            if let Some(secs) = retry_after {
                builder = builder.header(header::RETRY_AFTER, secs.to_string());
            }
            Some(builder.body(Body::from(body)).expect("fixed response"))
        }
        Mode::TruncatedJson => {
            let body =
                format!(r#"{{"id":"chatcmpl-mock","object":"chat.completion","model":"{model}","choices":[{{"ind"#);
            Some(([(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        Mode::DropMidBody => {
            let head = format!(r#"{{"id":"chatcmpl-mock","object":"chat.completion","model":"{model}","#);
            Some(([(header::CONTENT_TYPE, "application/json")], dropping_body(head)).into_response())
        }
        Mode::StreamErrorEvent => {
            let body = "data: {\"error\":{\"message\":\"The server is overloaded\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
            Some(([(header::CONTENT_TYPE, "text/event-stream")], body).into_response())
        }
        Mode::StallStream(silence) => {
            let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
                "model": model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "before the silence"}, "finish_reason": null}]});
            let first = Bytes::from(format!("data: {chunk}\n\n"));
            let stream = futures_util::stream::unfold(Some(first), move |first| async move {
                let next = first?;
                if next.is_empty() {
                    tokio::time::sleep(silence).await;
                    return Some((Ok::<_, std::io::Error>(Bytes::from_static(b"data: [DONE]\n\n")), None));
                }
                Some((Ok(next), Some(Bytes::new())))
            });
            Some(([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(stream)).into_response())
        }
        Mode::DropMidStream => {
            let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
                "model": model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial"}, "finish_reason": null}]});
            Some(
                ([(header::CONTENT_TYPE, "text/event-stream")], dropping_body(format!("data: {chunk}\n\n")))
                    .into_response(),
            )
        }
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

/// The text of a chat request's last message (empty when it has none).
pub fn last_user_text(body: &Value) -> String {
    body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("").to_string()
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    state.chat_hits.fetch_add(1, Ordering::SeqCst);
    let model = req["model"].as_str().unwrap_or("").to_string();
    if let Some(response) = failure(current_mode(&state), &model, &headers).await {
        return response;
    }
    // `slow*` models answer forty words, one chunk every 30 ms.
    let text = if model.starts_with("slow") {
        (0..40).map(|i| format!("word{i} ")).collect::<String>()
    } else if model.starts_with("drip") {
        (0..14).map(|i| format!("drop{i} ")).collect::<String>()
    } else if let Mode::Big(n) = current_mode_peek(&state) {
        "x".repeat(n)
    } else {
        format!("echo: {}", last_user_text(&req))
    };
    let no_usage = matches!(current_mode_peek(&state), Mode::NoUsage);
    if model.starts_with("tool") {
        return tool_call(state, &req, &model);
    }
    if req["stream"].as_bool() == Some(true) {
        let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true) && !no_usage;
        return sse(state, model.clone(), chat_chunks(&model, &text, include_usage));
    }
    let body = json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000u64, "model": model,
        "system_fingerprint": state.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": if no_usage { Value::Null } else { usage() },
    });
    axum::Json(body).into_response()
}

/// A `tool*` model's answer: one call of the request's first tool, its
/// arguments quoting the last user message.
fn tool_call(state: Arc<MockState>, req: &Value, model: &str) -> Response {
    let name = req["tools"][0]["function"]["name"].as_str().unwrap_or("lookup").to_string();
    let arguments = json!({"query": last_user_text(req)}).to_string();
    let base = |choices: Value| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
               "model": model, "choices": choices})
    };
    if req["stream"].as_bool() == Some(true) {
        let (head, tail) = arguments.split_at(arguments.len() / 2);
        let call = |first: bool, args: &str| {
            let mut c = json!({"index": 0, "function": {"arguments": args}});
            if first {
                c["id"] = "call_mock".into();
                c["type"] = "function".into();
                c["function"]["name"] = name.clone().into();
            }
            json!([{"index": 0, "delta": {"tool_calls": [c]}, "finish_reason": null}])
        };
        let mut chunks = vec![
            base(json!([{"index": 0, "delta": {"role": "assistant", "content": null}, "finish_reason": null}])),
            base(call(true, "")),
            base(call(false, head)),
            base(call(false, tail)),
            base(json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
        ];
        if req["stream_options"]["include_usage"].as_bool() == Some(true) {
            let mut last = base(json!([]));
            last["usage"] = usage();
            chunks.push(last);
        }
        return sse(state, model.to_string(), chunks);
    }
    let message = json!({"role": "assistant", "content": null,
        "tool_calls": [{"id": "call_mock", "type": "function", "function": {"name": name, "arguments": arguments}}]});
    axum::Json(json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000u64, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}], "usage": usage()}))
    .into_response()
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

/// Stream `chunks` as SSE; `hold*` models pause after the first chunk
/// (until released, at most 10 s), `drip*` models too (at most 120 s, or
/// until `POST /release`) and then send one chunk every 500 ms.
fn sse(state: Arc<MockState>, model: String, chunks: Vec<Value>) -> Response {
    let hold = if model.starts_with("hold") {
        Some(Duration::from_secs(10))
    } else if model.starts_with("drip") {
        Some(Duration::from_secs(120))
    } else {
        None
    };
    let pace = if model.starts_with("slow") {
        Some(Duration::from_millis(30))
    } else if model.starts_with("drip") {
        Some(Duration::from_millis(500))
    } else {
        None
    };
    let stream = async_stream(state, chunks, hold, pace);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("sse response")
}

fn async_stream(
    state: Arc<MockState>,
    chunks: Vec<Value>,
    hold: Option<Duration>,
    pace: Option<Duration>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    let frames: Vec<Bytes> = chunks
        .into_iter()
        .map(|c| Bytes::from(format!("data: {c}\n\n")))
        .chain(std::iter::once(Bytes::from_static(b"data: [DONE]\n\n")))
        .collect();
    futures_util::stream::unfold((frames.into_iter(), 0usize), move |(mut it, i)| {
        let state = state.clone();
        async move {
            if let Some(limit) = hold.filter(|_| i == 1) {
                // Hold the rest until the test releases it (bounded).
                let _ = tokio::time::timeout(limit, state.release.notified()).await;
            }
            if let Some(gap) = pace.filter(|_| i > 0) {
                tokio::time::sleep(gap).await;
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
    state.embedding_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(response) = failure(current_mode(&state), req["model"].as_str().unwrap_or(""), &headers).await {
        return response;
    }
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

/// `POST /v1/images/generations`: `n` images (URLs).
async fn images(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    if let Some(response) = failure(current_mode(&state), req["model"].as_str().unwrap_or(""), &headers).await {
        return response;
    }
    let n = req["n"].as_u64().unwrap_or(1);
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"url": format!("https://images.example/{i}.png"), "revised_prompt": req["prompt"]}))
        .collect();
    axum::Json(json!({"created": 1_700_000_000u64, "data": data})).into_response()
}

/// `POST /v1/audio/speech`: 64 KiB of "audio", streamed in 16 chunks.
async fn speech(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    if let Some(response) = failure(current_mode(&state), req["model"].as_str().unwrap_or(""), &headers).await {
        return response;
    }
    let chunks = (0..16u8).map(|i| Ok::<_, Infallible>(Bytes::from(vec![i; 4096])));
    Response::builder()
        .header(header::CONTENT_TYPE, "audio/mpeg")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("response")
}

/// `POST /v1/audio/transcriptions` and `/translations` (multipart): a text
/// and 75 seconds of audio in `usage`, as OpenAI reports it.
async fn transcription(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    *state.last_headers.lock().await = Some(headers.clone());
    let multipart = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !multipart.starts_with("multipart/form-data") || !body.windows(8).any(|w| w == b"filename") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"message": "file is required",
            "type": "invalid_request_error", "param": "file", "code": null}})),
        )
            .into_response();
    }
    *state.last_body.lock().await = Some(json!({"multipart_bytes": body.len()}));
    axum::Json(json!({"text": "hello from the audio", "usage": {"type": "duration", "seconds": 75}})).into_response()
}

/// `POST /v1/moderations`
async fn moderations(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    let flagged = req["input"].as_str().is_some_and(|t| t.contains("hate"));
    axum::Json(json!({"id": "modr-1", "model": req["model"], "results": [{"flagged": flagged,
        "categories": {"hate": flagged}, "category_scores": {"hate": if flagged { 0.9 } else { 0.01 }}}]}))
    .into_response()
}

/// `POST /v1/rerank` (Cohere's shape, as Jina and vLLM answer it).
async fn rerank(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    let docs = req["documents"].as_array().map_or(0, Vec::len);
    let results: Vec<Value> =
        (0..docs).rev().map(|i| json!({"index": i, "relevance_score": 1.0 / (1.0 + i as f64)})).collect();
    axum::Json(json!({"id": "rerank-1", "model": req["model"], "results": results,
        "usage": {"prompt_tokens": 20, "total_tokens": 20}}))
    .into_response()
}

/// The text of the last user turn of an Anthropic request (a string, or
/// its text and tool-result blocks).
fn anthropic_last_user(req: &Value) -> String {
    let Some(last) = req["messages"].as_array().and_then(|m| m.last()) else { return String::new() };
    match &last["content"] {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str().or_else(|| b["content"].as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// `POST /v1/messages`: Anthropic's own API, answering natively (ids
/// `msg_native_…`), non-streamed or as Anthropic's event stream. `tool*`
/// models call the first tool; usage is input 6 (+3 read from the prompt
/// cache), output 12.
async fn anthropic_messages(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    state.chat_hits.fetch_add(1, Ordering::SeqCst);
    let (model, text) = (req["model"].as_str().unwrap_or("").to_string(), anthropic_last_user(&req));
    let tool = req["tools"][0]["name"].as_str().filter(|_| model.starts_with("tool")).map(str::to_string);
    let usage = json!({"input_tokens": 6, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0});
    let (block, stop) = match &tool {
        Some(name) => {
            (json!({"type": "tool_use", "id": "toolu_native_1", "name": name, "input": {"query": text}}), "tool_use")
        }
        None => (json!({"type": "text", "text": format!("echo: {text}")}), "end_turn"),
    };
    if req["stream"].as_bool() != Some(true) {
        let mut usage = usage;
        usage["output_tokens"] = json!(12);
        return axum::Json(json!({"id": "msg_native_1", "type": "message", "role": "assistant", "model": model,
            "content": [block], "stop_reason": stop, "stop_sequence": null, "usage": usage}))
        .into_response();
    }
    let mut start_usage = usage;
    start_usage["output_tokens"] = json!(1);
    let mut events = vec![(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_native_1", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null, "usage": start_usage}}),
    )];
    match &tool {
        Some(name) => {
            events.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_native_1", "name": name, "input": {}}}),
            ));
            let args = json!({"query": text}).to_string();
            let (a, b) = args.split_at(args.len() / 2);
            for part in [a, b] {
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": part}}),
                ));
            }
        }
        None => {
            events.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ));
            for word in format!("echo: {text}").split_inclusive(' ') {
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": word}}),
                ));
            }
        }
    }
    events.push(("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push((
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 12}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let text: String = events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect();
    Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(Body::from(text)).expect("response")
}

/// The text of the last input of a Responses request: the string, or the
/// last item's text or function-call output.
fn responses_last_input(req: &Value) -> String {
    match &req["input"] {
        Value::String(text) => text.clone(),
        Value::Array(items) => {
            let Some(last) = items.last() else { return String::new() };
            if let Some(output) = last["output"].as_str() {
                return output.to_string();
            }
            match &last["content"] {
                Value::String(text) => text.clone(),
                Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""),
                _ => String::new(),
            }
        }
        _ => String::new(),
    }
}

/// `POST /v1/responses`: OpenAI's Responses API, answered natively (ids
/// `resp_native_…`), non-streamed or as its typed event stream. `tool*`
/// models call the first function tool; usage is input 9 (3 cached),
/// output 12.
async fn native_responses(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = record(&state, &headers, &body).await;
    state.chat_hits.fetch_add(1, Ordering::SeqCst);
    let (model, text) = (req["model"].as_str().unwrap_or("").to_string(), responses_last_input(&req));
    let tool = req["tools"][0]["name"].as_str().filter(|_| model.starts_with("tool")).map(str::to_string);
    let item = match &tool {
        Some(name) => json!({"type": "function_call", "id": "fc_native_1", "call_id": "call_native_1", "name": name,
            "arguments": json!({"query": text}).to_string(), "status": "completed"}),
        None => json!({"type": "message", "id": "msg_native_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": format!("echo: {text}"), "annotations": []}]}),
    };
    let usage = json!({"input_tokens": 9, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 21});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_native_1", "object": "response", "created_at": 1_700_000_000u64, "status": status,
            "model": model, "output": output, "usage": usage, "parallel_tool_calls": true, "tool_choice": "auto",
            "tools": req["tools"].clone(), "store": req["store"].clone(), "error": null, "incomplete_details": null})
    };
    if req["stream"].as_bool() != Some(true) {
        return axum::Json(response("completed", json!([item]), usage)).into_response();
    }
    let mut events: Vec<Value> = vec![
        json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}),
        json!({"type": "response.in_progress", "response": response("in_progress", json!([]), Value::Null)}),
    ];
    match &tool {
        Some(_) => {
            let mut added = item.clone();
            added["arguments"] = json!("");
            added["status"] = json!("in_progress");
            events.push(json!({"type": "response.output_item.added", "output_index": 0, "item": added}));
            let args = item["arguments"].as_str().unwrap_or_default().to_string();
            let (a, b) = args.split_at(args.len() / 2);
            for part in [a, b] {
                events.push(json!({"type": "response.function_call_arguments.delta", "item_id": "fc_native_1",
                    "output_index": 0, "delta": part}));
            }
            events.push(json!({"type": "response.function_call_arguments.done", "item_id": "fc_native_1",
                "output_index": 0, "arguments": args}));
        }
        None => {
            let mut added = item.clone();
            added["content"] = json!([]);
            added["status"] = json!("in_progress");
            events.push(json!({"type": "response.output_item.added", "output_index": 0, "item": added}));
            let part = json!({"type": "output_text", "text": "", "annotations": []});
            events.push(json!({"type": "response.content_part.added", "item_id": "msg_native_1", "output_index": 0,
                "content_index": 0, "part": part}));
            let full = format!("echo: {text}");
            for word in full.split_inclusive(' ') {
                events.push(json!({"type": "response.output_text.delta", "item_id": "msg_native_1",
                    "output_index": 0, "content_index": 0, "delta": word}));
            }
            events.push(json!({"type": "response.output_text.done", "item_id": "msg_native_1", "output_index": 0,
                "content_index": 0, "text": full}));
            events.push(json!({"type": "response.content_part.done", "item_id": "msg_native_1", "output_index": 0,
                "content_index": 0, "part": {"type": "output_text", "text": full, "annotations": []}}));
        }
    }
    events.push(json!({"type": "response.output_item.done", "output_index": 0, "item": item}));
    events.push(json!({"type": "response.completed", "response": response("completed", json!([item]), usage)}));
    let text: String = events
        .into_iter()
        .enumerate()
        .map(|(n, mut e)| {
            e["sequence_number"] = json!(n);
            format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or_default())
        })
        .collect();
    Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(Body::from(text)).expect("response")
}

/// `POST /release`: let every held stream go on (for a mock in another
/// process).
async fn release(State(state): State<Arc<MockState>>) -> StatusCode {
    state.release.notify_waiters();
    StatusCode::NO_CONTENT
}

async fn models(State(state): State<Arc<MockState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    axum::Json(
        json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "mock"}]}),
    )
    .into_response()
}
