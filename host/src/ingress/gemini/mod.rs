//! Gemini ingress: `POST /v1beta/models/{model}:generateContent`,
//! `:streamGenerateContent` (`?alt=sse`, else a streamed JSON array) and
//! `:countTokens`, over chat completions; errors in Google's shape
//! (`{"error":{"code","message","status"}}`).

pub mod reply;
pub mod request;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::ingress::{chat_stream, is_stream, json_response, new_id, sse_response};

/// Google's status name for an HTTP status.
fn status_name(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        408 | 504 => "DEADLINE_EXCEEDED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

/// An [`ApiError`] answered in Google's shape (same status and headers).
pub struct GeminiError(pub ApiError);

impl From<ApiError> for GeminiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for GeminiError {
    fn into_response(self) -> Response {
        let code = self.0.status.as_u16();
        self.0.respond_with(json!({"error": {"code": code, "message": self.0.message, "status": status_name(code)}}))
    }
}

/// The relayed chat `response` answered as Gemini responses for `model`.
pub async fn answer(response: Response, model: String, framing: reply::Framing) -> Result<Response, ApiError> {
    let id = new_id("");
    if is_stream(&response) {
        let body = chat_stream::translated(&response, reply::GeminiStream::new(model, id, framing))?;
        return Ok(match framing {
            reply::Framing::Sse => sse_response(body),
            reply::Framing::Array => {
                let mut r = Response::new(body);
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
        });
    }
    let body = crate::ingress::answer::body(response).await?;
    let chat = crate::ingress::answer::ChatAnswer::parse(&body)?;
    Ok(json_response(&reply::answer(&chat, &model, &id)))
}

/// `countTokens`' answer.
pub fn count_answer(tokens: u64) -> Response {
    json_response(&json!({"totalTokens": tokens}))
}

/// What the path's `{model}:{method}` asks for.
pub enum Method {
    /// `generateContent`.
    Generate,
    /// `streamGenerateContent`.
    Stream,
    /// `countTokens`.
    Count,
}

/// Split `gemini-x:generateContent` into the model and the method.
pub fn parse_target(target: &str) -> Result<(&str, Method), ApiError> {
    let (model, method) = target.rsplit_once(':').ok_or_else(ApiError::not_found_url)?;
    let method = match method {
        "generateContent" => Method::Generate,
        "streamGenerateContent" => Method::Stream,
        "countTokens" => Method::Count,
        _ => return Err(ApiError::not_found_url()),
    };
    Ok((model.strip_prefix("models/").unwrap_or(model), method))
}

/// The body of a `countTokens` call: its `contents`, or the
/// `generateContentRequest` it wraps.
pub fn count_body(body: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    match body.get("generateContentRequest").or_else(|| body.get("generate_content_request")) {
        Some(Value::Object(inner)) => inner.clone(),
        _ => body.clone(),
    }
}
