//! A Responses API request as a chat completion request.

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::ingress::{copy_fields, object_field};

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).param(param)
}

/// What a translated request carries besides the chat body.
pub struct Translated {
    /// The chat completion request.
    pub chat: Map<String, Value>,
    /// `stream`.
    pub stream: bool,
    /// `store` (on unless `false`, as OpenAI's).
    pub store: bool,
    /// The conversation so far without `instructions`: what a later
    /// `previous_response_id` continues from (the answer is added to it).
    pub conversation: Vec<Value>,
}

/// The text of a content part list or string.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").or_else(|| p.get("refusal")).and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One content part as a chat part.
fn part(p: &Value) -> Result<Value, ApiError> {
    match p["type"].as_str() {
        Some("input_text" | "output_text" | "text") => {
            let text = p["text"].as_str().ok_or_else(|| bad("input", "A text part needs 'text'."))?;
            Ok(json!({"type": "text", "text": text}))
        }
        Some("refusal") => Ok(json!({"type": "text", "text": p["refusal"].as_str().unwrap_or_default()})),
        Some("input_image") => {
            let url = p["image_url"].as_str().ok_or_else(|| {
                bad("input", "Images are accepted as 'image_url' (a URL or a data URL); file ids are not supported.")
            })?;
            let mut image = json!({"url": url});
            if let Some(detail) = p.get("detail").filter(|d| d.is_string()) {
                image["detail"] = detail.clone();
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        Some(other) => Err(bad("input", format!("Input content of type '{other}' is not supported."))),
        None => Err(bad("input", "Each content part needs a 'type'.")),
    }
}

/// A message item as a chat message.
fn message(item: &Value) -> Result<Value, ApiError> {
    let role = match item["role"].as_str() {
        Some(r @ ("user" | "assistant" | "system")) => r,
        // Not every provider knows `developer`; it means the same.
        Some("developer") => "system",
        _ => return Err(bad("input", "Each message's 'role' must be user, assistant, system or developer.")),
    };
    let content = match &item["content"] {
        Value::String(s) => Value::from(s.as_str()),
        Value::Array(parts) if role == "assistant" => Value::from(text_of(&Value::Array(parts.clone()))),
        Value::Array(parts) => {
            let parts = parts.iter().map(part).collect::<Result<Vec<_>, _>>()?;
            if parts.len() == 1 && parts[0]["type"] == "text" { parts[0]["text"].clone() } else { Value::Array(parts) }
        }
        _ => return Err(bad("input", "Each message's 'content' must be a string or a list of parts.")),
    };
    Ok(json!({"role": role, "content": content}))
}

/// `input` (a string or a list of items) as chat messages, after `history`.
fn conversation(input: Option<&Value>, mut messages: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        None | Some(Value::Null) => return Err(bad("input", "'input' is required.")),
        Some(Value::String(text)) => {
            messages.push(json!({"role": "user", "content": text}));
            return Ok(messages);
        }
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad("input", "Invalid type for 'input': expected a string or a list of items.")),
    };
    for item in items {
        match item.get("type").and_then(Value::as_str) {
            None | Some("message") => messages.push(message(item)?),
            Some("function_call") => {
                let (Some(call_id), Some(name)) = (item["call_id"].as_str(), item["name"].as_str()) else {
                    return Err(bad("input", "A function_call item needs 'call_id' and 'name'."));
                };
                let call = json!({"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": item["arguments"].as_str().unwrap_or("{}")}});
                // Consecutive calls belong to one assistant turn.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                        last["tool_calls"].as_array_mut().expect("array").push(call);
                    }
                    _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            Some("function_call_output") => {
                let call_id = item["call_id"]
                    .as_str()
                    .ok_or_else(|| bad("input", "A function_call_output item needs 'call_id'."))?;
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": text_of(&item["output"])}));
            }
            // Reasoning items of earlier turns are not replayed.
            Some("reasoning") => {}
            Some(other) => return Err(bad("input", format!("Input items of type '{other}' are not supported."))),
        }
    }
    Ok(messages)
}

