//! Re-framing a relayed chat-completion stream (OpenAI SSE, `data: {…}`
//! frames ending with `data: [DONE]`) as another protocol's events, chunk
//! by chunk as it arrives. Dropping the re-framed stream drops the relayed
//! one, so a client that leaves is billed exactly as on the chat route.

use std::borrow::Cow;

use axum::body::{Body, BodyDataStream};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;

use super::answer::{ChatUsage, or_default, text, usage};

/// Largest SSE frame buffered while waiting for its end.
const MAX_FRAME: usize = 16 * 1024 * 1024;

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

/// Write one SSE event: `event: NAME` (when given) and `data: JSON`,
/// serialized straight into `out`.
pub fn write_event<T: serde::Serialize + ?Sized>(out: &mut BytesMut, event: Option<&str>, data: &T) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(out.writer(), data).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
}

struct State<T> {
    body: BodyDataStream,
    buffer: BytesMut,
    /// Bytes of `buffer` already searched for a frame end (a frame that
    /// arrives in many pieces is not rescanned from its start each time).
    searched: usize,
    translator: T,
    done: bool,
}

impl<T: Translator> State<T> {
    /// Translate every complete frame in the buffer; true once the stream
    /// is over.
    fn drain(&mut self, out: &mut BytesMut) -> bool {
        loop {
            let from = self.searched.saturating_sub(1);
            let Some(end) = frame_end(&self.buffer[from..]).map(|at| from + at) else {
                self.searched = self.buffer.len();
                break;
            };
            self.searched = 0;
            let frame = self.buffer.split_to(end + 2);
            let Some(data) = frame_data(&frame) else { continue };
            if *data == *b"[DONE]" {
                self.translator.finish(out);
                return true;
            }
            // Bytes, as every parse on the relay's path reads them.
            match serde_json::from_slice::<ChatChunk<'_>>(&data) {
                Ok(ChatChunk { error: Some(error), .. }) => {
                    self.translator.error(&error, out);
                    return true;
                }
                Ok(chunk) => self.translator.chunk(&chunk, out),
                Err(_) => {
                    tracing::warn!("skipping a relayed stream frame that is not JSON");
                }
            }
        }
        false
    }
}

/// Where the first `\n\n` (an SSE frame's end) starts in `bytes`.
fn frame_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find(|&at| bytes.get(at + 1) == Some(&b'\n'))
}

/// The `data:` payload of one SSE frame (several `data:` lines joined with
/// `\n`, as SSE does); none when it has no data line.
fn frame_data(frame: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut lines = frame.split(|b| *b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"data:").map(<[u8]>::trim_ascii_start)
    });
    let first = lines.next()?;
    let Some(second) = lines.next() else { return Some(Cow::Borrowed(first)) };
    let mut joined = [first, second].join(&b'\n');
    for line in lines {
        joined.push(b'\n');
        joined.extend_from_slice(line);
    }
    Some(Cow::Owned(joined))
}

/// `body` (a relayed chat stream) re-framed by `translator`.
pub fn reframe<T: Translator>(body: Body, translator: T) -> impl Stream<Item = Result<Bytes, axum::Error>> + Send {
    let state = State { body: body.into_data_stream(), buffer: BytesMut::new(), searched: 0, translator, done: false };
    futures_util::stream::unfold(state, |mut s| async move {
        let mut out = BytesMut::new();
        while out.is_empty() {
            if s.done {
                return None;
            }
            match s.body.next().await {
                Some(Ok(bytes)) => {
                    s.buffer.extend_from_slice(&bytes);
                    if s.buffer.len() > MAX_FRAME {
                        s.translator.error(&stream_broken(), &mut out);
                        s.done = true;
                    } else {
                        s.done = s.drain(&mut out);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "a relayed stream failed");
                    s.translator.error(&stream_broken(), &mut out);
                    s.done = true;
                }
                None => {
                    s.done = true;
                    s.translator.finish(&mut out);
                }
            }
        }
        if let Some(job) = s.translator.pending() {
            let _ = tokio::task::spawn_blocking(job).await;
        }
        Some((Ok(out.freeze()), s))
    })
}

fn stream_broken() -> Value {
    serde_json::json!({"message": "The upstream stream failed.", "type": "upstream_error", "code": "upstream_error"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_s_data_lines_are_joined_and_other_lines_ignored() {
        assert_eq!((frame_end(b"a\nb\n\nc"), frame_end(b"a\nb\n"), frame_end(b"\n\n")), (Some(3), None, Some(0)));
        assert_eq!(frame_data(b"data: {\"a\":1}\n\n").as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(frame_data(b"event: x\r\ndata:{}\r\n\r\n").as_deref(), Some(&b"{}"[..]));
        assert_eq!(frame_data(b": ping\ndata: [1,\ndata: 2]\n\n").as_deref(), Some(&b"[1,\n2]"[..]));
        assert_eq!(frame_data(b": keep-alive\n\n"), None);
    }

    #[derive(Default)]
    struct Log(Vec<String>);
    impl Translator for Log {
        fn chunk(&mut self, chunk: &ChatChunk<'_>, out: &mut BytesMut) {
            self.0.push(chunk.choices.len().to_string());
            out.extend_from_slice(b"c");
        }
        fn error(&mut self, _: &Value, out: &mut BytesMut) {
            out.extend_from_slice(b"e");
        }
        fn finish(&mut self, out: &mut BytesMut) {
            out.extend_from_slice(b"f");
        }
    }

    async fn run(parts: &[&'static str]) -> String {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p.as_bytes()))).collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let out: Vec<_> = reframe(body, Log::default()).collect().await;
        out.into_iter().map(|b| String::from_utf8(b.expect("bytes").to_vec()).expect("utf8")).collect()
    }

    #[tokio::test]
    async fn frames_split_anywhere_are_reassembled() {
        assert_eq!(run(&["data: {\"n\":1}\n", "\ndata: {\"n\"", ":2}\n\ndata: [DONE]\n\n"]).await, "ccf");
    }

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

    #[tokio::test]
    async fn an_error_frame_ends_the_stream_and_a_missing_done_still_finishes() {
        assert_eq!(run(&["data: {\"n\":1}\n\ndata: {\"error\":{}}\n\ndata: {\"n\":2}\n\n"]).await, "ce");
        assert_eq!(run(&["data: {\"n\":1}\n\n"]).await, "cf");
    }
}
