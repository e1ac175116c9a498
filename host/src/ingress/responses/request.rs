//! A Responses API request as a chat completion request: one borrowed,
//! typed pass over the client's body, the chat request serialized from
//! typed parts (`ingress::chat_request`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::ingress::answer::text;
use crate::ingress::chat_request::{
    ChatMessage, ChatRequest, ChatTool, ChatToolChoice, FunctionDef, ImageUrl, InContent, JsonSchema, NewMessage, Part,
    Raw, ResponseFormat, ToolCall, UserContent, bad, compact, read, string, top_level,
};

/// The top-level fields of a Responses request; any JSON value is
/// accepted here and checked field by field, so a wrong type gets an error
/// naming that field.
#[derive(Default, Deserialize)]
pub struct ResponsesRequest<'a> {
    #[serde(default, borrow)]
    model: Raw<'a>,
    #[serde(default, borrow)]
    input: Raw<'a>,
    #[serde(default, borrow)]
    instructions: Raw<'a>,
    #[serde(default, borrow)]
    stream: Raw<'a>,
    #[serde(default, borrow)]
    store: Raw<'a>,
    #[serde(default, borrow)]
    previous_response_id: Raw<'a>,
    #[serde(default, borrow)]
    max_output_tokens: Raw<'a>,
    #[serde(default, borrow)]
    temperature: Raw<'a>,
    #[serde(default, borrow)]
    top_p: Raw<'a>,
    #[serde(default, borrow)]
    parallel_tool_calls: Raw<'a>,
    #[serde(default, borrow)]
    user: Raw<'a>,
    #[serde(default, borrow)]
    safety_identifier: Raw<'a>,
    #[serde(default, borrow)]
    tools: Raw<'a>,
    #[serde(default, borrow)]
    tool_choice: Raw<'a>,
    #[serde(default, borrow)]
    text: Raw<'a>,
    #[serde(default, borrow)]
    metadata: Raw<'a>,
    #[serde(default, borrow)]
    reasoning: Raw<'a>,
}

impl<'a> ResponsesRequest<'a> {
    /// Read the client's `body`.
    pub fn parse(body: &'a [u8]) -> Result<Self, ApiError> {
        top_level(body)
    }

    /// The request parameters a `response` object echoes, by name, as
    /// written (`None` when absent).
    pub fn echoed(&self) -> [(&'static str, Raw<'a>); 13] {
        [
            ("instructions", self.instructions),
            ("max_output_tokens", self.max_output_tokens),
            ("metadata", self.metadata),
            ("parallel_tool_calls", self.parallel_tool_calls),
            ("previous_response_id", self.previous_response_id),
            ("reasoning", self.reasoning),
            ("store", self.store),
            ("temperature", self.temperature),
            ("text", self.text),
            ("tool_choice", self.tool_choice),
            ("tools", self.tools),
            ("top_p", self.top_p),
            ("user", self.user),
        ]
    }

    /// The response a request continues.
    pub fn previous_response_id(&self) -> Result<Option<Cow<'a, str>>, ApiError> {
        let Some(raw) = self.previous_response_id else { return Ok(None) };
        string(raw, || bad("previous_response_id", "Invalid type for 'previous_response_id': expected a string."))
            .map(Some)
    }

    /// `stream` (off unless `true`).
    pub fn stream(&self) -> Result<bool, ApiError> {
        flag(self.stream, "stream", false)
    }

    /// Whether the request keeps no state here (`store: false`, no
    /// `previous_response_id`): it may pass, as written, to a channel
    /// whose upstream serves the Responses API itself.
    pub fn stateless(&self) -> bool {
        self.store.is_some_and(|s| s.get() == "false") && self.previous_response_id.is_none()
    }
}

/// A boolean parameter, `default` when absent.
fn flag(raw: Raw<'_>, key: &str, default: bool) -> Result<bool, ApiError> {
    match raw {
        None => Ok(default),
        Some(raw) => read(raw, || bad(key, format!("Invalid type for '{key}': expected a boolean."))),
    }
}