/// Function tools as chat tools.
fn tools(list: &Value) -> Result<Value, ApiError> {
    let Value::Array(list) = list else { return Err(bad("tools", "Invalid type for 'tools': expected a list.")) };
    let mut out = Vec::with_capacity(list.len());
    for tool in list {
        if tool["type"] != "function" {
            return Err(bad("tools", "Only function tools are supported."));
        }
        let name = tool["name"].as_str().ok_or_else(|| bad("tools", "Each function tool needs a 'name'."))?;
        let mut function = json!({"name": name});
        if let Some(f) = function.as_object_mut() {
            copy_fields(tool.as_object().expect("object"), f, &["description", "parameters", "strict"]);
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as chat's.
fn tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(choice.clone()),
        Value::Object(o) if o.get("type") == Some(&json!("function")) => match o.get("name").and_then(Value::as_str) {
            Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
            None => Err(bad("tool_choice", "A function tool choice needs a 'name'.")),
        },
        _ => Err(bad("tool_choice", "'tool_choice' must be auto, none, required or a function.")),
    }
}

/// `text.format` as chat's `response_format`.
fn response_format(text: &Map<String, Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else { return Ok(None) };
    match format["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            copy_fields(format.as_object().expect("object"), &mut schema, &["name", "schema", "strict", "description"]);
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(bad("text.format", "'text.format.type' must be text, json_object or json_schema.")),
    }
}

/// The chat request for Responses request `body`, continuing `history`
/// (the stored conversation of `previous_response_id`).
pub fn to_chat(body: &Map<String, Value>, history: Vec<Value>) -> Result<Translated, ApiError> {
    let model = body.get("model").and_then(Value::as_str).filter(|m| !m.is_empty());
    let model = model.ok_or_else(|| bad("model", "'model' is required."))?;
    let flag = |key: &str, default: bool| match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(key, format!("Invalid type for '{key}': expected a boolean."))),
    };
    let (stream, store) = (flag("stream", false)?, flag("store", true)?);
    let conversation = conversation(body.get("input"), history)?;
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(bad("instructions", "Invalid type for 'instructions': expected a string.")),
    }
    messages.extend(conversation.iter().cloned());
    let mut chat = Map::new();
    chat.insert("model".into(), model.into());
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(max) = body.get("max_output_tokens").filter(|m| !m.is_null()) {
        chat.insert("max_tokens".into(), max.clone());
    }
    copy_fields(body, &mut chat, &["temperature", "top_p", "parallel_tool_calls", "user"]);
    if let Some(id) = body.get("safety_identifier").filter(|v| v.is_string()) {
        chat.insert("user".into(), id.clone());
    }
    if let Some(list) = body.get("tools").filter(|t| !t.is_null()) {
        chat.insert("tools".into(), tools(list)?);
    }
    if let Some(choice) = body.get("tool_choice").filter(|c| !c.is_null()) {
        chat.insert("tool_choice".into(), tool_choice(choice)?);
    }
    if let Some(format) = object_field(body, "text")?.map(response_format).transpose()?.flatten() {
        chat.insert("response_format".into(), format);
    }
    if stream {
        chat.insert("stream".into(), true.into());
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Translated { chat, stream, store, conversation })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_a_chat_conversation() {
        let body = json!({
            "model": "m", "instructions": "be brief", "max_output_tokens": 50, "store": false,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "input": [
                {"role": "developer", "content": "rules"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"}
            ]
        });
        let t = to_chat(body.as_object().expect("o"), vec![json!({"role": "user", "content": "before"})]).expect("ok");
        let m = t.chat["messages"].as_array().expect("messages");
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(m[1], json!({"role": "user", "content": "before"}));
        assert_eq!(m[2]["role"], "system");
        assert_eq!(m[3]["content"][1]["image_url"]["url"], "data:image/png;base64,AA");
        assert_eq!(m[4]["tool_calls"].as_array().expect("calls").len(), 2);
        assert_eq!(m[5], json!({"role": "tool", "tool_call_id": "c1", "content": "42"}));
        assert_eq!(t.chat["max_tokens"], 50);
        assert_eq!(t.chat["response_format"]["json_schema"]["name"], "x");
        assert_eq!(t.chat["tool_choice"]["function"]["name"], "f");
        assert!(!t.store && !t.stream);
        assert_eq!(t.conversation.len(), 5, "instructions are not part of the stored conversation");
    }

    #[test]
    fn hosted_tools_and_missing_input_are_refused() {
        let hosted = json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]});
        assert_eq!(
            to_chat(hosted.as_object().expect("o"), vec![]).err().and_then(|e| e.param).as_deref(),
            Some("tools")
        );
        let empty = json!({"model": "m"});
        assert_eq!(
            to_chat(empty.as_object().expect("o"), vec![]).err().and_then(|e| e.param).as_deref(),
            Some("input")
        );
    }
}
