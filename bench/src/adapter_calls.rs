//! Per-adapter call overhead: each shipped adapter, in process, on its
//! provider's recorded examples (`tests/fixtures/providers/`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use wasmgate::plugins::{
    ArtifactCache, ChannelView, Endpoint, HttpResponse, LoadedPlugin, PluginEngine, RequestContext,
};

use crate::plugin_calls::{row, time};

const ADAPTERS: &[&str] = &["openai", "azure", "anthropic", "gemini", "baidu", "qwen", "ollama"];

const REQUEST: &[u8] = br#"{"model":"bench-model","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"benchmark this request"}],"temperature":0.2,"max_tokens":64}"#;

/// The recorded chat response and stream for `adapter` (OpenAI's shape for
/// `openai`, which shares Azure's examples).
fn fixtures(root: &Path, adapter: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let dir = root.join(if adapter == "openai" { "azure" } else { adapter });
    let chat = std::fs::read(dir.join("chat.json")).with_context(|| format!("{adapter}/chat.json"))?;
    let stream = ["stream.sse", "stream.ndjson"]
        .iter()
        .find_map(|f| std::fs::read(dir.join(f)).ok())
        .with_context(|| format!("{adapter}: no recorded stream"))?;
    Ok((chat, stream))
}

/// Measure and print the per-adapter table.
pub async fn run(plugins: &Path, n: usize) -> Result<()> {
    let engine = PluginEngine::new(&wasmgate::config::PluginConfig::default())?;
    let cache = std::sync::Arc::new(ArtifactCache::none());
    let root = plugins.parent().context("plugins dir has no parent")?.join("tests/fixtures/providers");
    let channel = ChannelView {
        id: 1,
        name: "bench".into(),
        base_url: "http://127.0.0.1:1".into(),
        key: "ak-bench|sk-bench".into(),
        settings: "{}".into(),
    };
    let ctx = |stream: bool| RequestContext {
        endpoint: Endpoint::ChatCompletions,
        requested_model: "bench-model".into(),
        upstream_model: "bench-model".into(),
        stream,
        include_usage: stream,
        request_id: "req_bench".into(),
    };
    println!("\n## per-adapter call overhead, in process ({n} iterations each)\n");
    println!("Calls reuse an instance per channel key (`instance_reuse`); a stream is one resumable");
    println!("decoder fed the provider's whole recorded stream.\n");
    println!("| adapter | call | p50 | p99 | mean |\n|---|---|---|---|---|");
    for &name in ADAPTERS {
        let bytes = std::fs::read(plugins.join(format!("{name}.wasm"))).with_context(|| format!("{name}.wasm"))?;
        let LoadedPlugin::Adapter(adapter) =
            wasmgate::plugins::load(&engine, &cache, name, bytes).await.map_err(anyhow::Error::msg)?.plugin
        else {
            bail!("{name}.wasm is not an adapter");
        };
        let credential: Option<std::sync::Arc<str>> = adapter.has_auth().then(|| "bench-token".into());
        let (chat, stream) = fixtures(&root, name)?;
        let response = HttpResponse { status: 200, headers: vec![], body: chat };
        let build = time!(n, {
            let r = adapter.build_request(1, &ctx(false), &channel, REQUEST, credential.clone()).await;
            assert!(matches!(r, Ok(Ok(_))), "{name} build-request: {r:?}");
        });
        row(&format!("{name} | build-request"), &build);
        let parse = time!(n, {
            let r = adapter.parse_response(1, &ctx(false), None, &response).await;
            assert!(matches!(r, Ok(Ok(_))), "{name} parse-response");
        });
        row(&format!("{name} | parse-response"), &parse);
        let decode = time!(n / 4, {
            let mut decoder = adapter.stream_decoder(1, &ctx(true), None).await.expect("decoder");
            let r = decoder.feed(&stream).await;
            assert!(matches!(r, Ok(Ok(ref ev)) if !ev.chunks.is_empty()), "{name} stream");
            let _ = decoder.finish().await;
        });
        row(&format!("{name} | decode a recorded stream"), &decode);
    }
    Ok(())
}
