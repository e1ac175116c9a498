//! The `qwen` adapter: OpenAI ↔ Alibaba's DashScope native API (base URL
//! `https://dashscope.aliyuncs.com`): `/api/v1/services/aigc/text-generation/generation`
//! with `result_format: "message"`, streams with `X-DashScope-SSE: enable` and
//! `incremental_output: true` (each event carries only the new text), and
//! `/api/v1/services/embeddings/text-embedding/text-embedding`.
//!
//! Tools, tool calls, JSON mode, `n`, stop sequences and sampling settings
//! are translated. Images need DashScope's multimodal endpoint and are
//! refused with a 400 here. Error codes (`InvalidApiKey`, `Throttling.*`,
//! `Arrearage`, `DataInspectionFailed`...) are classified.
//!
//! Channel settings: `probe_model` (default `qwen-turbo`).

use serde_json::{json, Map, Value};
use wasmgate_pdk::openai_compat::settings;
use wasmgate_pdk::sse::{SseDecoder, SseEvents};
use wasmgate_pdk::translate::{self as t, ChunkWriter};
use wasmgate_pdk::{
    error, header, origin_url, Adapter, AdapterInfo, Channel, Endpoint, ErrorKind, HttpMethod, HttpRequest,
    HttpResponse, ParsedResponse, Probe, RequestContext, StreamEvents, UpstreamError, Usage,
};

struct Qwen;

fn build_body(ctx: &RequestContext, body: &[u8]) -> Result<Value, UpstreamError> {
    let req = t::chat_request(body)?;
    if ctx.stream {
        t::single_choice(&req, "A DashScope stream")?;
    }
    let mut messages = Vec::new();
    for m in &req.messages {
        let mut out = json!({"role": m.role, "content": t::text_only(m, "the DashScope text-generation API")?});
        if let Some(calls) = &m.tool_calls {
            out["tool_calls"] = Value::Array(calls.clone());
        }
        if let Some(id) = &m.tool_call_id {
            out["tool_call_id"] = json!(id);
        }
        messages.push(out);
    }
    let mut p = Map::new();
    p.insert("result_format".into(), json!("message"));
    if ctx.stream {
        p.insert("incremental_output".into(), json!(true));
    }
    if let Some(v) = req.temperature {
        p.insert("temperature".into(), json!(v));
    }
    if let Some(v) = req.top_p {
        p.insert("top_p".into(), json!(v));
    }
    if let Some(v) = t::max_tokens(&req) {
        p.insert("max_tokens".into(), json!(v));
    }
    if let Some(n) = req.n {
        p.insert("n".into(), json!(n));
    }
    let stop = t::stop_sequences(&req);
    if !stop.is_empty() {
        p.insert("stop".into(), json!(stop));
    }
    if let Some(seed) = req.extra.get("seed") {
        p.insert("seed".into(), seed.clone());
    }
    if let Some(tools) = &req.tools {
        p.insert("tools".into(), Value::Array(tools.clone()));
    }
    if let Some(choice) = &req.tool_choice {
        p.insert("tool_choice".into(), choice.clone());
    }
    if let Some(format @ ("json_object" | "text")) = t::response_format(&req) {
        p.insert("response_format".into(), json!({"type": format}));
    }
    Ok(json!({"model": ctx.upstream_model, "input": {"messages": messages}, "parameters": p}))
}

fn classify(status: u16, retry_after: Option<u32>, v: &Value) -> UpstreamError {
    let code = v.get("code").and_then(Value::as_str).unwrap_or_default();
    let message = v.get("message").and_then(Value::as_str).unwrap_or_default();
    let message = if message.is_empty() { format!("upstream returned HTTP {status}") } else { message.to_string() };
    let kind = match code {
        "InvalidApiKey" | "AccessDenied" | "AccessDenied.Unpurchased" | "Workspace.AccessDenied" => ErrorKind::Auth,
        "Arrearage" | "Throttling.AllocationQuota" => ErrorKind::QuotaExhausted,
        c if c.starts_with("Throttling") => ErrorKind::RateLimited(retry_after),
        "DataInspectionFailed" | "data_inspection_failed" => ErrorKind::ContentFiltered,
        "ModelNotFound" | "ModelNotExist" => ErrorKind::ModelNotFound,
        "InvalidParameter" | "InvalidInputLength" => ErrorKind::BadRequest,
        "InternalError" | "InternalError.Timeout" | "ServiceUnavailable" => ErrorKind::Transient,
        _ => return t::status_error(status, retry_after, message),
    };
    error(kind, format!("{message} ({code})"), (status != 0).then_some(status))
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    let cached = u.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64).unwrap_or(0) as u32;
    if u.get("input_tokens").is_none() {
        let total = n("total_tokens");
        return Some(t::usage(total, 0, 0)); // embeddings report a total only
    }
    Some(t::usage(n("input_tokens"), n("output_tokens"), cached))
}

/// DashScope's finish reasons are OpenAI's, except `"null"` while running.
fn finish_reason(c: &Value) -> Option<String> {
    c.get("finish_reason").and_then(Value::as_str).filter(|r| *r != "null" && !r.is_empty()).map(str::to_string)
}

