//! SSE relay: upstream bytes go through the adapter's stream decoder and
//! out to the client as they come, with no buffering beyond what the
//! upstream body already holds (joined into one decoder call, at most 64
//! KiB: `coalesce`). Ends with `data: [DONE]` when the upstream signalled its end, or
//! with an OpenAI-style error event — also when the upstream's stream
//! broke off before its end marker, or passed the gateway's length or
//! duration limit.
//!
//! A translated route (Responses, Messages, Gemini) takes the stream as a
//! [`PendingStream`] and sets its [`Translator`]: from then on each chunk
//! is parsed once, for validation, the bill and the translation together,
//! and the translator's events are what reaches the client. The chunks
//! that came before (while failover was still possible) are held as the
//! adapter emitted them, not framed as SSE, and translated then.
//!
//! What a stream keeps is bounded: the decoder's small state, and for the
//! bill only the first [`GeneratedText::KEPT`] bytes of generated text plus
//! a byte count (see `billing::tokenize`). Counting, when the upstream
//! reported no usage, runs off the async workers — also when the client
//! leaves and the stream is dropped.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tracing::Instrument;

use crate::billing::tokenize::{GeneratedText, generated_text};
use crate::billing::{Ending, Meter};
use crate::channels::Channel;
use crate::error::ApiError;
use crate::filters::{Chain, ChunkOutcome};
use crate::health::Fault;
use crate::ingress::chat_stream::{ChatChunk, Translator};
use crate::plugins::{AdapterResult, AdapterStream, ErrorKind, PluginError, StreamEvents, Usage};
use crate::routing::{ChannelStats, InFlight};
use crate::state::AppState;

use super::coalesce::Coalesced;
use super::errors::client_error;

/// The upstream body, what is ready together joined (one decoder call).
type ByteStream = Coalesced<super::upstream_body::UpstreamBody, super::upstream_body::BodyError>;

/// What one decoder step produced, as SSE bytes.
pub(crate) struct Frames {
    /// `data: ...\n\n` frames.
    pub bytes: BytesMut,
    /// Number of chunks in `bytes` (or `held`).
    pub chunks: usize,
    /// Checked chunks kept as the adapter emitted them, for a translator
    /// still to come ([`Framing::Held`]).
    pub held: Vec<Vec<u8>>,
    /// The stream is over (done or failed).
    pub end: bool,
    /// An error ending the stream (eligible for failover when nothing was
    /// sent yet).
    pub early_error: Option<ApiError>,
    /// The classified upstream error behind `early_error`; `None` when the
    /// adapter itself (or the gateway's limit) ended it.
    pub early_kind: Option<ErrorKind>,
    /// The upstream's stream ended or broke before its end marker.
    pub cut: bool,
    /// The gateway's length or duration limit ended it.
    pub limited: bool,
}

impl Frames {
    fn empty() -> Self {
        Self {
            bytes: BytesMut::new(),
            chunks: 0,
            held: Vec::new(),
            end: false,
            early_error: None,
            early_kind: None,
            cut: false,
            limited: false,
        }
    }

    fn failed(err: ApiError, kind: Option<ErrorKind>) -> Self {
        Self { end: true, early_error: Some(err), early_kind: kind, ..Self::empty() }
    }
}

/// How a stream's chunks reach the client.
enum Framing {
    /// As OpenAI SSE frames (`data: …`, then `data: [DONE]`).
    Sse,
    /// Held in [`Frames::held`] for a translated route whose translator is
    /// not set yet.
    Held,
    /// As the translator's events.
    Translated(Box<dyn Translator>),
}

/// The event ending a stream with `err`: an OpenAI error frame, or the
/// translator's.
fn error_frame(out: &mut BytesMut, err: &ApiError, framing: &mut Framing) {
    let body = err.body();
    match framing {
        Framing::Translated(t) => t.error(&body["error"], out),
        Framing::Sse | Framing::Held => {
            out.put_slice(b"data: ");
            out.put_slice(body.to_string().as_bytes());
            out.put_slice(b"\n\n");
        }
    }
}

/// What became of one chunk.
enum Chunk {
    /// Sent on (as a frame, or translated).
    Sent,
    /// Not JSON: the stream fails.
    Malformed,
    /// An error chunk the translator ended the stream with.
    Ended,
}

