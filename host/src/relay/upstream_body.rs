//! An upstream response's body as a stream of byte pieces, each of which
//! must arrive within the idle limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::upstream::Slot;

/// Why an upstream body stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Nothing arrived for longer than the idle limit.
    #[error("upstream stalled while sending its response")]
    Stalled,
    /// The connection failed or closed mid-body.
    #[error("upstream connection dropped mid-response")]
    Dropped,
}

impl BodyError {
    /// Whether the upstream went silent (rather than away).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Stalled)
    }
}

/// The body of an upstream response. The idle timer is armed only when a
/// read finds nothing ready, so a body already buffered with its headers
/// (most unstreamed answers) never touches the timer wheel.
pub struct UpstreamBody {
    inner: Inner,
    /// Held until the body is read or dropped: the client's in-flight slot.
    _slot: Slot,
}

enum Inner {
    /// Read straight from hyper.
    Direct { body: Incoming, idle: Duration, timer: Option<Pin<Box<Sleep>>>, armed: bool },
    /// Read through reqwest (an upstream reached through a proxy), which
    /// applies the idle limit itself.
    Proxied(Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>),
}

impl UpstreamBody {
    /// `body`, read with `idle` as the longest silence allowed.
    pub(super) fn direct(body: Incoming, idle: Duration, slot: Slot) -> Self {
        Self { inner: Inner::Direct { body, idle, timer: None, armed: false }, _slot: slot }
    }

    /// A body read by reqwest.
    pub(super) fn proxied(response: reqwest::Response, slot: Slot) -> Self {
        Self { inner: Inner::Proxied(Box::pin(response.bytes_stream())), _slot: slot }
    }
}

impl Stream for UpstreamBody {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.inner {
            Inner::Proxied(stream) => match ready!(stream.as_mut().poll_next(cx)) {
                None => Poll::Ready(None),
                Some(Ok(bytes)) => Poll::Ready(Some(Ok(bytes))),
                Some(Err(e)) if e.is_timeout() => Poll::Ready(Some(Err(BodyError::Stalled))),
                Some(Err(_)) => Poll::Ready(Some(Err(BodyError::Dropped))),
            },
            Inner::Direct { body, idle, timer, armed } => loop {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(Some(Err(BodyError::Dropped))),
                    Poll::Ready(Some(Ok(frame))) => {
                        *armed = false;
                        match frame.into_data() {
                            Ok(bytes) if !bytes.is_empty() => return Poll::Ready(Some(Ok(bytes))),
                            // Trailers and empty pieces carry nothing to relay.
                            _ => continue,
                        }
                    }
                    Poll::Pending => {
                        if !*armed {
                            let deadline = Instant::now() + *idle;
                            match timer {
                                Some(t) => t.as_mut().reset(deadline),
                                None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                            }
                            *armed = true;
                        }
                        let timer = timer.as_mut().expect("armed above");
                        ready!(timer.as_mut().poll(cx));
                        return Poll::Ready(Some(Err(BodyError::Stalled)));
                    }
                }
            },
        }
    }
}
