//! An Anthropic Messages request as a chat completion request: one
//! borrowed, typed pass over the client's body and the chat request
//! serialized straight from typed parts (no JSON tree on the request's
//! worker; `docs/performance.md`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::ingress::answer::text;
use crate::ingress::chat_request::{
    ChatRequest, ChatTool, ChatToolChoice, FunctionDef, ImageUrl, InContent, NewMessage, Part, Raw, ToolCall,
    UserContent, bad, compact, literal, read, string, top_level,
};

/// The top-level fields of a Messages request the translation reads; any
/// JSON value is accepted here and checked field by field, so a wrong
/// type gets an error naming that field.
#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(default, borrow)]
    model: Raw<'a>,
    #[serde(default, borrow)]
    max_tokens: Raw<'a>,
    #[serde(default, borrow)]
    stream: Raw<'a>,
    #[serde(default, borrow)]
    system: Raw<'a>,
    #[serde(default, borrow)]
    messages: Raw<'a>,
    #[serde(default, borrow)]
    temperature: Raw<'a>,
    #[serde(default, borrow)]
    top_p: Raw<'a>,
    #[serde(default, borrow)]
    stop_sequences: Raw<'a>,
    #[serde(default, borrow)]
    metadata: Raw<'a>,
    #[serde(default, borrow)]
    tools: Raw<'a>,
    #[serde(default, borrow)]
    tool_choice: Raw<'a>,
}

/// One message of the request.
#[derive(Deserialize)]
struct InMessage<'a> {
    #[serde(default, borrow, deserialize_with = "text")]
    role: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Raw<'a>,
}

/// A content block, any type; each type reads its own fields.
#[derive(Deserialize)]
struct InBlock<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    source: Raw<'a>,
    #[serde(default, borrow, deserialize_with = "text")]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    input: Raw<'a>,
    #[serde(default, borrow, deserialize_with = "text")]
    tool_use_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Raw<'a>,
    #[serde(default, borrow)]
    is_error: Raw<'a>,
}

impl<'a> InBlock<'a> {
    fn parse(raw: &'a RawValue) -> Result<Self, ApiError> {
        read(raw, || bad("messages", "Each content block needs a 'type'."))
    }
}

/// An image block's `source`.
#[derive(Deserialize)]
struct ImageSource<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    media_type: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    data: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    url: Option<Cow<'a, str>>,
}

/// A tool definition.
#[derive(Deserialize)]
struct InTool<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    description: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    input_schema: Raw<'a>,
}

/// `tool_choice`.
#[derive(Deserialize)]
struct InToolChoice<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "text")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    disable_parallel_tool_use: Option<bool>,
}

/// `metadata` (only `user_id` is read).
#[derive(Deserialize)]
struct InMetadata<'a> {
    #[serde(default, borrow)]
    user_id: Raw<'a>,
}

/// The text of a `system` prompt: a string or a list of text blocks.
fn system_text(system: &RawValue) -> Result<Cow<'_, str>, ApiError> {
    let wrong = || bad("system", "Invalid type for 'system': expected a string or a list of text blocks.");
    match InContent::parse(system).ok_or_else(wrong)? {
        InContent::Text(text) => Ok(text),
        InContent::List(blocks) => {
            let not_text = || bad("system", "'system' blocks must be text blocks.");
            let mut texts = Vec::with_capacity(blocks.len());
            for raw in blocks {
                let block: InBlock = read(raw, not_text)?;
                match (block.kind.as_deref(), block.text) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => return Err(not_text()),
                }
            }
            Ok(Cow::Owned(texts.join("\n")))
        }
    }
}

/// An image block as a chat `image_url` part.
fn image_part<'a>(block: &InBlock<'a>) -> Result<Part<'a>, ApiError> {
    let unsupported = || bad("messages", "Unsupported image source type.");
    let source: ImageSource = read(block.source.ok_or_else(unsupported)?, unsupported)?;
    let url = match source.kind.as_deref() {
        Some("base64") => {
            let (Some(media), Some(data)) = (source.media_type, source.data) else {
                return Err(bad("messages", "An image's base64 source needs 'media_type' and 'data'."));
            };
            Cow::Owned(format!("data:{media};base64,{data}"))
        }
        Some("url") => match source.url {
            Some(url) => url,
            None => return Err(bad("messages", "An image's url source needs 'url'.")),
        },
        _ => return Err(unsupported()),
    };
    Ok(Part::ImageUrl { image_url: ImageUrl { url, detail: None } })
}

