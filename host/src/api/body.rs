//! Request bodies: size-limit and read failures become OpenAI-shaped errors.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use bytes::Bytes;

use crate::error::ApiError;

/// The body, or the error the client should get.
pub fn take(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                "The request body is too large.",
            )
        } else {
            ApiError::bad_request("The request body could not be read.")
        }
    })
}
