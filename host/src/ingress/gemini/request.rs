//! A Gemini `generateContent` request as a chat completion request. Field
//! names are accepted in lowerCamelCase and snake_case, as Google's JSON
//! mapping of the API does.

use std::collections::{HashMap, VecDeque};

use serde_json::{Map, Value, json};

use crate::error::ApiError;

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).param(param)
}

/// `obj[camel]`, else `obj[snake]`, when present and not null.
pub fn field<'a>(obj: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    obj.get(camel).or_else(|| obj.get(snake)).filter(|v| !v.is_null())
}

fn parts_of<'a>(content: &'a Value, param: &str) -> Result<&'a Vec<Value>, ApiError> {
    content["parts"].as_array().ok_or_else(|| bad(param, "Each content needs a 'parts' list."))
}

/// Tool call ids: Gemini matches a function response to its call by name
/// (or by `id` when given); chat needs ids.
#[derive(Default)]
struct CallIds {
    pending: HashMap<String, VecDeque<String>>,
    next: usize,
}

impl CallIds {
    fn call(&mut self, name: &str, given: Option<&str>) -> String {
        let id = given.map_or_else(|| format!("call_{}", self.next), str::to_string);
        self.next += 1;
        self.pending.entry(name.to_string()).or_default().push_back(id.clone());
        id
    }

    fn response(&mut self, name: &str, given: Option<&str>) -> String {
        if let Some(id) = given {
            return id.to_string();
        }
        self.pending.get_mut(name).and_then(VecDeque::pop_front).unwrap_or_else(|| format!("call_{name}"))
    }
}

/// One content (a turn) as chat messages.
fn content(c: &Value, ids: &mut CallIds, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let model = match c.get("role").and_then(Value::as_str) {
        None | Some("user") => false,
        Some("model") => true,
        Some(_) => return Err(bad("contents", "Each content's 'role' must be \"user\" or \"model\".")),
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for p in parts_of(c, "contents")? {
        if let Some(text) = p.get("text").and_then(Value::as_str) {
            if p.get("thought") != Some(&Value::Bool(true)) {
                parts.push(json!({"type": "text", "text": text}));
            }
        } else if let Some(data) = field(p, "inlineData", "inline_data") {
            let (Some(mime), Some(b64)) =
                (field(data, "mimeType", "mime_type").and_then(Value::as_str), data["data"].as_str())
            else {
                return Err(bad("contents", "'inlineData' needs 'mimeType' and 'data'."));
            };
            parts.push(json!({"type": "image_url", "image_url": {"url": format!("data:{mime};base64,{b64}")}}));
        } else if let Some(file) = field(p, "fileData", "file_data") {
            let uri = field(file, "fileUri", "file_uri").and_then(Value::as_str);
            let uri = uri.ok_or_else(|| bad("contents", "'fileData' needs 'fileUri'."))?;
            parts.push(json!({"type": "image_url", "image_url": {"url": uri}}));
        } else if let Some(call) = field(p, "functionCall", "function_call") {
            let name = call["name"].as_str().ok_or_else(|| bad("contents", "A functionCall needs 'name'."))?;
            let id = ids.call(name, call["id"].as_str());
            let args = call.get("args").cloned().unwrap_or(json!({}));
            calls
                .push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}}));
        } else if let Some(response) = field(p, "functionResponse", "function_response") {
            let name = response["name"].as_str().ok_or_else(|| bad("contents", "A functionResponse needs 'name'."))?;
            let id = ids.response(name, response["id"].as_str());
            let body = response.get("response").cloned().unwrap_or(json!({}));
            out.push(json!({"role": "tool", "tool_call_id": id, "content": body.to_string()}));
        } else {
            return Err(bad(
                "contents",
                "Unsupported part: expected text, inlineData, fileData, functionCall or functionResponse.",
            ));
        }
    }
    if model {
        let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        let mut m = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { text.into() }});
        if !calls.is_empty() {
            m["tool_calls"] = Value::Array(calls);
        }
        out.push(m);
    } else if !parts.is_empty() {
        let content =
            if parts.len() == 1 && parts[0]["type"] == "text" { parts[0]["text"].clone() } else { Value::Array(parts) };
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(())
}

