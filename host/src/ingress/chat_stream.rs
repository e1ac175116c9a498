//! Re-framing a relayed chat-completion stream (OpenAI SSE, `data: {…}`
//! frames ending with `data: [DONE]`) as another protocol's events, chunk
//! by chunk as it arrives. Dropping the re-framed stream drops the relayed
//! one, so a client that leaves is billed exactly as on the chat route.

use axum::body::{Body, BodyDataStream};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde_json::Value;

/// Largest SSE frame buffered while waiting for its end.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A protocol's side of the re-framing.
pub trait Translator: Send + 'static {
    /// One chat completion chunk.
    fn chunk(&mut self, chunk: &Value, out: &mut BytesMut);
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

/// Write one SSE event: `event: NAME` (when given) and `data: JSON`.
pub fn write_event(out: &mut BytesMut, event: Option<&str>, data: &Value) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

struct State<T> {
    body: BodyDataStream,
    buffer: BytesMut,
    translator: T,
    done: bool,
}

impl<T: Translator> State<T> {
    /// Translate every complete frame in the buffer; true once the stream
    /// is over.
    fn drain(&mut self, out: &mut BytesMut) -> bool {
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let frame = self.buffer.split_to(end + 2);
            let text = String::from_utf8_lossy(&frame);
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                self.translator.finish(out);
                return true;
            }
            match serde_json::from_str::<Value>(&data) {
                Ok(v) if v.get("error").is_some() => {
                    self.translator.error(&v["error"], out);
                    return true;
                }
                Ok(v) => self.translator.chunk(&v, out),
                Err(_) => {
                    tracing::warn!("skipping a relayed stream frame that is not JSON");
                }
            }
        }
        false
    }
}

/// `body` (a relayed chat stream) re-framed by `translator`.
pub fn reframe<T: Translator>(body: Body, translator: T) -> impl Stream<Item = Result<Bytes, axum::Error>> + Send {
    let state = State { body: body.into_data_stream(), buffer: BytesMut::new(), translator, done: false };
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

    #[derive(Default)]
    struct Log(Vec<String>);
    impl Translator for Log {
        fn chunk(&mut self, chunk: &Value, out: &mut BytesMut) {
            self.0.push(chunk["n"].to_string());
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

    #[tokio::test]
    async fn an_error_frame_ends_the_stream_and_a_missing_done_still_finishes() {
        assert_eq!(run(&["data: {\"n\":1}\n\ndata: {\"error\":{}}\n\ndata: {\"n\":2}\n\n"]).await, "ce");
        assert_eq!(run(&["data: {\"n\":1}\n\n"]).await, "cf");
    }
}
