//! The `baidu` adapter: OpenAI ↔ Baidu ERNIE (Qianfan's wenxinworkshop API,
//! base URL `https://aip.baidubce.com`).
//!
//! The channel key is `API_KEY|SECRET_KEY`. ERNIE wants an `access_token`
//! obtained from those at `/oauth/2.0/token` (valid 30 days): this adapter
//! describes that exchange through `wasmgate:plugin/auth`, the host performs
//! it once per expiry window and hands the token back through
//! [`wasmgate_pdk::credential`].
//!
//! ERNIE returns most errors as HTTP 200 with `error_code`; those are
//! classified like HTTP errors (110/111: token invalid → `auth`, so the host
//! exchanges again; 18/336501/336502: rate limits; 17/19: quota...). Not
//! supported by this adapter, refused with a 400: tools, images, `n` > 1.
//!
//! Channel settings: `probe_model` (default `ernie-speed-128k`).

use serde_json::{json, Map, Value};
use wasmgate_pdk::openai_compat::settings;
use wasmgate_pdk::sse::{SseDecoder, SseEvents};
use wasmgate_pdk::translate::{self as t, ChunkWriter};
use wasmgate_pdk::{
    error, header, origin_url, Adapter, AdapterInfo, Channel, Credential, Endpoint, ErrorKind, HttpMethod, HttpRequest,
    HttpResponse, ParsedResponse, Probe, RequestContext, StreamDecoder, StreamEvents, UpstreamError, Usage,
};

struct Baidu;

const API: &str = "/rpc/2.0/ai_custom/v1/wenxinworkshop";

/// The wenxinworkshop endpoint name of a model: older models have
/// historical names, newer ones use the model name.
fn chat_path(model: &str) -> String {
    let model = model.to_ascii_lowercase();
    match model.as_str() {
        "ernie-4.0-8k" | "ernie-bot-4" => "completions_pro".into(),
        "ernie-3.5-8k" | "ernie-bot" => "completions".into(),
        "ernie-bot-turbo" => "eb-instant".into(),
        _ => model,
    }
}

fn split_key(key: &str) -> Result<(&str, &str), UpstreamError> {
    key.split_once('|')
        .filter(|(ak, sk)| !ak.is_empty() && !sk.is_empty())
        .ok_or_else(|| error(ErrorKind::Auth, "the channel key must be `API_KEY|SECRET_KEY`", None))
}

/// Percent-encode a query value (keys are alphanumeric, but be safe).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn token() -> Result<String, UpstreamError> {
    wasmgate_pdk::credential().ok_or_else(|| error(ErrorKind::Auth, "no ERNIE access token available", None))
}

fn build_body(ctx: &RequestContext, body: &[u8]) -> Result<Value, UpstreamError> {
    let req = t::chat_request(body)?;
    t::single_choice(&req, "ERNIE")?;
    if req.tools.is_some() {
        return Err(t::unsupported("the baidu adapter does not support tools"));
    }
    let mut system = String::new();
    let mut messages = Vec::new();
    for m in &req.messages {
        match m.role.as_str() {
            "system" | "developer" => system.push_str(&t::text_only(m, "a system message")?),
            "user" | "assistant" => messages.push(json!({"role": m.role, "content": t::text_only(m, "ERNIE")?})),
            other => return Err(t::unsupported(format!("ERNIE does not accept `{other}` messages"))),
        }
    }
    let mut out = Map::new();
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system));
    }
    if let Some(v) = req.temperature {
        // ERNIE's range is (0, 1].
        out.insert("temperature".into(), json!(v.clamp(0.01, 1.0)));
    }
    if let Some(v) = req.top_p {
        out.insert("top_p".into(), json!(v));
    }
    if let Some(v) = t::max_tokens(&req) {
        out.insert("max_output_tokens".into(), json!(v.max(2)));
    }
    let stop = t::stop_sequences(&req);
    if !stop.is_empty() {
        out.insert("stop".into(), json!(stop));
    }
    if let Some(f @ ("json_object" | "text")) = t::response_format(&req) {
        out.insert("response_format".into(), json!(f));
    }
    if let Some(user) = req.extra.get("user").and_then(Value::as_str) {
        out.insert("user_id".into(), json!(user));
    }
    if ctx.stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// Classify an `error_code` body (any HTTP status).
