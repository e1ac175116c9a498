//! Many open streams at once: `n` streamed requests for a `drip` model (the
//! mock holds each after its first chunk until all are open, then sends one
//! chunk every 500 ms, 16 in all). Reports errors, the gateway's memory per
//! open stream (right when the last one opened, and 3 s later, once the
//! allocator has returned what the opening burst used), and the c=1 latency
//! of ordinary requests before and while the streams are open.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::StreamExt;
use serde_json::json;

use crate::peers::rss_tree;
use crate::stats::{self, Summary};

/// How the harness's clients reach the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Client {
    /// One HTTP/1.1 connection per open stream.
    Http1,
    /// h2c with prior knowledge: many streams per connection.
    Http2,
}

/// The protocols on either side of the gateway, for the report.
pub struct Sides {
    /// Between the clients and the gateway.
    pub client: &'static str,
    /// Between the gateway and the mock.
    pub upstream: &'static str,
}

/// RSS samples, 500 ms apart, before the settled figure is read.
const SETTLE_SAMPLES: usize = 6;

/// Streams the harness opens per HTTP/2 connection (below the gateway's
/// `http2_max_streams`).
const STREAMS_PER_H2_CONNECTION: usize = 200;

async fn c1_latency(client: &reqwest::Client, url: &str, key: &str, n: usize) -> Summary {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "meanwhile"}]});
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        if let Ok(r) = client.post(url).bearer_auth(key).json(&body).send().await {
            let _ = r.bytes().await;
        }
        samples.push(t.elapsed());
    }
    Summary::of(&samples)
}

/// Run the measurement against the gateway at `base` (process `pid`),
/// whose mock answers `POST /release`, with clients of kind `client`.
pub async fn run(
    base: &str,
    key: &str,
    n: usize,
    pid: u32,
    mock_url: &str,
    sides: &Sides,
    client: Client,
) -> Result<()> {
    let url = format!("{base}/v1/chat/completions");
    let idle = rss_tree(pid);
    let probe = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let before = c1_latency(&probe, &url, key, 300).await;
    let opened = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let clients: Vec<reqwest::Client> = match client {
        Client::Http1 => (0..8).map(|_| reqwest::Client::builder().pool_max_idle_per_host(0).build()).collect(),
        Client::Http2 => (0..n.div_ceil(STREAMS_PER_H2_CONNECTION))
            .map(|_| reqwest::Client::builder().http2_prior_knowledge().build())
            .collect::<reqwest::Result<_>>(),
    }?;
    let body = json!({"model": "drip-mini", "stream": true, "messages": [{"role": "user", "content": "drip"}]});
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, url, key, body) = (clients[i % clients.len()].clone(), url.clone(), key.to_string(), body.clone());
        let (opened, errors) = (opened.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let ok = async {
                let resp = client.post(&url).bearer_auth(&key).json(&body).send().await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let mut stream = resp.bytes_stream();
                let mut text = String::new();
                let mut first = true;
                while let Some(chunk) = stream.next().await {
                    text.push_str(&String::from_utf8_lossy(&chunk.ok()?));
                    if first {
                        opened.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                }
                text.ends_with("data: [DONE]\n\n").then_some(())
            }
            .await;
            if ok.is_none() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    // Wait until every stream has its first chunk (or failed), bounded.
    let deadline = Instant::now() + Duration::from_secs(110);
    while opened.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open_after = started.elapsed();
    let held = opened.load(Ordering::Relaxed);
    let at_open = rss_tree(pid);
    // What the open streams hold, once the allocator has given back the
    // opening burst's transient memory (requests in flight at once): the
    // streams stay open meanwhile.
    let mut settled = at_open;
    for _ in 0..SETTLE_SAMPLES {
        tokio::time::sleep(Duration::from_millis(500)).await;
        settled = rss_tree(pid);
    }
    let during = c1_latency(&probe, &url, key, 300).await;
    let _ = probe.post(format!("{}/release", mock_url.trim_end_matches("/v1"))).send().await;
    for t in tasks {
        let _ = t.await;
    }
    let errors = errors.load(Ordering::Relaxed);
    let per_stream = |rss: u64| rss.saturating_sub(idle) as f64 / held.max(1) as f64 / 1024.0;
    let (from, to) = (sides.client, sides.upstream);
    println!(
        "\n## {n} concurrent streams, clients over {from}, upstream over {to} (16 chunks, 500 ms apart, all open at once)\n"
    );
    println!(
        "| streams open at once | errors | opened in | gateway RSS idle → all open → settled | per open stream, at open → settled |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {held} | {errors} | {:.1} s | {} MB → {} MB → {} MB | {:.1} KB → **{:.1} KB** |",
        open_after.as_secs_f64(),
        idle >> 20,
        at_open >> 20,
        settled >> 20,
        per_stream(at_open),
        per_stream(settled)
    );
    println!("\n| other requests, c=1 | p50 | p99 |\n|---|---|---|");
    println!("| before | {} | {} |", stats::us(before.p50), stats::us(before.p99));
    println!("| while the streams are open | {} | {} |", stats::us(during.p50), stats::us(during.p99));
    Ok(())
}
