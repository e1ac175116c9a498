//! The `anthropic` adapter: OpenAI chat completions ↔ Anthropic's Messages
//! API (`POST {base_url}/v1/messages`, base URL `https://api.anthropic.com`).
//!
//! System messages become `system`, tools and tool calls become `tool_use` /
//! `tool_result` blocks, images become `image` blocks, stop reasons and the
//! SSE events (`message_start`, `content_block_*`, `message_delta`...) map to
//! OpenAI's. Usage includes prompt-cache reads and writes. Not translatable,
//! so refused with a 400: `n` > 1 and `response_format` JSON modes.
//!
//! Channel settings: `anthropic_version` (default `2023-06-01`),
//! `default_max_tokens` (default 4096; Anthropic requires `max_tokens`),
//! `probe_model`.

use serde_json::{json, Map, Value};
use wasmgate_pdk::openai_compat::settings;
use wasmgate_pdk::sse::{SseDecoder, SseEvents};
use wasmgate_pdk::translate::{self as t, ChunkWriter, Image, Part};
use wasmgate_pdk::{
    error, header, origin_url, Adapter, AdapterInfo, Channel, Endpoint, ErrorKind, HttpMethod, HttpRequest,
    HttpResponse, Operation, ParsedResponse, PassthroughContext, Probe, RequestContext, StreamEvents, UpstreamError,
    Usage,
};

struct Anthropic;

fn build_body(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<Value, UpstreamError> {
    let req = t::chat_request(body)?;
    t::single_choice(&req, "Anthropic")?;
    if matches!(t::response_format(&req), Some("json_object" | "json_schema")) {
        return Err(t::unsupported("Anthropic has no JSON mode; describe the format in the prompt or use a tool"));
    }
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in &req.messages {
        match m.role.as_str() {
            "system" | "developer" => {
                system.push(json!({"type": "text", "text": t::text_only(m, "a system message")?}))
            }
            "user" => push(&mut messages, "user", user_blocks(m)?),
            "assistant" => {
                let mut blocks = Vec::new();
                let text = t::text_only(m, "an assistant message")?;
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for (id, name, args) in t::tool_calls(m) {
                    let input: Value = serde_json::from_str(&args).unwrap_or_else(|_| json!({}));
                    blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
                }
                push(&mut messages, "assistant", blocks);
            }
            "tool" => {
                let id = m.tool_call_id.clone().unwrap_or_default();
                let block =
                    json!({"type": "tool_result", "tool_use_id": id, "content": t::text_only(m, "a tool message")?});
                push(&mut messages, "user", vec![block]);
            }
            other => return Err(t::unsupported(format!("unknown message role `{other}`"))),
        }
    }
    let default_max = settings(channel).get("default_max_tokens").and_then(Value::as_u64).unwrap_or(4096);
    let mut out = Map::new();
    out.insert("model".into(), json!(ctx.upstream_model));
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(t::max_tokens(&req).map_or(default_max, u64::from)));
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    if let Some(v) = req.temperature {
        out.insert("temperature".into(), json!(v.min(1.0)));
    }
    if let Some(v) = req.top_p {
        out.insert("top_p".into(), json!(v));
    }
    let stop = t::stop_sequences(&req);
    if !stop.is_empty() {
        out.insert("stop_sequences".into(), json!(stop));
    }
    if let Some(tools) = &req.tools {
        let mut list = Vec::new();
        for tool in tools {
            let (name, description, schema) = t::tool_function(tool)?;
            list.push(json!({"name": name, "description": description.unwrap_or_default(), "input_schema": schema}));
        }
        out.insert("tools".into(), Value::Array(list));
    }
    match &req.tool_choice {
        None => {}
        Some(Value::String(s)) if s == "auto" => {
            out.insert("tool_choice".into(), json!({"type": "auto"}));
        }
        Some(Value::String(s)) if s == "required" => {
            out.insert("tool_choice".into(), json!({"type": "any"}));
        }
        Some(Value::String(s)) if s == "none" => {
            out.insert("tool_choice".into(), json!({"type": "none"}));
        }
        Some(choice) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => {
                out.insert("tool_choice".into(), json!({"type": "tool", "name": name}));
            }
            None => return Err(t::unsupported("unsupported `tool_choice`")),
        },
    }
    if let Some(user) = req.extra.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if ctx.stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// Append blocks as a message of `role`, merging consecutive same-role
