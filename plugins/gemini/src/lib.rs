//! The `gemini` adapter: OpenAI ↔ Google's Gemini API
//! (`{base_url}/v1beta/models/{model}:generateContent`,
//! `:streamGenerateContent?alt=sse`, `:batchEmbedContents`; base URL
//! `https://generativelanguage.googleapis.com`). The key goes in the
//! `x-goog-api-key` header, never in the URL.
//!
//! Roles map to `user`/`model`, system messages to `systemInstruction`,
//! tools to `functionDeclarations`, tool calls and results to
//! `functionCall`/`functionResponse` parts, inline images to `inlineData`,
//! JSON mode to `responseMimeType`, `n` to `candidateCount`. Safety blocks
//! finish with `content_filter`; a blocked prompt is a content-filter error.
//! Remote image URLs are refused (Gemini needs uploaded files for those).
//!
//! Channel settings: `api_version` (default `v1beta`), `probe_model`.

use serde_json::{json, Map, Value};
use wasmgate_pdk::openai::ChatMessage;
use wasmgate_pdk::openai_compat::settings;
use wasmgate_pdk::sse::{SseDecoder, SseEvents};
use wasmgate_pdk::translate::{self as t, ChunkWriter, Image, Part};
use wasmgate_pdk::{
    error, header, origin_url, Adapter, AdapterInfo, Channel, Endpoint, ErrorKind, HttpMethod, HttpRequest,
    HttpResponse, ParsedResponse, Probe, RequestContext, StreamEvents, UpstreamError, Usage,
};

struct Gemini;

fn parts(m: &ChatMessage) -> Result<Vec<Value>, UpstreamError> {
    t::content_parts(m)?
        .into_iter()
        .map(|p| match p {
            Part::Text(text) => Ok(json!({"text": text})),
            Part::Image(Image::Inline { mime, data }) => Ok(json!({"inlineData": {"mimeType": mime, "data": data}})),
            Part::Image(Image::Url(_)) => Err(t::unsupported(
                "Gemini accepts images as base64 data URLs only (data:image/png;base64,...), not remote URLs",
            )),
        })
        .collect()
}

fn build_body(body: &[u8]) -> Result<Value, UpstreamError> {
    let req = t::chat_request(body)?;
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // Gemini answers a function call by name; OpenAI by call id.
    let mut call_names: Vec<(String, String)> = Vec::new();
    for m in &req.messages {
        match m.role.as_str() {
            "system" | "developer" => system.push(json!({"text": t::text_only(m, "a system message")?})),
            "user" => contents.push(json!({"role": "user", "parts": parts(m)?})),
            "assistant" => {
                let mut p = parts(m)?;
                for (id, name, args) in t::tool_calls(m) {
                    let args: Value = serde_json::from_str(&args).unwrap_or_else(|_| json!({}));
                    p.push(json!({"functionCall": {"name": name, "args": args}}));
                    call_names.push((id, name));
                }
                contents.push(json!({"role": "model", "parts": p}));
            }
            "tool" => {
                let id = m.tool_call_id.clone().unwrap_or_default();
                let name = call_names.iter().find(|(i, _)| *i == id).map(|(_, n)| n.clone()).unwrap_or(id);
                let text = t::text_only(m, "a tool message")?;
                let response = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"content": text}));
                contents.push(
                    json!({"role": "user", "parts": [{"functionResponse": {"name": name, "response": response}}]}),
                );
            }
            other => return Err(t::unsupported(format!("unknown message role `{other}`"))),
        }
    }
    let mut config = Map::new();
    if let Some(v) = req.temperature {
        config.insert("temperature".into(), json!(v));
    }
    if let Some(v) = req.top_p {
        config.insert("topP".into(), json!(v));
    }
    if let Some(v) = t::max_tokens(&req) {
        config.insert("maxOutputTokens".into(), json!(v));
    }
    if let Some(n) = req.n {
        config.insert("candidateCount".into(), json!(n));
    }
    let stop = t::stop_sequences(&req);
    if !stop.is_empty() {
        config.insert("stopSequences".into(), json!(stop));
    }
    match t::response_format(&req) {
        Some("json_object") => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some("json_schema") => {
            config.insert("responseMimeType".into(), json!("application/json"));
            if let Some(schema) = req.response_format.as_ref().and_then(|f| f.pointer("/json_schema/schema")) {
                config.insert("responseJsonSchema".into(), schema.clone());
            }
        }
        _ => {}
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    if let Some(tools) = &req.tools {
        let mut decls = Vec::new();
        for tool in tools {
            let (name, description, parameters) = t::tool_function(tool)?;
            decls.push(json!({"name": name, "description": description.unwrap_or_default(), "parameters": parameters}));
        }
        out.insert("tools".into(), json!([{"functionDeclarations": decls}]));
    }
    if let Some(choice) = &req.tool_choice {
        let (mode, names) = match choice.as_str() {
            Some("none") => ("NONE", None),
            Some("required") => ("ANY", None),
            Some(_) => ("AUTO", None),
            None => ("ANY", choice.pointer("/function/name").cloned()),
        };
        let mut fc = json!({"mode": mode});
        if let Some(name) = names {
            fc["allowedFunctionNames"] = json!([name]);
        }
        out.insert("toolConfig".into(), json!({"functionCallingConfig": fc}));
    }
    Ok(Value::Object(out))
}

