//! Incremental Server-Sent Events parser (the WHATWG event-stream format).
//!
//! Bytes may be split anywhere, including inside a UTF-8 sequence or a
//! `\r\n` pair; complete events come out in order.

use serde::{Deserialize, Serialize};

/// Longest line (or event) a parser buffers before the stream is refused:
/// an upstream that never sends a newline must not grow a decoder's state
/// without bound.
pub const MAX_PENDING: usize = 4 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, when given.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Buffers partial lines and yields complete events.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// An empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes; returns the events completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if self.buf.is_empty() {
            // The usual case: no partial line before, so read the lines in
            // place and keep only the tail.
            let used = self.lines(bytes, &mut out);
            self.buf.extend_from_slice(&bytes[used..]);
        } else {
            self.buf.extend_from_slice(bytes);
            let buf = std::mem::take(&mut self.buf);
            let used = self.lines(&buf, &mut out);
            self.buf = buf;
            self.buf.drain(..used);
        }
        out
    }

    /// Handle every complete line of `text`, pushing the events they
    /// complete; returns how many bytes they took.
    fn lines(&mut self, text: &[u8], out: &mut Vec<SseEvent>) -> usize {
        let mut start = 0;
        while let Some(rel) = memchr::memchr2(b'\n', b'\r', &text[start..]) {
            let end = start + rel;
            // A lone '\r' at the very end may be the first half of "\r\n".
            if text[end] == b'\r' && end + 1 == text.len() {
                break;
            }
            let line = utf8_lossy(&text[start..end]);
            let skip = if text[end] == b'\r' && text.get(end + 1) == Some(&b'\n') { 2 } else { 1 };
            start = end + skip;
            if let Some(event) = self.line(&line) {
                out.push(event);
            }
        }
        start
    }

    /// Bytes held for an unfinished line or event.
    pub fn pending(&self) -> usize {
        self.buf.len() + self.data.as_ref().map_or(0, String::len)
    }

    /// [`Self::push`], refusing a stream whose unfinished line or event
    /// grows past [`MAX_PENDING`].
    pub fn push_bounded(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, crate::UpstreamError> {
        let events = self.push(bytes);
        if self.pending() > MAX_PENDING {
            return Err(crate::error(
                crate::ErrorKind::Transient,
                "upstream stream sent an oversized event without a line break",
                None,
            ));
        }
        Ok(events)
    }

    /// The stream ended: dispatch a last event not followed by a blank line.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.buf.is_empty() {
            let line = utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            if let Some(event) = self.line(&line) {
                return Some(event);
            }
        }
        self.dispatch()
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        self.data.take().map(|data| SseEvent { event, data })
    }
}

/// `bytes` as text, invalid sequences replaced. Valid text (nearly every
/// line) is checked by `str::from_utf8`, which reads ASCII a word at a time;
/// `String::from_utf8_lossy` walks it byte by byte (the decoder's largest
/// cost in wasm before).
fn utf8_lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// What differs between providers that stream JSON objects as SSE events:
/// how one event becomes OpenAI chunks. [`SseDecoder`] does the rest.
pub trait SseEvents {
    /// State for a new stream of the request described by `ctx`.
    fn new(ctx: crate::RequestContext) -> Self;
    /// Handle one event (`name` is its `event:` field; `data` its parsed
    /// JSON): push chunks and usage to `out`, or set `out.error`.
    fn event(
        &mut self,
        name: Option<&str>,
        data: serde_json::Value,
        out: &mut crate::StreamEvents,
    ) -> Result<(), crate::UpstreamError>;
    /// Whether the provider has signalled the end of the stream.
    fn done(&self) -> bool;
}

/// What a non-JSON `data:` payload that relays and providers are known to
/// send means: `[DONE]` ends the stream (OpenAI's marker, which some
/// proxies append to other providers' streams); keep-alive words are
/// skipped. Any other non-JSON data is an error.
fn sentinel(data: &str) -> Option<bool> {
    let d = data.trim();
    if d == "[DONE]" {
        return Some(true);
    }
    ["ping", "keep-alive", "keepalive", "heartbeat"].iter().any(|w| d.eq_ignore_ascii_case(w)).then_some(false)
}

/// A [`crate::StreamDecoder`] for SSE streams of JSON events: parses the
/// bytes (split anywhere), skips blank events and keep-alive sentinels,
/// ends at a `[DONE]` marker, turns any other non-JSON data into a
/// transient error and stops at the first in-band error. Its state (the
/// parser's partial line and `E`) is serialized between calls, so `E` must
/// be too.
#[derive(Serialize, Deserialize)]
#[serde(bound = "E: Serialize + serde::de::DeserializeOwned")]
pub struct SseDecoder<E> {
    parser: SseParser,
    events: E,
    failed: bool,
    #[serde(default)]
    ended: bool,
}

