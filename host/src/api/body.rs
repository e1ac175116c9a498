//! Request bodies: size-limit and read failures become OpenAI-shaped errors.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use bytes::Bytes;

use crate::error::ApiError;

/// The body, or the error the client should get.
pub fn take(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            let mut err = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                "The request body is too large.",
            );
            // The rest of the body is never read: the connection must not be reused.
            err.close_connection = true;
            err
        } else if super::limits::timed_out(&rejection) {
            let mut err = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
                "The request body was not received in time.",
            );
            err.close_connection = true;
            err
        } else {
            ApiError::bad_request("The request body could not be read.")
        }
    })
}
