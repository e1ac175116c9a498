//! One attempt of a request passed through an adapter's `passthrough`
//! export: a relayed operation (images, audio, moderations, rerank; see
//! `crate::relayed`) or a native request (Anthropic Messages to an
//! Anthropic channel). The adapter's `build-passthrough` says where to send
//! the client's body; a JSON answer is read, billed by what it reports and
//! returned as it is; an event stream is forwarded as it arrives and billed
//! by the usage its events carry; any other answer (speech audio) is billed
//! by what was asked and streamed to the client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::{
    Attempt, Failure, adapter_unavailable, client_error, credential, plugin_failure, refused, send, upstream_failure,
};
use crate::billing::{Ending, Meter, Tokens, storage_unavailable};
use crate::channels::KeyView;
use crate::plugins::{Endpoint, Operation, PassthroughContext, RequestContext, Usage};
use crate::relayed::{NativeAnswer, answered_units, usage_of};
use crate::routing::{ChannelStats, InFlight};

/// What is passed through.
pub(super) struct Passed<'a> {
    /// The operation.
    pub operation: Operation,
    /// The body's media type.
    pub content_type: &'a str,
    /// The body.
    pub body: &'a Bytes,
    /// A native request asking for an event stream.
    pub stream: bool,
    /// Client headers the adapter may forward (see `Native::headers`).
    pub headers: &'a [crate::plugins::Header],
}

/// The upstream request the adapter built for a passed-through body.
pub(super) struct Built {
    adapter: Arc<crate::plugins::AdapterPlugin>,
    request: crate::plugins::HttpRequest,
    credential: Option<Arc<str>>,
    upstream_model: String,
}

/// Whether `operation` is a client protocol some channels speak natively
/// (the others translate it).
fn native(operation: Operation) -> bool {
    matches!(operation, Operation::Messages | Operation::Responses)
}

/// Have the adapter build the upstream request; `None` when it says a
/// native protocol is not native on this channel (translate instead).
pub(super) async fn build(a: &Attempt<'_>, passed: &Passed<'_>, key_view: &KeyView) -> Result<Option<Built>, Failure> {
    let (state, channel, req) = (a.state, a.channel, a.req);
    let Some(adapter) = a.plugins.adapters.get(&channel.adapter).filter(|p| p.relays(passed.operation)) else {
        tracing::warn!(channel = channel.id, adapter = %channel.adapter, "adapter not loaded or not relaying");
        return Err(Failure::Retry(adapter_unavailable(), None));
    };
    let ctx = PassthroughContext {
        operation: passed.operation,
        client_headers: passed.headers.to_vec(),
        requested_model: req.model.clone(),
        upstream_model: channel.upstream_model(&req.model),
        content_type: passed.content_type.to_string(),
        request_id: req.request_id.clone(),
    };
    let credential = credential(a, adapter, key_view).await?;
    let (adapter, upstream_model) = (adapter.clone(), ctx.upstream_model.clone());
    match adapter.build_passthrough(a.tag, &ctx, &key_view.view, passed.body, credential.clone()).await {
        Err(e) => Err(plugin_failure(state, &e)),
        Ok(Err(e)) if native(passed.operation) && matches!(e.kind, crate::plugins::ErrorKind::BadRequest) => Ok(None),
        Ok(Err(e)) => Err(Failure::Final(client_error(&e, channel))),
        Ok(Ok(request)) => Ok(Some(Built { adapter, request, credential, upstream_model })),
    }
}

/// Send what [`build`] built and answer with the upstream's own answer.
pub(super) async fn serve(
    a: &Attempt<'_>,
    passed: Passed<'_>,
    built: Built,
    key_view: &KeyView,
    in_flight: InFlight,
    meter: &mut Option<Meter>,
) -> Result<Response, Failure> {
    let started = Instant::now();
    let (state, channel, req) = (a.state, a.channel, a.req);
    let Built { adapter, request: upstream_req, credential, upstream_model } = built;
    let adapter = adapter.as_ref();
    let settings: Option<Arc<str>> = Some(Arc::from(key_view.view.settings.as_str()));
    let response = send(a, adapter, upstream_req, &upstream_model).await?;
    if !response.status().is_success() {
        // Classified as the adapter classifies any answer of its provider.
        let error_ctx = RequestContext {
            endpoint: Endpoint::ChatCompletions,
            requested_model: req.model.clone(),
            upstream_model,
            stream: passed.stream,
            include_usage: false,
            request_id: req.request_id.clone(),
        };
        return Err(refused(a, adapter, &error_ctx, settings, response, key_view, credential.is_some()).await);
    }
    let content_type = response.content_type().unwrap_or_else(|| "application/octet-stream".into());
    let lower = content_type.to_ascii_lowercase();
    let body = if lower.contains("json") {
        let reading = Instant::now();
        let read = state.upstream.read(response).await;
        a.waited_since(reading);
        let read = read.map_err(|e| upstream_failure(&e, channel))?;
        let (usage, units) = answered_units(passed.operation, &read.body);
        settle(a, meter, usage, units)?;
        a.stats.success(started.elapsed(), None);
        drop(in_flight);
        Body::from(read.body)
    } else if lower.starts_with("text/event-stream") {
        // Billed when it ends, by the usage its events carry.
        let ttft = started.elapsed();
        a.stats.success(ttft, Some(ttft));
        let mut m = meter.take();
        if let Some(m) = &mut m
            && let Err(e) = m.stream_started(a.info.clone(), ttft)
        {
            tracing::error!(error = %e, "refusing a stream whose usage cannot be recorded");
            return Err(Failure::Final(storage_unavailable()));
        }
        let upstream = response.body_stream();
        Body::from_stream(Metered {
            upstream,
            meter: m,
            seen: SseUsage::default(),
            ttft,
            _in_flight: in_flight,
            _stats: a.stats.clone(),
        })
    } else {
        // Audio: billed by what was asked, streamed as it comes.
        settle(a, meter, None, None)?;
        a.stats.success(started.elapsed(), None);
        let _in_flight = in_flight;
        Body::from_stream(response.body_stream().map(|chunk| chunk.map_err(std::io::Error::other)))
    };
    let mut out = Response::new(body);
    let value = HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    out.headers_mut().insert(header::CONTENT_TYPE, value);
    out.extensions_mut().insert(NativeAnswer);
    Ok(out)
}

