//! A complete adapter for OpenAI and OpenAI-compatible APIs, reusable by
//! plugins that only need to tweak it (another auth header, a path prefix,
//! a marker in responses...).
//!
//! Channel settings understood (JSON object, all optional):
//! - `headers`: object of extra headers to send (e.g. `OpenAI-Organization`);
//! - `probe_model`: model used by the health probe;
//! - `probe_endpoint`: `"chat"` (default) or `"embeddings"`;
//! - `responses`: `"native"` when the upstream serves the Responses API
//!   itself (OpenAI does; most compatible servers do not): stateless
//!   `/v1/responses` requests are then passed through unchanged.

use serde_json::{Map, Value};

use crate::openai::{Envelope, ErrorBody, ErrorDetail};
use crate::sse::SseParser;
use crate::{
    error, header, origin_url, Adapter, AdapterInfo, Channel, Endpoint, ErrorKind, HttpMethod, HttpRequest,
    HttpResponse, Operation, ParsedResponse, PassthroughContext, Probe, RequestContext, StreamDecoder, StreamEvents,
    UpstreamError,
};

/// The OpenAI-compatible adapter.
pub struct OpenAiCompat;

/// API path of an endpoint, relative to the channel's base URL.
pub fn endpoint_path(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "/chat/completions",
        Endpoint::Completions => "/completions",
        Endpoint::Embeddings => "/embeddings",
        Endpoint::Models => "/models",
    }
}

/// Parse a channel's settings object (`{}` when empty or invalid).
pub fn settings(channel: &Channel) -> Map<String, Value> {
    match serde_json::from_str::<Value>(&channel.settings) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// Rewrite the client's body for the upstream: set the upstream model name
/// and, for streams, ask for usage in the last chunk. The body is not
/// parsed into a tree: its top-level members are copied through verbatim
/// (in their order), only `model` and `stream_options` are rewritten.
pub fn rewrite_body(ctx: &RequestContext, body: &[u8]) -> Result<Vec<u8>, UpstreamError> {
    let members =
        crate::raw::members(body).map_err(|e| error(ErrorKind::BadRequest, format!("invalid JSON body: {e}"), None))?;
    let wants_usage = ctx.stream && matches!(ctx.endpoint, Endpoint::ChatCompletions | Endpoint::Completions);
    let mut out = crate::raw::ObjectWriter::with_capacity(body.len() + ctx.upstream_model.len() + 48);
    let (mut model_written, mut options_written) = (false, false);
    for (key, value) in &members {
        match key.as_ref() {
            "model" => {
                out.member(key, &Value::String(ctx.upstream_model.clone()));
                model_written = true;
            }
            "stream_options" if wants_usage => {
                let mut options = match serde_json::from_str::<Value>(value.get()) {
                    Ok(Value::Object(map)) => map,
                    _ => Map::new(),
                };
                options.insert("include_usage".into(), Value::Bool(true));
                out.member(key, &Value::Object(options));
                options_written = true;
            }
            _ => out.raw_member(key, value),
        }
    }
    if !model_written {
        out.member("model", &Value::String(ctx.upstream_model.clone()));
    }
    if wants_usage && !options_written {
        out.member("stream_options", &serde_json::json!({"include_usage": true}));
    }
    Ok(out.finish())
}

/// The channel's key as a bearer token and the extra `headers` of its
/// settings.
pub fn auth_headers(channel: &Channel) -> Vec<crate::Header> {
    let mut headers = Vec::with_capacity(4);
    if !channel.key.is_empty() {
        headers.push(header("authorization", format!("Bearer {}", channel.key)));
    }
    if let Some(Value::Object(extra)) = settings(channel).get("headers") {
        for (name, value) in extra {
            if let Some(value) = value.as_str() {
                headers.push(header(&name.to_ascii_lowercase(), value));
            }
        }
    }
    headers
}

/// The upstream request for `ctx` on an OpenAI-compatible API.
pub fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
    let url = origin_url(&channel.base_url, endpoint_path(ctx.endpoint));
    let mut headers = auth_headers(channel);
    if ctx.endpoint == Endpoint::Models {
        return Ok(HttpRequest { method: HttpMethod::Get, url, headers, body: Vec::new() });
    }
    headers.push(header("content-type", "application/json"));
    if ctx.stream {
        headers.push(header("accept", "text/event-stream"));
    }
    Ok(HttpRequest { method: HttpMethod::Post, url, headers, body: rewrite_body(ctx, body)? })
}

