//! Re-framing a relayed chat-completion stream as another protocol's
//! events, chunk by chunk as it arrives: the relay parses each chunk once
//! into a [`ChatChunk`] and hands it to the route's [`Translator`] (see
//! `relay::PendingStream`). Dropping the re-framed stream drops the relayed
//! one, so a client that leaves is billed exactly as on the chat route.

use std::borrow::Cow;

use axum::body::Body;
use axum::response::Response;
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::Value;

use super::answer::{ChatUsage, or_default, text, usage};
use crate::error::ApiError;
use crate::relay::PendingStream;

/// What the translators read of a chat completion chunk, borrowed from
/// the frame where the JSON allows (no DOM per chunk).
#[derive(Debug, Default, Deserialize)]
pub struct ChatChunk<'a> {
    /// The choices; translators read the first.
    #[serde(default, borrow, deserialize_with = "or_default")]
    pub choices: Vec<ChoiceDelta<'a>>,
    /// Usage, on the last chunk when asked for.
    #[serde(default, deserialize_with = "usage")]
    pub usage: Option<ChatUsage>,
    /// An error the relay ended the stream with.
    #[serde(default)]
    pub error: Option<Value>,
}

/// One choice of a chunk.
#[derive(Debug, Default, Deserialize)]
pub struct ChoiceDelta<'a> {
    /// What the choice adds.
    #[serde(default, borrow, deserialize_with = "or_default")]
    pub delta: Delta<'a>,
    /// Why the choice ended, on its last chunk.
    #[serde(default, borrow, deserialize_with = "text")]
    pub finish_reason: Option<Cow<'a, str>>,
}

/// A choice's increment.
#[derive(Debug, Default, Deserialize)]
pub struct Delta<'a> {
    /// Text.
    #[serde(default, borrow, deserialize_with = "text")]
    pub content: Option<Cow<'a, str>>,
    /// Reasoning text (DeepSeek-style `reasoning_content`).
    #[serde(default, borrow, deserialize_with = "text")]
    pub reasoning_content: Option<Cow<'a, str>>,
    /// Tool call fragments.
    #[serde(default, borrow, deserialize_with = "or_default")]
    pub tool_calls: Vec<ToolCallDelta<'a>>,
}

/// A fragment of one tool call (a whole call in a non-streamed answer).
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct ToolCallDelta<'a> {
    /// Which call of the turn.
    #[serde(default, deserialize_with = "or_default")]
    pub index: u64,
    /// The call's id, on its first fragment.
    #[serde(default, borrow, deserialize_with = "text")]
    pub id: Option<Cow<'a, str>>,
    /// Name and argument text.
    #[serde(default, borrow, deserialize_with = "or_default")]
    pub function: FunctionDelta<'a>,
}

/// A tool call fragment's function part.
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct FunctionDelta<'a> {
    /// The function's name, on the first fragment.
    #[serde(default, borrow, deserialize_with = "text")]
    pub name: Option<Cow<'a, str>>,
    /// More of the JSON arguments.
    #[serde(default, borrow, deserialize_with = "text")]
    pub arguments: Option<Cow<'a, str>>,
}

impl ToolCallDelta<'_> {
    /// (id, name, arguments), empty where absent.
    pub fn parts(&self) -> (&str, &str, &str) {
        let f = &self.function;
        (
            self.id.as_deref().unwrap_or_default(),
            f.name.as_deref().unwrap_or_default(),
            f.arguments.as_deref().unwrap_or_default(),
        )
    }
}

impl ChatChunk<'_> {
    /// The first choice's delta and finish reason.
    pub fn first(&self) -> Option<&ChoiceDelta<'_>> {
        self.choices.first()
    }
}

/// A non-empty optional string.
pub fn non_empty<'s>(s: &'s Option<Cow<'_, str>>) -> Option<&'s str> {
    s.as_deref().filter(|t| !t.is_empty())
}

/// A protocol's side of the re-framing.
pub trait Translator: Send + 'static {
    /// One chat completion chunk.
    fn chunk(&mut self, chunk: &ChatChunk<'_>, out: &mut BytesMut);
    /// The relay ended the stream with an error (`{"error":{…}}`).
    fn error(&mut self, error: &Value, out: &mut BytesMut);
    /// The stream ended (`[DONE]`, or the body ended without it).
    fn finish(&mut self, out: &mut BytesMut);
    /// Blocking work (a store write) to finish before the events just
    /// produced reach the client.
    fn pending(&mut self) -> Option<Box<dyn FnOnce() + Send>> {
        None
    }
}

/// `out` as an `io::Write` for `serde_json`. Unlike `BufMut::writer`, whose
/// `write` takes `min(remaining_mut, len)` bytes, each write here is
/// `extend_from_slice` of a length the compiler sees: the serializer's
/// many one-byte writes (`{`, `"`, `:`, `,`) become stores instead of
/// `memset`/`memcpy` calls (~800 per Responses stream, measured).
pub struct JsonOut<'a>(pub &'a mut BytesMut);

impl std::io::Write for JsonOut<'_> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(buf);
        Ok(())
    }

    #[inline]
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write one SSE event: `event: NAME` (when given) and `data: JSON`,
/// serialized straight into `out`.
pub fn write_event<T: serde::Serialize + ?Sized>(out: &mut BytesMut, event: Option<&str>, data: &T) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    let start = out.len();
    if serde_json::to_writer(JsonOut(out), data).is_err() {
        out.truncate(start);
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
}

/// A translated route's relayed stream `response` as `translator`'s
/// events.
pub fn translated<T: Translator>(response: &Response, translator: T) -> Result<Body, ApiError> {
    let pending = response.extensions().get::<PendingStream>().and_then(|p| p.translated(Box::new(translator)));
    pending.ok_or_else(|| {
        tracing::error!("a translated route's stream came without its pending stream");
        ApiError::internal()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_and_odd_types_in_a_chunk_read_as_absent() {
        let frame = r#"{"choices":[{"index":0,"delta":{"content":"hi","tool_calls":null,"reasoning_content":null,"refusal":null},"finish_reason":null}],"usage":null}"#;
        let chunk: ChatChunk<'_> = serde_json::from_str(frame).expect("a chunk with nulls");
        assert_eq!(chunk.first().and_then(|c| c.delta.content.as_deref()), Some("hi"));
        let frame = r#"{"choices":[{"delta":null,"finish_reason":"stop"}]}"#;
        let chunk: ChatChunk<'_> = serde_json::from_str(frame).expect("a null delta");
        assert_eq!(chunk.first().and_then(|c| c.finish_reason.as_deref()), Some("stop"));
        let frame = r#"{"choices":[{"delta":{"tool_calls":[{"index":null,"id":"c","function":{"name":"f","arguments":{"a":1}}}]}}]}"#;
        let chunk: ChatChunk<'_> = serde_json::from_str(frame).expect("odd types");
        let call = &chunk.choices[0].delta.tool_calls[0];
        assert_eq!(
            (call.index, call.function.name.as_deref(), call.function.arguments.as_deref()),
            (0, Some("f"), None)
        );
        assert!(serde_json::from_str::<ChatChunk<'_>>(r#"{"choices":null}"#).is_ok());
    }
}
