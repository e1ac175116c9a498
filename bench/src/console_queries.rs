//! `--log-rows N`: the console's read endpoints on a large usage log.
//! Seeds a store with N rows spread over the last week (1,000 users, 50
//! channels, 20 models, 5 % errors) in the rows' own format, starts the
//! gateway on it (which builds the rollups and segments once: timed),
//! then times each dashboard and logs query from one client, one
//! at a time, and prints p50 / p99.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmgate::billing::log_blocks;
use wasmgate::billing::logs::{LogKind, LogRow};
use wasmgate::store::{Store, unix_now_ms};

use crate::stats::Summary;
use crate::{Args, start_gateway};

/// A small deterministic generator (xorshift64*), so every run seeds the same log.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Write `rows` rows into a store at `data`, oldest first; returns the
/// id and request id of the row a tenth of the way from the oldest (a
/// deep cursor).
fn seed(data: &Path, rows: usize) -> Result<(u64, String)> {
    let store = Store::open(data)?;
    let logs = store.tree("logs")?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let now = unix_now_ms();
    let week = 7 * 86_400_000u64;
    let mut deep = (0, String::new());
    let mut batch: Vec<LogRow> = Vec::with_capacity(10_000);
    for i in 0..rows {
        let id = store.generate_id()?;
        let at_ms = now - week + (week * i as u64) / rows as u64;
        // The gateway's own request id format: the time, then random digits.
        let request_id = format!("req_{at_ms:012x}{:08x}", id as u32);
        if i == rows / 10 {
            deep = (id, request_id.clone());
        }
        let error = rng.below(20) == 0;
        let user = rng.below(1000) + 1;
        let model = format!("model-{}", rng.below(20));
        let prompt = rng.below(2000);
        let completion = if error { 0 } else { rng.below(800) };
        let row = LogRow {
            id,
            at_ms,
            kind: if error { LogKind::Error } else { LogKind::Consume },
            request_id,
            user_id: Some(user),
            token_id: Some(user * 10 + rng.below(3)),
            token_name: format!("key-{user}"),
            group: "default".into(),
            channel_id: rng.below(50) + 1,
            upstream_model: model.clone(),
            model,
            prompt_tokens: prompt,
            completion_tokens: completion,
            quota: if error { 0 } else { i64::try_from(prompt + 4 * completion).unwrap_or(0) },
            latency_ms: 200 + rng.below(3000),
            status: if error { 502 } else { 200 },
            error_kind: error.then(|| "transient".to_string()),
            plugin: "openai".into(),
            plugin_sha256: "0".repeat(64),
            ..LogRow::default()
        };
        batch.push(row);
        if batch.len() == batch.capacity() {
            log_blocks::Layout::WIDE.insert(&logs, &batch)?;
            batch.clear();
        }
    }
    log_blocks::Layout::WIDE.insert(&logs, &batch)?;
    logs.flush()?;
    Ok(deep)
}

async fn time(http: &reqwest::Client, base: &str, path: &str, n: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let resp = http.get(format!("{base}{path}")).bearer_auth("adm-bench").send().await?;
        anyhow::ensure!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.bytes().await?;
        samples.push(started.elapsed());
    }
    Ok(Summary::of(&samples))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Seed, start, time.
pub async fn run(args: &Args, rows: usize) -> Result<()> {
    println!("\n## Console queries on {rows} usage rows\n");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let started = Instant::now();
    let (deep, deep_request) = tokio::task::spawn_blocking(move || seed(&data, rows)).await.context("seeding")??;
    println!("seeded in {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    let (_gateway, base) = start_gateway(args, dir.path(), &["openai.wasm", "weighted.wasm"], "")?;
    println!("gateway up (building rollups and segments once) in {:.1} s\n", started.elapsed().as_secs_f64());
    let http = reqwest::Client::new();
    let n = 200;
    println!("| query | p50 | p99 |\n|---|---|---|");
    let queries = [
        ("dashboard, last hour", "/api/dashboard?range=hour".to_string(), n),
        ("dashboard, last day", "/api/dashboard?range=day".to_string(), n),
        ("dashboard, last week", "/api/dashboard?range=week".to_string(), n),
        ("logs, first page (50 rows)", "/api/logs?limit=50".to_string(), n),
        ("logs, a page 90 % deep (cursor)", format!("/api/logs?limit=50&before_id={deep}"), n),
        ("logs, one user's rows", "/api/logs?limit=50&user_id=7".to_string(), n),
        ("logs, one model, 90 % deep", format!("/api/logs?limit=50&model=model-3&before_id={deep}"), n),
        ("logs, errors only", "/api/logs?limit=50&type=error".to_string(), n),
        ("logs, one request id (the gateway's, 90 % deep)", format!("/api/logs?limit=50&request_id={deep_request}"), n),
        (
            "logs, a client's own request id, absent (walks every row)",
            "/api/logs?limit=50&request_id=client-42".to_string(),
            10,
        ),
        ("logs, a user with no rows (skips every segment)", "/api/logs?limit=50&user_id=5000".to_string(), n),
        ("logs, last hour only", format!("/api/logs?limit=50&start_ms={}", unix_now_ms() - 3_600_000), n),
        ("logs by page number (counts every match: page 1000)", "/api/logs?page=1000&per_page=50".to_string(), 5),
    ];
    for (name, path, n) in queries {
        let s = time(&http, &base, &path, n).await?;
        println!("| {name} | {} | {} |", ms(s.p50), ms(s.p99));
    }
    Ok(())
}