impl Adapter for Qwen {
    type Decoder = SseDecoder<Events>;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "qwen".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Alibaba Qwen through the native DashScope API".into(),
            endpoints: vec![Endpoint::ChatCompletions, Endpoint::Embeddings],
            default_models: vec![
                "qwen-turbo".into(),
                "qwen-plus".into(),
                "qwen-max".into(),
                "text-embedding-v3".into(),
            ],
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        let (path, body) = match ctx.endpoint {
            Endpoint::ChatCompletions => ("/api/v1/services/aigc/text-generation/generation", build_body(ctx, body)?),
            Endpoint::Embeddings => (
                "/api/v1/services/embeddings/text-embedding/text-embedding",
                json!({"model": ctx.upstream_model, "input": {"texts": t::embedding_inputs(body)?}}),
            ),
            _ => return Err(t::unsupported("DashScope serves chat completions and embeddings only")),
        };
        let mut headers = vec![
            header("authorization", format!("Bearer {}", channel.key)),
            header("content-type", "application/json"),
        ];
        if ctx.stream {
            headers.push(header("x-dashscope-sse", "enable"));
            headers.push(header("accept", "text/event-stream"));
        }
        let url = origin_url(&channel.base_url, path);
        Ok(HttpRequest { method: HttpMethod::Post, url, headers, body: wasmgate_pdk::json_bytes(&body) })
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        let v = t::upstream_json(&response.body, response.status)?;
        if v.get("code").and_then(Value::as_str).is_some_and(|c| !c.is_empty()) {
            return Err(classify(response.status, None, &v));
        }
        let usage = usage_of(&v);
        if ctx.endpoint == Endpoint::Embeddings {
            let mut items: Vec<(u64, Value)> = v
                .pointer("/output/embeddings")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|e| (e["text_index"].as_u64().unwrap_or(0), e["embedding"].clone())).collect())
                .unwrap_or_default();
            items.sort_by_key(|(i, _)| *i);
            let vectors = items.into_iter().map(|(_, e)| e).collect();
            let body = t::embeddings(&ctx.requested_model, vectors, &usage.unwrap_or(t::usage(0, 0, 0)));
            return Ok(ParsedResponse { body, usage });
        }
        let choices = v
            .pointer("/output/choices")
            .and_then(Value::as_array)
            .ok_or_else(|| error(ErrorKind::Transient, "upstream sent no choices", Some(response.status)))?
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut message =
                    c.get("message").cloned().unwrap_or_else(|| json!({"role": "assistant", "content": ""}));
                message["role"] = json!("assistant");
                t::choice(i, message, &finish_reason(c).unwrap_or_else(|| "stop".into()))
            })
            .collect();
        let id = v.get("request_id").and_then(Value::as_str).unwrap_or("qwen");
        let body = t::completion(&format!("chatcmpl-{id}"), &ctx.requested_model, t::now(), choices, usage.as_ref());
        Ok(ParsedResponse { body, usage })
    }

    fn classify_error(_ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        let v = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        classify(response.status, t::retry_after(response), &v)
    }

    fn health_probe(channel: &Channel) -> Probe {
        let model = settings(channel).get("probe_model").and_then(Value::as_str).unwrap_or("qwen-turbo").to_string();
        let body = json!({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]});
        Probe { endpoint: Endpoint::ChatCompletions, model, body: wasmgate_pdk::json_bytes(&body) }
    }
}

/// DashScope SSE: `event:result` with a whole response object per event
/// (incremental text); errors arrive as `event:error` with `code`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Events {
    out: ChunkWriter,
    include_usage: bool,
    usage: Option<Usage>,
    done: bool,
}

impl SseEvents for Events {
    fn new(ctx: RequestContext) -> Self {
        let out = ChunkWriter::new(&ctx, format!("chatcmpl-{}", ctx.request_id));
        Self { out, include_usage: ctx.include_usage, usage: None, done: false }
    }

    fn event(&mut self, name: Option<&str>, v: Value, out: &mut StreamEvents) -> Result<(), UpstreamError> {
        if name == Some("error") || v.get("code").and_then(Value::as_str).is_some_and(|c| !c.is_empty()) {
            out.error = Some(classify(0, None, &v));
            return Ok(());
        }
        if let Some(id) = v.get("request_id").and_then(Value::as_str) {
            self.out.id = format!("chatcmpl-{id}");
        }
        if let Some(u) = usage_of(&v) {
            self.usage = Some(u);
        }
        let Some(c) = v.pointer("/output/choices/0") else { return Ok(()) };
        let mut delta = Map::new();
        if let Some(text) = c.pointer("/message/content").and_then(Value::as_str) {
            delta.insert("content".into(), json!(text));
        }
        if let Some(calls) = c.pointer("/message/tool_calls") {
            delta.insert("tool_calls".into(), calls.clone());
        }
        if !delta.is_empty() {
            out.chunks.push(self.out.delta(Value::Object(delta), None));
        }
        if let Some(finish) = finish_reason(c) {
            out.chunks.push(self.out.delta(json!({}), Some(&finish)));
            if let Some(u) = self.usage {
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

wasmgate_pdk::export_adapter!(Qwen);