/// Bill the attempt that served: by the upstream's usage when it reported
/// tokens, by the units it reported (or those asked) otherwise.
fn settle(a: &Attempt<'_>, meter: &mut Option<Meter>, usage: Option<Usage>, units: Option<u64>) -> Result<(), Failure> {
    let Some(mut m) = meter.take() else { return Ok(()) };
    m.serving(a.info.clone());
    if let Some(units) = units {
        m.set_units(units);
    }
    let tokens = m.relayed_tokens(usage);
    m.settle(tokens, Ending::default()).map_err(|e| {
        tracing::error!(error = %e, "refusing an answer whose usage cannot be recorded");
        Failure::Final(storage_unavailable())
    })
}

/// The usage an event stream reports, read from its `data:` lines as they
/// pass: Anthropic's `message_start` (input and prompt-cache tokens) and
/// `message_delta` (output tokens so far), the Responses API's
/// `response.completed`; and the bytes of text deltas, to estimate what was
/// delivered when the stream ends before its usage.
#[derive(Default)]
struct SseUsage {
    /// An incomplete last line.
    partial: Vec<u8>,
    input: Option<Usage>,
    output: Option<u32>,
    text_bytes: u64,
}

impl SseUsage {
    fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let Some(last) = memchr::memrchr(b'\n', &self.partial) else { return };
        // The complete lines; the partial last one stays for the next bytes.
        let rest = self.partial.split_off(last + 1);
        let lines = std::mem::replace(&mut self.partial, rest);
        for line in lines.split(|b| *b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            if data.windows(7).any(|w| w == b"\"usage\"") {
                self.usage_event(data);
            } else if memchr::memmem::find(data, b"delta\"").is_some() {
                // Anthropic's `content_block_delta`, the Responses API's
                // `response.output_text.delta` and argument deltas.
                self.text_bytes = self.text_bytes.saturating_add(data.len() as u64);
            }
        }
        // A line that never ends must not grow without bound.
        if self.partial.len() > 1 << 20 {
            self.partial.clear();
        }
    }

    fn usage_event(&mut self, data: &[u8]) {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(data) else { return };
        let usage = event
            .get("usage")
            .or_else(|| event.get("message").and_then(|m| m.get("usage")))
            .or_else(|| event.get("response").and_then(|r| r.get("usage")));
        let Some(usage) = usage else { return };
        if let Some(u) = usage_of(usage) {
            self.input = Some(u);
        }
        // (`message_start` carries a placeholder output count.)
        let start = event.get("type").and_then(serde_json::Value::as_str) == Some("message_start");
        if let Some(out) = usage.get("output_tokens").and_then(serde_json::Value::as_u64).filter(|_| !start) {
            self.output = Some(u32::try_from(out).unwrap_or(u32::MAX));
        }
    }

    /// What to bill: the reported usage, the delivered text at about four
    /// bytes a token when the output was never reported.
    fn tokens(&self, meter: &Meter) -> Tokens {
        match (self.input, self.output) {
            (Some(input), Some(output)) => Usage { completion_tokens: output, ..input }.into(),
            (input, _) => {
                let base = meter.relayed_tokens(input);
                Tokens { completion: self.text_bytes.div_ceil(4), estimated: true, ..base }
            }
        }
    }
}

/// An upstream event stream forwarded as it arrives, billed when it ends —
/// or, if the client goes away first, for what was delivered.
struct Metered {
    upstream: super::upstream_body::UpstreamBody,
    meter: Option<Meter>,
    seen: SseUsage,
    ttft: Duration,
    _in_flight: InFlight,
    _stats: Arc<ChannelStats>,
}

impl Metered {
    fn settle(&mut self, ending: Ending) {
        if let Some(m) = self.meter.take() {
            let tokens = self.seen.tokens(&m);
            if let Err(e) = m.settle(tokens, Ending { ttft: Some(self.ttft), ..ending }) {
                tracing::error!(error = %e, "a passed-through stream's usage could not be journaled");
            }
        }
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.upstream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                self.seen.feed(&bytes);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.settle(Ending { upstream_cut: true, ..Ending::default() });
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => {
                self.settle(Ending::default());
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.settle(Ending { client_disconnected: true, ..Ending::default() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_stream_usage_is_read_across_split_events() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,",
            "\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n",
        );
        let mut seen = SseUsage::default();
        for chunk in stream.as_bytes().chunks(7) {
            seen.feed(chunk);
        }
        let input = seen.input.expect("input");
        assert_eq!((input.prompt_tokens, input.cached_tokens, seen.output), (16, 4, Some(7)));
        let mut cut = SseUsage::default();
        cut.feed(&stream.as_bytes()[..stream.find("event: message_delta").expect("delta")]);
        assert_eq!(cut.output, None, "message_start's output count is a placeholder");
        let mut responses = SseUsage::default();
        responses.feed(
            b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
        );
        assert!(responses.text_bytes > 0, "a Responses stream cut before its usage is billed for its text");
        assert!(seen.text_bytes > 0);
    }
}
