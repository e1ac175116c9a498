//! The adapter conformance suite: provider-independent cases for every
//! endpoint the adapter claims, robustness against hostile upstream bytes,
//! the health probe, the credential exchange, and (optionally) the
//! provider's recorded examples.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::{Report, percentiles};
use crate::channels::origin_of;
use crate::plugins::{
    AdapterPlugin, ChannelView, Endpoint, ErrorKind, Header, HttpMethod, HttpRequest, HttpResponse, NO_KEY,
    RequestContext,
};

const BASE_URL: &str = "https://upstream.conformance.test/base";
const KEY: &str = "ck-conformance-key|cs-conformance-secret";
const CREDENTIAL: &str = "conformance-credential";

fn channel() -> ChannelView {
    ChannelView { id: 1, name: "conformance".into(), base_url: BASE_URL.into(), key: KEY.into(), settings: "{}".into() }
}

fn ctx(endpoint: Endpoint, model: &str, stream: bool) -> RequestContext {
    RequestContext {
        endpoint,
        requested_model: model.into(),
        upstream_model: model.into(),
        stream,
        include_usage: stream,
        request_id: "req_conformance".into(),
    }
}

fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    HttpResponse {
        status,
        headers: headers.iter().map(|(n, v)| Header { name: n.to_string(), value: v.to_string() }).collect(),
        body: body.to_vec(),
    }
}