/// Parse `chunk` once: its text for the bill into `generated`, and the
/// translator's events into `out`.
fn translate(
    chunk: &[u8],
    translator: &mut dyn Translator,
    generated: Option<&mut GeneratedText>,
    out: &mut BytesMut,
) -> Chunk {
    let Ok(parsed) = serde_json::from_slice::<ChatChunk<'_>>(chunk) else { return Chunk::Malformed };
    if let Some(error) = &parsed.error {
        translator.error(error, out);
        return Chunk::Ended;
    }
    if let Some(generated) = generated {
        for delta in parsed.choices.iter().map(|c| &c.delta) {
            for text in [&delta.content, &delta.reasoning_content].into_iter().flatten() {
                generated.push(text);
            }
            for call in &delta.tool_calls {
                let (_, name, arguments) = call.parts();
                generated.push(name);
                generated.push(arguments);
            }
        }
    }
    translator.chunk(&parsed, out);
    Chunk::Sent
}

/// A translated route's stream once its first chunks are in (failover is
/// over), handed from the relay to the route in the response's extensions;
/// [`PendingStream::translated`] makes the response body.
#[derive(Clone)]
pub struct PendingStream(Arc<Mutex<Option<(Frames, LiveStream)>>>);

impl PendingStream {
    pub(crate) fn new(first: Frames, live: LiveStream) -> Self {
        Self(Arc::new(Mutex::new(Some((first, live)))))
    }

    /// The stream re-framed by `translator` (`None` once taken).
    pub fn translated(&self, mut translator: Box<dyn Translator>) -> Option<axum::body::Body> {
        let (mut first, mut live) = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()?;
        // The held chunks were checked, and their text taken for the bill,
        // when they came: translate them only.
        let mut ended_by_error = false;
        for chunk in std::mem::take(&mut first.held) {
            if let Chunk::Ended = translate(&chunk, translator.as_mut(), None, &mut first.bytes) {
                ended_by_error = true;
                break;
            }
        }
        if first.end && !ended_by_error {
            translator.finish(&mut first.bytes);
        }
        first.end |= ended_by_error;
        live.framing = Framing::Translated(translator);
        Some(axum::body::Body::from_stream(body(first, live)))
    }
}

fn upstream_error(code: &'static str, message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", Some(code), message.to_string())
}

/// A stream that has begun: the upstream response, its decoder, and what
/// the bill needs.
pub(crate) struct LiveStream {
    upstream: ByteStream,
    decoder: AdapterStream,
    state: AppState,
    channel: Arc<Channel>,
    max_bytes: u64,
    /// When the stream is cut however busy it is (`max_stream_secs`); the
    /// idle limit is the upstream client's read timeout.
    deadline: Pin<Box<tokio::time::Sleep>>,
    received: u64,
    usage: Option<Usage>,
    generated: GeneratedText,
    /// The request's span: the stream's log lines (polled after the
    /// handler returned) carry its id through it.
    span: tracing::Span,
    /// The channel's statistics (a failure after the first byte counts).
    pub stats: Arc<ChannelStats>,
    /// Counts the stream as in flight until it ends.
    _in_flight: InFlight,
    /// Counted in `wasmgate_open_streams` while alive.
    _open: crate::metrics::OpenStream,
    /// Bills the request when the stream ends (or the client leaves).
    pub meter: Option<Meter>,
    /// Time to first token.
    pub ttft: Option<Duration>,
    ending: Ending,
    /// The request's filters that look at chunks, and each one's state.
    filters: Option<(Arc<Chain>, Vec<Vec<u8>>)>,
    /// A filter stopped the stream (or failed closed): the error ending it.
    stopped: Option<ApiError>,
    /// How the chunks reach the client.
    framing: Framing,
}

