//! SSE relay: upstream bytes go through the adapter's stream decoder and
//! out to the client chunk by chunk, with no buffering beyond one upstream
//! read. Ends with `data: [DONE]`, or with an OpenAI-style error event.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use crate::billing::tokenize::generated_text;
use crate::billing::{Delivery, Meter};
use crate::channels::Channel;
use crate::error::ApiError;
use crate::plugins::{AdapterResult, AdapterStream, ErrorKind, PluginError, StreamEvents, Usage};
use crate::routing::{ChannelStats, InFlight};

use super::errors::client_error;

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// What one decoder step produced, as SSE bytes.
pub(crate) struct Frames {
    /// `data: ...\n\n` frames.
    pub bytes: BytesMut,
    /// Number of chunks in `bytes`.
    pub chunks: usize,
    /// The stream is over (done or failed).
    pub end: bool,
    /// An error ending the stream (eligible for failover when nothing was
    /// sent yet).
    pub early_error: Option<ApiError>,
    /// The classified upstream error behind `early_error`; `None` when the
    /// adapter itself failed.
    pub early_kind: Option<ErrorKind>,
}

fn error_frame(out: &mut BytesMut, err: &ApiError) {
    out.put_slice(b"data: ");
    out.put_slice(err.body().to_string().as_bytes());
    out.put_slice(b"\n\n");
}

/// Turn a decoder result into frames. `sent_any` says whether the client has
/// received anything yet (failover is only possible before that).
pub(crate) fn frames(
    result: AdapterResult<StreamEvents>,
    channel: &Channel,
    usage: &mut Option<Usage>,
    text: &mut String,
    upstream_ended: bool,
) -> Frames {
    let mut out = Frames { bytes: BytesMut::new(), chunks: 0, end: false, early_error: None, early_kind: None };
    let events = match result {
        Err(e) => {
            log_plugin_error(&e);
            out.early_error = Some(ApiError::plugin());
            out.end = true;
            return out;
        }
        Ok(Err(e)) => {
            out.early_error = Some(client_error(&e, channel));
            out.early_kind = Some(e.kind);
            out.end = true;
            return out;
        }
        Ok(Ok(events)) => events,
    };
    for chunk in &events.chunks {
        if serde_json::from_slice::<serde::de::IgnoredAny>(chunk).is_err() {
            tracing::warn!(channel = channel.id, "adapter emitted a stream chunk that is not JSON");
            out.early_error = Some(ApiError::plugin());
            out.end = true;
            return out;
        }
        out.bytes.put_slice(b"data: ");
        out.bytes.put_slice(chunk);
        out.bytes.put_slice(b"\n\n");
        out.chunks += 1;
        // Kept to bill by a local count if the upstream reports no usage.
        generated_text(chunk, text);
    }
    if events.usage.is_some() {
        *usage = events.usage;
    }
    if let Some(e) = events.error {
        out.early_error = Some(client_error(&e, channel));
        out.early_kind = Some(e.kind);
        out.end = true;
    } else if events.done || upstream_ended {
        out.bytes.put_slice(b"data: [DONE]\n\n");
        out.end = true;
    }
    out
}

fn log_plugin_error(e: &PluginError) {
    tracing::warn!(error = %e, "plugin failed while decoding a stream");
}

/// A stream that has already produced its first frames.
pub(crate) struct LiveStream {
    pub upstream: ByteStream,
    pub decoder: AdapterStream,
    pub channel: Arc<Channel>,
    pub idle: Duration,
    pub usage: Option<Usage>,
    pub request_id: String,
    /// The channel's statistics (a failure after the first byte counts).
    pub stats: Arc<ChannelStats>,
    /// Counts the stream as in flight until it ends.
    pub _in_flight: InFlight,
    /// Bills the request when the stream ends (or the client leaves).
    pub meter: Option<Meter>,
    /// Generated text sent so far.
    pub text: String,
    /// Time to first token.
    pub ttft: Option<Duration>,
}

impl LiveStream {
    /// Settle the bill once: with the upstream's usage, else by counting
    /// what was delivered.
    fn settle(&mut self, client_disconnected: bool) {
        if let Some(meter) = self.meter.take() {
            meter.settle(Delivery { usage: self.usage, text: &self.text, ttft: self.ttft, client_disconnected });
        }
    }
}

impl Drop for LiveStream {
    /// A stream dropped before its end is a client that went away: bill
    /// what was delivered.
    fn drop(&mut self) {
        if self.meter.is_some() {
            tracing::info!(request_id = %self.request_id, channel = self.channel.id, "client disconnected mid-stream");
        }
        self.settle(true);
    }
}

/// Read upstream until the decoder yields something to send. `Err` means
/// the stream failed before any byte reached the client (failover allowed
/// when the error is a retryable upstream one).
pub(crate) async fn first_frames(live: &mut LiveStream) -> Result<Frames, (ApiError, Option<ErrorKind>)> {
    loop {
        let step = next_frames(live).await;
        if let Some(err) = step.early_error {
            return Err((err, step.early_kind));
        }
        if step.chunks > 0 || step.end {
            return Ok(step);
        }
    }
}

async fn next_frames(live: &mut LiveStream) -> Frames {
    match tokio::time::timeout(live.idle, live.upstream.next()).await {
        Err(_) => stalled(&live.channel, "stalled"),
        Ok(Some(Err(_))) => stalled(&live.channel, "connection dropped mid-stream"),
        Ok(Some(Ok(bytes))) => {
            let r = live.decoder.feed(&bytes);
            frames(r, &live.channel, &mut live.usage, &mut live.text, false)
        }
        Ok(None) => {
            let r = live.decoder.finish();
            frames(r, &live.channel, &mut live.usage, &mut live.text, true)
        }
    }
}

fn stalled(channel: &Channel, what: &str) -> Frames {
    tracing::warn!(channel = channel.id, "upstream stream {what}");
    let err = ApiError::new(
        axum::http::StatusCode::BAD_GATEWAY,
        "upstream_error",
        Some("upstream_error"),
        format!("The upstream stream {what}."),
    );
    Frames {
        bytes: BytesMut::new(),
        chunks: 0,
        end: true,
        early_error: Some(err),
        early_kind: Some(ErrorKind::Transient),
    }
}

/// The response body: `first` then everything after it.
pub(crate) fn body(first: Frames, live: LiveStream) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let state = (Some(first), live, false);
    futures_util::stream::unfold(state, |(pending, mut live, ended)| async move {
        if let Some(f) = pending {
            let end = f.end;
            if end {
                finish_log(&mut live);
            }
            return Some((Ok(f.bytes.freeze()), (None, live, end)));
        }
        if ended {
            return None;
        }
        loop {
            let mut step = next_frames(&mut live).await;
            if let Some(err) = &step.early_error {
                if step.early_kind.is_some() {
                    live.stats.failure();
                }
                error_frame(&mut step.bytes, err);
            }
            if step.end {
                finish_log(&mut live);
                return Some((Ok(step.bytes.freeze()), (None, live, true)));
            }
            if !step.bytes.is_empty() {
                return Some((Ok(step.bytes.freeze()), (None, live, false)));
            }
        }
    })
}

fn finish_log(live: &mut LiveStream) {
    live.settle(false);
    tracing::debug!(request_id = %live.request_id, channel = live.channel.id,
        plugin = live.decoder.plugin_name(), usage = ?live.usage, "stream finished");
}
