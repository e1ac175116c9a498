//! `--swaps N`: how long a hot swap takes, under load. A gateway with the
//! plugin artifact cache off (every swap compiles) serves a steady
//! c=8 load of chat requests through `openai.wasm` while `openai.wasm` is
//! replaced N times, in turn by three different builds of it (the shipped
//! one and the golden 0.1.3 and 0.1.0 builds); each swap is timed from the
//! rename into the plugins directory to the new SHA-256 being served
//! (`GET /api/plugins/openai`). Failed requests are counted: a swap must
//! fail none.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::stats::Summary;
use crate::{Args, TOKEN, start_gateway};

async fn served_sha(http: &reqwest::Client, base: &str) -> Result<String> {
    let v: serde_json::Value =
        http.get(format!("{base}/api/plugins/openai")).bearer_auth("adm-bench").send().await?.json().await?;
    Ok(v["sha256"].as_str().unwrap_or_default().to_string())
}

/// Swap `n` times under load; print the timings and the failures.
pub async fn run(args: &Args, mock_url: &str, n: usize) -> Result<()> {
    println!("\n## Hot swap of openai.wasm under load ({n} swaps, artifact cache off)\n");
    let root = args.plugins.clone().context("--plugins")?;
    let fixtures = root.join("../tests/fixtures/compat");
    let builds: [PathBuf; 3] =
        [root.join("openai.wasm"), fixtures.join("openai-wit-0.1.3.wasm"), fixtures.join("openai-wit-0.1.0.wasm")];
    let dir = tempfile::tempdir()?;
    let channels = format!(
        "[[channels]]\nname = \"m\"\nadapter = \"openai\"\nbase_url = \"{mock_url}\"\nkey = \"sk-1\"\nmodels = [\"gpt-4o-mini\"]\n"
    );
    let mut swap_args = args.clone();
    swap_args.plugin_options = format!("{}\ncache = false\n", args.plugin_options);
    let (_gateway, base) = start_gateway(&swap_args, dir.path(), &["openai.wasm", "weighted.wasm"], &channels)?;
    let plugins_dir = dir.path().join("plugins");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"swap"}]}"#;
    let mut load = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failed, base) = (stop.clone(), ok.clone(), failed.clone(), base.clone());
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = http
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let http = reqwest::Client::new();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let before = served_sha(&http, &base).await?;
        // The next build whose bytes differ from what serves.
        let staged = plugins_dir.join(".openai.wasm.part");
        std::fs::copy(&builds[(i + 1) % builds.len()], &staged)?;
        let started = Instant::now();
        std::fs::rename(&staged, plugins_dir.join("openai.wasm"))?;
        loop {
            if served_sha(&http, &base).await? != before {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "swap {i} never took effect");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples.push(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let s = Summary::of(&samples);
    let max = samples.iter().max().copied().unwrap_or_default();
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    println!("swap time: p50 {}, p95 {}, max {} (debounce included)", ms(s.p50), ms(s.p95), ms(max));
    println!("requests meanwhile: {} served, {} failed", ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    Ok(())
}