/// The content of a `tool_result` block as text.
fn tool_result_text(content: Raw<'_>) -> String {
    let Some(content) = content else { return String::new() };
    match InContent::parse(content) {
        Some(InContent::Text(text)) => text.into_owned(),
        Some(InContent::List(blocks)) => {
            let texts: Vec<_> = blocks.into_iter().filter_map(|raw| InBlock::parse(raw).ok()?.text).collect();
            texts.join("\n")
        }
        None => compact(content),
    }
}

/// One Anthropic message as one or more chat messages (tool results
/// become `tool` messages, in order).
fn message<'a>(raw: &'a RawValue, out: &mut Vec<NewMessage<'a>>) -> Result<(), ApiError> {
    let wrong_role = || bad("messages", "Each message's 'role' must be \"user\" or \"assistant\".");
    let msg: InMessage = read(raw, wrong_role)?;
    let role = match msg.role.as_deref() {
        Some(role @ ("user" | "assistant")) => role,
        _ => return Err(wrong_role()),
    };
    let assistant = role == "assistant";
    let wrong_content = || bad("messages", "Each message's 'content' must be a string or a list of blocks.");
    let blocks = match msg.content.and_then(InContent::parse).ok_or_else(wrong_content)? {
        InContent::Text(text) if assistant => {
            out.push(NewMessage::Assistant { content: Some(text), tool_calls: Vec::new() });
            return Ok(());
        }
        InContent::Text(text) => {
            out.push(NewMessage::User { content: UserContent::Text(text) });
            return Ok(());
        }
        InContent::List(blocks) => blocks,
    };
    let mut parts: Vec<Part> = Vec::new();
    let mut tool_calls: Vec<ToolCall> = Vec::new();
    for raw in blocks {
        let block = InBlock::parse(raw)?;
        match block.kind.as_deref() {
            Some("text") => {
                let text = block.text.ok_or_else(|| bad("messages", "A text block needs 'text'."))?;
                parts.push(Part::Text { text });
            }
            Some("image") if !assistant => parts.push(image_part(&block)?),
            Some("tool_use") if assistant => {
                let (Some(id), Some(name)) = (block.id, block.name) else {
                    return Err(bad("messages", "A tool_use block needs 'id' and 'name'."));
                };
                let arguments = block.input.map_or(Cow::Borrowed("{}"), |input| Cow::Owned(compact(input)));
                tool_calls.push(ToolCall::function(id, name, arguments));
            }
            Some("tool_result") if !assistant => {
                let id =
                    block.tool_use_id.ok_or_else(|| bad("messages", "A tool_result block needs 'tool_use_id'."))?;
                let mut text = tool_result_text(block.content);
                if block.is_error.is_some_and(|e| e.get() == "true") {
                    text = format!("Error: {text}");
                }
                out.push(NewMessage::Tool { tool_call_id: id, content: text });
            }
            // Reasoning of earlier turns is not replayed to other providers.
            Some("thinking" | "redacted_thinking") => {}
            Some(other) => {
                return Err(bad(
                    "messages",
                    format!("Content blocks of type '{other}' are not supported in {role} messages."),
                ));
            }
            None => return Err(bad("messages", "Each content block needs a 'type'.")),
        }
    }
    if assistant {
        let texts: Vec<&str> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_ref()),
                Part::ImageUrl { .. } => None,
            })
            .collect();
        let content = (!texts.is_empty()).then(|| Cow::Owned(texts.concat()));
        out.push(NewMessage::Assistant { content, tool_calls });
    } else if !parts.is_empty() {
        out.push(NewMessage::User { content: UserContent::of(parts) });
    }
    Ok(())
}