/// messages (Anthropic requires alternation; tool results follow as user).
fn push(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if let Some(last) = messages.last_mut() {
        if last["role"] == role {
            if let Some(content) = last["content"].as_array_mut() {
                content.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

fn user_blocks(m: &wasmgate_pdk::openai::ChatMessage) -> Result<Vec<Value>, UpstreamError> {
    t::content_parts(m)?
        .into_iter()
        .map(|p| match p {
            Part::Text(text) => Ok(json!({"type": "text", "text": text})),
            Part::Image(Image::Inline { mime, data }) => {
                Ok(json!({"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}}))
            }
            Part::Image(Image::Url(url)) => Ok(json!({"type": "image", "source": {"type": "url", "url": url}})),
        })
        .collect()
}

fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn usage_of(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    let cache_read = n("cache_read_input_tokens");
    let prompt = n("input_tokens") + cache_read + n("cache_creation_input_tokens");
    t::usage(prompt, n("output_tokens"), cache_read)
}

fn classify(status: u16, retry_after: Option<u32>, body: &Value) -> UpstreamError {
    let kind_text = body.pointer("/error/type").and_then(Value::as_str).unwrap_or_default();
    let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or_default();
    let message = if message.is_empty() { format!("upstream returned HTTP {status}") } else { message.to_string() };
    let kind = match kind_text {
        "authentication_error" | "permission_error" => ErrorKind::Auth,
        "rate_limit_error" => ErrorKind::RateLimited(retry_after),
        "overloaded_error" | "api_error" | "timeout_error" => ErrorKind::Transient,
        "not_found_error" => ErrorKind::ModelNotFound,
        "billing_error" => ErrorKind::QuotaExhausted,
        "invalid_request_error" | "request_too_large" if message.contains("credit balance") => {
            ErrorKind::QuotaExhausted
        }
        "invalid_request_error" | "request_too_large" => ErrorKind::BadRequest,
        _ => return t::status_error(status, retry_after, message),
    };
    error(kind, message, (status != 0).then_some(status))
}

/// The key, API version and content type every request carries.
fn api_headers(channel: &Channel) -> Vec<wasmgate_pdk::Header> {
    let version =
        settings(channel).get("anthropic_version").and_then(Value::as_str).unwrap_or("2023-06-01").to_string();
    vec![
        header("x-api-key", channel.key.clone()),
        header("anthropic-version", version),
        header("content-type", "application/json"),
    ]
}

/// A client's own Messages request, passed through: only `model` changes
/// (to the channel's upstream name).
fn native_messages(ctx: &PassthroughContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
    let mut request: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| error(ErrorKind::BadRequest, format!("invalid JSON body: {e}"), None))?;
    request.insert("model".into(), Value::String(ctx.upstream_model.clone()));
    let mut headers = api_headers(channel);
    // The beta features the client asked for (Claude Code sends several).
    for h in ctx.client_headers.iter().filter(|h| h.name.eq_ignore_ascii_case("anthropic-beta")) {
        headers.push(header("anthropic-beta", h.value.clone()));
    }
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        headers.push(header("accept", "text/event-stream"));
    }
    let body = wasmgate_pdk::json_bytes(&request);
    Ok(HttpRequest { method: HttpMethod::Post, url: origin_url(&channel.base_url, "/v1/messages"), headers, body })
}

impl Adapter for Anthropic {
    fn operations() -> Vec<Operation> {
        vec![Operation::Messages]
    }

    fn build_passthrough(
        ctx: &PassthroughContext,
        channel: &Channel,
        body: &[u8],
    ) -> Result<HttpRequest, UpstreamError> {
        match ctx.operation {
            Operation::Messages => native_messages(ctx, channel, body),
            _ => Err(t::unsupported("Anthropic's API serves Messages only")),
        }
    }

    type Decoder = SseDecoder<Events>;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "anthropic".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Anthropic Messages API (Claude)".into(),
            endpoints: vec![Endpoint::ChatCompletions],
            default_models: vec!["claude-sonnet-4-5".into(), "claude-haiku-4-5".into()],
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        if ctx.endpoint != Endpoint::ChatCompletions {
            return Err(t::unsupported("Anthropic serves chat completions only"));
        }
        let mut headers = api_headers(channel);
        if ctx.stream {
            headers.push(header("accept", "text/event-stream"));
        }
        let body = wasmgate_pdk::json_bytes(&build_body(ctx, channel, body)?);
        Ok(HttpRequest { method: HttpMethod::Post, url: origin_url(&channel.base_url, "/v1/messages"), headers, body })
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        let v = t::upstream_json(&response.body, response.status)?;
        if v.get("type").and_then(Value::as_str) == Some("error") {
            return Err(classify(response.status, None, &v));
        }
        let mut text = String::new();
        let mut calls = Vec::new();
        for block in v.get("content").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or_default()),
                Some("tool_use") => {
                    let s = |k: &str| block.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                    let args = block.get("input").map_or_else(|| "{}".into(), Value::to_string);
                    calls.push(t::tool_call_json(None, &s("id"), &s("name"), &args));
                }
                _ => {}
            }
        }
        let usage = v.get("usage").map(usage_of);
        let finish = finish_reason(v.get("stop_reason").and_then(Value::as_str));
        let text = (!text.is_empty() || calls.is_empty()).then_some(text);
        let choice = t::choice(0, t::assistant_message(text, calls), finish);
        let id = v.get("id").and_then(Value::as_str).unwrap_or("msg");
        let body = t::completion(id, &ctx.requested_model, t::now(), vec![choice], usage.as_ref());
        Ok(ParsedResponse { body, usage })
    }

    fn classify_error(_ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        classify(response.status, t::retry_after(response), &body)
    }

    fn health_probe(channel: &Channel) -> Probe {
        let model =
            settings(channel).get("probe_model").and_then(Value::as_str).unwrap_or("claude-haiku-4-5").to_string();
        let body = json!({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]});
        Probe { endpoint: Endpoint::ChatCompletions, model, body: wasmgate_pdk::json_bytes(&body) }
    }
}