/// `tools[].functionDeclarations` as chat tools.
fn tools(list: &Value) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for tool in list.as_array().ok_or_else(|| bad("tools", "'tools' must be a list."))? {
        let Some(decls) = field(tool, "functionDeclarations", "function_declarations") else {
            return Err(bad("tools", "Only function declarations are supported as tools."));
        };
        for d in decls.as_array().ok_or_else(|| bad("tools", "'functionDeclarations' must be a list."))? {
            let name = d["name"].as_str().ok_or_else(|| bad("tools", "Each function declaration needs a 'name'."))?;
            let mut function = json!({"name": name, "parameters": field(d, "parameters", "parameters_json_schema")
                .or_else(|| d.get("parametersJsonSchema")).cloned().unwrap_or(json!({"type": "object"}))});
            if let Some(desc) = d.get("description").filter(|v| v.is_string()) {
                function["description"] = desc.clone();
            }
            out.push(json!({"type": "function", "function": function}));
        }
    }
    Ok(out)
}

/// `toolConfig.functionCallingConfig` as chat's `tool_choice`.
fn tool_choice(config: &Value) -> Option<Value> {
    let calling = field(config, "functionCallingConfig", "function_calling_config")?;
    let allowed = field(calling, "allowedFunctionNames", "allowed_function_names").and_then(Value::as_array);
    match calling.get("mode").and_then(Value::as_str) {
        Some("NONE") => Some(json!("none")),
        Some("ANY") => match allowed.map(Vec::as_slice) {
            Some([only]) => Some(json!({"type": "function", "function": {"name": only}})),
            _ => Some(json!("required")),
        },
        Some("AUTO") => Some(json!("auto")),
        _ => None,
    }
}

/// The chat request for a Gemini request `body` on `model`.
pub fn to_chat(body: &Map<String, Value>, model: &str, stream: bool) -> Result<Map<String, Value>, ApiError> {
    let body = Value::Object(body.clone());
    let mut messages = Vec::new();
    if let Some(system) = field(&body, "systemInstruction", "system_instruction") {
        let text: Vec<&str> =
            parts_of(system, "systemInstruction")?.iter().filter_map(|p| p["text"].as_str()).collect();
        messages.push(json!({"role": "system", "content": text.join("\n")}));
    }
    let contents = body.get("contents").and_then(Value::as_array);
    let contents = contents.ok_or_else(|| bad("contents", "'contents' is required and must be a list."))?;
    let mut ids = CallIds::default();
    for c in contents {
        content(c, &mut ids, &mut messages)?;
    }
    let mut chat = Map::new();
    chat.insert("model".into(), model.into());
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(config) = field(&body, "generationConfig", "generation_config") {
        for (camel, snake, to) in [
            ("temperature", "temperature", "temperature"),
            ("topP", "top_p", "top_p"),
            ("maxOutputTokens", "max_output_tokens", "max_tokens"),
            ("stopSequences", "stop_sequences", "stop"),
            ("candidateCount", "candidate_count", "n"),
            ("seed", "seed", "seed"),
            ("presencePenalty", "presence_penalty", "presence_penalty"),
            ("frequencyPenalty", "frequency_penalty", "frequency_penalty"),
        ] {
            if let Some(v) = field(config, camel, snake) {
                chat.insert(to.into(), v.clone());
            }
        }
        let mime = field(config, "responseMimeType", "response_mime_type").and_then(Value::as_str);
        if mime == Some("application/json") {
            let schema = field(config, "responseJsonSchema", "response_json_schema")
                .or_else(|| field(config, "responseSchema", "response_schema"));
            let format = match schema {
                Some(schema) => json!({"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}),
                None => json!({"type": "json_object"}),
            };
            chat.insert("response_format".into(), format);
        }
    }
    if let Some(list) = body.get("tools").filter(|t| !t.is_null()) {
        chat.insert("tools".into(), Value::Array(tools(list)?));
    }
    if let Some(choice) = field(&body, "toolConfig", "tool_config").and_then(tool_choice) {
        chat.insert("tool_choice".into(), choice);
    }
    if stream {
        chat.insert("stream".into(), true.into());
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(chat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_config_and_function_turns_translate() {
        let body = json!({
            "system_instruction": {"parts": [{"text": "be brief"}]},
            "contents": [
                {"role": "user", "parts": [{"text": "weather?"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 12}}}]}
            ],
            "generationConfig": {"maxOutputTokens": 30, "temperature": 0.5, "stopSequences": ["END"]},
            "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {"type": "object"}}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
        });
        let chat = to_chat(body.as_object().expect("o"), "gemini-x", false).expect("ok");
        let m = chat["messages"].as_array().expect("messages");
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        let id = m[2]["tool_calls"][0]["id"].clone();
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": id, "content": "{\"temp\":12}"}));
        assert_eq!((chat["max_tokens"].clone(), chat["stop"].clone()), (json!(30), json!(["END"])));
        assert_eq!(chat["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(chat["tools"][0]["function"]["name"], "get_weather");
    }
}
