//! From a classified upstream error to what the client sees. Channel
//! problems (bad key, exhausted account) are the operator's business: the
//! client gets a generic 503, never the upstream's words about the key.

use axum::http::StatusCode;

use crate::channels::Channel;
use crate::error::ApiError;
use crate::plugins::{ErrorKind, UpstreamError};

/// Whether another channel may succeed where this one failed.
pub fn retryable(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited(_)
            | ErrorKind::Transient
            | ErrorKind::Auth
            | ErrorKind::QuotaExhausted
            | ErrorKind::Other
    )
}

/// The client-facing error for `e` raised on `channel`.
pub fn client_error(e: &UpstreamError, channel: &Channel) -> ApiError {
    let msg = channel.scrub(&e.message);
    match e.kind {
        ErrorKind::BadRequest => ApiError::bad_request(msg),
        ErrorKind::ContentFiltered => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", Some("content_filter"), msg)
        }
        ErrorKind::ModelNotFound => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            "The upstream does not serve this model.",
        ),
        ErrorKind::RateLimited(retry_after) => {
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                "The upstream is rate limiting requests; retry later.",
            );
            err.retry_after = retry_after;
            err
        }
        ErrorKind::Auth | ErrorKind::QuotaExhausted => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            Some("channel_unavailable"),
            "No upstream channel is currently able to serve this request.",
        ),
        ErrorKind::Transient | ErrorKind::Other => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            Some("upstream_error"),
            "The upstream failed to answer the request.",
        ),
    }
}
