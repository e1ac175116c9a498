//! `/metrics` after a known mix of requests — successes, a failover, a
//! plugin trap, a rate-limit rejection, a stream — read directly and
//! through a real Prometheus server (Debian's `prometheus`, installed by
//! `cargo xtask test`) scraping the gateway every second on loopback; and
//! the spans of a failover request, received by an OTLP/HTTP collector.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValueKind;
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use prost::Message;

use serde_json::{Value, json};

use crate::support::accounts::user_with_token;
use crate::support::mock::MockUpstream;
use crate::support::{Gateway, TOKEN, channel, chat, client, eventually, post};

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Start one scraping `target` (`host:port`) every second.
    fn start(target: &str) -> Self {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("no prometheus binary: run the suite with `cargo xtask test`, which installs it");
        let dir = tempfile::tempdir().expect("tmp");
        let config = dir.path().join("prometheus.yml");
        let yaml = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: wasmgate\n    \
             static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(&config, yaml).expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Self { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// The value of an instant `query`, if it has exactly one sample.
    async fn value(&self, query: &str) -> Option<f64> {
        let resp = client().get(format!("{}/api/v1/query", self.url)).query(&[("query", query)]).send().await.ok()?;
        let body: Value = resp.json().await.ok()?;
        let result = body["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Wait until `query` is `expected` (bounded); panics with the last value.
    async fn expect(&self, query: &str, expected: impl Fn(f64) -> bool) {
        let ok = eventually(Duration::from_secs(45), || async { self.value(query).await.is_some_and(&expected) }).await;
        assert!(ok.is_some(), "PromQL `{query}` never matched; last value {:?}", self.value(query).await);
    }
}

/// One sample of the text exposition: `name{labels} value` where every
/// `(label, value)` of `labels` is present.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_a_known_mix_and_a_real_prometheus_reads_them() {
    let mock = MockUpstream::start("ok").await;
    let channels = channel("dead", "openai", "http://127.0.0.1:1/v1", &["fo-model"], "priority = 10\n")
        + &channel("good", "openai", &mock.base_url(), &["gpt-4o-mini", "fo-model"], "")
        + &channel("hostile", "hostile", &mock.base_url(), &["trap"], "");
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm", "hostile.wasm"], &channels);

    // The mix: one failover, two plain successes, a stream, a trap, and a
    // token limited to one request a minute (one served, one refused).
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("fo-model", "fail over")).await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..2 {
        assert_eq!(post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "plain")).await.0, 200);
    }
    let mut streamed = chat("gpt-4o-mini", "stream");
    streamed["stream"] = json!(true);
    let text = client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&streamed).send().await;
    assert!(text.expect("stream").text().await.expect("body").ends_with("data: [DONE]\n\n"));
    assert_eq!(post(&gw, "/v1/chat/completions", &chat("trap", "trap")).await.0, 502);
    let (_, limited) = user_with_token(&gw, 1_000_000, json!({"rpm": 1})).await;
    let send =
        || client().post(gw.url("/v1/chat/completions")).bearer_auth(&limited).json(&chat("gpt-4o-mini", "x")).send();
    assert_eq!(send().await.expect("send").status().as_u16(), 200);
    assert_eq!(send().await.expect("send").status().as_u16(), 429);

    let scrape = client().get(gw.url("/metrics")).send().await.expect("scrape");
    assert_eq!(scrape.status().as_u16(), 200);
    assert!(scrape.headers()["content-type"].to_str().expect("type").starts_with("application/openmetrics-text"));
    let text = scrape.text().await.expect("text");
    assert_eq!(sample(&text, "wasmgate_requests_total", &[]), 7.0, "{text}");
    assert_eq!(sample(&text, "wasmgate_requests_total", &[("status", "2xx")]), 5.0);
    assert_eq!(sample(&text, "wasmgate_requests_total", &[("status", "4xx"), ("code", "rate_limit_exceeded")]), 1.0);
    assert_eq!(sample(&text, "wasmgate_requests_total", &[("status", "5xx"), ("code", "plugin_error")]), 1.0);
    assert_eq!(sample(&text, "wasmgate_failovers_total", &[]), 1.0);
    assert_eq!(sample(&text, "wasmgate_attempts_total", &[("outcome", "transient")]), 1.0);
    assert!(sample(&text, "wasmgate_plugin_calls_total", &[("plugin", "hostile"), ("outcome", "trap")]) >= 1.0);
    assert!(
        sample(
            &text,
            "wasmgate_plugin_calls_total",
            &[("plugin", "openai"), ("call", "build_request"), ("outcome", "ok")]
        ) >= 5.0
    );
    assert_eq!(sample(&text, "wasmgate_rate_limited_total", &[("kind", "rpm")]), 1.0);
    assert_eq!(sample(&text, "wasmgate_overhead_seconds_count", &[("endpoint", "chat_completions")]), 5.0);
    assert_eq!(sample(&text, "wasmgate_time_to_first_token_seconds_count", &[]), 1.0);
    assert!(sample(&text, "wasmgate_tokens_total", &[("model", "gpt-4o-mini"), ("direction", "output")]) >= 12.0);
    assert_eq!(sample(&text, "wasmgate_channel_state", &[("state", "enabled")]), 3.0);
    assert!(sample(&text, "process_resident_memory_bytes", &[]) > 1e6);
    assert_eq!(sample(&text, "wasmgate_plugin_loads_total", &[("kind", "published")]), 3.0, "three plugins loaded");
    assert!(sample(&text, "wasmgate_plugin_instances_idle", &[]) >= 1.0);
    // Every call has ended: no instance is counted as in use (none leaked).
    assert_eq!(sample(&text, "wasmgate_plugin_instances_in_use", &[]), 0.0, "{text}");
    // Calls are labelled with the version the plugin reports.
    let (_, plugins) = crate::support::admin(&gw, reqwest::Method::GET, "/api/plugins", None).await;
    let openai = plugins["data"].as_array().and_then(|d| d.iter().find(|p| p["name"] == "openai")).expect("openai");
    let version = openai["version"].as_str().expect("version");
    let labels = [("plugin", "openai"), ("version", version), ("call", "build_request"), ("outcome", "ok")];
    assert!(sample(&text, "wasmgate_plugin_calls_total", &labels) >= 5.0, "{text}");
    assert!(text.contains("\nwasmgate_billing_batch_duration_seconds_count "), "the writer's batches are timed");
    assert!(!text.contains(&limited) && !text.contains("sk-upstream-secret"), "no secrets in metrics");
    // Every metric the shipped Grafana dashboard queries exists.
    let dashboard =
        std::fs::read_to_string(crate::support::root().join("docs/grafana-dashboard.json")).expect("dashboard");
    for name in
        dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("wasmgate_"))
    {
        let base = name.trim_end_matches("_bucket");
        assert!(text.contains(&format!("\n{base}")), "the dashboard queries {name}, which /metrics does not serve");
    }

    // `/api/plugins` counts every call, adapters' and routers' alike.
    let (_, plugins) = crate::support::admin(&gw, reqwest::Method::GET, "/api/plugins", None).await;
    let plugin = |name: &str| plugins["data"].as_array().and_then(|d| d.iter().find(|p| p["name"] == name).cloned());
    let hostile = plugin("hostile").expect("hostile listed");
    assert!(hostile["calls"].as_u64() >= Some(2) && hostile["failed_calls"].as_u64() >= Some(1), "{hostile}");
    let openai = plugin("openai").expect("openai listed");
    assert!(openai["calls"].as_u64() >= Some(10) && openai["failed_calls"] == 0, "{openai}");
    assert!(plugin("weighted").expect("weighted listed")["calls"].as_u64() >= Some(1));

    let target = gw.url("").trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&target);
    prometheus.expect("sum(wasmgate_requests_total)", |v| v == 7.0).await;
    prometheus.expect("wasmgate_failovers_total", |v| v == 1.0).await;
    prometheus.expect(r#"sum(wasmgate_plugin_calls_total{outcome="trap"})"#, |v| v >= 1.0).await;
    prometheus.expect(r#"sum(wasmgate_rate_limited_total{kind="rpm"})"#, |v| v == 1.0).await;
    prometheus.expect("wasmgate_open_streams", |v| v == 0.0).await;
    prometheus
        .expect("histogram_quantile(0.5, sum by (le) (wasmgate_overhead_seconds_bucket))", |v| v > 0.0 && v < 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_metrics_token_is_required_when_set() {
    let mock = MockUpstream::start("ok").await;
    let toml =
        format!("[metrics]\ntoken = \"scrape-secret\"\n{}", channel("a", "openai", &mock.base_url(), &["m"], ""));
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &toml);
    let bare = client().get(gw.url("/metrics")).send().await.expect("scrape");
    assert_eq!(bare.status().as_u16(), 401);
    let ok = client().get(gw.url("/metrics")).bearer_auth("scrape-secret").send().await.expect("scrape");
    assert_eq!(ok.status().as_u16(), 200);
    assert!(ok.text().await.expect("text").contains("# TYPE wasmgate_failovers counter"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_request_id_is_kept_echoed_and_logged_in_the_usage_row() {
    let mock = MockUpstream::start("ok").await;
    let gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &channel("a", "openai", &mock.base_url(), &["m", "slow-m"], ""),
    );
    let (_, key) = user_with_token(&gw, 1_000_000, json!({})).await;
    let send = |id: &'static str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-request-id", id)
            .json(&chat("m", "hi"))
            .send()
    };
    let resp = send("client-trace.42:a_b").await.expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-trace.42:a_b");
    crate::support::accounts::wait_rows(&gw, "request_id=client-trace.42:a_b", 1).await;
    // Every log line of the request carries its id (the request span's field).
    assert!(gw.log().contains("request{request_id=client-trace.42:a_b}"), "{}", gw.log());
    // A stream's lines logged after the handler returned carry it too:
    // here the client leaves mid-stream.
    let mut stream = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-request-id", "client-stream-7")
        .json(&json!({"model": "slow-m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("stream")
        .bytes_stream();
    futures_util::StreamExt::next(&mut stream).await.expect("a first chunk").expect("bytes");
    drop(stream);
    let logged = || async {
        gw.log()
            .lines()
            .any(|l| l.contains("client disconnected mid-stream") && l.contains("request_id=client-stream-7"))
    };
    assert!(eventually(Duration::from_secs(10), logged).await.is_some(), "{}", gw.log());
    // An id that cannot be logged or stored as it is gets replaced.
    let resp = send("has spaces and / slashes").await.expect("send");
    let id = resp.headers()["x-request-id"].to_str().expect("id").to_string();
    assert!(id.starts_with("req_"), "{id}");
}

#[test]
fn log_lines_are_json_objects_with_log_format_json() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("c.toml");
    let toml = format!("data_dir = {:?}\nplugins_dir = {:?}\n", dir.path().join("data"), dir.path().join("plugins"));
    std::fs::write(&config, toml).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["--log-format", "json", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let stderr = child.stderr.take().expect("stderr");
    let lines: Vec<String> =
        std::io::BufRead::lines(std::io::BufReader::new(stderr)).take(3).map_while(Result::ok).collect();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string() && v["fields"].is_object(), "{line}");
    }
}

/// A minimal OTLP/HTTP traces receiver on loopback: every span it is sent.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<OtlpSpan>>>) {
    use axum::extract::State;
    let spans: Arc<Mutex<Vec<OtlpSpan>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(spans): State<Arc<Mutex<Vec<OtlpSpan>>>>, body: axum::body::Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                let mut all = spans.lock().expect("lock");
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        all.extend(scope.spans);
                    }
                }
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }),
        )
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