impl LiveStream {
    /// A stream over `response`, decoded by `decoder`.
    pub fn new(
        state: &AppState,
        response: super::upstream::UpstreamResponse,
        decoder: AdapterStream,
        channel: Arc<Channel>,
        stats: Arc<ChannelStats>,
        in_flight: InFlight,
    ) -> Self {
        let cfg = &state.config.upstream;
        Self {
            upstream: Coalesced::new(response.body_stream()),
            decoder,
            state: state.clone(),
            channel,
            max_bytes: cfg.max_stream_bytes,
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(cfg.max_stream_secs))),
            received: 0,
            usage: None,
            generated: GeneratedText::default(),
            span: tracing::Span::current(),
            stats,
            _in_flight: in_flight,
            _open: crate::metrics::open_streams(),
            meter: None,
            ttft: None,
            ending: Ending::default(),
            filters: None,
            stopped: None,
            framing: Framing::Sse,
        }
    }

    /// Hold the chunks for a translator (a translated route's stream): see
    /// [`PendingStream`].
    pub fn hold_for_translator(&mut self) {
        self.framing = Framing::Held;
    }

    /// Whether the chunks are held for a translator.
    pub fn held(&self) -> bool {
        matches!(self.framing, Framing::Held)
    }

    /// Run every chunk through `chain`'s chunk filters.
    pub fn filter_chunks(&mut self, chain: Option<Arc<Chain>>) {
        self.filters = chain.map(|c| {
            let states = c.stream_states();
            (c, states)
        });
    }

    /// The decoder's chunks after the chunk filters: rewritten, dropped, or
    /// cut where a filter stopped the stream (what follows is not sent).
    async fn filtered(&mut self, result: AdapterResult<StreamEvents>) -> AdapterResult<StreamEvents> {
        let Some((chain, states)) = &mut self.filters else { return result };
        let Ok(Ok(mut events)) = result else { return result };
        let mut kept = Vec::with_capacity(events.chunks.len());
        for chunk in std::mem::take(&mut events.chunks) {
            match chain.on_chunk(chunk, states).await {
                Ok(ChunkOutcome::Send(chunk)) => kept.push(chunk),
                Ok(ChunkOutcome::Drop) => {}
                Ok(ChunkOutcome::Stop(err)) | Err(err) => {
                    self.stopped = Some(err);
                    break;
                }
            }
        }
        events.chunks = kept;
        Ok(Ok(events))
    }

    /// Whether the bill needs the generated text (no usage reported yet,
    /// and something to charge).
    fn needs_text(&self) -> bool {
        self.usage.is_none() && self.meter.as_ref().is_none_or(Meter::needs_tokens)
    }

    /// Turn a decoder result into frames. `upstream_ended`: the upstream
    /// body is over, so a stream not marked done was cut.
    fn frames(&mut self, result: AdapterResult<StreamEvents>, upstream_ended: bool) -> Frames {
        let events = match result {
            Err(e) => {
                tracing::warn!(error = %e, cause = e.cause(), "plugin failed while decoding a stream");
                return Frames::failed(super::plugin_error(&self.state, &e), None);
            }
            Ok(Err(e)) => return Frames::failed(client_error(&e, &self.channel), Some(e.kind)),
            Ok(Ok(events)) => events,
        };
        let mut out = Frames::empty();
        for chunk in events.chunks {
            let generated = self.needs_text().then_some(&mut self.generated);
            // One pass: validate the chunk, and take its text for the bill
            // (and translate it).
            let step = match &mut self.framing {
                Framing::Translated(t) => translate(&chunk, t.as_mut(), generated, &mut out.bytes),
                _ if !generated_text(&chunk, generated) => Chunk::Malformed,
                Framing::Sse => {
                    out.bytes.put_slice(b"data: ");
                    out.bytes.put_slice(&chunk);
                    out.bytes.put_slice(b"\n\n");
                    Chunk::Sent
                }
                Framing::Held => {
                    out.held.push(chunk);
                    Chunk::Sent
                }
            };
            match step {
                Chunk::Sent => out.chunks += 1,
                Chunk::Malformed => {
                    let e = PluginError::malformed(self.decoder.plugin_name(), "a stream chunk that is not JSON");
                    tracing::warn!(channel = self.channel.id, "adapter emitted a stream chunk that is not JSON");
                    return Frames::failed(super::plugin_error(&self.state, &e), None);
                }
                Chunk::Ended => {
                    out.chunks += 1;
                    out.end = true;
                    return out;
                }
            }
        }
        if events.usage.is_some() {
            self.usage = events.usage;
        }
        if let Some(err) = self.stopped.take() {
            // A filter ended the stream: not the upstream's fault.
            out.early_error = Some(err);
            out.end = true;
        } else if let Some(e) = events.error {
            out.early_error = Some(client_error(&e, &self.channel));
            out.early_kind = Some(e.kind);
            out.end = true;
        } else if events.done {
            match &mut self.framing {
                Framing::Translated(t) => t.finish(&mut out.bytes),
                Framing::Sse => out.bytes.put_slice(b"data: [DONE]\n\n"),
                // The translator finishes when it takes the held chunks.
                Framing::Held => {}
            }
            out.end = true;
        } else if upstream_ended {
            tracing::warn!(channel = self.channel.id, "upstream stream ended before its end marker");
            out.early_error =
                Some(upstream_error("stream_truncated", "The upstream stream ended before it was complete."));
            out.early_kind = Some(ErrorKind::Transient);
            out.cut = true;
            out.end = true;
        }
        out
    }

    /// Read upstream until the decoder yields something to send or the
    /// stream ends.
    async fn next_frames(&mut self) -> Frames {
        let next = tokio::select! {
            biased;
            () = &mut self.deadline => None,
            next = self.upstream.next() => Some(next),
        };
        let Some(next) = next else {
            return self.limit("stream_too_long", "The stream reached the gateway's duration limit.");
        };
        match next {
            Some(Err(e)) if e.is_timeout() => self.broken("stalled"),
            Some(Err(_)) => self.broken("connection dropped mid-stream"),
            Some(Ok(bytes)) => {
                self.received = self.received.saturating_add(bytes.len() as u64);
                if self.received > self.max_bytes {
                    return self.limit("stream_too_large", "The stream reached the gateway's length limit.");
                }
                let r = self.decoder.feed(&bytes).await;
                let r = self.filtered(r).await;
                self.frames(r, false)
            }
            None => {
                let r = self.decoder.finish().await;
                let r = self.filtered(r).await;
                self.frames(r, true)
            }
        }
    }

    fn broken(&self, what: &str) -> Frames {
        tracing::warn!(channel = self.channel.id, "upstream stream {what}");
        let mut f = Frames::failed(
            upstream_error("upstream_error", &format!("The upstream stream {what}.")),
            Some(ErrorKind::Transient),
        );
        f.cut = true;
        f
    }

    fn limit(&self, code: &'static str, message: &str) -> Frames {
        tracing::warn!(channel = self.channel.id, received = self.received, "{message}");
        let mut f = Frames::failed(upstream_error(code, message), None);
        f.limited = true;
        f
    }

    /// The stream failed after reaching the client: count it against the
    /// channel when the upstream is to blame.
    fn failed_midway(&mut self, f: &Frames) {
        self.ending.upstream_cut |= f.cut;
        self.ending.limited |= f.limited;
        if let Some(kind) = &f.early_kind {
            crate::metrics::get().attempt(self.channel.id, super::kind_name(kind));
            self.stats.failure();
            let consecutive_failures = self.stats.view().consecutive_failures;
            self.state.health.on_failure(&self.channel, &Fault { kind, key: None, consecutive_failures });
        }
    }

    /// Finish the translator's blocking work (a store write) before the
    /// events just produced reach the client.
    async fn translator_pending(&mut self) {
        if let Framing::Translated(t) = &mut self.framing
            && let Some(job) = t.pending()
        {
            let _ = tokio::task::spawn_blocking(job).await;
        }
    }

    /// Settle the bill once (at the end of the stream): with the upstream's
    /// usage, else counting what was delivered off the async workers.
    async fn settle(&mut self) {
        let Some(meter) = self.meter.take() else { return };
        let ending = Ending { ttft: self.ttft, ..self.ending };
        let tokens = meter.tokens(self.usage, std::mem::take(&mut self.generated)).await;
        if let Err(e) = meter.settle(tokens, ending) {
            tracing::error!(error = %e, "a delivered stream's usage is held in memory until the storage recovers");
        }
        tracing::debug!(channel = self.channel.id,
            plugin = self.decoder.plugin_name(), usage = ?self.usage, "stream finished");
    }
}