fn classify(status: u16, v: &Value) -> Option<UpstreamError> {
    let code = v.get("error_code").and_then(Value::as_i64)?;
    let message = v.get("error_msg").and_then(Value::as_str).unwrap_or("ERNIE returned an error");
    let kind = match code {
        110 | 111 | 4 | 6 | 13 | 14 | 100 => ErrorKind::Auth,
        17 | 19 | 336200 => ErrorKind::QuotaExhausted,
        18 | 336501 | 336502 => ErrorKind::RateLimited(None),
        1 | 2 | 336000 | 336100 => ErrorKind::Transient,
        336104 | 336105 | 336007 => ErrorKind::ContentFiltered,
        3 | 336001..=336199 => ErrorKind::BadRequest,
        _ => ErrorKind::Other,
    };
    Some(error(kind, format!("{message} (ERNIE error {code})"), (status != 0).then_some(status)))
}

fn finish_reason(reason: Option<&str>) -> &'static str {
    match reason {
        Some("length") => "length",
        Some("content_filter") => "content_filter",
        _ => "stop",
    }
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    Some(t::usage(n("prompt_tokens"), n("completion_tokens"), 0))
}

impl Adapter for Baidu {
    type Decoder = Decoder;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "baidu".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Baidu ERNIE (Qianfan wenxinworkshop API)".into(),
            endpoints: vec![Endpoint::ChatCompletions, Endpoint::Embeddings],
            default_models: vec![
                "ernie-4.0-8k".into(),
                "ernie-3.5-8k".into(),
                "ernie-speed-128k".into(),
                "embedding-v1".into(),
            ],
        }
    }

    fn exchange_request(channel: &Channel) -> Option<HttpRequest> {
        let (ak, sk) = split_key(&channel.key).unwrap_or(("", ""));
        let query = format!("grant_type=client_credentials&client_id={}&client_secret={}", encode(ak), encode(sk));
        Some(HttpRequest {
            method: HttpMethod::Post,
            url: origin_url(&channel.base_url, &format!("/oauth/2.0/token?{query}")),
            headers: vec![header("accept", "application/json")],
            body: Vec::new(),
        })
    }

    fn parse_exchange(channel: &Channel, response: &HttpResponse) -> Result<Credential, UpstreamError> {
        split_key(&channel.key)?;
        let v: Value = t::upstream_json(&response.body, response.status)?;
        match (v.get("access_token").and_then(Value::as_str), v.get("expires_in").and_then(Value::as_u64)) {
            (Some(token), expires) if response.status < 300 => {
                Ok(Credential { token: token.to_string(), expires_in_secs: expires.unwrap_or(86_400) })
            }
            _ => {
                let what = v.get("error_description").and_then(Value::as_str).unwrap_or("token exchange refused");
                let kind = if response.status >= 500 { ErrorKind::Transient } else { ErrorKind::Auth };
                Err(error(kind, format!("ERNIE access token: {what}"), Some(response.status)))
            }
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        let (path, body) = match ctx.endpoint {
            Endpoint::ChatCompletions => {
                (format!("{API}/chat/{}", chat_path(&ctx.upstream_model)), build_body(ctx, body)?)
            }
            Endpoint::Embeddings => {
                (format!("{API}/embeddings/{}", ctx.upstream_model), json!({"input": t::embedding_inputs(body)?}))
            }
            _ => return Err(t::unsupported("ERNIE serves chat completions and embeddings only")),
        };
        let url = origin_url(&channel.base_url, &format!("{path}?access_token={}", encode(&token()?)));
        let headers = vec![header("content-type", "application/json")];
        Ok(HttpRequest { method: HttpMethod::Post, url, headers, body: wasmgate_pdk::json_bytes(&body) })
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        let v = t::upstream_json(&response.body, response.status)?;
        if let Some(e) = classify(response.status, &v) {
            return Err(e);
        }
        let usage = usage_of(&v);
        let created = v.get("created").and_then(Value::as_u64).unwrap_or_else(t::now);
        if ctx.endpoint == Endpoint::Embeddings {
            let vectors =
                v["data"].as_array().map(|d| d.iter().map(|e| e["embedding"].clone()).collect()).unwrap_or_default();
            let body = t::embeddings(&ctx.requested_model, vectors, &usage.unwrap_or(t::usage(0, 0, 0)));
            return Ok(ParsedResponse { body, usage });
        }
        let text = v.get("result").and_then(Value::as_str).unwrap_or_default().to_string();
        let finish = finish_reason(v.get("finish_reason").and_then(Value::as_str));
        let id = v.get("id").and_then(Value::as_str).unwrap_or("ernie");
        let choice = t::choice(0, t::assistant_message(Some(text), Vec::new()), finish);
        let body = t::completion(id, &ctx.requested_model, created, vec![choice], usage.as_ref());
        Ok(ParsedResponse { body, usage })
    }

    fn classify_error(_ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        let v = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        classify(response.status, &v).unwrap_or_else(|| {
            t::status_error(
                response.status,
                t::retry_after(response),
                format!("upstream returned HTTP {}", response.status),
            )
        })
    }

    fn health_probe(channel: &Channel) -> Probe {
        let model =
            settings(channel).get("probe_model").and_then(Value::as_str).unwrap_or("ernie-speed-128k").to_string();
        let body = json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "ping"}]});
        Probe { endpoint: Endpoint::ChatCompletions, model, body: wasmgate_pdk::json_bytes(&body) }
    }
}

