//! A chat completion as an Anthropic Message, serialized from typed
//! structs (no JSON tree on the request's worker).

use serde::Serialize;
use serde_json::Value;

use crate::ingress::answer::{ChatAnswer, ChatUsage};

/// Anthropic's `stop_reason` for a chat `finish_reason`.
pub fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage object.
#[derive(Serialize)]
pub struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation_input_tokens: u64,
}

/// Anthropic's usage object for a chat `usage`.
pub fn usage(usage: Option<ChatUsage>) -> Usage {
    let u = usage.unwrap_or_default();
    Usage {
        input_tokens: u.uncached_prompt(),
        output_tokens: u.completion_tokens,
        cache_read_input_tokens: u.prompt_tokens_details.cached_tokens,
        cache_creation_input_tokens: 0,
    }
}

/// A tool call's `arguments` (a JSON string) as the `input` object.
pub fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ if arguments.trim().is_empty() => Value::Object(serde_json::Map::new()),
        _ => serde_json::json!({"_raw_arguments": arguments}),
    }
}

/// A content block of a Message.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block<'a> {
    /// Reasoning.
    Thinking {
        /// The reasoning text.
        thinking: &'a str,
        /// Anthropic's signature (none from other providers).
        signature: &'static str,
    },
    /// Text.
    Text {
        /// The text.
        text: &'a str,
    },
    /// A tool call.
    ToolUse {
        /// The call's id.
        id: &'a str,
        /// The tool's name.
        name: &'a str,
        /// The arguments.
        input: Value,
    },
}

/// An Anthropic Message.
#[derive(Serialize)]
pub struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<Block<'a>>,
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
    usage: Usage,
}

/// The Message for chat completion `chat`, answering for `model`.
pub fn message<'a>(chat: &'a ChatAnswer<'a>, model: &'a str, id: &'a str) -> Message<'a> {
    let (text, reasoning, calls, finish) = chat.message();
    let mut content = Vec::with_capacity(1 + calls.len());
    if !reasoning.is_empty() {
        content.push(Block::Thinking { thinking: reasoning, signature: "" });
    }
    if !text.is_empty() {
        content.push(Block::Text { text });
    }
    for call in calls {
        let (id, name, arguments) = call.parts();
        content.push(Block::ToolUse { id, name, input: tool_input(arguments) });
    }
    Message {
        id,
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason: stop_reason(finish),
        stop_sequence: None,
        usage: usage(chat.usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_and_tool_calls_become_blocks() {
        let chat = json!({"choices": [{"message": {"role": "assistant", "content": "hi",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}})
        .to_string();
        let chat = ChatAnswer::parse(chat.as_bytes()).expect("an answer");
        let m = serde_json::to_value(message(&chat, "claude-x", "msg_1")).expect("json");
        assert_eq!(m["content"][0], json!({"type": "text", "text": "hi"}));
        assert_eq!(m["content"][1]["input"], json!({"a": 1}));
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["usage"]["input_tokens"], 6);
        assert_eq!(m["usage"]["cache_read_input_tokens"], 4);
    }
}
