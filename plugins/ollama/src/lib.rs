//! The `ollama` adapter: OpenAI ↔ Ollama's native API (base URL
//! `http://127.0.0.1:11434`): `POST /api/chat` (an NDJSON stream: one JSON
//! object per line, the last with `done: true` and the token counts) and
//! `POST /api/embed`.
//!
//! Images (base64 data URLs) go to `images`, tools and tool calls are
//! translated (Ollama's arguments are objects, OpenAI's are JSON text),
//! JSON mode becomes `format`, sampling settings and stop sequences go to
//! `options`. `n` > 1 and remote image URLs are refused with a 400. A key,
//! when the channel has one, is sent as a bearer token (for proxies).
//!
//! Channel settings: `probe_model` (default `llama3.2`), `keep_alive`.

use serde_json::{json, Map, Value};
use wasmgate_pdk::openai::ChatMessage;
use wasmgate_pdk::openai_compat::settings;
use wasmgate_pdk::translate::{self as t, ChunkWriter, Image, Part};
use wasmgate_pdk::{
    error, header, origin_url, Adapter, AdapterInfo, Channel, Endpoint, ErrorKind, HttpMethod, HttpRequest,
    HttpResponse, ParsedResponse, Probe, RequestContext, StreamDecoder, StreamEvents, UpstreamError, Usage,
};

struct Ollama;

fn message(m: &ChatMessage) -> Result<Value, UpstreamError> {
    let mut text = String::new();
    let mut images = Vec::new();
    for part in t::content_parts(m)? {
        match part {
            Part::Text(s) => text.push_str(&s),
            Part::Image(Image::Inline { data, .. }) => images.push(json!(data)),
            Part::Image(Image::Url(_)) => return Err(t::unsupported("Ollama takes images as base64 data URLs only")),
        }
    }
    let mut out = json!({"role": m.role, "content": text});
    if !images.is_empty() {
        out["images"] = Value::Array(images);
    }
    let calls: Vec<Value> = t::tool_calls(m)
        .into_iter()
        .map(|(_, name, args)| {
            let args: Value = serde_json::from_str(&args).unwrap_or_else(|_| json!({}));
            json!({"function": {"name": name, "arguments": args}})
        })
        .collect();
    if !calls.is_empty() {
        out["tool_calls"] = Value::Array(calls);
    }
    Ok(out)
}

fn build_body(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<Value, UpstreamError> {
    let req = t::chat_request(body)?;
    t::single_choice(&req, "Ollama")?;
    let messages = req.messages.iter().map(message).collect::<Result<Vec<_>, _>>()?;
    let mut options = Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            options.insert(k.into(), v);
        }
    };
    set("temperature", req.temperature.map(|v| json!(v)));
    set("top_p", req.top_p.map(|v| json!(v)));
    set("num_predict", t::max_tokens(&req).map(|v| json!(v)));
    set("seed", req.extra.get("seed").cloned());
    let stop = t::stop_sequences(&req);
    set("stop", (!stop.is_empty()).then(|| json!(stop)));
    let mut out = json!({"model": ctx.upstream_model, "messages": messages, "stream": ctx.stream});
    if !options.is_empty() {
        out["options"] = Value::Object(options);
    }
    match t::response_format(&req) {
        Some("json_object") => out["format"] = json!("json"),
        Some("json_schema") => {
            out["format"] = req
                .response_format
                .as_ref()
                .and_then(|f| f.pointer("/json_schema/schema"))
                .cloned()
                .unwrap_or(json!("json"));
        }
        _ => {}
    }
    if let Some(tools) = &req.tools {
        out["tools"] = Value::Array(tools.clone());
    }
    if let Some(keep_alive) = settings(channel).get("keep_alive") {
        out["keep_alive"] = keep_alive.clone();
    }
    Ok(out)
}

fn usage_of(v: &Value) -> Usage {
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    t::usage(n("prompt_eval_count"), n("eval_count"), 0)
}

fn finish_reason(v: &Value, has_calls: bool) -> &'static str {
    match v.get("done_reason").and_then(Value::as_str) {
        _ if has_calls => "tool_calls",
        Some("length") => "length",
        _ => "stop",
    }
}

