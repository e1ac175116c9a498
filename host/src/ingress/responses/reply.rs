//! The `response` object of the Responses API, built from a chat answer.

use serde_json::{Map, Value, json};

use crate::ingress::{new_id, usage_numbers};

/// Request parameters a `response` object echoes back.
const ECHOED: &[&str] = &[
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "previous_response_id",
    "reasoning",
    "store",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "user",
];

/// The fixed part of a response: its id, creation time, model and the
/// echoed request parameters.
#[derive(Clone)]
pub struct Frame {
    /// `resp_…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The requested model.
    pub model: String,
    echoed: Map<String, Value>,
}

impl Frame {
    /// The frame of a response to `request`.
    pub fn new(request: &Map<String, Value>, model: &str, created_at: u64) -> Self {
        let mut echoed = Map::new();
        for key in ECHOED {
            echoed.insert((*key).to_string(), request.get(*key).cloned().unwrap_or(Value::Null));
        }
        for (key, default) in [
            ("store", json!(true)),
            ("parallel_tool_calls", json!(true)),
            ("tools", json!([])),
            ("tool_choice", json!("auto")),
            ("metadata", json!({})),
            ("text", json!({"format": {"type": "text"}})),
        ] {
            if echoed[key].is_null() {
                echoed.insert(key.into(), default);
            }
        }
        Self { id: new_id("resp_"), created_at, model: model.to_string(), echoed }
    }

    /// The `response` object in `status` with `output` and chat `usage`.
    pub fn response(&self, status: Status, output: &[Value], usage: Option<&Value>) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status.name(),
            "error": null, "incomplete_details": null, "model": self.model, "output": output,
            "truncation": "disabled", "usage": usage.map(usage_object),
        });
        if let Status::Incomplete(reason) = status {
            r["incomplete_details"] = json!({"reason": reason});
        }
        if let Status::Failed(message) = status {
            r["error"] = json!({"code": "server_error", "message": message});
        }
        let map = r.as_object_mut().expect("object");
        map.extend(self.echoed.clone());
        r
    }
}

/// A response's status.
#[derive(Clone, Copy)]
pub enum Status<'a> {
    /// Being generated (stream events before the end).
    InProgress,
    /// Done.
    Completed,
    /// Cut short, with the reason (`max_output_tokens`, `content_filter`).
    Incomplete(&'static str),
    /// Failed, with a message for the client.
    Failed(&'a str),
}

impl Status<'_> {
    fn name(&self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Incomplete(_) => "incomplete",
            Status::Failed(_) => "failed",
        }
    }

    /// The status a chat `finish_reason` ends in.
    pub fn of_finish(finish: Option<&str>) -> Status<'static> {
        match finish {
            Some("length") => Status::Incomplete("max_output_tokens"),
            Some("content_filter") => Status::Incomplete("content_filter"),
            _ => Status::Completed,
        }
    }
}

/// The Responses API's usage object for a chat `usage`.
pub fn usage_object(usage: &Value) -> Value {
    let (prompt, completion, cached, reasoning) = usage_numbers(Some(usage));
    json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
           "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
           "total_tokens": prompt.saturating_add(completion)})
}

/// An assistant message output item.
pub fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" && text.is_empty() {
        json!([])
    } else {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

/// A function call output item.
pub fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

/// The output items of a chat answer's message.
pub fn output_items(message: &Value) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        items.push(message_item(&new_id("msg_"), text, "completed"));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let f = &call["function"];
        items.push(call_item(
            &new_id("fc_"),
            call["id"].as_str().unwrap_or_default(),
            f["name"].as_str().unwrap_or_default(),
            f["arguments"].as_str().unwrap_or_default(),
            "completed",
        ));
    }
    items
}

/// The assistant's turn as a chat message (what a continuation replays).
pub fn assistant_message(text: &str, calls: &[(String, String, String)]) -> Value {
    let mut m = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { Value::from(text) }});
    if !calls.is_empty() {
        let calls: Vec<Value> = calls
            .iter()
            .map(
                |(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}),
            )
            .collect();
        m["tool_calls"] = Value::Array(calls);
    }
    m
}
