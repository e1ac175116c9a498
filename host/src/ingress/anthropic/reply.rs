//! A chat completion as an Anthropic Message.

use serde_json::{Map, Value, json};

use crate::ingress::usage_numbers;

/// Anthropic's `stop_reason` for a chat `finish_reason`.
pub fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage object for a chat `usage`.
pub fn usage(usage: Option<&Value>) -> Value {
    let (prompt, completion, cached, _) = usage_numbers(usage);
    json!({"input_tokens": prompt.saturating_sub(cached), "output_tokens": completion,
           "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0})
}

/// A tool call's `arguments` (a JSON string) as the `input` object.
pub fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ if arguments.trim().is_empty() => json!({}),
        _ => json!({"_raw_arguments": arguments}),
    }
}

/// The Message for chat completion `chat`, answering for `model`.
pub fn message(chat: &Map<String, Value>, model: &str, id: &str) -> Value {
    let choice = &chat.get("choices").and_then(|c| c.get(0)).cloned().unwrap_or(Value::Null);
    let msg = &choice["message"];
    let mut content = Vec::new();
    if let Some(reasoning) = msg["reasoning_content"].as_str().filter(|r| !r.is_empty()) {
        content.push(json!({"type": "thinking", "thinking": reasoning, "signature": ""}));
    }
    if let Some(text) = msg["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("");
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": tool_input(arguments)}));
    }
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(choice["finish_reason"].as_str()), "stop_sequence": null,
        "usage": usage(chat.get("usage")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_tool_calls_become_blocks() {
        let chat = json!({"choices": [{"message": {"role": "assistant", "content": "hi",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}});
        let m = message(chat.as_object().expect("o"), "claude-x", "msg_1");
        assert_eq!(m["content"][0], json!({"type": "text", "text": "hi"}));
        assert_eq!(m["content"][1]["input"], json!({"a": 1}));
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["usage"]["input_tokens"], 6);
        assert_eq!(m["usage"]["cache_read_input_tokens"], 4);
    }
}
