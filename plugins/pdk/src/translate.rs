//! Helpers for adapters that translate to a provider's own API (Anthropic,
//! Gemini, Ollama...): reading OpenAI requests, refusing what a provider
//! cannot do with a clear `400`, and writing OpenAI responses and chunks.

use serde_json::{json, Map, Value};

use crate::openai::{ChatCompletionRequest, ChatMessage};
use crate::{error, ErrorKind, RequestContext, UpstreamError, Usage};

/// A `bad-request` error: the client asked for something this provider
/// cannot do. Shown to the client as an OpenAI `invalid_request_error`.
pub fn unsupported(what: impl std::fmt::Display) -> UpstreamError {
    error(ErrorKind::BadRequest, what.to_string(), None)
}

/// Parse a chat-completions request body.
pub fn chat_request(body: &[u8]) -> Result<ChatCompletionRequest, UpstreamError> {
    serde_json::from_slice(body).map_err(|e| unsupported(format!("invalid chat completions request: {e}")))
}

/// Parse a JSON body an upstream sent, or fail as a transient upstream error.
pub fn upstream_json(body: &[u8], status: u16) -> Result<Value, UpstreamError> {
    serde_json::from_slice(body)
        .map_err(|_| error(ErrorKind::Transient, "upstream returned a response that is not valid JSON", Some(status)))
}

/// Refuse `n` > 1 for providers that generate one choice per request.
pub fn single_choice(req: &ChatCompletionRequest, provider: &str) -> Result<(), UpstreamError> {
    match req.n {
        Some(n) if n > 1 => Err(unsupported(format!("{provider} does not support `n` > 1; send {n} requests"))),
        _ => Ok(()),
    }
}

/// The stop sequences of a request (`stop` is a string or a list).
pub fn stop_sequences(req: &ChatCompletionRequest) -> Vec<String> {
    match &req.stop {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// `max_completion_tokens`, else `max_tokens`.
pub fn max_tokens(req: &ChatCompletionRequest) -> Option<u32> {
    req.max_completion_tokens.or(req.max_tokens)
}

/// The `type` of `response_format` (`text`, `json_object`, `json_schema`).
pub fn response_format(req: &ChatCompletionRequest) -> Option<&str> {
    req.response_format.as_ref().and_then(|f| f.get("type")).and_then(Value::as_str)
}

/// One part of a message's content.
pub enum Part {
    /// Text.
    Text(String),
    /// An image: a `data:` URL (`mime`, base64 `data`) or a plain URL.
    Image(Image),
}

/// An image given in a message.
pub enum Image {
    /// Inline bytes from a `data:<mime>;base64,<data>` URL.
    Inline {
        /// MIME type, e.g. `image/png`.
        mime: String,
        /// Base64 data.
        data: String,
    },
    /// A remote URL.
    Url(String),
}

/// The parts of a message's `content` (a string or a list of parts). Parts
/// of other types (audio, files) are refused.
pub fn content_parts(message: &ChatMessage) -> Result<Vec<Part>, UpstreamError> {
    match &message.content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![Part::Text(s.clone())]),
        Some(Value::Array(parts)) => parts.iter().map(part).collect(),
        Some(_) => Err(unsupported("message content must be a string or a list of parts")),
    }
}

fn part(p: &Value) -> Result<Part, UpstreamError> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Part::Text(p.get("text").and_then(Value::as_str).unwrap_or_default().to_string())),
        Some("image_url") => {
            let url = p.pointer("/image_url/url").and_then(Value::as_str).unwrap_or_default();
            Ok(Part::Image(image(url)))
        }
        Some(other) => Err(unsupported(format!("content parts of type `{other}` are not supported by this provider"))),
        None => Err(unsupported("a content part has no `type`")),
    }
}

fn image(url: &str) -> Image {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((mime, data)) = rest.split_once(";base64,") {
            return Image::Inline { mime: mime.to_string(), data: data.to_string() };
        }
    }
    Image::Url(url.to_string())
}

/// The text of a message, refusing images (for text-only providers).
pub fn text_only(message: &ChatMessage, provider: &str) -> Result<String, UpstreamError> {
    let mut text = String::new();
    for part in content_parts(message)? {
        match part {
            Part::Text(t) => text.push_str(&t),
            Part::Image(_) => return Err(unsupported(format!("{provider} does not accept images in messages"))),
        }
    }
    Ok(text)
}

/// An OpenAI tool definition's function: (name, description, parameters).
pub fn tool_function(tool: &Value) -> Result<(String, Option<String>, Value), UpstreamError> {
    if tool.get("type").and_then(Value::as_str).unwrap_or("function") != "function" {
        return Err(unsupported("only tools of type `function` are supported"));
    }
    let f = tool.get("function").ok_or_else(|| unsupported("a tool has no `function`"))?;
    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| unsupported("a tool function has no `name`"))?;
    let description = f.get("description").and_then(Value::as_str).map(str::to_string);
    let parameters = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    Ok((name.to_string(), description, parameters))
}