/// What a translated request carries besides the chat body.
pub struct Translated {
    /// The chat completion request, serialized.
    pub chat: Vec<u8>,
    /// `stream`.
    pub stream: bool,
    /// `store` (on unless `false`, as OpenAI's).
    pub store: bool,
    /// With `store`, the conversation so far without `instructions`: what
    /// a later `previous_response_id` continues from (the answer is added
    /// to it). Empty otherwise.
    pub conversation: Vec<Value>,
}

/// An input item (or a message), any type; each type reads its own fields.
#[derive(Deserialize)]
struct InItem<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    role: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Raw<'a>,
    #[serde(default, borrow, deserialize_with = "text")]
    call_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    arguments: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    output: Raw<'a>,
}

/// A content part.
#[derive(Deserialize)]
struct InPart<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    image_url: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    detail: Raw<'a>,
}

impl<'a> InPart<'a> {
    fn parse(raw: &'a RawValue) -> Result<Self, ApiError> {
        read(raw, || bad("input", "Each content part needs a 'type'."))
    }
}

/// A function tool.
#[derive(Deserialize)]
struct InTool<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    description: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    parameters: Raw<'a>,
    #[serde(default, borrow)]
    strict: Raw<'a>,
}

/// `text.format` (and `tool_choice` objects: `type` and `name`).
#[derive(Deserialize)]
struct InFormat<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Raw<'a>,
    #[serde(default, borrow)]
    schema: Raw<'a>,
    #[serde(default, borrow)]
    strict: Raw<'a>,
    #[serde(default, borrow)]
    description: Raw<'a>,
}

/// `text` (only `format` is read).
#[derive(Deserialize)]
struct InText<'a> {
    #[serde(default, borrow)]
    format: Raw<'a>,
}

/// The text of a content part list or string.
fn text_of(content: Raw<'_>) -> String {
    let Some(content) = content else { return String::new() };
    match InContent::parse(content) {
        Some(InContent::Text(text)) => text.into_owned(),
        Some(InContent::List(parts)) => {
            let texts: Vec<_> = parts
                .into_iter()
                .filter_map(|raw| {
                    let part = InPart::parse(raw).ok()?;
                    part.text.or(part.refusal)
                })
                .collect();
            texts.concat()
        }
        None => compact(content),
    }
}

/// One content part as a chat part.
fn part(raw: &RawValue) -> Result<Part<'_>, ApiError> {
    let p = InPart::parse(raw)?;
    match p.kind.as_deref() {
        Some("input_text" | "output_text" | "text") => {
            let text = p.text.ok_or_else(|| bad("input", "A text part needs 'text'."))?;
            Ok(Part::Text { text })
        }
        Some("refusal") => Ok(Part::Text { text: p.refusal.unwrap_or_default() }),
        Some("input_image") => {
            let url = p.image_url.ok_or_else(|| {
                bad("input", "Images are accepted as 'image_url' (a URL or a data URL); file ids are not supported.")
            })?;
            let detail = p.detail.filter(|d| d.get().starts_with('"'));
            Ok(Part::ImageUrl { image_url: ImageUrl { url, detail } })
        }
        Some(other) => Err(bad("input", format!("Input content of type '{other}' is not supported."))),
        None => Err(bad("input", "Each content part needs a 'type'.")),
    }
}

/// A message item as a chat message.
fn message<'a>(item: InItem<'a>) -> Result<NewMessage<'a>, ApiError> {
    let role = match item.role.as_deref() {
        Some(r @ ("user" | "assistant" | "system")) => r,
        // Not every provider knows `developer`; it means the same.
        Some("developer") => "system",
        _ => return Err(bad("input", "Each message's 'role' must be user, assistant, system or developer.")),
    };
    let wrong = || bad("input", "Each message's 'content' must be a string or a list of parts.");
    let content = match item.content.and_then(InContent::parse).ok_or_else(wrong)? {
        InContent::Text(text) if role == "assistant" => {
            return Ok(NewMessage::Assistant { content: Some(text), tool_calls: Vec::new() });
        }
        InContent::List(_) if role == "assistant" => {
            let text = text_of(item.content);
            return Ok(NewMessage::Assistant { content: Some(Cow::Owned(text)), tool_calls: Vec::new() });
        }
        InContent::Text(text) => UserContent::Text(text),
        InContent::List(parts) => UserContent::of(parts.into_iter().map(part).collect::<Result<_, _>>()?),
    };
    Ok(match role {
        "system" => NewMessage::System { content },
        _ => NewMessage::User { content },
    })
}

