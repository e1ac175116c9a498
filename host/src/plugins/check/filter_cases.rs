//! The filter conformance suite: it declares a hook; every declared hook
//! answers, without failing, on requests, answers and a stream of chunks of
//! the shapes clients send (with the rule settings of `settings.json` in
//! the fixtures directory, else `{}`); what it returns is JSON; the same
//! input gives the same verdict; and the time a call takes.

use std::path::Path;
use std::time::Instant;

use super::{Report, percentiles};
use crate::plugins::{ChunkAction, Endpoint, FilterContext, FilterPlugin, Hook, RequestVerdict, ResponseVerdict};

const REQUESTS: [&str; 4] = [
    r#"{"model":"m","messages":[{"role":"user","content":"Hello there"}]}"#,
    r#"{"model":"m","stream":true,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"What is in this image? Mail me at a@b.example"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
    r#"{"model":"m","messages":[{"role":"user","content":"call a tool"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#,
    r#"{"model":"m","input":["embed me","and me"]}"#,
];

const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":6,"total_tokens":9}}"#;

const CHUNKS: [&str; 4] = [
    r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
    r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hello"}}]}"#,
    r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" world"}}]}"#,
    r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
];

fn context(settings: &str, stream: bool) -> FilterContext {
    FilterContext {
        endpoint: Endpoint::ChatCompletions,
        route: "chat_completions".into(),
        model: "m".into(),
        group: "default".into(),
        stream,
        request_id: "req_conformance".into(),
        user_id: Some(1),
        token_id: Some(1),
        settings: settings.into(),
    }
}

fn is_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

async fn requests(filter: &FilterPlugin, settings: &str) -> Result<(), String> {
    for (i, body) in REQUESTS.iter().enumerate() {
        let ctx = context(settings, i == 1);
        let first = filter.on_request(&ctx, body.as_bytes()).await.map_err(|e| format!("request {i}: {e}"))?;
        if let RequestVerdict::Edit(edit) = &first
            && edit.body.as_deref().is_some_and(|b| !is_json(b))
        {
            return Err(format!("request {i}: the edited body is not JSON"));
        }
        let again = filter.on_request(&ctx, body.as_bytes()).await.map_err(|e| format!("request {i}: {e}"))?;
        if format!("{first:?}") != format!("{again:?}") {
            return Err(format!("request {i}: two calls gave different verdicts"));
        }
    }
    Ok(())
}

async fn response(filter: &FilterPlugin, settings: &str) -> Result<(), String> {
    match filter.on_response(&context(settings, false), ANSWER.as_bytes()).await.map_err(|e| e.to_string())? {
        ResponseVerdict::Rewrite(body) if !is_json(&body) => Err("the rewritten answer is not JSON".into()),
        _ => Ok(()),
    }
}

async fn stream(filter: &FilterPlugin, settings: &str) -> Result<(), String> {
    let ctx = context(settings, true);
    let mut state = Vec::new();
    for (i, chunk) in CHUNKS.iter().enumerate() {
        let verdict =
            filter.on_stream_chunk(&ctx, chunk.as_bytes(), &state).await.map_err(|e| format!("chunk {i}: {e}"))?;
        state = verdict.state;
        if matches!(verdict.action, ChunkAction::Stop(_)) {
            break;
        }
    }
    Ok(())
}

pub(super) async fn run(filter: &FilterPlugin, fixtures: Option<&Path>, report: &mut Report) {
    let settings = fixtures
        .map(|d| d.join("settings.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_else(|| "{}".into());
    let hooks = &filter.info.hooks;
    report.case("info: declares at least one hook", if hooks.is_empty() { Err("no hooks".into()) } else { Ok(()) });
    if filter.wants(Hook::Request) {
        report.case(
            "on-request: answers on chat, multimodal, tool and embeddings requests, same verdict twice",
            requests(filter, &settings).await,
        );
    }
    if filter.wants(Hook::Response) {
        report.case("on-response: answers on a chat completion; a rewrite is JSON", response(filter, &settings).await);
    }
    if filter.wants(Hook::StreamChunk) {
        report.case("on-stream-chunk: answers on a 4-chunk stream carrying its state", stream(filter, &settings).await);
    }
    let hook = if filter.wants(Hook::Request) {
        "on-request"
    } else if filter.wants(Hook::Response) {
        "on-response"
    } else {
        "on-stream-chunk"
    };
    let ctx = context(&settings, false);
    let mut samples = Vec::with_capacity(300);
    for _ in 0..300 {
        let t = Instant::now();
        let _ = match hook {
            "on-request" => filter.on_request(&ctx, REQUESTS[0].as_bytes()).await.map(|_| ()),
            "on-response" => filter.on_response(&ctx, ANSWER.as_bytes()).await.map(|_| ()),
            _ => filter.on_stream_chunk(&ctx, CHUNKS[1].as_bytes(), b"").await.map(|_| ()),
        };
        samples.push(t.elapsed());
    }
    let (p50, p99) = percentiles(samples);
    report.timings.push(format!("{hook} p50 {p50:?}, p99 {p99:?}"));
}