fn calls_of(v: &Value, first_index: usize, request_id: &str, stream: bool) -> Vec<Value> {
    let calls = v.pointer("/message/tool_calls").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let index = first_index + i;
            let name = c.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
            let args = c.pointer("/function/arguments").map_or_else(|| "{}".into(), Value::to_string);
            t::tool_call_json(stream.then_some(index), &format!("call_{request_id}_{index}"), name, &args)
        })
        .collect()
}

fn classify(status: u16, retry_after: Option<u32>, body: &[u8]) -> UpstreamError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = v.get("error").and_then(Value::as_str).unwrap_or_default();
    if status == 404 || message.contains("not found") {
        let message = if message.is_empty() { "model not found".to_string() } else { message.to_string() };
        return error(ErrorKind::ModelNotFound, message, (status != 0).then_some(status));
    }
    let message = if message.is_empty() { format!("upstream returned HTTP {status}") } else { message.to_string() };
    t::status_error(status, retry_after, message)
}

impl Adapter for Ollama {
    type Decoder = Decoder;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "ollama".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Ollama native API (/api/chat, /api/embed)".into(),
            endpoints: vec![Endpoint::ChatCompletions, Endpoint::Embeddings],
            default_models: vec!["llama3.2".into(), "nomic-embed-text".into()],
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        let (path, body) = match ctx.endpoint {
            Endpoint::ChatCompletions => ("/api/chat", build_body(ctx, channel, body)?),
            Endpoint::Embeddings => {
                ("/api/embed", json!({"model": ctx.upstream_model, "input": t::embedding_inputs(body)?}))
            }
            _ => return Err(t::unsupported("Ollama's native API serves chat completions and embeddings only")),
        };
        let mut headers = vec![header("content-type", "application/json")];
        if !channel.key.is_empty() {
            headers.push(header("authorization", format!("Bearer {}", channel.key)));
        }
        let url = origin_url(&channel.base_url, path);
        Ok(HttpRequest { method: HttpMethod::Post, url, headers, body: wasmgate_pdk::json_bytes(&body) })
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        let v = t::upstream_json(&response.body, response.status)?;
        if v.get("error").is_some() {
            return Err(classify(response.status, None, &response.body));
        }
        let usage = usage_of(&v);
        if ctx.endpoint == Endpoint::Embeddings {
            let vectors = v.get("embeddings").and_then(Value::as_array).cloned().unwrap_or_default();
            let body = t::embeddings(&ctx.requested_model, vectors, &usage);
            return Ok(ParsedResponse { body, usage: Some(usage) });
        }
        let calls = calls_of(&v, 0, &ctx.request_id, false);
        let text = v.pointer("/message/content").and_then(Value::as_str).unwrap_or_default().to_string();
        let finish = finish_reason(&v, !calls.is_empty());
        let text = (!text.is_empty() || calls.is_empty()).then_some(text);
        let choice = t::choice(0, t::assistant_message(text, calls), finish);
        let id = format!("chatcmpl-{}", ctx.request_id);
        let body = t::completion(&id, &ctx.requested_model, t::now(), vec![choice], Some(&usage));
        Ok(ParsedResponse { body, usage: Some(usage) })
    }

    fn classify_error(_ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        classify(response.status, t::retry_after(response), &response.body)
    }

    fn health_probe(channel: &Channel) -> Probe {
        let model = settings(channel).get("probe_model").and_then(Value::as_str).unwrap_or("llama3.2").to_string();
        let body = json!({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]});
        Probe { endpoint: Endpoint::ChatCompletions, model, body: wasmgate_pdk::json_bytes(&body) }
    }
}

/// Ollama's stream: newline-delimited JSON objects.
#[derive(serde::Serialize, serde::Deserialize)]
struct Decoder {
    buf: Vec<u8>,
    out: ChunkWriter,
    request_id: String,
    include_usage: bool,
    calls: usize,
    done: bool,
}

