//! Logs and traces. Logs go to stderr as text or JSON lines. Traces are
//! off unless an OTLP endpoint is configured (`[telemetry] otlp_endpoint`,
//! or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, with `OTEL_SERVICE_NAME`): then
//! every `/v1` request is a span — with child spans per attempt, plugin
//! call and upstream call — exported over OTLP/HTTP (protobuf) in
//! batches, its attributes after the OpenTelemetry GenAI conventions, and a
//! client's W3C `traceparent` is continued and passed upstream. Prompt and
//! completion text are never recorded.
//!
//! The spans are at `DEBUG` level and only the trace layer enables them, so
//! with traces off they cost a disabled callsite check.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::TelemetryConfig;

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Whether traces are exported (set once at start).
pub fn traces_on() -> bool {
    TRACES.get().copied().unwrap_or(false)
}

static TRACES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The OTLP traces endpoint, if traces are on: the configuration's, else
/// the standard environment variables'.
fn endpoint(cfg: &TelemetryConfig) -> Option<String> {
    if let Some(base) = cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        let base = base.trim_end_matches('/');
        return Some(if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") });
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| format!("{}/v1/traces", b.trim_end_matches('/'))))
}

/// Install the log (and, when configured, trace) subscriber.
pub fn init(json_logs: bool, cfg: &TelemetryConfig) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json_logs {
        fmt.json().with_current_span(true).with_filter(filter).boxed()
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_filter(filter).boxed()
    };
    let Some(endpoint) = endpoint(cfg) else {
        let _ = TRACES.set(false);
        Registry::default().with(logs).init();
        return Telemetry { provider: None };
    };
    let provider = match exporter(&endpoint, cfg) {
        Ok(p) => p,
        Err(error) => {
            Registry::default().with(logs).init();
            tracing::error!(%error, "traces are off: the OTLP exporter could not be built");
            let _ = TRACES.set(false);
            return Telemetry { provider: None };
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("wasmgate");
    let spans = Targets::new().with_target("wasmgate", tracing::Level::DEBUG);
    let traces = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans);
    Registry::default().with(logs).with(traces).init();
    let _ = TRACES.set(true);
    tracing::info!(%endpoint, "exporting traces over OTLP");
    Telemetry { provider: Some(provider) }
}

fn exporter(endpoint: &str, cfg: &TelemetryConfig) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let batch =
        BatchConfigBuilder::default().with_scheduled_delay(Duration::from_millis(cfg.export_interval_ms)).build();
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
    let name =
        std::env::var("OTEL_SERVICE_NAME").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| cfg.service_name.clone());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
}

/// Make `span` a child of the client's `traceparent`, when it sent one.
pub fn continue_trace(span: &Span, headers: &axum::http::HeaderMap) {
    if !traces_on() || !headers.contains_key("traceparent") {
        return;
    }
    let cx: Context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(cx);
}

/// Request headers as a propagation carrier.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// The `traceparent` to send upstream for the current span, if traced.
pub fn traceparent() -> Option<String> {
    if !traces_on() {
        return None;
    }
    let cx = Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// Set an attribute on the current span (no-op with traces off).
pub fn attribute(key: &'static str, value: impl Into<opentelemetry::Value>) {
    if traces_on() {
        Span::current().set_attribute(key, value);
    }
}

/// Set an attribute on `span` (no-op with traces off).
pub fn span_attribute(span: &Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if traces_on() {
        span.set_attribute(key, value);
    }
}