impl<E: SseEvents> SseDecoder<E> {
    fn dispatch(&mut self, events: Vec<SseEvent>) -> Result<crate::StreamEvents, crate::UpstreamError> {
        let mut out = crate::StreamEvents::empty();
        for event in events {
            if self.failed || self.ended || event.data.trim().is_empty() {
                continue;
            }
            match sentinel(&event.data) {
                Some(true) => {
                    self.ended = true;
                    continue;
                }
                Some(false) => continue,
                None => {}
            }
            let data = serde_json::from_str(&event.data).map_err(|_| {
                crate::error(crate::ErrorKind::Transient, "upstream stream carried data that is not JSON", None)
            })?;
            self.events.event(event.event.as_deref(), data, &mut out)?;
            self.failed = out.error.is_some();
        }
        out.done = self.failed || self.ended || self.events.done();
        Ok(out)
    }
}

impl<E: SseEvents + Serialize + serde::de::DeserializeOwned> crate::StreamDecoder for SseDecoder<E> {
    fn new(ctx: crate::RequestContext) -> Self {
        Self { parser: SseParser::new(), events: E::new(ctx), failed: false, ended: false }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<crate::StreamEvents, crate::UpstreamError> {
        let events = self.parser.push_bounded(bytes)?;
        self.dispatch(events)
    }

    fn finish(&mut self) -> Result<crate::StreamEvents, crate::UpstreamError> {
        let events = self.parser.finish().into_iter().collect();
        self.dispatch(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_anywhere() {
        let input = b"data: {\"a\":1}\r\n\r\n: comment\n\nevent: x\ndata: l1\ndata: l2\n\ndata: [DONE]\n\n";
        for cut in 0..input.len() {
            let mut p = SseParser::new();
            let mut events = p.push(&input[..cut]);
            events.extend(p.push(&input[cut..]));
            events.extend(p.finish());
            let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
            assert_eq!(data, ["{\"a\":1}", "l1\nl2", "[DONE]"], "cut at {cut}");
            assert_eq!(events[1].event.as_deref(), Some("x"));
        }
    }

    #[test]
    fn invalid_utf8_is_replaced_and_a_split_sequence_is_joined() {
        let mut p = SseParser::new();
        let mut events = p.push(b"data: caf\xc3");
        events.extend(p.push(b"\xa9 \xff\n\n"));
        assert_eq!(events[0].data, "caf\u{e9} \u{fffd}");
    }

    #[test]
    fn last_event_without_blank_line() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: tail").is_empty());
        assert_eq!(p.finish().map(|e| e.data), Some("tail".to_string()));
    }
}

#[cfg(test)]
mod decoder_tests {
    use super::*;
    use crate::{RequestContext, StreamDecoder, StreamEvents, UpstreamError};

    /// Counts `n` fields; ends at `{"end": true}`.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Count(u64, bool);

    impl SseEvents for Count {
        fn new(_ctx: RequestContext) -> Self {
            Count(0, false)
        }
        fn event(&mut self, _: Option<&str>, v: serde_json::Value, _: &mut StreamEvents) -> Result<(), UpstreamError> {
            self.0 += v["n"].as_u64().unwrap_or(0);
            self.1 |= v["end"] == true;
            Ok(())
        }
        fn done(&self) -> bool {
            self.1
        }
    }

    fn ctx() -> RequestContext {
        crate::testing::stream_context("m")
    }

    #[test]
    fn sse_decoder_splits_anywhere_and_refuses_non_json() {
        let input = b"data: {\"n\": 2}\n\n: keep-alive\n\ndata:\n\nevent: x\ndata: {\"n\": 3, \"end\": true}\n\n";
        for cut in 0..input.len() {
            let mut d = SseDecoder::<Count>::new(ctx());
            let a = d.feed(&input[..cut]).expect("feed");
            let b = d.feed(&input[cut..]).expect("feed");
            assert!(!a.done || cut == input.len());
            assert!(b.done || a.done, "cut at {cut}");
            assert_eq!(d.events.0, 5);
        }
        let mut d = SseDecoder::<Count>::new(ctx());
        assert!(d.feed(b"data: {oops\n\n").is_err_and(|e| matches!(e.kind, crate::ErrorKind::Transient)));
    }

    #[test]
    fn keep_alive_sentinels_are_skipped_and_done_ends_the_stream() {
        let mut d = SseDecoder::<Count>::new(ctx());
        let out = d.feed(b"data: ping\n\ndata: {\"n\": 2}\n\ndata: Keep-Alive\n\n").expect("sentinels skipped");
        assert!(!out.done);
        let out = d.feed(b"data: [DONE]\n\ndata: {\"n\": 9}\n\n").expect("[DONE]");
        assert!(out.done, "[DONE] ends the stream");
        assert_eq!(d.events.0, 2, "nothing after [DONE] counts");
        let mut d = SseDecoder::<Count>::new(ctx());
        assert!(d.feed(b"data: pong pong\n\n").is_err(), "other non-JSON data is still an error");
    }
}