fn attr<'a>(span: &'a OtlpSpan, key: &str) -> Option<&'a AnyValueKind> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

fn text_attr<'a>(span: &'a OtlpSpan, key: &str) -> Option<&'a str> {
    match attr(span, key) {
        Some(AnyValueKind::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int_attr(span: &OtlpSpan, key: &str) -> Option<i64> {
    match attr(span, key) {
        Some(AnyValueKind::IntValue(i)) => Some(*i),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_is_traced_over_otlp_with_genai_attributes_and_the_clients_trace_id() {
    let (collector, spans) = otlp_receiver().await;
    let mock = MockUpstream::start("ok").await;
    let toml = format!(
        "[telemetry]\notlp_endpoint = {collector:?}\nexport_interval_ms = 200\n{}{}",
        channel("dead", "openai", "http://127.0.0.1:1/v1", &["fo-model"], "priority = 10\n"),
        channel("good", "openai", &mock.base_url(), &["fo-model"], "")
    );
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &toml);
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&chat("fo-model", "a secret prompt"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let request_name = "POST /v1/chat/completions";
    let found = eventually(Duration::from_secs(20), || async {
        spans.lock().expect("lock").iter().any(|s| s.name == request_name)
    })
    .await;
    assert!(found.is_some(), "no request span exported");
    // Children end (and are exported) before their parent.
    let spans = spans.lock().expect("lock").clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let request = spans.iter().find(|s| s.name == request_name).expect("request span");
    assert_eq!(hex(&request.trace_id), trace_id, "the client's trace is continued");
    assert_eq!(hex(&request.parent_span_id), "b7ad6b7169203331");
    assert_eq!(text_attr(request, "gen_ai.operation.name"), Some("chat"));
    assert_eq!(text_attr(request, "gen_ai.request.model"), Some("fo-model"));
    let children = |parent: &OtlpSpan, name: &str| -> Vec<OtlpSpan> {
        spans.iter().filter(|s| s.parent_span_id == parent.span_id && s.name == name).cloned().collect()
    };
    let attempts = children(request, "attempt");
    assert_eq!(attempts.len(), 2, "one attempt per channel: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let (failed, served): (Vec<_>, Vec<_>) = attempts.iter().partition(|a| text_attr(a, "error.type").is_some());
    assert_eq!((failed.len(), served.len()), (1, 1));
    assert_eq!(text_attr(failed[0], "error.type"), Some("transient"));
    let served = served[0];
    assert_eq!(text_attr(served, "gen_ai.provider.name"), Some("openai"));
    assert_eq!(text_attr(served, "gen_ai.response.model"), Some("fo-model"));
    assert_eq!(
        (int_attr(served, "gen_ai.usage.input_tokens"), int_attr(served, "gen_ai.usage.output_tokens")),
        (Some(9), Some(12))
    );
    for attempt in &attempts {
        assert_eq!(children(attempt, "plugin build_request").len(), 1, "a build_request span under each attempt");
        assert_eq!(children(attempt, "upstream").len(), 1, "an upstream span under each attempt");
    }
    assert_eq!(children(served, "plugin parse_response").len(), 1);
    assert_eq!(int_attr(&children(served, "upstream")[0], "http.response.status_code"), Some(200));
    // The upstream got the trace context; prompts are never recorded.
    let headers = mock.state.last_headers.lock().await.clone().expect("upstream headers");
    let sent = headers.get("traceparent").expect("traceparent upstream").to_str().expect("ascii").to_string();
    assert!(sent.starts_with(&format!("00-{trace_id}-")), "{sent}");
    let dump = format!("{spans:?}");
    assert!(!dump.contains("a secret prompt") && !dump.contains("sk-upstream-secret"), "no prompt or key in spans");
}