impl Decoder {
    fn line(&mut self, line: &[u8], out: &mut StreamEvents) -> Result<(), UpstreamError> {
        if line.iter().all(u8::is_ascii_whitespace) || self.done {
            return Ok(());
        }
        let v: Value = serde_json::from_slice(line)
            .map_err(|_| error(ErrorKind::Transient, "upstream stream carried a line that is not JSON", None))?;
        if v.get("error").is_some() {
            out.error = Some(classify(0, None, line));
            self.done = true;
            return Ok(());
        }
        let text = v.pointer("/message/content").and_then(Value::as_str).unwrap_or_default();
        let calls = calls_of(&v, self.calls, &self.request_id, true);
        self.calls += calls.len();
        if !text.is_empty() || !self.out.started {
            out.chunks.push(self.out.delta(json!({"content": text}), None));
        }
        if !calls.is_empty() {
            out.chunks.push(self.out.delta(json!({"tool_calls": calls}), None));
        }
        if v.get("done").and_then(Value::as_bool) == Some(true) {
            let usage = usage_of(&v);
            out.chunks.push(self.out.delta(json!({}), Some(finish_reason(&v, self.calls > 0))));
            if self.include_usage {
                out.chunks.push(self.out.usage(&usage));
            }
            out.usage = Some(usage);
            self.done = true;
        }
        Ok(())
    }

    fn drain(&mut self, all: bool) -> Result<StreamEvents, UpstreamError> {
        let mut out = StreamEvents::empty();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            self.line(&line, &mut out)?;
        }
        if all && !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.line(&line, &mut out)?;
        }
        out.done = self.done;
        Ok(out)
    }
}

impl StreamDecoder for Decoder {
    fn new(ctx: RequestContext) -> Self {
        let out = ChunkWriter::new(&ctx, format!("chatcmpl-{}", ctx.request_id));
        Self {
            buf: Vec::new(),
            out,
            request_id: ctx.request_id.clone(),
            include_usage: ctx.include_usage,
            calls: 0,
            done: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<StreamEvents, UpstreamError> {
        self.buf.extend_from_slice(bytes);
        let events = self.drain(false)?;
        if self.buf.len() > wasmgate_pdk::sse::MAX_PENDING {
            return Err(error(ErrorKind::Transient, "upstream stream sent an oversized line", None));
        }
        Ok(events)
    }

    fn finish(&mut self) -> Result<StreamEvents, UpstreamError> {
        self.drain(true)
    }
}

wasmgate_pdk::export_adapter!(Ollama);

#[cfg(test)]
mod props {
    //! The NDJSON decoder takes any bytes split anywhere, and a valid stream
    //! decodes the same whole or in pieces (its state serialized between
    //! pieces, as the host keeps it).

    use proptest::prelude::*;
    use wasmgate_pdk::codec;

    use super::Decoder;

    fn ctx() -> wasmgate_pdk::RequestContext {
        wasmgate_pdk::testing::stream_context("m")
    }

    fn decode(bytes: &[u8], cut: usize) -> Result<Vec<Vec<u8>>, String> {
        let cut = cut % (bytes.len() + 1);
        let a = codec::decode::<Decoder>(ctx(), &[], &bytes[..cut]).map_err(|e| e.message)?;
        let b = codec::decode::<Decoder>(ctx(), &a.state, &bytes[cut..]).map_err(|e| e.message)?;
        let c = codec::finish::<Decoder>(ctx(), &b.state).map_err(|e| e.message)?;
        Ok([a.chunks, b.chunks, c.chunks].concat())
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec("[a-z ]{0,12}", 0..8).prop_map(|words| {
            let mut s: String = words
                .iter()
                .map(|w| format!("{{\"model\":\"m\",\"message\":{{\"role\":\"assistant\",\"content\":\"{w}\"}},\"done\":false}}\n"))
                .collect();
            s.push_str("{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":3,\"eval_count\":5}\n");
            s.into_bytes()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024), cut in any::<usize>()) {
            if let Ok(chunks) = decode(&bytes, cut) {
                for c in chunks {
                    prop_assert!(serde_json::from_slice::<serde_json::Value>(&c).is_ok());
                }
            }
        }

        #[test]
        fn pieces_decode_like_the_whole(s in stream(), cut in any::<usize>()) {
            prop_assert_eq!(decode(&s, 0).map(|c| c.len()), decode(&s, cut).map(|c| c.len()));
        }
    }
}