impl Drop for LiveStream {
    /// A stream dropped before its end is a client that went away: bill
    /// what was delivered — counted on the blocking pool, never here.
    fn drop(&mut self) {
        let Some(meter) = self.meter.take() else { return };
        let _entered = self.span.enter();
        tracing::info!(channel = self.channel.id, "client disconnected mid-stream");
        let ending = Ending { ttft: self.ttft, client_disconnected: true, ..self.ending };
        let (usage, generated) = (self.usage, std::mem::take(&mut self.generated));
        let span = self.span.clone();
        let finish = move |meter: Meter, tokens| {
            if let Err(e) = meter.settle(tokens, ending) {
                let _entered = span.enter();
                tracing::error!(error = %e, "an abandoned stream's usage is held in memory until the storage recovers");
            }
        };
        if usage.is_some() || !meter.needs_tokens() {
            // Nothing to count.
            let tokens = meter.tokens_blocking(usage, &generated);
            finish(meter, tokens);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let tokens = meter.tokens(usage, generated).await;
                    finish(meter, tokens);
                });
            }
            Err(_) => {
                std::thread::spawn(move || {
                    let tokens = meter.tokens_blocking(usage, &generated);
                    finish(meter, tokens);
                });
            }
        }
    }
}

/// Read upstream until the decoder yields something to send. `Err` means
/// the stream failed before any byte reached the client (failover allowed
/// when the error is a retryable upstream one). A stream that ends without
/// a single chunk — an empty or non-SSE `200` — is such a failure.
pub(crate) async fn first_frames(live: &mut LiveStream) -> Result<Frames, (ApiError, Option<ErrorKind>)> {
    loop {
        let step = live.next_frames().await;
        if let Some(err) = step.early_error {
            return Err((err, step.early_kind));
        }
        if step.chunks > 0 {
            return Ok(step);
        }
        if step.end {
            tracing::warn!(channel = live.channel.id, "upstream sent an empty stream");
            let err = upstream_error("upstream_error", "The upstream returned an empty stream.");
            return Err((err, Some(ErrorKind::Transient)));
        }
    }
}