/// `input` (a string or a list of items) as chat messages.
fn conversation(input: Raw<'_>) -> Result<Vec<NewMessage<'_>>, ApiError> {
    let input = input.ok_or_else(|| bad("input", "'input' is required."))?;
    let wrong = || bad("input", "Invalid type for 'input': expected a string or a list of items.");
    let items = match InContent::parse(input).ok_or_else(wrong)? {
        InContent::Text(text) => return Ok(vec![NewMessage::User { content: UserContent::Text(text) }]),
        InContent::List(items) => items,
    };
    let mut messages: Vec<NewMessage> = Vec::with_capacity(items.len());
    for raw in items {
        let item: InItem = read(raw, || bad("input", "Each input item must be an object."))?;
        match item.kind.as_deref() {
            None | Some("message") => messages.push(message(item)?),
            Some("function_call") => {
                let (Some(call_id), Some(name)) = (item.call_id, item.name) else {
                    return Err(bad("input", "A function_call item needs 'call_id' and 'name'."));
                };
                let call = ToolCall::function(call_id, name, item.arguments.unwrap_or(Cow::Borrowed("{}")));
                // Consecutive calls belong to one assistant turn.
                match messages.last_mut() {
                    Some(NewMessage::Assistant { tool_calls, .. }) if !tool_calls.is_empty() => tool_calls.push(call),
                    _ => messages.push(NewMessage::Assistant { content: None, tool_calls: vec![call] }),
                }
            }
            Some("function_call_output") => {
                let call_id =
                    item.call_id.ok_or_else(|| bad("input", "A function_call_output item needs 'call_id'."))?;
                messages.push(NewMessage::Tool { tool_call_id: call_id, content: text_of(item.output) });
            }
            // Reasoning items of earlier turns are not replayed.
            Some("reasoning") => {}
            Some(other) => return Err(bad("input", format!("Input items of type '{other}' are not supported."))),
        }
    }
    Ok(messages)
}

/// Function tools as chat tools.
fn tools(list: &RawValue) -> Result<Vec<ChatTool<'_>>, ApiError> {
    let list: Vec<&RawValue> = read(list, || bad("tools", "Invalid type for 'tools': expected a list."))?;
    let only_functions = || bad("tools", "Only function tools are supported.");
    let mut out = Vec::with_capacity(list.len());
    for raw in list {
        let tool: InTool = read(raw, only_functions)?;
        if tool.kind.as_deref() != Some("function") {
            return Err(only_functions());
        }
        let name = tool.name.ok_or_else(|| bad("tools", "Each function tool needs a 'name'."))?;
        let (description, parameters, strict) = (tool.description, tool.parameters, tool.strict);
        out.push(FunctionDef { name, description, parameters, strict }.into());
    }
    Ok(out)
}

/// `tool_choice` as chat's.
fn tool_choice(raw: &RawValue) -> Result<ChatToolChoice<'_>, ApiError> {
    let wrong = || bad("tool_choice", "'tool_choice' must be auto, none, required or a function.");
    if raw.get().starts_with('"') {
        return match string(raw, wrong)?.as_ref() {
            "auto" => Ok(ChatToolChoice::Mode("auto")),
            "none" => Ok(ChatToolChoice::Mode("none")),
            "required" => Ok(ChatToolChoice::Mode("required")),
            _ => Err(wrong()),
        };
    }
    let choice: InFormat = read(raw, wrong)?;
    if choice.kind.as_deref() != Some("function") {
        return Err(wrong());
    }
    match choice.name.and_then(|n| string(n, wrong).ok()) {
        Some(name) => Ok(ChatToolChoice::function(name)),
        None => Err(bad("tool_choice", "A function tool choice needs a 'name'.")),
    }
}