fn finish_reason(reason: Option<&str>, has_calls: bool) -> Option<&'static str> {
    let reason = reason?;
    Some(match reason {
        _ if has_calls => "tool_calls",
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => "content_filter",
        _ => "stop",
    })
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usageMetadata")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    let completion = n("candidatesTokenCount") + n("thoughtsTokenCount");
    Some(t::usage(n("promptTokenCount"), completion, n("cachedContentTokenCount")))
}

/// A prompt blocked before generation.
fn blocked(v: &Value) -> Option<UpstreamError> {
    let reason = v.pointer("/promptFeedback/blockReason").and_then(Value::as_str)?;
    Some(error(
        ErrorKind::ContentFiltered,
        format!("the prompt was blocked by Gemini's safety filter ({reason})"),
        None,
    ))
}

/// (text, tool calls as (name, arguments), finish reason) of one candidate.
fn candidate(c: &Value) -> (String, Vec<(String, String)>, Option<&'static str>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for p in c.pointer("/content/parts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
        if let Some(s) = p.get("text").and_then(Value::as_str) {
            if p.get("thought").and_then(Value::as_bool) != Some(true) {
                text.push_str(s);
            }
        }
        if let Some(f) = p.get("functionCall") {
            let args = f.get("args").map_or_else(|| "{}".into(), Value::to_string);
            calls.push((f.get("name").and_then(Value::as_str).unwrap_or_default().to_string(), args));
        }
    }
    let finish = finish_reason(c.get("finishReason").and_then(Value::as_str), !calls.is_empty());
    (text, calls, finish)
}

fn classify(status: u16, retry_after: Option<u32>, v: &Value) -> UpstreamError {
    let message = v.pointer("/error/message").and_then(Value::as_str).unwrap_or_default();
    let message = if message.is_empty() { format!("upstream returned HTTP {status}") } else { message.to_string() };
    let st = v.pointer("/error/status").and_then(Value::as_str).unwrap_or_default();
    let invalid_key = v.to_string().contains("API_KEY_INVALID");
    let kind = match st {
        _ if invalid_key => ErrorKind::Auth,
        "UNAUTHENTICATED" | "PERMISSION_DENIED" => ErrorKind::Auth,
        "RESOURCE_EXHAUSTED" => ErrorKind::RateLimited(retry_after),
        "NOT_FOUND" => ErrorKind::ModelNotFound,
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => ErrorKind::BadRequest,
        "UNAVAILABLE" | "INTERNAL" | "DEADLINE_EXCEEDED" => ErrorKind::Transient,
        _ => return t::status_error(status, retry_after, message),
    };
    error(kind, message, (status != 0).then_some(status))
}

fn call_id(request_id: &str, i: usize) -> String {
    format!("call_{request_id}_{i}")
}

