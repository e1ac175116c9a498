//! Hostile and broken upstream streams (issue 11, items 1, 16, 17): an
//! endless stream is cut at the gateway's limit with bounded memory and
//! the process survives its client leaving; an empty or non-SSE `200` to a
//! streamed request fails over like any failure; a stream cut before its
//! end marker ends in an error event, never in `[DONE]`, and is recorded as
//! cut.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::accounts::{open_stream, user_with_token, wait_rows};
use crate::support::mock::Mode;
use crate::support::{Gateway, MockUpstream, admin, assert_openai_error, channel, eventually};

const PLUGINS: &[&str] = &["openai.wasm", "weighted.wasm"];
/// Priced, so that a stream without usage must be counted.
const PRICING: &str = "[pricing]\n[pricing.models.m]\nratio = 1\n";

fn stream_body() -> Value {
    json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "go on forever"}]})
}

/// Read `stream` to its end; returns the text.
async fn read_all(mut stream: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin) -> String {
    let mut text = String::new();
    while let Some(Ok(bytes)) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endless_stream_is_cut_at_the_limit_with_bounded_memory_and_survives_its_client_leaving() {
    let mock = MockUpstream::start("endless").await;
    mock.set_mode(Mode::EndlessStream);
    let toml = format!(
        "{PRICING}\n[upstream]\nmax_stream_bytes = 100_000_000\n{}",
        channel("e", "openai", &mock.base_url(), &["m"], "")
    );
    let mut gw = Gateway::start(PLUGINS, &toml);
    let (_, key) = user_with_token(&gw, 1_000_000_000, json!({})).await;
    let idle_rss = gw.rss();

    // 1. Read it all: the gateway ends it at 100 MB with an error event.
    let (id, stream) = open_stream(&gw, &key, &stream_body()).await;
    let sampler = {
        let pid = gw.pid();
        tokio::spawn(async move {
            let mut peak = 0u64;
            for _ in 0..600 {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024;
                peak = peak.max(rss);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let text = read_all(stream).await;
    assert!(
        text.contains("stream_too_large"),
        "ends with the limit's error event: …{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(!text.contains("[DONE]"), "a cut stream is never reported complete");
    let row = wait_rows(&gw, &format!("request_id={id}"), 1).await["data"][0].clone();
    assert_eq!((row["limited"].as_bool(), row["estimated"].as_bool()), (Some(true), Some(true)), "{row}");
    assert!(row["completion_tokens"].as_u64().is_some_and(|t| t > 1_000_000), "billed what was delivered: {row}");

    // 2. The client leaves after 20 MB: the process survives, and bills it.
    let (id, mut stream) = open_stream(&gw, &key, &stream_body()).await;
    let mut received = 0usize;
    while received < 20_000_000 {
        received += stream.next().await.expect("more").expect("bytes").len();
    }
    drop(stream);
    let row = wait_rows(&gw, &format!("request_id={id}"), 1).await["data"][0].clone();
    assert_eq!(row["client_disconnected"], true, "{row}");
    assert!(gw.alive(), "the gateway survived the client leaving an endless stream");
    sampler.abort();
    let peak = gw.rss();
    eprintln!("endless streams: idle RSS {} MB, after {} MB", idle_rss >> 20, peak >> 20);
    assert!(peak < idle_rss + (150 << 20), "memory grew with the stream: {idle_rss} -> {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_or_non_sse_200_fails_over_and_ends_in_an_error_when_nothing_serves() {
    let bad = MockUpstream::start("bad").await;
    let good = MockUpstream::start("good").await;
    let toml = channel("bad", "openai", &bad.base_url(), &["m", "only-bad"], "priority = 10")
        + &channel("good", "openai", &good.base_url(), &["m"], "priority = 0");
    let gw = Gateway::start(PLUGINS, &toml);
    let json_200 = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
    for (name, mode) in [
        ("empty 200", Mode::empty_200()),
        (
            "JSON 200",
            Mode::Fixed { status: 200, content_type: "application/json", body: json_200.into(), retry_after: None },
        ),
        (
            "[DONE] only",
            Mode::Fixed {
                status: 200,
                content_type: "text/event-stream",
                body: "data: [DONE]\n\n".into(),
                retry_after: None,
            },
        ),
    ] {
        bad.set_mode(mode);
        let mut body = stream_body();
        let resp = crate::support::send(&gw, "/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 200, "{name}");
        let text = resp.text().await.expect("body");
        assert!(
            text.contains("\"system_fingerprint\":\"mock\"") && text.ends_with("data: [DONE]\n\n"),
            "{name}: served by the good channel: {text}"
        );
        // With no other channel: an OpenAI-shaped error, not `200` + `[DONE]`.
        body["model"] = json!("only-bad");
        let resp = crate::support::send(&gw, "/v1/chat/completions", &body).await;
        let status = resp.status().as_u16();
        let err: Value = resp.json().await.expect("an error body");
        // 502 while the channel is tried, 503 once it rests after repeated failures.
        assert!(status == 502 || status == 503, "{name}: {status} {err}");
        assert_eq!(assert_openai_error(&err), "upstream_error", "{name}");
    }
    let (_, channels) = admin(&gw, Method::GET, "/api/channels/1", None).await;
    assert!(channels["stats"]["error_rate"].as_f64().is_some_and(|r| r > 0.0), "the channel was blamed: {channels}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_falls_silent_is_cut_at_the_idle_limit() {
    let mock = MockUpstream::start("stall").await;
    mock.set_mode(Mode::StallStream(Duration::from_secs(30)));
    let toml = format!(
        "{PRICING}\n[upstream]\nidle_timeout_secs = 1\n{}",
        channel("c", "openai", &mock.base_url(), &["m"], "")
    );
    let gw = Gateway::start(PLUGINS, &toml);
    let (_, key) = user_with_token(&gw, 1_000_000, json!({})).await;
    let (id, stream) = open_stream(&gw, &key, &stream_body()).await;
    let text = read_all(stream).await;
    assert!(text.contains("before the silence"), "the chunk that came was relayed: {text}");
    assert!(text.contains("stalled") && !text.contains("[DONE]"), "the silence ends the stream with an error: {text}");
    let row = wait_rows(&gw, &format!("request_id={id}"), 1).await["data"][0].clone();
    assert_eq!(row["upstream_cut"], true, "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_cut_before_its_end_is_an_error_event_recorded_as_cut() {
    let mock = MockUpstream::start("cut").await;
    mock.set_mode(Mode::CutStream);
    let toml = format!("{PRICING}\n{}", channel("c", "openai", &mock.base_url(), &["m"], ""));
    let gw = Gateway::start(PLUGINS, &toml);
    let (_, key) = user_with_token(&gw, 1_000_000, json!({})).await;
    let (id, stream) = open_stream(&gw, &key, &stream_body()).await;
    let text = read_all(stream).await;
    assert!(text.contains("\"content\":\"cut \""), "the chunks that came were relayed: {text}");
    assert!(text.contains("stream_truncated") && !text.contains("[DONE]"), "{text}");
    let row = wait_rows(&gw, &format!("request_id={id}"), 1).await["data"][0].clone();
    assert_eq!(row["upstream_cut"], true, "{row}");
    let blamed = eventually(Duration::from_secs(5), || async {
        admin(&gw, Method::GET, "/api/channels/1", None).await.1["stats"]["consecutive_failures"].as_u64() >= Some(1)
    })
    .await;
    assert!(blamed.is_some(), "the cut counts against the channel's health");
}