/// API path of a relayed operation, relative to the channel's base URL.
pub fn operation_path(operation: Operation) -> &'static str {
    match operation {
        Operation::ImagesGenerations => "/images/generations",
        Operation::AudioSpeech => "/audio/speech",
        Operation::AudioTranscriptions => "/audio/transcriptions",
        Operation::AudioTranslations => "/audio/translations",
        Operation::Moderations => "/moderations",
        Operation::Rerank => "/rerank",
        Operation::Messages => "/messages",
        Operation::Responses => "/responses",
    }
}

/// Every relayed operation (and `responses`, passed through natively on
/// channels whose settings say `"responses": "native"`).
pub const OPERATIONS: [Operation; 7] = [
    Operation::ImagesGenerations,
    Operation::AudioSpeech,
    Operation::AudioTranscriptions,
    Operation::AudioTranslations,
    Operation::Moderations,
    Operation::Rerank,
    Operation::Responses,
];

/// The upstream request relaying `body` on an OpenAI-compatible API: the
/// same path under the channel's base URL, its key as a bearer token, a
/// JSON body's `model` set to the upstream one (a multipart body goes as
/// it is).
pub fn build_passthrough(
    ctx: &PassthroughContext,
    channel: &Channel,
    body: &[u8],
) -> Result<HttpRequest, UpstreamError> {
    let native = |protocol: &str| settings(channel).get(protocol).and_then(Value::as_str) == Some("native");
    match ctx.operation {
        // Only channels that say their upstream serves it: the host
        // translates for the others.
        Operation::Responses if !native("responses") => {
            return Err(error(ErrorKind::BadRequest, "this channel serves Responses through chat completions", None));
        }
        Operation::Messages => return Err(error(ErrorKind::BadRequest, "not an Anthropic API", None)),
        _ => {}
    }
    let url = origin_url(&channel.base_url, operation_path(ctx.operation));
    let mut headers = auth_headers(channel);
    headers.push(header("content-type", &ctx.content_type));
    let json = ctx.content_type.starts_with("application/json");
    let body = if json && ctx.upstream_model != ctx.requested_model {
        let members = crate::raw::members(body)
            .map_err(|e| error(ErrorKind::BadRequest, format!("invalid JSON body: {e}"), None))?;
        let mut out = crate::raw::ObjectWriter::with_capacity(body.len() + ctx.upstream_model.len());
        for (key, value) in &members {
            match key.as_ref() {
                "model" => out.member(key, &Value::String(ctx.upstream_model.clone())),
                _ => out.raw_member(key, value),
            }
        }
        out.finish()
    } else {
        body.to_vec()
    };
    Ok(HttpRequest { method: HttpMethod::Post, url, headers, body })
}

/// Check a 2xx body is OpenAI JSON and take its usage; the body is returned
/// unchanged, so unknown fields reach the client byte for byte.
pub fn parse_response(_ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
    let envelope: Envelope = serde_json::from_slice(&response.body).map_err(|_| {
        error(ErrorKind::Transient, "upstream returned a response that is not valid JSON", Some(response.status))
    })?;
    if let Some(detail) = envelope.error {
        return Err(classify_detail(response.status, None, &detail));
    }
    Ok(ParsedResponse { body: response.body.clone(), usage: envelope.usage.map(|u| u.to_usage()) })
}

/// Retry-After in whole seconds, from a response's headers.
pub fn retry_after(response: &HttpResponse) -> Option<u32> {
    response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("retry-after"))
        .and_then(|h| h.value.trim().parse::<f64>().ok())
        .map(|secs| secs.ceil().max(0.0) as u32)
}

/// Classify a non-2xx OpenAI-style response by status and error code.
pub fn classify_error(_ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
    let detail = serde_json::from_slice::<ErrorBody>(&response.body).ok().map(|b| b.error);
    match detail {
        Some(detail) => classify_detail(response.status, retry_after(response), &detail),
        None => {
            let mut e = classify_detail(response.status, retry_after(response), &ErrorDetail::default());
            e.message = format!("upstream returned HTTP {}", response.status);
            e
        }
    }
}

