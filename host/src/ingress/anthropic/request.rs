//! An Anthropic Messages request as a chat completion request.

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::ingress::{copy_fields, object_field};

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).param(param)
}

/// The text of a `system` prompt: a string or a list of text blocks.
fn system_text(system: &Value) -> Result<String, ApiError> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for block in blocks {
                match block.get("text").and_then(Value::as_str) {
                    Some(text) if block["type"] == "text" => texts.push(text),
                    _ => return Err(bad("system", "'system' blocks must be text blocks.")),
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(bad("system", "Invalid type for 'system': expected a string or a list of text blocks.")),
    }
}

/// An image block as a chat `image_url` part.
fn image_part(block: &Value) -> Result<Value, ApiError> {
    let source = &block["source"];
    let url = match source["type"].as_str() {
        Some("base64") => {
            let (Some(media), Some(data)) = (source["media_type"].as_str(), source["data"].as_str()) else {
                return Err(bad("messages", "An image's base64 source needs 'media_type' and 'data'."));
            };
            format!("data:{media};base64,{data}")
        }
        Some("url") => match source["url"].as_str() {
            Some(url) => url.to_string(),
            None => return Err(bad("messages", "An image's url source needs 'url'.")),
        },
        _ => return Err(bad("messages", "Unsupported image source type.")),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// The content of a `tool_result` block as text.
fn tool_result_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => {
            blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
        }
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One Anthropic message as one or more chat messages (tool results
/// become `tool` messages, in order).
fn message(msg: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let role = match msg["role"].as_str() {
        Some(role @ ("user" | "assistant")) => role,
        _ => return Err(bad("messages", "Each message's 'role' must be \"user\" or \"assistant\".")),
    };
    let blocks = match &msg["content"] {
        Value::String(text) => {
            out.push(json!({"role": role, "content": text}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => return Err(bad("messages", "Each message's 'content' must be a string or a list of blocks.")),
    };
    let mut parts: Vec<Value> = Vec::new();
    let mut tool_calls: Vec<Value> = Vec::new();
    for block in blocks {
        match block["type"].as_str() {
            Some("text") => {
                let text = block["text"].as_str().ok_or_else(|| bad("messages", "A text block needs 'text'."))?;
                parts.push(json!({"type": "text", "text": text}));
            }
            Some("image") if role == "user" => parts.push(image_part(block)?),
            Some("tool_use") if role == "assistant" => {
                let (Some(id), Some(name)) = (block["id"].as_str(), block["name"].as_str()) else {
                    return Err(bad("messages", "A tool_use block needs 'id' and 'name'."));
                };
                let input = if block["input"].is_null() { json!({}) } else { block["input"].clone() };
                tool_calls.push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": input.to_string()}}));
            }
            Some("tool_result") if role == "user" => {
                let id = block["tool_use_id"]
                    .as_str()
                    .ok_or_else(|| bad("messages", "A tool_result block needs 'tool_use_id'."))?;
                let mut text = tool_result_text(&block["content"]);
                if block["is_error"] == true {
                    text = format!("Error: {text}");
                }
                out.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
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
    if role == "assistant" {
        let text: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        let mut m = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { Value::from(text.concat()) }});
        if !tool_calls.is_empty() {
            m["tool_calls"] = Value::Array(tool_calls);
        }
        out.push(m);
    } else if !parts.is_empty() {
        let all_text = parts.iter().all(|p| p["type"] == "text");
        let content = if all_text && parts.len() == 1 { parts[0]["text"].clone() } else { Value::Array(parts) };
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(())
}

/// Anthropic tool definitions as chat tools.
fn tools(list: &Value) -> Result<Value, ApiError> {
    let Value::Array(list) = list else { return Err(bad("tools", "Invalid type for 'tools': expected a list.")) };
    let mut out = Vec::with_capacity(list.len());
    for tool in list {
        if tool.get("type").and_then(Value::as_str).is_some_and(|t| t != "custom") {
            return Err(bad("tools", "Only client tools (name, description, input_schema) are supported."));
        }
        let name = tool["name"].as_str().ok_or_else(|| bad("tools", "Each tool needs a 'name'."))?;
        let mut function =
            json!({"name": name, "parameters": tool.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
        if let Some(d) = tool.get("description").filter(|d| d.is_string()) {
            function["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as chat's, and whether parallel tool use is off.
fn tool_choice(choice: &Map<String, Value>) -> Result<(Value, bool), ApiError> {
    let parallel_off = choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true));
    let chat = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice", "A tool choice of type 'tool' needs a 'name'."))?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => return Err(bad("tool_choice", "'tool_choice.type' must be auto, any, tool or none.")),
    };
    Ok((chat, parallel_off))
}

/// The chat completion request for a Messages request `body`, and whether
/// it streams.
pub fn to_chat(body: &Map<String, Value>) -> Result<(Map<String, Value>, bool), ApiError> {
    let model = body.get("model").and_then(Value::as_str).filter(|m| !m.is_empty());
    let model = model.ok_or_else(|| bad("model", "'model' is required."))?;
    let max_tokens = body.get("max_tokens").and_then(Value::as_u64);
    let max_tokens =
        max_tokens.ok_or_else(|| bad("max_tokens", "'max_tokens' is required and must be a positive integer."))?;
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "Invalid type for 'stream': expected a boolean.")),
    };
    let mut messages = Vec::new();
    if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
        messages.push(json!({"role": "system", "content": system_text(system)?}));
    }
    let Some(Value::Array(list)) = body.get("messages") else {
        return Err(bad("messages", "'messages' is required and must be a list."));
    };
    for msg in list {
        message(msg, &mut messages)?;
    }
    let mut chat = Map::new();
    chat.insert("model".into(), model.into());
    chat.insert("messages".into(), Value::Array(messages));
    chat.insert("max_tokens".into(), max_tokens.into());
    copy_fields(body, &mut chat, &["temperature", "top_p"]);
    if let Some(stop) = body.get("stop_sequences").filter(|s| !s.is_null()) {
        chat.insert("stop".into(), stop.clone());
    }
    if let Some(user) = object_field(body, "metadata")?.and_then(|m| m.get("user_id")).filter(|u| u.is_string()) {
        chat.insert("user".into(), user.clone());
    }
    if let Some(list) = body.get("tools").filter(|t| !t.is_null()) {
        chat.insert("tools".into(), tools(list)?);
    }
    if let Some(choice) = object_field(body, "tool_choice")? {
        let (choice, parallel_off) = tool_choice(choice)?;
        chat.insert("tool_choice".into(), choice);
        if parallel_off {
            chat.insert("parallel_tool_calls".into(), false.into());
        }
    }
    if stream {
        chat.insert("stream".into(), true.into());
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok((chat, stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Map<String, Value> {
        to_chat(v.as_object().expect("object")).expect("translates").0
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
        assert_eq!(m[2]["tool_calls"][0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "12C"}));
        assert_eq!(m[4], json!({"role": "user", "content": "thanks"}));
        assert_eq!(out["tool_choice"], "required");
        assert_eq!(out["parallel_tool_calls"], false);
        assert_eq!(out["stop"], json!(["END"]));
        assert_eq!(out["user"], "u1");
        assert_eq!(out["tools"][0]["function"]["parameters"], json!({"type": "object"}));
    }

    #[test]
    fn missing_max_tokens_and_server_tools_are_refused() {
        let no_max = json!({"model": "m", "messages": []});
        assert_eq!(to_chat(no_max.as_object().expect("o")).expect_err("refused").param.as_deref(), Some("max_tokens"));
        let server = json!({"model": "m", "max_tokens": 1, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]});
        assert_eq!(to_chat(server.as_object().expect("o")).expect_err("refused").param.as_deref(), Some("tools"));
    }
}
