//! Billing cannot be crashed, stalled or bypassed (issue 11, items 2, 3, 4
//! and 6): counts that overflow are refused or saturate, odd JSON never
//! skips the estimate, a huge one-word prompt is refused or counted off the
//! async workers while `/health` keeps answering, and one token cannot hold
//! every stream.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::accounts::{call, open_stream, user_with_token};
use crate::support::{Gateway, MockUpstream, admin, channel, client};

const PLUGINS: &[&str] = &["openai.wasm", "weighted.wasm"];
const PRICES: &str = "[pricing.models.m]\nratio = 1\n[pricing.models.hold-m]\nratio = 1\n";

/// A gateway pricing `m` and `hold-m`; `pricing` adds lines to `[pricing]`.
async fn gateway_priced(pricing: &str, extra: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start("up").await;
    let toml = format!(
        "{extra}\n[pricing]\n{pricing}\n{PRICES}\n{}",
        channel("up", "openai", &mock.base_url(), &["m", "hold-m"], "")
    );
    (mock, Gateway::start(PLUGINS, &toml))
}

async fn gateway(extra: &str) -> (MockUpstream, Gateway) {
    gateway_priced("", extra).await
}

async fn balance(gw: &Gateway, user: u64) -> i64 {
    admin(gw, Method::GET, &format!("/api/users/{user}"), None).await.1["quota"].as_i64().expect("quota")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_that_overflow_are_refused_never_a_free_pass() {
    // Limits raised as far as they go, so the arithmetic itself is tested.
    let (mock, gw) = gateway_priced("max_completion_tokens = 9223372036854775807", "").await;
    let (uid, key) = user_with_token(&gw, 100, json!({})).await;
    for max_tokens in [json!(9_223_372_036_854_775_808u64), json!(18_446_744_073_709_551_615u64), json!(1e300)] {
        for n in [json!(1), json!(128)] {
            let body = json!({"model": "m", "max_tokens": max_tokens, "n": n, "messages": [{"role": "user", "content": "hi"}]});
            let (status, err, _) = call(&gw, &key, &body).await;
            assert!(status == 400 || status == 429, "max_tokens {max_tokens}, n {n}: {status} {err}");
            assert!(err["error"]["message"].as_str().is_some(), "{err}");
        }
    }
    assert_eq!(mock.hits(), 0, "nothing reached the upstream");
    assert_eq!(balance(&gw, uid).await, 100, "no charge, no negative balance");

    // With the default limit, the client hears what OpenAI would say.
    let (_mock, gw) = gateway("").await;
    let (_, key) = user_with_token(&gw, 100, json!({})).await;
    let body = json!({"model": "m", "max_tokens": 18_446_744_073_709_551_615u64, "messages": [{"role": "user", "content": "hi"}]});
    let (status, err, _) = call(&gw, &key, &body).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("max_tokens")), "{err}");
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("max_tokens is too large")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_json_never_skips_the_estimate() {
    let (mock, gw) = gateway("").await;
    let (uid, key) = user_with_token(&gw, 50, json!({})).await;
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    // Duplicate keys: refused (which one would the upstream read?).
    for raw in [
        format!(r#"{{"model":"m","max_tokens":1,"max_tokens":1,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#),
        format!(r#"{{"model":"m","model":"m","messages":[{{"role":"user","content":"{prompt}"}}]}}"#),
    ] {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.expect("json");
        assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("duplicate")), "{err}");
    }
    // `"max_tokens": 1.0` is read as 1, and the ~400-token prompt is still
    // estimated: 50 quota cannot pay for it.
    let body = json!({"model": "m", "max_tokens": 1.0, "messages": [{"role": "user", "content": prompt}]});
    let (status, err, _) = call(&gw, &key, &body).await;
    assert_eq!((status, err["error"]["code"].as_str()), (429, Some("insufficient_quota")), "{err}");
    assert_eq!(mock.hits(), 0);
    assert_eq!(balance(&gw, uid).await, 50, "no overdraft");
}

