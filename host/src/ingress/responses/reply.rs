//! The `response` object of the Responses API, built from a chat answer.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::ingress::answer::ChatAnswer;
use crate::ingress::answer::ChatUsage;
use crate::ingress::chat_request::literal;
use crate::ingress::new_id;
use crate::ingress::responses::request::ResponsesRequest;

/// The fixed part of a response: its id, creation time, model and the
/// echoed request parameters (each serialized once, when it is made).
#[derive(Clone)]
pub struct Frame {
    /// `resp_…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The requested model.
    pub model: String,
    echoed: Vec<(&'static str, Box<RawValue>)>,
}

/// What an absent echoed parameter reads as.
fn echo_default(key: &str) -> &'static str {
    match key {
        "store" | "parallel_tool_calls" => "true",
        "tools" => "[]",
        "tool_choice" => "\"auto\"",
        "metadata" => "{}",
        "text" => r#"{"format":{"type":"text"}}"#,
        _ => "null",
    }
}

impl Frame {
    /// The frame of a response to `request`.
    pub fn new(request: &ResponsesRequest<'_>, model: &str, created_at: u64) -> Self {
        let echoed = request
            .echoed()
            .into_iter()
            .map(|(key, raw)| (key, raw.unwrap_or_else(|| literal(echo_default(key))).to_owned()))
            .collect();
        Self { id: new_id("resp_"), created_at, model: model.to_string(), echoed }
    }

    /// The `response` object in `status` with `output` and chat `usage`.
    pub fn response<'a>(
        &'a self,
        status: Status<'a>,
        output: &'a [OutputItem<'a>],
        usage: Option<ChatUsage>,
    ) -> ResponseObject<'a> {
        ResponseObject { frame: self, status, output, usage: usage.map(usage_object) }
    }
}

/// A `response` object, serialized straight from its parts.
pub struct ResponseObject<'a> {
    frame: &'a Frame,
    status: Status<'a>,
    output: &'a [OutputItem<'a>],
    usage: Option<Usage>,
}

/// `response.error` of a failed response.
#[derive(Serialize)]
struct ErrorObject<'a> {
    code: &'static str,
    message: &'a str,
}

/// `response.incomplete_details`.
#[derive(Serialize)]
struct Incomplete {
    reason: &'static str,
}

impl Serialize for ResponseObject<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let f = self.frame;
        let mut map = serializer.serialize_map(Some(10 + f.echoed.len()))?;
        map.serialize_entry("id", &f.id)?;
        map.serialize_entry("object", "response")?;
        map.serialize_entry("created_at", &f.created_at)?;
        map.serialize_entry("status", self.status.name())?;
        let error = match self.status {
            Status::Failed(message) => Some(ErrorObject { code: "server_error", message }),
            _ => None,
        };
        map.serialize_entry("error", &error)?;
        let incomplete = match self.status {
            Status::Incomplete(reason) => Some(Incomplete { reason }),
            _ => None,
        };
        map.serialize_entry("incomplete_details", &incomplete)?;
        map.serialize_entry("model", &f.model)?;
        map.serialize_entry("output", self.output)?;
        map.serialize_entry("truncation", "disabled")?;
        map.serialize_entry("usage", &self.usage)?;
        for (key, value) in &f.echoed {
            map.serialize_entry(key, value)?;
        }
        map.end()
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

/// The Responses API's usage object.
#[derive(Serialize)]
pub struct Usage {
    input_tokens: u64,
    input_tokens_details: CachedTokens,
    output_tokens: u64,
    output_tokens_details: ReasoningTokens,
    total_tokens: u64,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

/// The Responses API's usage object for a chat `usage`.
pub fn usage_object(u: ChatUsage) -> Usage {
    Usage {
        input_tokens: u.prompt_tokens,
        input_tokens_details: CachedTokens { cached_tokens: u.prompt_tokens_details.cached_tokens },
        output_tokens: u.completion_tokens,
        output_tokens_details: ReasoningTokens { reasoning_tokens: u.completion_tokens_details.reasoning_tokens },
        total_tokens: u.total(),
    }
}

/// An output item.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem<'a> {
    /// The assistant's text.
    Message {
        /// `msg_…`.
        id: &'a str,
        /// `in_progress` or `completed`.
        status: &'static str,
        /// Always `assistant`.
        role: &'static str,
        /// The text part (none while an empty message streams in).
        content: Vec<OutputText<'a>>,
    },
    /// A function call.
    FunctionCall {
        /// `fc_…`.
        id: &'a str,
        /// The id the client answers with `function_call_output`.
        call_id: &'a str,
        /// The function's name.
        name: &'a str,
        /// The arguments, a JSON text.
        arguments: &'a str,
        /// `in_progress` or `completed`.
        status: &'static str,
    },
}

/// An `output_text` content part.
#[derive(Serialize)]
pub struct OutputText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [u8; 0],
}

impl<'a> OutputText<'a> {
    /// A part with `text`.
    pub fn new(text: &'a str) -> Self {
        Self { kind: "output_text", text, annotations: [] }
    }
}

/// An assistant message output item.
pub fn message_item<'a>(id: &'a str, text: &'a str, status: &'static str) -> OutputItem<'a> {
    let content = if status == "in_progress" && text.is_empty() { Vec::new() } else { vec![OutputText::new(text)] };
    OutputItem::Message { id, status, role: "assistant", content }
}

/// A function call output item.
pub fn call_item<'a>(
    id: &'a str,
    call_id: &'a str,
    name: &'a str,
    arguments: &'a str,
    status: &'static str,
) -> OutputItem<'a> {
    OutputItem::FunctionCall { id, call_id, name, arguments, status }
}

/// The output items of a chat answer (`ids` holds their ids: made here,
/// borrowed by the items).
pub fn output_items<'a>(chat: &'a ChatAnswer<'a>, ids: &'a mut Vec<String>) -> Vec<OutputItem<'a>> {
    let (text, _, calls, _) = chat.message();
    ids.clear();
    if !text.is_empty() {
        ids.push(new_id("msg_"));
    }
    ids.extend(calls.iter().map(|_| new_id("fc_")));
    let ids: &'a [String] = ids;
    let mut ids = ids.iter();
    let mut items = Vec::with_capacity(1 + calls.len());
    if !text.is_empty()
        && let Some(id) = ids.next()
    {
        items.push(message_item(id, text, "completed"));
    }
    for (call, id) in calls.iter().zip(ids) {
        let (call_id, name, arguments) = call.parts();
        items.push(call_item(id, call_id, name, arguments, "completed"));
    }
    items
}

/// The assistant's turn as a chat message (what a continuation replays).
pub fn assistant_message(text: &str, calls: &[(&str, &str, &str)]) -> Value {
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
