//! The one error type that reaches clients, always in OpenAI's shape:
//! `{"error":{"message","type","param","code"}}`. Internal detail goes to
//! the log, never into the body.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message (safe to show).
    pub message: String,
    /// OpenAI error type, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// Offending parameter, if any.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `model_not_found`.
    pub code: Option<&'static str>,
    /// Seconds the client should wait (`Retry-After`).
    pub retry_after: Option<u32>,
    /// Answer with `Connection: close` (the request body was not read, so
    /// the connection cannot be reused).
    pub close_connection: bool,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code, retry_after: None, close_connection: false }
    }

    /// Attach the offending parameter.
    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message)
    }

    /// 401 for a missing or wrong token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), message)
    }

    /// 404 for a model no channel serves.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .param("model")
    }

    /// 404 for a URL the gateway does not serve.
    pub fn not_found_url() -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("unknown_url"), "Unknown request URL.")
    }

    /// 502 `plugin_error`: an adapter or policy failed on this request.
    pub fn plugin() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "plugin_error",
            Some("plugin_error"),
            "The gateway's provider adapter failed to handle this request.",
        )
    }

    /// 500 for the gateway's own failures.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, "The gateway hit an internal error.")
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl ApiError {
    /// This error's status and headers with `body`, another protocol's
    /// shape of the same error.
    pub fn respond_with(&self, body: serde_json::Value) -> Response {
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(v) = self.retry_after.and_then(|secs| HeaderValue::from_str(&secs.to_string()).ok()) {
            response.headers_mut().insert("retry-after", v);
        }
        if self.close_connection {
            response.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond_with(self.body())
    }
}