/// Anthropic tool definitions as chat tools.
fn tools(list: &RawValue) -> Result<Vec<ChatTool<'_>>, ApiError> {
    let list: Vec<&RawValue> = read(list, || bad("tools", "Invalid type for 'tools': expected a list."))?;
    let no_name = || bad("tools", "Each tool needs a 'name'.");
    let mut out = Vec::with_capacity(list.len());
    for raw in list {
        let tool: InTool = read(raw, no_name)?;
        if tool.kind.as_deref().is_some_and(|t| t != "custom") {
            return Err(bad("tools", "Only client tools (name, description, input_schema) are supported."));
        }
        let name = tool.name.ok_or_else(no_name)?;
        let parameters = Some(tool.input_schema.unwrap_or(literal(r#"{"type":"object"}"#)));
        out.push(FunctionDef { name, description: tool.description, parameters, strict: None }.into());
    }
    Ok(out)
}

/// `tool_choice` as chat's, and whether parallel tool use is off.
fn tool_choice(raw: &RawValue) -> Result<(ChatToolChoice<'_>, bool), ApiError> {
    let choice: InToolChoice = read(raw, || bad("tool_choice", "Invalid type for 'tool_choice': expected an object."))?;
    let chat = match choice.kind.as_deref() {
        Some("auto") => ChatToolChoice::Mode("auto"),
        Some("any") => ChatToolChoice::Mode("required"),
        Some("none") => ChatToolChoice::Mode("none"),
        Some("tool") => {
            let name = choice.name.ok_or_else(|| bad("tool_choice", "A tool choice of type 'tool' needs a 'name'."))?;
            ChatToolChoice::function(name)
        }
        _ => return Err(bad("tool_choice", "'tool_choice.type' must be auto, any, tool or none.")),
    };
    Ok((chat, choice.disable_parallel_tool_use == Some(true)))
}

/// A Messages request translated: the chat completion request's body and
/// whether it streams.
pub struct Translated {
    /// The chat completion request, serialized.
    pub chat: Vec<u8>,
    /// Whether the client asked for a stream.
    pub stream: bool,
}

/// The chat completion request for a Messages request `body`. With
/// `counting` (`count_tokens`), a missing `max_tokens` reads as 1;
/// otherwise it is required.
pub fn to_chat(body: &[u8], counting: bool) -> Result<Translated, ApiError> {
    let req: MessagesRequest = top_level(body)?;
    let no_model = || bad("model", "'model' is required.");
    let model = string(req.model.ok_or_else(no_model)?, no_model)?;
    if model.is_empty() {
        return Err(no_model());
    }
    let no_max = || bad("max_tokens", "'max_tokens' is required and must be a positive integer.");
    let max_tokens = match req.max_tokens {
        Some(raw) => read::<u64>(raw, no_max).map(|_| raw)?,
        None if counting => literal("1"),
        None => return Err(no_max()),
    };
    let stream = match req.stream {
        None => false,
        Some(raw) => read::<bool>(raw, || bad("stream", "Invalid type for 'stream': expected a boolean."))?,
    };
    let mut messages = Vec::new();
    if let Some(system) = req.system {
        messages.push(NewMessage::System { content: UserContent::Text(system_text(system)?) });
    }
    let not_list = || bad("messages", "'messages' is required and must be a list.");
    let list: Vec<&RawValue> = read(req.messages.ok_or_else(not_list)?, not_list)?;
    for raw in list {
        message(raw, &mut messages)?;
    }
    let user = match req.metadata {
        Some(raw) => {
            let metadata: InMetadata =
                read(raw, || bad("metadata", "Invalid type for 'metadata': expected an object."))?;
            metadata.user_id.filter(|u| u.get().starts_with('"'))
        }
        None => None,
    };
    let (tool_choice, parallel_off) = match req.tool_choice {
        Some(raw) => {
            let (choice, off) = tool_choice(raw)?;
            (Some(choice), off)
        }
        None => (None, false),
    };
    let mut chat = ChatRequest::new(model, messages.into_iter().map(Into::into).collect()).streamed(stream);
    chat.max_tokens = Some(max_tokens);
    chat.temperature = req.temperature;
    chat.top_p = req.top_p;
    chat.stop = req.stop_sequences;
    chat.user = user;
    chat.tools = req.tools.map(tools).transpose()?;
    chat.tool_choice = tool_choice;
    chat.parallel_tool_calls = parallel_off.then(|| literal("false"));
    Ok(Translated { chat: chat.to_vec()?, stream })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn chat(v: Value) -> Value {
        let out = to_chat(v.to_string().as_bytes(), false).expect("translates");
        serde_json::from_slice(&out.chat).expect("JSON")
    }

    fn refused(v: Value) -> Option<String> {
        to_chat(v.to_string().as_bytes(), false).err().expect("refused").param
    }

    #[test]
    fn system_blocks_tools_and_tool_results_translate() {
        let out = chat(json!({
            "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "be brief"}],
            "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
            "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12C"},
                    {"type": "text", "text": "thanks"}]}
            ]
        }));
        let m = out["messages"].as_array().expect("messages");
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(m[1], json!({"role": "user", "content": "weather?"}));
        assert_eq!(m[2]["content"], "checking");
        assert_eq!(m[2]["tool_calls"][0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "12C"}));
        assert_eq!(m[4], json!({"role": "user", "content": "thanks"}));
        assert_eq!(out["tool_choice"], "required");
        assert_eq!(out["parallel_tool_calls"], false);
        assert_eq!(out["stop"], json!(["END"]));
        assert_eq!(out["user"], "u1");
        assert_eq!(out["tools"][0]["function"]["parameters"], json!({"type": "object"}));
        assert_eq!(out["tools"][0]["function"]["description"], "d");
        assert!(out.get("stream").is_none() && out.get("temperature").is_none());
    }

    #[test]
    fn images_errors_streams_and_escapes_translate() {
        let out = chat(json!({
            "model": "m", "max_tokens": 8, "stream": true, "temperature": 0.5,
            "tool_choice": {"type": "tool", "name": "f"},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look \"here\"\n"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": null}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": true,
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
            ]
        }));
        let m = out["messages"].as_array().expect("messages");
        assert_eq!(m[0]["content"][0], json!({"type": "text", "text": "look \"here\"\n"}));
        assert_eq!(m[0]["content"][1]["image_url"]["url"], "data:image/png;base64,AAA");
        assert_eq!(
            m[1],
            json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        assert_eq!(m[2], json!({"role": "tool", "tool_call_id": "t1", "content": "Error: a\nb"}));
        assert_eq!(out["tool_choice"], json!({"type": "function", "function": {"name": "f"}}));
        assert_eq!(
            (out["stream"].clone(), out["stream_options"].clone()),
            (json!(true), json!({"include_usage": true}))
        );
        assert_eq!(out["temperature"], 0.5);
    }

    #[test]
    fn missing_max_tokens_wrong_types_and_server_tools_are_refused() {
        assert_eq!(refused(json!({"model": "m", "messages": []})).as_deref(), Some("max_tokens"));
        let counted = to_chat(br#"{"model":"m","messages":[]}"#, true).expect("a default stands in");
        assert!(!counted.stream);
        let server = json!({"model": "m", "max_tokens": 1, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]});
        assert_eq!(refused(server).as_deref(), Some("tools"));
        assert_eq!(refused(json!({"model": "", "max_tokens": 1, "messages": []})).as_deref(), Some("model"));
        assert_eq!(refused(json!({"model": "m", "max_tokens": 1, "messages": {}})).as_deref(), Some("messages"));
        assert_eq!(
            refused(json!({"model": "m", "max_tokens": 1, "stream": "yes", "messages": []})).as_deref(),
            Some("stream")
        );
        assert_eq!(
            refused(json!({"model": "m", "max_tokens": 1, "metadata": 3, "messages": []})).as_deref(),
            Some("metadata")
        );
        assert_eq!(
            refused(json!({"model": "m", "max_tokens": 1, "system": 3, "messages": []})).as_deref(),
            Some("system")
        );
        let bad_role = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]});
        assert_eq!(refused(bad_role).as_deref(), Some("messages"));
        let bad_block =
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "video"}]}]});
        assert_eq!(refused(bad_block).as_deref(), Some("messages"));
        assert!(to_chat(b"[1]", false).is_err());
    }
}
