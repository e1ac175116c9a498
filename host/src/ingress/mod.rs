//! Client protocols besides OpenAI's chat completions — the OpenAI
//! Responses API, Anthropic Messages and Gemini — served on every channel by
//! translating the request to a chat completion, relaying it through the
//! channel's adapter as usual (admission, routing, failover, billing), and
//! translating the answer back: a JSON body, or the chat stream re-framed
//! as the protocol's typed SSE events while it flows.

pub mod answer;
pub mod anthropic;
pub mod chat_request;
pub mod chat_stream;
pub mod gemini;
pub mod responses;

use axum::body::Body;
use axum::response::Response;

/// Largest non-streamed chat answer translated (the relay already bounds
/// what it reads from an upstream; this only guards the second read).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Whether the relayed response is a stream.
pub fn is_stream(response: &Response) -> bool {
    response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// An SSE response with `body`.
pub fn sse_response(body: Body) -> Response {
    use axum::http::{HeaderValue, header};
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A JSON response with `value`.
pub fn json_response<T: serde::Serialize + ?Sized>(value: &T) -> Response {
    use axum::http::{HeaderValue, header};
    let text = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A short random id with `prefix` (`msg_…`, `resp_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}
