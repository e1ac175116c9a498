//! Limits on what a client sends, answered in OpenAI's error shape: a URI
//! or headers too long (414, 431 — hyper answers only past twice these
//! limits, with its own bodiless response), and a body that does not
//! arrive in time (408; the whole body has `server.body_timeout_secs`,
//! however slowly it drips).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::error::ApiError;
use crate::state::AppState;

/// The body did not arrive within the limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received in time")]
pub struct BodyTimeout;

/// A body that fails once its deadline passes.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn too_long(status: StatusCode, code: &'static str, message: &str) -> Response {
    let mut err = ApiError::new(status, "invalid_request_error", Some(code), message);
    err.close_connection = true;
    err.into_response()
}

/// Refuse an oversized URI or headers.
pub fn check(state: &AppState, req: &Request) -> Result<(), Box<Response>> {
    let cfg = &state.config.server;
    let uri = req.uri();
    let uri_len = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if uri_len > cfg.max_uri_bytes {
        return Err(Box::new(too_long(StatusCode::URI_TOO_LONG, "uri_too_long", "The request URI is too long.")));
    }
    let header_bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if header_bytes > cfg.max_header_bytes {
        return Err(Box::new(too_long(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_header_fields_too_large",
            "The request headers are too large.",
        )));
    }
    Ok(())
}

/// `req` with its body given the deadline (a request without a body —
/// `GET`, or an empty one — needs none).
pub fn with_deadline(state: &AppState, req: Request) -> Request {
    if req.body().is_end_stream() {
        return req;
    }
    let deadline = Duration::from_secs(state.config.server.body_timeout_secs);
    req.map(|inner| Body::new(DeadlineBody { inner, sleep: Box::pin(tokio::time::sleep(deadline)) }))
}

/// Whether a body read failed because its deadline passed.
pub fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTimeout>() {
            return true;
        }
        current = e.source();
    }
    false
}