/// Turns Anthropic's typed SSE events into OpenAI chunks.
#[derive(serde::Serialize, serde::Deserialize)]
struct Events {
    out: ChunkWriter,
    include_usage: bool,
    usage: Usage,
    /// Anthropic content-block index → OpenAI tool-call index.
    tool_index: Vec<(u64, usize)>,
    finish: Option<String>,
    done: bool,
}

impl Events {
    fn end(&mut self, out: &mut StreamEvents) {
        if self.done {
            return;
        }
        self.done = true;
        out.chunks.push(self.out.delta(json!({}), Some(self.finish.as_deref().unwrap_or("stop"))));
        if self.include_usage {
            out.chunks.push(self.out.usage(&self.usage));
        }
        out.usage = Some(self.usage);
    }
}

impl SseEvents for Events {
    fn new(ctx: RequestContext) -> Self {
        Self {
            out: ChunkWriter::new(&ctx, format!("msg_{}", ctx.request_id)),
            include_usage: ctx.include_usage,
            usage: t::usage(0, 0, 0),
            tool_index: Vec::new(),
            finish: None,
            done: false,
        }
    }

    fn event(&mut self, _name: Option<&str>, v: Value, out: &mut StreamEvents) -> Result<(), UpstreamError> {
        match v.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                if let Some(id) = v.pointer("/message/id").and_then(Value::as_str) {
                    self.out.id = id.to_string();
                }
                if let Some(u) = v.pointer("/message/usage") {
                    self.usage = usage_of(u);
                }
                out.chunks.push(self.out.delta(json!({"content": ""}), None));
            }
            "content_block_start" => {
                let block = &v["content_block"];
                if block["type"] == "tool_use" {
                    let index = self.tool_index.len();
                    self.tool_index.push((v["index"].as_u64().unwrap_or(0), index));
                    let s = |k: &str| block[k].as_str().unwrap_or_default().to_string();
                    let call = t::tool_call_json(Some(index), &s("id"), &s("name"), "");
                    out.chunks.push(self.out.delta(json!({"tool_calls": [call]}), None));
                }
            }
            "content_block_delta" => {
                let delta = &v["delta"];
                match delta["type"].as_str().unwrap_or_default() {
                    "text_delta" => {
                        let text = delta["text"].as_str().unwrap_or_default();
                        out.chunks.push(self.out.delta(json!({"content": text}), None));
                    }
                    "input_json_delta" => {
                        let block = v["index"].as_u64().unwrap_or(0);
                        let index = self.tool_index.iter().find(|(b, _)| *b == block).map_or(0, |(_, i)| *i);
                        let part = delta["partial_json"].as_str().unwrap_or_default();
                        let call = json!({"index": index, "function": {"arguments": part}});
                        out.chunks.push(self.out.delta(json!({"tool_calls": [call]}), None));
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.finish = Some(finish_reason(v.pointer("/delta/stop_reason").and_then(Value::as_str)).to_string());
                if let Some(n) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    let u = &mut self.usage;
                    *u = t::usage(u.prompt_tokens, n as u32, u.cached_tokens);
                }
            }
            "message_stop" => self.end(out),
            "error" => out.error = Some(classify(0, None, &v)),
            _ => {} // ping, content_block_stop
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.done
    }
}

wasmgate_pdk::export_adapter!(Anthropic);