/// ERNIE's stream events: `result` increments, `is_end` on the last.
#[derive(serde::Serialize, serde::Deserialize)]
struct Events {
    out: ChunkWriter,
    include_usage: bool,
    done: bool,
}

impl SseEvents for Events {
    fn new(ctx: RequestContext) -> Self {
        let out = ChunkWriter::new(&ctx, format!("chatcmpl-{}", ctx.request_id));
        Self { out, include_usage: ctx.include_usage, done: false }
    }

    fn event(&mut self, _name: Option<&str>, v: Value, out: &mut StreamEvents) -> Result<(), UpstreamError> {
        if let Some(e) = classify(0, &v) {
            out.error = Some(e);
            return Ok(());
        }
        if let Some(id) = v.get("id").and_then(Value::as_str) {
            self.out.id = id.to_string();
        }
        let text = v.get("result").and_then(Value::as_str).unwrap_or_default();
        out.chunks.push(self.out.delta(json!({"content": text}), None));
        if v.get("is_end").and_then(Value::as_bool) == Some(true) {
            let finish = finish_reason(v.get("finish_reason").and_then(Value::as_str));
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

/// ERNIE streams SSE, except that an error comes as a bare JSON body: the
/// first non-blank byte decides which.
#[derive(serde::Serialize, serde::Deserialize)]
struct Decoder {
    sse: SseDecoder<Events>,
    json_body: Option<bool>,
    raw: Vec<u8>,
}

impl StreamDecoder for Decoder {
    fn new(ctx: RequestContext) -> Self {
        Self { sse: SseDecoder::new(ctx), json_body: None, raw: Vec::new() }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<StreamEvents, UpstreamError> {
        if self.json_body.is_none() {
            self.json_body = bytes.iter().find(|b| !b.is_ascii_whitespace()).map(|b| *b == b'{');
        }
        if self.json_body != Some(true) {
            return self.sse.feed(bytes);
        }
        if self.raw.len() + bytes.len() > 1 << 16 {
            return Err(error(ErrorKind::Transient, "ERNIE sent an oversized error body", None));
        }
        self.raw.extend_from_slice(bytes); // an error body, read at the end
        Ok(StreamEvents::empty())
    }

    fn finish(&mut self) -> Result<StreamEvents, UpstreamError> {
        if self.json_body != Some(true) {
            return self.sse.finish();
        }
        let v = serde_json::from_slice::<Value>(&self.raw).unwrap_or(Value::Null);
        let mut out = StreamEvents::empty();
        out.error = classify(0, &v).or_else(|| Some(error(ErrorKind::Transient, "ERNIE sent no stream", None)));
        out.done = true;
        Ok(out)
    }
}

wasmgate_pdk::export_adapter!(Baidu);
