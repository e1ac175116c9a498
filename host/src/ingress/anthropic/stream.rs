//! A chat completion stream as Anthropic's stream events: `message_start`,
//! `ping`, `content_block_start` / `_delta` / `_stop` (text, `tool_use`
//! with `input_json_delta`, thinking), `message_delta` with the usage, and
//! `message_stop`; an `error` event when the relay fails mid-stream.

use crate::ingress::answer::ChatUsage;
use bytes::BytesMut;
use serde::Serialize;
use serde_json::Value;

use super::error_body;
use super::reply::{self, stop_reason, usage};
use crate::ingress::chat_stream::{ChatChunk, Translator, non_empty, write_event};

/// What kind of content block is open.
#[derive(PartialEq)]
enum Block {
    Text,
    Thinking,
    /// A tool call: the chat stream's tool-call index.
    Tool(u64),
}

/// `content_block_delta`, serialized without building a JSON tree.
#[derive(Serialize)]
struct BlockDelta<'a, D> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u64,
    delta: &'a D,
}

/// An event that is only its type (`ping`, `message_stop`).
#[derive(Serialize)]
struct Bare {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// `content_block_start`.
#[derive(Serialize)]
struct BlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u64,
    content_block: reply::Block<'a>,
}

/// `content_block_stop`.
#[derive(Serialize)]
struct BlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u64,
}

/// `message_start`'s message: empty, with zero usage.
#[derive(Serialize)]
struct StartMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: [u8; 0],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: reply::Usage,
}

/// `message_start`.
#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: StartMessage<'a>,
}

/// `message_delta`: the stop reason and the usage.
#[derive(Serialize)]
struct MessageDelta {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta,
    usage: reply::Usage,
}

/// `message_delta.delta`.
#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<&'static str>,
}

/// An `input_json_delta`.
#[derive(Serialize)]
struct JsonDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    partial_json: &'a str,
}

/// A text or thinking delta.
#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a str>,
}

/// The translator's state.
pub struct MessagesStream {
    id: String,
    model: String,
    started: bool,
    open: Option<Block>,
    /// Index of the next content block.
    next_index: u64,
    finish: Option<String>,
    usage: Option<ChatUsage>,
}

impl MessagesStream {
    /// A stream answering for `model` as message `id`.
    pub fn new(id: String, model: String) -> Self {
        Self { id, model, started: false, open: None, next_index: 0, finish: None, usage: None }
    }

    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let message = StartMessage {
            id: &self.id,
            kind: "message",
            role: "assistant",
            model: &self.model,
            content: [],
            stop_reason: None,
            stop_sequence: None,
            usage: usage(None),
        };
        write_event(out, Some("message_start"), &MessageStart { kind: "message_start", message });
        write_event(out, Some("ping"), &Bare { kind: "ping" });
    }

    fn close(&mut self, out: &mut BytesMut) {
        if self.open.take().is_some() {
            let index = self.next_index - 1;
            write_event(out, Some("content_block_stop"), &BlockStop { kind: "content_block_stop", index });
        }
    }

    /// Make `block` the open block (closing another), starting it with
    /// the content block `start` makes.
    fn open<'a>(&mut self, block: Block, start: impl FnOnce() -> reply::Block<'a>, out: &mut BytesMut) -> u64 {
        if self.open.as_ref() == Some(&block) {
            return self.next_index - 1;
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some(block);
        let start = BlockStart { kind: "content_block_start", index, content_block: start() };
        write_event(out, Some("content_block_start"), &start);
        index
    }

    fn delta<D: Serialize>(out: &mut BytesMut, index: u64, delta: &D) {
        write_event(out, Some("content_block_delta"), &BlockDelta { kind: "content_block_delta", index, delta });
    }
}

impl Translator for MessagesStream {
    fn chunk(&mut self, chunk: &ChatChunk<'_>, out: &mut BytesMut) {
        self.start(out);
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        let Some(choice) = chunk.first() else { return };
        let delta = &choice.delta;
        if let Some(thinking) = non_empty(&delta.reasoning_content) {
            let start = || reply::Block::Thinking { thinking: "", signature: "" };
            let index = self.open(Block::Thinking, start, out);
            Self::delta(out, index, &TextDelta { kind: "thinking_delta", text: None, thinking: Some(thinking) });
        }
        if let Some(text) = non_empty(&delta.content) {
            let index = self.open(Block::Text, || reply::Block::Text { text: "" }, out);
            Self::delta(out, index, &TextDelta { kind: "text_delta", text: Some(text), thinking: None });
        }
        for call in &delta.tool_calls {
            let start = || reply::Block::ToolUse {
                id: call.id.as_deref().unwrap_or_default(),
                name: call.function.name.as_deref().unwrap_or_default(),
                input: Value::Object(serde_json::Map::new()),
            };
            let index = self.open(Block::Tool(call.index), start, out);
            if let Some(args) = non_empty(&call.function.arguments) {
                Self::delta(out, index, &JsonDelta { kind: "input_json_delta", partial_json: args });
            }
        }
        if let Some(reason) = &choice.finish_reason {
            self.finish = Some(reason.to_string());
        }
    }

    fn error(&mut self, error: &Value, out: &mut BytesMut) {
        self.start(out);
        let status = match error["type"].as_str() {
            Some("invalid_request_error") => 400,
            Some("rate_limit_error") => 429,
            _ => 502,
        };
        let message = error["message"].as_str().unwrap_or("The upstream stream failed.");
        write_event(out, Some("error"), &error_body(status, message));
    }

    fn finish(&mut self, out: &mut BytesMut) {
        self.start(out);
        self.close(out);
        let delta = StopDelta { stop_reason: stop_reason(self.finish.as_deref()), stop_sequence: None };
        let event = MessageDelta { kind: "message_delta", delta, usage: usage(self.usage) };
        write_event(out, Some("message_delta"), &event);
        write_event(out, Some("message_stop"), &Bare { kind: "message_stop" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(chunks: &[Value]) -> Vec<String> {
        let mut t = MessagesStream::new("msg_1".into(), "m".into());
        let mut out = BytesMut::new();
        for c in chunks {
            let text = c.to_string();
            let chunk: ChatChunk<'_> = serde_json::from_str(&text).expect("a chat chunk");
            t.chunk(&chunk, &mut out);
        }
        t.finish(&mut out);
        String::from_utf8(out.to_vec())
            .expect("utf8")
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .map(String::from)
            .collect()
    }

    #[test]
    fn text_then_a_tool_call_opens_and_closes_blocks_in_order() {
        let c =
            |delta: Value, finish: Value| json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        let got = events(&[
            c(json!({"role": "assistant", "content": ""}), Value::Null),
            c(json!({"content": "Hi"}), Value::Null),
            c(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]}),
                Value::Null,
            ),
            c(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":1}"}}]}), json!("tool_calls")),
        ]);
        assert_eq!(
            got,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
    }
}
