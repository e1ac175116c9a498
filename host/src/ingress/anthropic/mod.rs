//! Anthropic Messages (`POST /v1/messages`) over chat completions, and
//! Anthropic's error shape: `{"type":"error","error":{"type","message"}}`.

pub mod reply;
pub mod request;
pub mod stream;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::ingress::{chat_stream, is_stream, json_response, new_id, sse_response};

/// Anthropic's error type for an HTTP status.
fn error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error body in Anthropic's shape.
pub fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// An [`ApiError`] answered in Anthropic's shape (same status and headers).
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        self.0.respond_with(error_body(self.0.status.as_u16(), &self.0.message))
    }
}

/// The relayed chat completion `response` answered as a Message (or its
/// stream) for `model`.
pub async fn answer(response: Response, model: String) -> Result<Response, ApiError> {
    // An Anthropic channel's own answer (passed through): as it is.
    if response.extensions().get::<crate::relayed::NativeAnswer>().is_some() {
        return Ok(response);
    }
    let id = new_id("msg_");
    if is_stream(&response) {
        return Ok(sse_response(chat_stream::translated(&response, stream::MessagesStream::new(id, model))?));
    }
    let body = crate::ingress::answer::body(response).await?;
    let chat = crate::ingress::answer::ChatAnswer::parse(&body)?;
    Ok(json_response(&reply::message(&chat, &model, &id)))
}

/// `count_tokens`' answer.
pub fn count_answer(tokens: u64) -> Response {
    (StatusCode::OK, json_response(&json!({"input_tokens": tokens}))).into_response()
}