/// `/health` latencies measured while `work` runs.
async fn health_latencies_during<F: std::future::Future>(gw: &Gateway, work: F) -> (F::Output, Vec<Duration>) {
    let url = gw.url("/health");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe = tokio::spawn({
        let seen = seen.clone();
        async move {
            let c = client();
            loop {
                let t = Instant::now();
                let ok = c.get(&url).send().await.is_ok_and(|r| r.status() == 200);
                seen.lock().expect("lock").push(if ok { t.elapsed() } else { Duration::from_secs(3600) });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let result = work.await;
    probe.abort();
    let latencies = seen.lock().expect("lock").clone();
    (result, latencies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_one_word_prompt_is_refused_or_counted_off_the_workers_while_health_answers() {
    let (mock, gw) = gateway("").await;
    let (_, broke) = user_with_token(&gw, 0, json!({})).await;
    let (_, poor) = user_with_token(&gw, 1_000_000, json!({})).await;
    let word = "a".repeat(7_000_000);
    let big = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": word}]});
    let health_url = gw.url("/health");
    let (results, _) = health_latencies_during(&gw, async {
        let mut tasks = Vec::new();
        for key in [&broke, &broke, &poor, &poor] {
            let (url, key, body) = (gw.url("/v1/chat/completions"), key.clone(), big.clone());
            tasks.push(tokio::spawn(async move {
                let resp = client().post(url).bearer_auth(key).json(&body).send().await.expect("send");
                resp.status().as_u16()
            }));
        }
        // Meanwhile /health answers; measure it directly too.
        let c = client();
        let mut lat = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            assert_eq!(c.get(&health_url).send().await.expect("health").status(), 200);
            lat.push(t.elapsed());
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.expect("task"));
        }
        (statuses, lat)
    })
    .await;
    let (statuses, mut latencies) = results;
    assert_eq!(statuses, [429, 429, 429, 429], "no quota for 7 M tokens: refused without counting a 7 MB word");
    assert_eq!(mock.hits(), 0);
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    eprintln!("/health during four 7 MB prompts: median {median:?}, max {:?}", latencies.last());
    assert!(median < Duration::from_millis(100), "median /health {median:?}");

    // A 3 MB one-word prompt from a user whose quota is under its byte
    // bound but over its real count: counted exactly (off the workers) and
    // served.
    let word = "a".repeat(3_000_000);
    let body = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": word}]});
    let (result, latencies) = health_latencies_during(&gw, call(&gw, &poor, &body)).await;
    let (status, out, _) = result;
    assert_eq!(status, 200, "{}", out.to_string().chars().take(300).collect::<String>());
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!("/health while a 3 MB prompt was counted: worst {worst:?} over {} probes", latencies.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_cannot_hold_every_stream() {
    let (mock, gw) = gateway("tokens = [\"sk-test-0123456789abcdefghijklmnopqrstuv\", \"sk-other-0123456789abcdefghijklmnopqrst\"]\n[limits]\ntoken_streams = 10\n").await;
    let body = json!({"model": "hold-m", "stream": true, "messages": [{"role": "user", "content": "hold"}]});
    let mut held = Vec::new();
    for _ in 0..10 {
        let (_, mut stream) = open_stream(&gw, crate::support::TOKEN, &body).await;
        assert!(tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("first chunk").is_some());
        held.push(stream);
    }
    let (status, err, _) = call(&gw, crate::support::TOKEN, &body).await;
    assert_eq!((status, err["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")), "{err}");
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("open streams")), "{err}");
    // Others are unaffected, and the busy token's non-streamed calls too.
    let (_, mut other) = open_stream(&gw, "sk-other-0123456789abcdefghijklmnopqrst", &body).await;
    assert!(tokio::time::timeout(Duration::from_secs(5), other.next()).await.expect("first chunk").is_some());
    let plain = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(call(&gw, crate::support::TOKEN, &plain).await.0, 200);
    // A token's own limit wins over the default.
    let (_, key) = user_with_token(&gw, 1_000_000, json!({"streams": 1})).await;
    let (_, mut one) = open_stream(&gw, &key, &body).await;
    assert!(tokio::time::timeout(Duration::from_secs(5), one.next()).await.expect("first chunk").is_some());
    assert_eq!(call(&gw, &key, &body).await.0, 429);
    drop(held);
    mock.release();
}