/// An assistant message's tool calls: (id, name, arguments JSON text).
pub fn tool_calls(message: &ChatMessage) -> Vec<(String, String, String)> {
    let calls = message.tool_calls.as_deref().unwrap_or_default();
    calls
        .iter()
        .map(|c| {
            let s = |p: &str| c.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
            (s("/id"), s("/function/name"), s("/function/arguments"))
        })
        .collect()
}

/// An OpenAI `tool_calls` entry (`index` is set for stream deltas).
pub fn tool_call_json(index: Option<usize>, id: &str, name: &str, arguments: &str) -> Value {
    let mut call = json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
    if let (Some(i), Some(obj)) = (index, call.as_object_mut()) {
        obj.insert("index".into(), json!(i));
    }
    call
}

/// OpenAI's `usage` object for a WIT usage record.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Usage from prompt and completion counts (total = their sum).
pub fn usage(prompt: u32, completion: u32, cached: u32) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: cached,
        total_tokens: prompt.saturating_add(completion),
    }
}

/// The host's clock (seconds since the epoch), for `created`.
#[cfg(target_family = "wasm")]
pub fn now() -> u64 {
    crate::bindings::wasmgate::plugin::clock::now_unix_secs()
}

/// The system clock, when a plugin's code runs natively (its unit tests).
#[cfg(not(target_family = "wasm"))]
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An assistant message for a `chat.completion` choice.
pub fn assistant_message(text: Option<String>, tool_calls: Vec<Value>) -> Value {
    let mut m = Map::new();
    m.insert("role".into(), json!("assistant"));
    m.insert("content".into(), text.map_or(Value::Null, Value::String));
    if !tool_calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    Value::Object(m)
}

/// A complete `chat.completion` body.
pub fn completion(id: &str, model: &str, created: u64, choices: Vec<Value>, usage: Option<&Usage>) -> Vec<u8> {
    let mut body = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
    });
    if let (Some(u), Some(obj)) = (usage, body.as_object_mut()) {
        obj.insert("usage".into(), usage_json(u));
    }
    crate::json_bytes(&body)
}

/// A `chat.completion` choice.
pub fn choice(index: usize, message: Value, finish_reason: &str) -> Value {
    json!({"index": index, "message": message, "finish_reason": finish_reason, "logprobs": null})
}

/// Writes the chunks of one streamed chat completion with a fixed id,
/// model and creation time.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChunkWriter {
    /// Completion id shared by every chunk.
    pub id: String,
    /// Model reported to the client.
    pub model: String,
    /// Creation time shared by every chunk.
    pub created: u64,
    /// Whether the first (role) delta was sent.
    pub started: bool,
    /// Top-level fields added to every chunk from now on (say
    /// `system_fingerprint`, or a provider's `citations`); the chunk's own
    /// fields (`id`, `object`, `created`, `model`, `choices`, `usage`) win.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, Value>,
}

impl ChunkWriter {
    /// A writer for a stream of `ctx`'s request; `id` may be replaced later
    /// when the provider announces its own.
    pub fn new(ctx: &RequestContext, id: String) -> Self {
        Self { id, model: ctx.requested_model.clone(), created: now(), started: false, extra: serde_json::Map::new() }
    }

    /// Add the top-level field `key` to every chunk written from now on.
    pub fn set_field(&mut self, key: &str, value: Value) {
        self.extra.insert(key.to_string(), value);
    }