/// `text.format` as chat's `response_format`.
fn response_format(text: &RawValue) -> Result<Option<ResponseFormat<'_>>, ApiError> {
    let text: InText = read(text, || bad("text", "Invalid type for 'text': expected an object."))?;
    let Some(format) = text.format else { return Ok(None) };
    let wrong = || bad("text.format", "'text.format.type' must be text, json_object or json_schema.");
    let format: InFormat = read(format, wrong)?;
    match format.kind.as_deref() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let (name, schema, strict, description) = (format.name, format.schema, format.strict, format.description);
            Ok(Some(ResponseFormat::JsonSchema { json_schema: JsonSchema { name, schema, strict, description } }))
        }
        _ => Err(wrong()),
    }
}

/// The chat request for Responses request `req`, continuing `history`
/// (the stored conversation of `previous_response_id`).
pub fn to_chat(req: &ResponsesRequest<'_>, history: Vec<Value>) -> Result<Translated, ApiError> {
    let no_model = || bad("model", "'model' is required.");
    let model = string(req.model.ok_or_else(no_model)?, no_model)?;
    if model.is_empty() {
        return Err(no_model());
    }
    let (stream, store) = (req.stream()?, flag(req.store, "store", true)?);
    let new = conversation(req.input)?;
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(1 + history.len() + new.len());
    if let Some(instructions) = req.instructions {
        let wrong = || bad("instructions", "Invalid type for 'instructions': expected a string.");
        let instructions = string(instructions, wrong)?;
        messages.push(NewMessage::System { content: UserContent::Text(instructions) }.into());
    }
    messages.extend(history.iter().map(ChatMessage::Kept));
    let first_new = messages.len();
    messages.extend(new.into_iter().map(ChatMessage::New));
    let mut chat = ChatRequest::new(model, messages).streamed(stream);
    chat.max_tokens = req.max_output_tokens;
    chat.temperature = req.temperature;
    chat.top_p = req.top_p;
    chat.parallel_tool_calls = req.parallel_tool_calls;
    chat.user = req.safety_identifier.filter(|id| id.get().starts_with('"')).or(req.user);
    chat.tools = req.tools.map(tools).transpose()?;
    chat.tool_choice = req.tool_choice.map(tool_choice).transpose()?;
    chat.response_format = req.text.map(response_format).transpose()?.flatten();
    let body = chat.to_vec()?;
    let conversation = if store {
        let added = chat.messages[first_new..].iter().map(|m| serde_json::to_value(m).unwrap_or(Value::Null));
        let added: Vec<Value> = added.collect();
        history.into_iter().chain(added).collect()
    } else {
        Vec::new()
    };
    Ok(Translated { chat: body, stream, store, conversation })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn translate(body: &Value, history: Vec<Value>) -> Result<(Value, Translated), ApiError> {
        let text = body.to_string();
        let req = ResponsesRequest::parse(text.as_bytes())?;
        let t = to_chat(&req, history)?;
        Ok((serde_json::from_slice(&t.chat).expect("JSON"), t))
    }

    #[test]
    fn items_become_a_chat_conversation() {
        let body = json!({
            "model": "m", "instructions": "be brief", "max_output_tokens": 50, "store": true,
            "safety_identifier": "s-1", "user": "u-1",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "input": [
                {"role": "developer", "content": "rules"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"},
                    {"type": "refusal", "refusal": "b"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
                {"type": "reasoning", "summary": []}
            ]
        });
        let (chat, t) = translate(&body, vec![json!({"role": "user", "content": "before"})]).expect("ok");
        let m = chat["messages"].as_array().expect("messages");
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(m[1], json!({"role": "user", "content": "before"}));
        assert_eq!(m[2], json!({"role": "system", "content": "rules"}));
        assert_eq!(m[3]["content"][1]["image_url"], json!({"url": "data:image/png;base64,AA", "detail": "low"}));
        assert_eq!(m[4], json!({"role": "assistant", "content": "ab"}));
        assert_eq!(m[5]["tool_calls"][1]["function"], json!({"name": "f", "arguments": "{}"}));
        assert_eq!(m[6], json!({"role": "tool", "tool_call_id": "c1", "content": "42"}));
        assert_eq!(m.len(), 7);
        assert_eq!(chat["max_tokens"], 50);
        assert_eq!(chat["user"], "s-1", "safety_identifier stands for the end user");
        assert_eq!(
            chat["response_format"]["json_schema"],
            json!({"name": "x", "schema": {"type": "object"}, "strict": true})
        );
        assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "f"}}));
        assert_eq!(
            chat["tools"][0],
            json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})
        );
        assert!(t.store && !t.stream);
        assert_eq!(t.conversation.len(), 6, "instructions are not part of the stored conversation");
        assert_eq!(t.conversation[1], json!({"role": "system", "content": "rules"}));
    }

    #[test]
    fn a_string_input_streams_and_stores_nothing_when_asked() {
        let body = json!({"model": "m", "input": "hi", "stream": true, "store": false, "tool_choice": "required",
            "text": {"format": {"type": "json_object"}}});
        let (chat, t) = translate(&body, vec![]).expect("ok");
        assert_eq!(chat["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(
            (chat["stream"].clone(), chat["stream_options"].clone()),
            (json!(true), json!({"include_usage": true}))
        );
        assert_eq!(
            (chat["tool_choice"].clone(), chat["response_format"].clone()),
            (json!("required"), json!({"type": "json_object"}))
        );
        assert!(t.stream && !t.store && t.conversation.is_empty());
        let req = ResponsesRequest::parse(br#"{"store":false,"input":"x"}"#).expect("parses");
        assert!(req.stateless());
        let req = ResponsesRequest::parse(br#"{"store":false,"previous_response_id":"resp_1"}"#).expect("parses");
        assert!(!req.stateless());
    }

    #[test]
    fn hosted_tools_wrong_types_and_missing_input_are_refused() {
        let refused = |body: Value| translate(&body, vec![]).err().and_then(|e| e.param);
        assert_eq!(
            refused(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})).as_deref(),
            Some("tools")
        );
        assert_eq!(refused(json!({"model": "m"})).as_deref(), Some("input"));
        assert_eq!(refused(json!({"model": "m", "input": 3})).as_deref(), Some("input"));
        assert_eq!(refused(json!({"model": "", "input": "x"})).as_deref(), Some("model"));
        assert_eq!(refused(json!({"model": "m", "input": "x", "stream": 1})).as_deref(), Some("stream"));
        assert_eq!(refused(json!({"model": "m", "input": "x", "instructions": []})).as_deref(), Some("instructions"));
        assert_eq!(
            refused(json!({"model": "m", "input": "x", "tool_choice": "maybe"})).as_deref(),
            Some("tool_choice")
        );
        assert_eq!(
            refused(json!({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}})).as_deref(),
            Some("text.format")
        );
        assert_eq!(refused(json!({"model": "m", "input": "x", "text": 1})).as_deref(), Some("text"));
        assert_eq!(refused(json!({"model": "m", "input": [{"type": "computer_call"}]})).as_deref(), Some("input"));
        assert_eq!(
            refused(json!({"model": "m", "input": [{"role": "tool", "content": "x"}]})).as_deref(),
            Some("input")
        );
        let bad_id = ResponsesRequest::parse(br#"{"previous_response_id":7}"#).expect("parses");
        assert_eq!(bad_id.previous_response_id().err().and_then(|e| e.param).as_deref(), Some("previous_response_id"));
        assert!(ResponsesRequest::parse(b"[]").is_err());
    }
}