/// The response body: `first` then everything after it.
pub(crate) fn body(first: Frames, live: LiveStream) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let state = (Some(first), live, false);
    futures_util::stream::unfold(state, |(pending, mut live, ended)| {
        // Each step runs in the request's span (the handler has returned).
        let span = live.span.clone();
        async move {
            if let Some(f) = pending {
                let end = f.end;
                if end {
                    live.settle().await;
                }
                live.translator_pending().await;
                return Some((Ok(f.bytes.freeze()), (None, live, end)));
            }
            if ended {
                return None;
            }
            loop {
                let mut step = live.next_frames().await;
                if let Some(err) = &step.early_error {
                    error_frame(&mut step.bytes, err, &mut live.framing);
                    live.failed_midway(&step);
                }
                if step.end {
                    // Journaled before the last frame leaves.
                    live.settle().await;
                    live.translator_pending().await;
                    return Some((Ok(step.bytes.freeze()), (None, live, true)));
                }
                if !step.bytes.is_empty() {
                    live.translator_pending().await;
                    return Some((Ok(step.bytes.freeze()), (None, live, false)));
                }
            }
        }
        .instrument(span)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `c` per chunk, `e` per error and `f` at the end.
    struct Log;

    impl Translator for Log {
        fn chunk(&mut self, _: &ChatChunk<'_>, out: &mut BytesMut) {
            out.extend_from_slice(b"c");
        }
        fn error(&mut self, _: &serde_json::Value, out: &mut BytesMut) {
            out.extend_from_slice(b"e");
        }
        fn finish(&mut self, out: &mut BytesMut) {
            out.extend_from_slice(b"f");
        }
    }

    #[test]
    fn one_parse_translates_a_chunk_and_takes_its_text_and_an_error_chunk_ends_the_stream() {
        let (mut out, mut generated) = (BytesMut::new(), GeneratedText::default());
        let chunk = br#"{"choices":[{"delta":{"content":"hi ","reasoning_content":"why","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}]}"#;
        assert!(matches!(translate(chunk, &mut Log, Some(&mut generated), &mut out), Chunk::Sent));
        assert_eq!(generated.total_bytes(), 9, "content, reasoning, the call's name and arguments");
        assert!(matches!(translate(br#"{"error":{"message":"x"}}"#, &mut Log, None, &mut out), Chunk::Ended));
        assert!(matches!(translate(b"data: not json", &mut Log, None, &mut out), Chunk::Malformed));
        assert_eq!(&out[..], b"ce");
    }
}