fn classify_detail(status: u16, retry_after: Option<u32>, detail: &ErrorDetail) -> UpstreamError {
    let code = detail.code_str().unwrap_or_default();
    let kind_text = detail.kind.clone().unwrap_or_default();
    let kind = match (status, code.as_str(), kind_text.as_str()) {
        (_, "insufficient_quota", _) | (_, _, "insufficient_quota") | (402, _, _) => ErrorKind::QuotaExhausted,
        (_, "invalid_api_key" | "account_deactivated", _) | (401 | 403, _, _) => ErrorKind::Auth,
        (_, "rate_limit_exceeded", _) | (429, _, _) => ErrorKind::RateLimited(retry_after),
        (_, "content_filter" | "content_policy_violation", _) => ErrorKind::ContentFiltered,
        (_, "model_not_found", _) | (404, _, _) => ErrorKind::ModelNotFound,
        (400 | 413 | 415 | 422, _, _) => ErrorKind::BadRequest,
        (408 | 409 | 425 | 500..=599, _, _) => ErrorKind::Transient,
        (_, _, "server_error") => ErrorKind::Transient,
        _ => ErrorKind::Other,
    };
    let message =
        if detail.message.is_empty() { format!("upstream returned HTTP {status}") } else { detail.message.clone() };
    error(kind, message, if status == 0 { None } else { Some(status) })
}

/// Probe with a one-token chat (or an embedding when the settings say so).
pub fn health_probe(channel: &Channel) -> Probe {
    let settings = settings(channel);
    let embeddings = settings.get("probe_endpoint").and_then(Value::as_str) == Some("embeddings");
    let default_model = if embeddings { "text-embedding-3-small" } else { "gpt-4o-mini" };
    let model = settings.get("probe_model").and_then(Value::as_str).unwrap_or(default_model).to_string();
    if embeddings {
        let body = serde_json::json!({"model": model, "input": "ping"});
        Probe { endpoint: Endpoint::Embeddings, model, body: crate::json_bytes(&body) }
    } else {
        let body = serde_json::json!({
            "model": model, "max_tokens": 1,
            "messages": [{"role": "user", "content": "ping"}]
        });
        Probe { endpoint: Endpoint::ChatCompletions, model, body: crate::json_bytes(&body) }
    }
}

/// Decodes OpenAI's SSE stream: chunks pass through byte for byte.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct OpenAiSseDecoder {
    parser: SseParser,
    include_usage: bool,
    done: bool,
}

impl OpenAiSseDecoder {
    fn events(&mut self, events: Vec<crate::sse::SseEvent>) -> Result<StreamEvents, UpstreamError> {
        let mut out = StreamEvents::empty();
        for event in events {
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                self.done = true;
                continue;
            }
            let envelope: Envelope = serde_json::from_str(data)
                .map_err(|_| error(ErrorKind::Transient, "upstream stream carried data that is not JSON", None))?;
            if let Some(detail) = envelope.error {
                out.error = Some(classify_detail(0, None, &detail));
                self.done = true;
                break;
            }
            let usage_only = envelope.choices.as_ref().is_none_or(|c| c.is_empty());
            if let Some(usage) = &envelope.usage {
                out.usage = Some(usage.to_usage());
            }
            if usage_only && envelope.usage.is_some() && !self.include_usage {
                continue;
            }
            // The event's own bytes become the chunk (copied only when trimmed).
            let chunk = if data.len() == event.data.len() { event.data.into_bytes() } else { data.as_bytes().to_vec() };
            out.chunks.push(chunk);
        }
        out.done = self.done;
        Ok(out)
    }
}

impl StreamDecoder for OpenAiSseDecoder {
    fn new(ctx: RequestContext) -> Self {
        Self { parser: SseParser::new(), include_usage: ctx.include_usage, done: false }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<StreamEvents, UpstreamError> {
        let events = self.parser.push_bounded(bytes)?;
        self.events(events)
    }

    fn finish(&mut self) -> Result<StreamEvents, UpstreamError> {
        let events = self.parser.finish().into_iter().collect();
        self.events(events)
    }
}

impl Adapter for OpenAiCompat {
    type Decoder = OpenAiSseDecoder;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "openai".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "OpenAI and OpenAI-compatible APIs".into(),
            endpoints: vec![Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings, Endpoint::Models],
            default_models: vec!["gpt-4o".into(), "gpt-4o-mini".into(), "text-embedding-3-small".into()],
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        build_request(ctx, channel, body)
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        parse_response(ctx, response)
    }

    fn classify_error(ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        classify_error(ctx, response)
    }

    fn health_probe(channel: &Channel) -> Probe {
        health_probe(channel)
    }

    fn operations() -> Vec<Operation> {
        OPERATIONS.to_vec()
    }

    fn build_passthrough(
        ctx: &PassthroughContext,
        channel: &Channel,
        body: &[u8],
    ) -> Result<HttpRequest, UpstreamError> {
        build_passthrough(ctx, channel, body)
    }
}