/// A canonical OpenAI request per endpoint.
fn sample(endpoint: Endpoint) -> (&'static str, serde_json::Value) {
    use serde_json::json;
    match endpoint {
        Endpoint::ChatCompletions => (
            "conformance-chat",
            json!({"model": "conformance-chat", "max_tokens": 16, "temperature": 0.2,
                   "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]}),
        ),
        Endpoint::Completions => {
            ("conformance-text", json!({"model": "conformance-text", "prompt": "Say hello.", "max_tokens": 8}))
        }
        Endpoint::Embeddings => ("conformance-embed", json!({"model": "conformance-embed", "input": ["a", "b"]})),
        Endpoint::Models => ("", json!({})),
    }
}

fn endpoint_name(e: Endpoint) -> &'static str {
    crate::relay::endpoint_name(e)
}

/// A built request must stay in the channel's origin and keep the key out
/// of the URL.
fn well_formed(req: &HttpRequest, endpoint: Endpoint) -> Result<(), String> {
    let origin = origin_of(BASE_URL).unwrap_or_default();
    if origin_of(&req.url).as_deref() != Some(origin.as_str()) {
        return Err(format!("URL `{}` is outside the channel's origin", req.url));
    }
    if req.url.contains("ck-conformance-key") || req.url.contains("cs-conformance-secret") {
        return Err("the channel key appears in the URL (it would reach access logs)".into());
    }
    if endpoint != Endpoint::Models && (matches!(req.method, HttpMethod::Get) || req.body.is_empty()) {
        return Err("a request with a body was built as a GET or without a body".into());
    }
    Ok(())
}

pub(super) async fn run(adapter: &Arc<AdapterPlugin>, fixtures: Option<&Path>, report: &mut Report) {
    let view = channel();
    let credential = credential_case(adapter, &view, report).await;
    let cred = credential.as_ref();
    let claimed = adapter.info.endpoints.clone();
    report.case(
        "info() claims at least one endpoint",
        if claimed.is_empty() { Err("endpoints is empty".into()) } else { Ok(()) },
    );

    for &endpoint in &claimed {
        let (model, body) = sample(endpoint);
        let body = serde_json::to_vec(&body).unwrap_or_default();
        for stream in [false, true] {
            if stream && endpoint != Endpoint::ChatCompletions {
                continue;
            }
            let label =
                format!("{}{}: builds a request", endpoint_name(endpoint), if stream { " (stream)" } else { "" });
            let c = ctx(endpoint, model, stream);
            let first = adapter.build_request(NO_KEY, &c, &view, &body, cred.cloned()).await;
            let result = match &first {
                Err(e) => Err(format!("trapped: {e}")),
                Ok(Err(e)) => Err(format!("refused a canonical request: {:?} {}", e.kind, e.message)),
                Ok(Ok(req)) => match well_formed(req, endpoint) {
                    Err(e) => Err(e),
                    // Same input, same request: adapters are pure functions.
                    Ok(()) => match adapter.build_request(NO_KEY, &c, &view, &body, cred.cloned()).await {
                        Ok(Ok(again)) if again.url == req.url && again.body == req.body => Ok(()),
                        _ => Err("two calls with the same input built different requests".into()),
                    },
                },
            };
            report.case(label, result);
        }
    }

    if claimed.contains(&Endpoint::ChatCompletions) {
        let c = ctx(Endpoint::ChatCompletions, "conformance-chat", false);
        let result = match adapter.build_request(NO_KEY, &c, &view, b"{not json", cred.cloned()).await {
            Err(e) => Err(format!("trapped: {e}")),
            Ok(Ok(_)) => Err("accepted a body that is not JSON".into()),
            Ok(Err(e)) if matches!(e.kind, ErrorKind::BadRequest) => Ok(()),
            Ok(Err(e)) => Err(format!("classified invalid JSON as {:?}, not bad-request", e.kind)),
        };
        report.case("invalid JSON from the client is a bad-request", result);
        timing(adapter, &view, cred, report).await;
    }

    passthrough_cases(adapter, &view, cred, report).await;
    classify_cases(adapter, &claimed, report).await;
    garbage_cases(adapter, &claimed, report).await;
    probe_case(adapter, &view, &claimed, cred, report).await;
    if let Some(dir) = fixtures {
        recorded(adapter, dir, &claimed, report).await;
    }
}

/// Each relayed operation the adapter lists (`passthrough`, WIT 0.1.6)
/// builds a well-formed request for a canonical body.
async fn passthrough_cases(
    adapter: &Arc<AdapterPlugin>,
    view: &ChannelView,
    cred: Option<&Arc<str>>,
    report: &mut Report,
) {
    use crate::plugins::{Operation, PassthroughContext};
    for &operation in adapter.operations() {
        let (content_type, body): (&str, &[u8]) = match operation {
            Operation::AudioTranscriptions | Operation::AudioTranslations => (
                "multipart/form-data; boundary=cb",
                b"--cb\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nconformance-audio\r\n--cb\r\n\
Content-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\n\x00\x01\r\n--cb--\r\n",
            ),
            _ => ("application/json", br#"{"model":"conformance-op","input":"hello","prompt":"hello","query":"q","documents":["a"],"voice":"alloy"}"#),
        };
        let ctx = PassthroughContext {
            operation,
            client_headers: Vec::new(),
            requested_model: "conformance-op".into(),
            upstream_model: "conformance-op".into(),
            content_type: content_type.into(),
            request_id: "req_conformance".into(),
        };
        // A native protocol may say "not natively on this channel"
        // (bad-request): the host then translates.
        let native = matches!(operation, Operation::Messages | Operation::Responses);
        let result = match adapter.build_passthrough(NO_KEY, &ctx, view, body, cred.cloned()).await {
            Err(e) => Err(format!("trapped: {e}")),
            Ok(Err(e)) if native && matches!(e.kind, ErrorKind::BadRequest) => Ok(()),
            Ok(Err(e)) => Err(format!("refused a canonical request: {:?} {}", e.kind, e.message)),
            Ok(Ok(req)) => well_formed(&req, Endpoint::ChatCompletions),
        };
        report.case(format!("{}: relays a request", crate::relayed::route(operation)), result);
    }
}

/// The exchange, when the adapter has one: stays in the origin.
async fn credential_case(adapter: &Arc<AdapterPlugin>, view: &ChannelView, report: &mut Report) -> Option<Arc<str>> {
    if !adapter.has_auth() {
        return None;
    }
    match adapter.exchange_request(NO_KEY, view).await {
        Err(e) => {
            report.case("auth: exchange-request", Err(format!("trapped: {e}")));
            None
        }
        Ok(None) => {
            report.case("auth: exchange-request (none needed)", Ok(()));
            None
        }
        Ok(Some(req)) => {
            let origin = origin_of(BASE_URL).unwrap_or_default();
            let result = if origin_of(&req.url).as_deref() == Some(origin.as_str()) {
                Ok(())
            } else {
                Err(format!("exchange URL `{}` is outside the channel's origin", req.url))
            };
            report.case("auth: exchange request stays in the channel's origin", result);
            let garbage = response(500, &[], b"<html>oops</html>");
            let result = match adapter.parse_exchange(NO_KEY, view, &garbage).await {
                Err(e) => Err(format!("trapped: {e}")),
                Ok(Ok(_)) => Err("read a credential out of an HTML error page".into()),
                Ok(Err(_)) => Ok(()),
            };
            report.case("auth: a failed exchange is an error", result);
            Some(Arc::from(CREDENTIAL))
        }
    }
}

async fn timing(adapter: &Arc<AdapterPlugin>, view: &ChannelView, cred: Option<&Arc<str>>, report: &mut Report) {
    let (model, body) = sample(Endpoint::ChatCompletions);
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let c = ctx(Endpoint::ChatCompletions, model, false);
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let _ = adapter.build_request(NO_KEY, &c, view, &body, cred.cloned()).await;
        samples.push(t.elapsed());
    }
    let (p50, p99) = percentiles(samples);
    report.timings.push(format!("build-request (chat) p50 {p50:?}, p99 {p99:?}"));
}

async fn classify_cases(adapter: &Arc<AdapterPlugin>, claimed: &[Endpoint], report: &mut Report) {
    let Some(&endpoint) = claimed.first() else { return };
    let (model, _) = sample(endpoint);
    let c = ctx(endpoint, model, false);
    type Expected = fn(&ErrorKind) -> bool;
    let cases: [(&str, HttpResponse, Expected); 5] = [
        ("401 is auth", response(401, &[], b"Unauthorized"), |k| matches!(k, ErrorKind::Auth)),
        ("429 is rate-limited", response(429, &[("retry-after", "7")], b""), |k| {
            matches!(k, ErrorKind::RateLimited(_))
        }),
        (
            "plain-text 503 is transient",
            response(503, &[("content-type", "text/plain")], b"no healthy upstream"),
            |k| matches!(k, ErrorKind::Transient),
        ),
        ("HTML 502 is transient", response(502, &[("content-type", "text/html")], b"<html><h1>502</h1></html>"), |k| {
            matches!(k, ErrorKind::Transient)
        }),
        ("empty 500 is transient", response(500, &[], b""), |k| matches!(k, ErrorKind::Transient)),
    ];
    for (label, resp, ok) in cases {
        let result = match adapter.classify_error(NO_KEY, &c, None, &resp).await {
            Err(e) => Err(format!("trapped: {e}")),
            Ok(e) if e.message.contains("conformance-key") => Err("the message contains the channel key".into()),
            Ok(e) if ok(&e.kind) => Ok(()),
            Ok(e) => Err(format!("classified as {:?}", e.kind)),
        };
        report.case(format!("classify-error: {label}"), result);
    }
}

/// Hostile upstream bytes are errors, never traps or successes.
async fn garbage_cases(adapter: &Arc<AdapterPlugin>, claimed: &[Endpoint], report: &mut Report) {
    let Some(&endpoint) = claimed.first() else { return };
    let (model, _) = sample(endpoint);
    let c = ctx(endpoint, model, false);
    for (label, body) in
        [("an HTML", &b"<html>oops</html>"[..]), ("an empty", b""), ("a truncated JSON", b"{\"id\": \"x\", \"cho")]
    {
        let result = match adapter.parse_response(NO_KEY, &c, None, &response(200, &[], body)).await {
            Err(e) => Err(format!("trapped: {e}")),
            Ok(Ok(_)) => Err("turned it into a successful response".into()),
            Ok(Err(_)) => Ok(()),
        };
        report.case(format!("parse-response: a 200 with {label} body is an error"), result);
    }
    if !claimed.contains(&Endpoint::ChatCompletions) {
        return;
    }
    let c = ctx(Endpoint::ChatCompletions, "conformance-chat", true);
    let result = async {
        let mut decoder = adapter.stream_decoder(NO_KEY, &c, None).await.map_err(|e| format!("trapped: {e}"))?;
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        for bytes in [&b"data: {garbage\n\n"[..], b"\x00\xff\xfe not a stream at all\n\n"] {
            match decoder.feed(bytes).await {
                Err(e) => return Err(format!("trapped: {e}")),
                Ok(Ok(ev)) => chunks.extend(ev.chunks),
                Ok(Err(_)) => return Ok(()),
            }
        }
        match decoder.finish().await {
            Err(e) => return Err(format!("trapped: {e}")),
            Ok(Ok(ev)) => chunks.extend(ev.chunks),
            Ok(Err(_)) => {}
        }
        match chunks.iter().find(|c| serde_json::from_slice::<serde_json::Value>(c).is_err()) {
            Some(_) => Err("emitted a chunk that is not JSON".into()),
            None => Ok(()),
        }
    }
    .await;
    report.case("stream decoder: garbage bytes give an error, not a trap or a bad chunk", result);
}

async fn probe_case(
    adapter: &Arc<AdapterPlugin>,
    view: &ChannelView,
    claimed: &[Endpoint],
    cred: Option<&Arc<str>>,
    report: &mut Report,
) {
    let result = match adapter.health_probe(NO_KEY, view, cred.cloned()).await {
        Err(e) => Err(format!("trapped: {e}")),
        Ok(p) if p.model.is_empty() => Err("the probe names no model".into()),
        Ok(p) if !claimed.contains(&p.endpoint) => {
            Err(format!("probes {}, which info() does not claim", endpoint_name(p.endpoint)))
        }
        Ok(p) => {
            match adapter.build_request(NO_KEY, &ctx(p.endpoint, &p.model, false), view, &p.body, cred.cloned()).await {
                Ok(Ok(req)) => well_formed(&req, p.endpoint),
                Ok(Err(e)) => Err(format!("its own probe body is refused: {}", e.message)),
                Err(e) => Err(format!("trapped building the probe: {e}")),
            }
        }
    };
    report.case("health-probe: a claimed endpoint, a model, a buildable body", result);
}

/// What `expect.json` says a recorded example must translate to: `text`,
/// `prompt_tokens`, `completion_tokens` and `finish_reason` for
/// `chat.json`; `stream_text`, `stream_prompt_tokens`,
/// `stream_completion_tokens` for the recorded stream (each optional).
fn compare(expect: &serde_json::Value, fields: &[(&str, serde_json::Value)]) -> Result<(), String> {
    let wrong: Vec<String> = fields
        .iter()
        .filter(|(key, got)| expect.get(*key).is_some_and(|want| !want.is_null() && want != got))
        .map(|(key, got)| format!("{key}: expected {}, got {got}", expect[*key]))
        .collect();
    if wrong.is_empty() { Ok(()) } else { Err(wrong.join("; ")) }
}

/// The provider's recorded examples in `dir`, when present.
pub(super) async fn recorded(adapter: &Arc<AdapterPlugin>, dir: &Path, claimed: &[Endpoint], report: &mut Report) {
    let expect: serde_json::Value =
        std::fs::read(dir.join("expect.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let c = ctx(Endpoint::ChatCompletions, "conformance-chat", false);
    if let Ok(body) = std::fs::read(dir.join("chat.json")) {
        let result = match adapter
            .parse_response(NO_KEY, &c, None, &response(200, &[("content-type", "application/json")], &body))
            .await
        {
            Err(e) => Err(format!("trapped: {e}")),
            Ok(Err(e)) => Err(format!("refused: {:?} {}", e.kind, e.message)),
            Ok(Ok(parsed)) => {
                let v: serde_json::Value = serde_json::from_slice(&parsed.body).unwrap_or_default();
                if v["choices"].as_array().is_none_or(Vec::is_empty) {
                    Err("no choices in the OpenAI body".into())
                } else if let Some(u) = parsed.usage {
                    compare(
                        &expect,
                        &[
                            ("text", v["choices"][0]["message"]["content"].clone()),
                            ("finish_reason", v["choices"][0]["finish_reason"].clone()),
                            ("prompt_tokens", u.prompt_tokens.into()),
                            ("completion_tokens", u.completion_tokens.into()),
                        ],
                    )
                } else {
                    Err("no usage taken from the response".into())
                }
            }
        };
        let what = if expect.is_null() { "" } else { ", as expect.json says" };
        report.case(format!("recorded chat.json: an OpenAI body with choices and usage{what}"), result);
    }
    let stream = ["stream.sse", "stream.ndjson"].iter().find_map(|f| std::fs::read(dir.join(f)).ok());
    if let (Some(bytes), true) = (stream, claimed.contains(&Endpoint::ChatCompletions)) {
        let c = ctx(Endpoint::ChatCompletions, "conformance-chat", true);
        let result = async {
            let mut decoder = adapter.stream_decoder(NO_KEY, &c, None).await.map_err(|e| format!("trapped: {e}"))?;
            let (mut chunks, mut usage, mut done): (Vec<Vec<u8>>, _, _) = (Vec::new(), None, false);
            // Split every 7 bytes: decoders must cope with any boundary.
            let mut pieces = Vec::new();
            for p in bytes.chunks(7) {
                pieces.push(decoder.feed(p).await);
            }
            pieces.push(decoder.finish().await);
            for ev in pieces {
                let ev = ev.map_err(|e| format!("trapped: {e}"))?.map_err(|e| format!("error: {}", e.message))?;
                chunks.extend(ev.chunks);
                usage = ev.usage.or(usage);
                done |= ev.done;
            }
            if chunks.is_empty() || !done || usage.is_none() {
                return Err(format!("{} chunks, done={done}, usage={}", chunks.len(), usage.is_some()));
            }
            let mut text = String::new();
            for chunk in &chunks {
                let v: serde_json::Value =
                    serde_json::from_slice(chunk).map_err(|_| "a chunk is not JSON".to_string())?;
                text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            }
            let tokens = |f: fn(&crate::plugins::Usage) -> u32| usage.as_ref().map_or(0, f);
            compare(
                &expect,
                &[
                    ("stream_text", text.into()),
                    ("stream_prompt_tokens", tokens(|u| u.prompt_tokens).into()),
                    ("stream_completion_tokens", tokens(|u| u.completion_tokens).into()),
                ],
            )
        }
        .await;
        let what = if expect.is_null() { "" } else { ", as expect.json says" };
        report.case(format!("recorded stream, split every 7 bytes: chunks, end and usage{what}"), result);
    }
    if let Ok(body) = std::fs::read(dir.join("error.json")) {
        let result = match adapter.classify_error(NO_KEY, &c, None, &response(400, &[], &body)).await {
            Err(e) => Err(format!("trapped: {e}")),
            Ok(e) if matches!(e.kind, ErrorKind::Other) || e.message.is_empty() => {
                Err(format!("unclassified ({:?}, message {:?})", e.kind, e.message))
            }
            Ok(_) => Ok(()),
        };
        report.case("recorded error.json: classified with a message", result);
    }
}