    /// A chunk with one choice carrying `delta` and maybe a finish reason.
    /// The first chunk also carries `"role": "assistant"`.
    pub fn delta(&mut self, mut delta: Value, finish_reason: Option<&str>) -> Vec<u8> {
        if !self.started {
            self.started = true;
            if let Some(obj) = delta.as_object_mut() {
                obj.insert("role".into(), json!("assistant"));
            }
        }
        let choice = json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null});
        self.chunk(vec![choice], None)
    }

    /// The usage-only chunk OpenAI sends last with `include_usage`.
    pub fn usage(&self, usage: &Usage) -> Vec<u8> {
        self.chunk(Vec::new(), Some(usage))
    }

    fn chunk(&self, choices: Vec<Value>, usage: Option<&Usage>) -> Vec<u8> {
        let mut body = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(obj) = body.as_object_mut() {
            if let Some(u) = usage {
                obj.insert("usage".into(), usage_json(u));
            }
            for (k, v) in &self.extra {
                if !obj.contains_key(k) && k != "usage" {
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
        crate::json_bytes(&body)
    }
}

/// An OpenAI `embedding` list body.
pub fn embeddings(model: &str, vectors: Vec<Value>, usage: &Usage) -> Vec<u8> {
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    let usage = json!({"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens});
    crate::json_bytes(&json!({"object": "list", "data": data, "model": model, "usage": usage}))
}

/// The `input` of an embeddings request as a list of strings (token-array
/// inputs are refused: providers other than OpenAI take text).
pub fn embedding_inputs(body: &[u8]) -> Result<Vec<String>, UpstreamError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| unsupported(format!("invalid JSON body: {e}")))?;
    match value.get("input") {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            Ok(items.iter().filter_map(Value::as_str).map(str::to_string).collect())
        }
        Some(Value::Array(_)) => Err(unsupported("this provider takes embedding input as text, not token arrays")),
        _ => Err(unsupported("`input` must be a string or a list of strings")),
    }
}

/// Retry-After seconds from a response's headers.
pub fn retry_after(response: &crate::HttpResponse) -> Option<u32> {
    crate::openai_compat::retry_after(response)
}

/// An error for a non-2xx status when the body says nothing useful.
pub fn status_error(status: u16, retry_after: Option<u32>, message: impl Into<String>) -> UpstreamError {
    let kind = match status {
        401 | 403 => ErrorKind::Auth,
        402 => ErrorKind::QuotaExhausted,
        429 => ErrorKind::RateLimited(retry_after),
        404 => ErrorKind::ModelNotFound,
        400 | 413 | 415 | 422 => ErrorKind::BadRequest,
        408 | 409 | 425 | 500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Other,
    };
    error(kind, message, Some(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(content: Value) -> ChatMessage {
        serde_json::from_value(json!({"role": "user", "content": content})).expect("message")
    }

    #[test]
    fn a_chunk_writer_adds_top_level_fields_but_never_over_its_own() {
        let ctx = crate::testing::stream_context("m");
        let mut w = ChunkWriter::new(&ctx, "c1".into());
        w.set_field("system_fingerprint", json!("fp_1"));
        w.set_field("id", json!("hijack"));
        let chunk: Value = serde_json::from_slice(&w.delta(json!({"content": "hi"}), None)).expect("json");
        assert_eq!((chunk["system_fingerprint"].as_str(), chunk["id"].as_str()), (Some("fp_1"), Some("c1")));
        let kept: ChunkWriter = serde_json::from_value(serde_json::to_value(&w).expect("state")).expect("state");
        assert_eq!(kept.extra["system_fingerprint"], "fp_1", "the fields survive the decoder's state");
        let old: ChunkWriter =
            serde_json::from_value(json!({"id": "c", "model": "m", "created": 1, "started": true})).expect("old state");
        assert!(old.extra.is_empty());
    }

    #[test]
    fn content_parts_read_text_and_images() {
        let m = message(json!([
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ]));
        let parts = content_parts(&m).expect("parts");
        assert!(matches!(&parts[0], Part::Text(t) if t == "look"));
        assert!(
            matches!(&parts[1], Part::Image(Image::Inline { mime, data }) if mime == "image/png" && data == "AAAA")
        );
        assert!(matches!(&parts[2], Part::Image(Image::Url(u)) if u.ends_with("cat.jpg")));
        assert!(text_only(&m, "X").is_err_and(|e| e.message.contains("X does not accept images")));
        let audio = message(json!([{"type": "input_audio", "input_audio": {}}]));
        assert!(content_parts(&audio).is_err_and(|e| matches!(e.kind, ErrorKind::BadRequest)));
    }

    #[test]
    fn request_fields() {
        let req =
            chat_request(br#"{"model":"m","messages":[],"stop":"END","max_tokens":5,"max_completion_tokens":9,"n":3}"#)
                .expect("request");
        assert_eq!(stop_sequences(&req), ["END"]);
        assert_eq!(max_tokens(&req), Some(9));
        assert!(single_choice(&req, "P").is_err_and(|e| e.message.contains("`n` > 1")));
        assert!(chat_request(b"[1]").is_err_and(|e| matches!(e.kind, ErrorKind::BadRequest)));
    }

    #[test]
    fn tools_and_embedding_inputs() {
        let tool = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
        assert_eq!(tool_function(&tool).expect("tool").0, "f");
        assert!(tool_function(&json!({"type": "function", "function": {}})).is_err());
        assert!(tool_function(&json!({"type": "code_interpreter"})).is_err());
        assert_eq!(embedding_inputs(br#"{"input":"a"}"#).expect("one"), ["a"]);
        assert_eq!(embedding_inputs(br#"{"input":["a","b"]}"#).expect("two"), ["a", "b"]);
        assert!(embedding_inputs(br#"{"input":[[1,2]]}"#).is_err_and(|e| e.message.contains("token arrays")));
    }
}
