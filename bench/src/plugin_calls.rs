//! In-process plugin call overhead with the real components.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wasmgate::config::PluginConfig;
use wasmgate::plugins::{
    ArtifactCache, Candidate, ChannelView, Endpoint, HttpResponse, LoadedPlugin, PluginEngine, RequestContext,
    RequestMeta,
};

use crate::stats::{self, Summary};

/// Time `$n` evaluations of `$body` (which may `.await`), after `$n / 2`
/// warm-up ones.
macro_rules! time {
    ($n:expr, $body:expr) => {{
        let n: usize = $n;
        for _ in 0..n / 2 {
            $body;
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = std::time::Instant::now();
            $body;
            samples.push(t.elapsed());
        }
        samples
    }};
}
pub(crate) use time;

/// Print one table row: p50, p99, mean.
pub(crate) fn row(name: &str, samples: &[Duration]) {
    let s = Summary::of(samples);
    println!("| {name} | {} | {} | {} |", stats::us(s.p50), stats::us(s.p99), stats::us(s.mean));
}

/// Measure and print the plugin call table.
pub async fn run(plugins: &Path, n: usize) -> Result<()> {
    let engine = PluginEngine::new(&PluginConfig::default())?;
    let cache = Arc::new(ArtifactCache::none());
    let bytes = std::fs::read(plugins.join("openai.wasm")).context("openai.wasm")?;
    let LoadedPlugin::Adapter(adapter) =
        wasmgate::plugins::load(&engine, &cache, "openai", bytes).await.map_err(anyhow::Error::msg)?.plugin
    else {
        bail!("openai.wasm is not an adapter");
    };
    let ctx = RequestContext {
        endpoint: Endpoint::ChatCompletions,
        requested_model: "gpt-4o-mini".into(),
        upstream_model: "gpt-4o-mini".into(),
        stream: false,
        include_usage: false,
        request_id: "req_bench".into(),
    };
    let channel = ChannelView {
        id: 1,
        name: "bench".into(),
        base_url: "http://127.0.0.1:1/v1".into(),
        key: "sk-upstream".into(),
        settings: "{}".into(),
    };
    let request = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"benchmark this request"}],"temperature":0.2}"#;
    let response = HttpResponse {
        status: 200,
        headers: vec![],
        body: br#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"echo: benchmark this request"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#.to_vec(),
    };
    let chunk = br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"word "},"finish_reason":null}]}

"#;

    println!("\n## plugin call overhead, in process ({n} iterations each)\n");
    println!("| call | p50 | p99 | mean |\n|---|---|---|---|");
    let both = time!(n, {
        let r = adapter.build_request(1, &ctx, &channel, request, None).await;
        assert!(matches!(r, Ok(Ok(_))));
        let p = adapter.parse_response(1, &ctx, None, &response).await;
        assert!(matches!(p, Ok(Ok(_))));
    });
    row("openai: build-request + parse-response (instances reused per channel key)", &both);
    row(
        "openai: instantiate + info (the fixed cost of a fresh instance)",
        &time!(n, {
            let _ = adapter.call_info().await;
        }),
    );
    row(
        "openai: build-request (instance reused)",
        &time!(n, {
            let _ = adapter.build_request(1, &ctx, &channel, request, None).await;
        }),
    );
    let mut stream_ctx = ctx.clone();
    stream_ctx.stream = true;
    let mut decoder = adapter.stream_decoder(1, &stream_ctx, None).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    row(
        "openai: stream-codec decode (one chunk)",
        &time!(n, {
            let r = decoder.feed(chunk).await;
            assert!(matches!(r, Ok(Ok(ref ev)) if ev.chunks.len() == 1));
        }),
    );

    let candidates: Vec<Candidate> = (0..3u32)
        .map(|i| Candidate {
            channel_id: u64::from(i),
            priority: 0,
            weight: i + 1,
            latency_ms: 20.0 * f64::from(i + 1),
            error_rate: 0.01,
            in_flight: i,
            consecutive_failures: 0,
        })
        .collect();
    let meta = RequestMeta {
        endpoint: Endpoint::ChatCompletions,
        model: "gpt-4o-mini".into(),
        group: "default".into(),
        stream: true,
        seed: 42,
    };
    for policy in ["weighted", "round-robin", "latency"] {
        let file = format!("{policy}.wasm");
        let bytes = std::fs::read(plugins.join(&file)).with_context(|| file.clone())?;
        if let LoadedPlugin::Router(router) =
            wasmgate::plugins::load(&engine, &cache, policy, bytes).await.map_err(anyhow::Error::msg)?.plugin
        {
            let facts = wasmgate::plugins::RoutingFacts {
                sequence: 7,
                ttft_ms: vec![30.0, 10.0, 50.0],
                ..wasmgate::plugins::RoutingFacts::default()
            };
            row(
                &format!("{policy}: select (3 candidates)"),
                &time!(n, {
                    let order = router.select(&meta, &candidates, facts.clone()).await;
                    assert!(matches!(order, Ok(ref o) if o.len() == 3));
                }),
            );
        }
    }
    filters(plugins, &engine, &cache, n, request).await
}

/// The shipped filters' hooks on the same request, an answer chunk.
async fn filters(
    plugins: &Path,
    engine: &Arc<PluginEngine>,
    cache: &Arc<ArtifactCache>,
    n: usize,
    request: &[u8],
) -> Result<()> {
    let context = |settings: &str| wasmgate::plugins::FilterContext {
        endpoint: Endpoint::ChatCompletions,
        route: "chat_completions".into(),
        model: "gpt-4o-mini".into(),
        group: "default".into(),
        stream: true,
        request_id: "req_bench".into(),
        user_id: Some(1),
        token_id: Some(1),
        settings: settings.into(),
    };
    let chunk = br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"word "},"finish_reason":null}]}"#;
    let block = r#"{"words": ["forbidden fruit", "secret", "password"], "patterns": ["sk-[A-Za-z0-9]{20,}"]}"#;
    for (name, settings) in [("block-list", block), ("pii-redact", "{}"), ("prompt-cap", r#"{"max_chars": 100000}"#)] {
        let bytes = std::fs::read(plugins.join(format!("{name}.wasm"))).with_context(|| name.to_string())?;
        let LoadedPlugin::Filter(filter) =
            wasmgate::plugins::load(engine, cache, name, bytes).await.map_err(anyhow::Error::msg)?.plugin
        else {
            bail!("{name}.wasm is not a filter");
        };
        let ctx = context(settings);
        row(
            &format!("{name}: on-request"),
            &time!(n, {
                let r = filter.on_request(&ctx, request).await;
                assert!(r.is_ok());
            }),
        );
        if filter.wants(wasmgate::plugins::Hook::StreamChunk) {
            row(
                &format!("{name}: on-stream-chunk (one chunk)"),
                &time!(n, {
                    let r = filter.on_stream_chunk(&ctx, chunk, b"").await;
                    assert!(r.is_ok());
                }),
            );
        }
    }
    Ok(())
}