impl Adapter for Gemini {
    type Decoder = SseDecoder<Events>;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "gemini".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Google Gemini API (generateContent, embeddings)".into(),
            endpoints: vec![Endpoint::ChatCompletions, Endpoint::Embeddings],
            default_models: vec!["gemini-2.5-flash".into(), "gemini-2.5-pro".into(), "text-embedding-004".into()],
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        let version = settings(channel).get("api_version").and_then(Value::as_str).unwrap_or("v1beta").to_string();
        let model = &ctx.upstream_model;
        let (path, body) = match ctx.endpoint {
            Endpoint::ChatCompletions if ctx.stream => {
                (format!("/{version}/models/{model}:streamGenerateContent?alt=sse"), build_body(body)?)
            }
            Endpoint::ChatCompletions => (format!("/{version}/models/{model}:generateContent"), build_body(body)?),
            Endpoint::Embeddings => {
                let requests: Vec<Value> = t::embedding_inputs(body)?
                    .into_iter()
                    .map(|text| json!({"model": format!("models/{model}"), "content": {"parts": [{"text": text}]}}))
                    .collect();
                (format!("/{version}/models/{model}:batchEmbedContents"), json!({"requests": requests}))
            }
            _ => return Err(t::unsupported("Gemini serves chat completions and embeddings only")),
        };
        let headers = vec![header("x-goog-api-key", channel.key.clone()), header("content-type", "application/json")];
        let url = origin_url(&channel.base_url, &path);
        Ok(HttpRequest { method: HttpMethod::Post, url, headers, body: wasmgate_pdk::json_bytes(&body) })
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        let v = t::upstream_json(&response.body, response.status)?;
        if v.get("error").is_some() {
            return Err(classify(response.status, None, &v));
        }
        if ctx.endpoint == Endpoint::Embeddings {
            let vectors: Vec<Value> = v
                .get("embeddings")
                .and_then(Value::as_array)
                .ok_or_else(|| error(ErrorKind::Transient, "upstream sent no embeddings", Some(response.status)))?
                .iter()
                .map(|e| e.get("values").cloned().unwrap_or(Value::Null))
                .collect();
            // batchEmbedContents reports no usage; the host counts locally.
            let usage = t::usage(0, 0, 0);
            let body = t::embeddings(&ctx.requested_model, vectors, &usage);
            return Ok(ParsedResponse { body, usage: None });
        }
        if let Some(e) = blocked(&v) {
            return Err(e);
        }
        let mut choices = Vec::new();
        for (i, c) in
            v.get("candidates").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default().iter().enumerate()
        {
            let (text, calls, finish) = candidate(c);
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(j, (name, args))| t::tool_call_json(None, &call_id(&ctx.request_id, j), name, args))
                .collect();
            let text = (!text.is_empty() || calls.is_empty()).then_some(text);
            choices.push(t::choice(i, t::assistant_message(text, calls), finish.unwrap_or("stop")));
        }
        let usage = usage_of(&v);
        let id = format!("chatcmpl-{}", ctx.request_id);
        let body = t::completion(&id, &ctx.requested_model, t::now(), choices, usage.as_ref());
        Ok(ParsedResponse { body, usage })
    }

    fn classify_error(_ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        let v = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        classify(response.status, t::retry_after(response), &v)
    }

    fn health_probe(channel: &Channel) -> Probe {
        let model =
            settings(channel).get("probe_model").and_then(Value::as_str).unwrap_or("gemini-2.5-flash").to_string();
        let body = json!({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]});
        Probe { endpoint: Endpoint::ChatCompletions, model, body: wasmgate_pdk::json_bytes(&body) }
    }
}

/// Gemini streams whole `GenerateContentResponse` objects as SSE `data:`;
/// the last one carries `finishReason` and the final usage.
#[derive(serde::Serialize, serde::Deserialize)]
struct Events {
    out: ChunkWriter,
    request_id: String,
    include_usage: bool,
    calls: usize,
    done: bool,
}

impl SseEvents for Events {
    fn new(ctx: RequestContext) -> Self {
        Self {
            out: ChunkWriter::new(&ctx, format!("chatcmpl-{}", ctx.request_id)),
            request_id: ctx.request_id.clone(),
            include_usage: ctx.include_usage,
            calls: 0,
            done: false,
        }
    }

    fn event(&mut self, _name: Option<&str>, v: Value, out: &mut StreamEvents) -> Result<(), UpstreamError> {
        if v.get("error").is_some() {
            out.error = Some(classify(0, None, &v));
            return Ok(());
        }
        if let Some(e) = blocked(&v) {
            out.error = Some(e);
            return Ok(());
        }
        let Some(c) = v.pointer("/candidates/0") else { return Ok(()) };
        let (text, calls, finish) = candidate(c);
        if !text.is_empty() || (!self.out.started && calls.is_empty()) {
            out.chunks.push(self.out.delta(json!({"content": text}), None));
        }
        for (name, args) in calls {
            let call = t::tool_call_json(Some(self.calls), &call_id(&self.request_id, self.calls), &name, &args);
            self.calls += 1;
            out.chunks.push(self.out.delta(json!({"tool_calls": [call]}), None));
        }
        if let Some(finish) = finish {
            let finish = if self.calls > 0 { "tool_calls" } else { finish };
            out.chunks.push(self.out.delta(json!({}), Some(finish)));
            if let Some(u) = usage_of(&v) {
                if self.include_usage {
                    out.chunks.push(self.out.usage(&u));
                }
                out.usage = Some(u);
            }
            self.done = true;
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.done
    }
}

wasmgate_pdk::export_adapter!(Gemini);
