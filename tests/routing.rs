//! Routing through the real gateway binary with the real policy plugins
//! (`weighted`, `round-robin`, `latency`) over loopback mock upstreams, one
//! mock per channel so each mock's hit count is that channel's traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::mock::Mode;
use crate::support::{Gateway, MockUpstream, TOKEN, admin, channel, chat, client, eventually, load, post};
use reqwest::Method;
use serde_json::json;

const POLICIES: &[&str] = &["openai.wasm", "weighted.wasm", "round-robin.wasm", "latency.wasm"];

async fn mocks(names: &[&str]) -> Vec<MockUpstream> {
    let mut out = Vec::new();
    for n in names {
        out.push(MockUpstream::start(n).await);
    }
    out
}

fn share(hits: u64, total: u64) -> f64 {
    100.0 * hits as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weighted_1_2_7_shares_and_lower_tier_only_when_top_tier_fails() {
    let m = mocks(&["a", "b", "c", "backup"]).await;
    let mut toml = String::from("[upstream]\nmax_attempts = 4\n\n");
    for (i, (mock, weight)) in m.iter().zip([1, 2, 7]).enumerate() {
        let extra = format!("priority = 10\nweight = {weight}");
        toml += &channel(&format!("c{i}"), "openai", &mock.base_url(), &["gpt-4o-mini"], &extra);
    }
    toml += &channel("backup", "openai", &m[3].base_url(), &["gpt-4o-mini"], "priority = 0\nweight = 100");
    let gw = Gateway::start(POLICIES, &toml);

    let started = Instant::now();
    let results = load(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "hi"), 3000, 32).await;
    let elapsed = started.elapsed();
    assert!(results.iter().all(|(s, _)| *s == 200), "every request must succeed");
    let hits: Vec<u64> = m.iter().map(MockUpstream::hits).collect();
    let total: u64 = hits[..3].iter().sum();
    assert_eq!(total, 3000, "{hits:?}");
    assert_eq!(hits[3], 0, "the lower tier gets nothing while the top tier serves: {hits:?}");
    let shares: Vec<f64> = hits[..3].iter().map(|h| share(*h, total)).collect();
    eprintln!("weighted 1:2:7 over 3000 requests in {elapsed:?}: shares {shares:.1?} %");
    for (got, want) in shares.iter().zip([10.0, 20.0, 70.0]) {
        assert!((got - want).abs() <= 3.0, "share {got:.1} % is not within 3 points of {want} %: {hits:?}");
    }

    for mock in &m[..3] {
        mock.set_mode(Mode::no_healthy_upstream());
    }
    let results = load(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "hi"), 50, 8).await;
    assert!(results.iter().all(|(s, _)| *s == 200), "the lower tier must serve when the top tier fails");
    assert!(results.iter().all(|(_, b)| b["system_fingerprint"] == "backup"));
    assert_eq!(m[3].hits(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replacing_the_policy_file_changes_routing_within_two_seconds_without_failures() {
    let m = mocks(&["a", "b", "c"]).await;
    let mut toml = String::new();
    for (i, mock) in m.iter().enumerate() {
        toml += &channel(&format!("c{i}"), "openai", &mock.base_url(), &["gpt-4o-mini"], "weight = 1");
    }
    let gw = Arc::new(Gateway::start(POLICIES, &toml));

    // Background traffic for the whole swap.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (gw, stop, failures, sent) = (gw.clone(), stop.clone(), failures.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            let http = crate::support::client();
            while !stop.load(Ordering::Relaxed) {
                let resp = http
                    .post(gw.url("/v1/chat/completions"))
                    .bearer_auth(crate::support::TOKEN)
                    .json(&chat("gpt-4o-mini", "load"))
                    .send()
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
                if !resp.is_ok_and(|r| r.status() == 200) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let spread = eventually(Duration::from_secs(10), || async { m[0].hits() > 0 && m[1].hits() > 0 }).await;
    assert!(spread.is_some(), "weighted spreads traffic before the swap");

    let swapped_at = Instant::now();
    gw.install_plugin("pick-last.wasm", "weighted.wasm");
    // Routing has changed once a window of requests all reach the last channel.
    let took = eventually(Duration::from_secs(2), || {
        let gw = gw.clone();
        async move {
            let results = load(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "probe"), 10, 2).await;
            results.iter().all(|(s, b)| *s == 200 && b["system_fingerprint"] == "c")
        }
    })
    .await;
    let took = took.map(|_| swapped_at.elapsed());
    assert!(took.is_some(), "routing did not change within 2 s of replacing weighted.wasm");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    eprintln!(
        "policy swap visible after {took:?}; {} background requests, {} failed",
        sent.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request may fail during the swap");
    let (status, plugin) = admin(&gw, Method::GET, "/api/plugins/weighted", None).await;
    assert_eq!((status, plugin["version"].as_str()), (200, Some("0.1.0-fixture")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_and_latency_policies_chosen_per_model_through_the_admin_api() {
    let m = mocks(&["a", "b", "c"]).await;
    let mut toml = String::new();
    for (i, mock) in m.iter().enumerate() {
        // Two candidates for `fast-model`, so the two choices are always these two.
        let models: &[&str] = if i == 1 { &["rr-model"] } else { &["rr-model", "fast-model"] };
        toml += &channel(&format!("c{i}"), "openai", &mock.base_url(), models, "");
    }
    let gw = Gateway::start(POLICIES, &toml);

    let table = json!({"policy": "weighted", "rules": [
        {"model": "rr-model", "policy": "round-robin"},
        {"model": "fast-model", "policy": "latency"},
    ]});
    let (status, view) = admin(&gw, Method::PUT, "/api/routing", Some(&table)).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["source"], "api");
    assert_eq!(view["missing_policies"], json!([]));

    // Round robin: strictly in turn, one request at a time.
    let mut order = Vec::new();
    for _ in 0..9 {
        let (status, body) = post(&gw, "/v1/chat/completions", &chat("rr-model", "turn")).await;
        assert_eq!(status, 200, "{body}");
        order.push(body["system_fingerprint"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(order[..3], order[3..6], "{order:?}");
    assert_eq!(order[..3], order[6..9], "{order:?}");
    let mut distinct = order[..3].to_vec();
    distinct.sort();
    assert_eq!(distinct, ["a", "b", "c"], "{order:?}");

    // Latency: one of the two channels slows down; once its average shows
    // it, the fast one takes the traffic.
    m[0].set_mode(Mode::Slow(Duration::from_millis(150)));
    let before: Vec<u64> = m.iter().map(MockUpstream::hits).collect();
    for _ in 0..40 {
        let (status, _) = post(&gw, "/v1/chat/completions", &chat("fast-model", "quick")).await;
        assert_eq!(status, 200);
    }
    let got: Vec<u64> = m.iter().zip(&before).map(|(mock, b)| mock.hits() - b).collect();
    eprintln!("latency policy, 40 requests, a 150 ms channel and a fast one: {got:?}");
    assert_eq!(got[1], 0, "c1 does not offer fast-model");
    assert!(got[2] >= 36, "the fast channel must serve almost every request: {got:?}");

    // The table survives a restart; DELETE returns to the file's table.
    let mut gw = gw;
    gw.restart();
    let (_, view) = admin(&gw, Method::GET, "/api/routing", None).await;
    assert_eq!(view["rules"].as_array().map(Vec::len), Some(2), "{view}");
    let (status, view) = admin(&gw, Method::DELETE, "/api/routing", None).await;
    assert_eq!(
        (status, view["source"].as_str(), view["rules"].as_array().map(Vec::len)),
        (200, Some("config"), Some(0))
    );

    let bad = json!({"policy": "weighted", "rules": [{"policy": "latency"}]});
    let (status, err) = admin(&gw, Method::PUT, "/api/routing", Some(&bad)).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("rules[0]")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_misbehaving_policy_falls_back_to_weighted_and_is_reported() {
    let m = mocks(&["a", "b"]).await;
    let mut toml = String::from("[routing]\npolicy = \"bad-policy\"\n\n");
    for (i, mock) in m.iter().enumerate() {
        toml += &channel(&format!("c{i}"), "openai", &mock.base_url(), &["trap-model", "index-model"], "");
    }
    let mut plugins = POLICIES.to_vec();
    plugins.push("bad-policy.wasm");
    let gw = Gateway::start(&plugins, &toml);
    for model in ["trap-model", "index-model"] {
        for _ in 0..5 {
            let (status, body) = post(&gw, "/v1/chat/completions", &chat(model, "x")).await;
            assert_eq!(status, 200, "{model}: {body}");
        }
    }
    let (_, status) = admin(&gw, Method::GET, "/api/plugins/bad-policy", None).await;
    assert_eq!(status["call_failures"], 10, "{status}");
    assert!(status["last_call_error"].as_str().is_some_and(|e| e.contains("index")), "{status}");
    assert!(status["loaded"].as_bool().unwrap_or(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_and_channels_are_per_group() {
    let m = mocks(&["shared", "vip"]).await;
    let vip_token = "sk-vip-0123456789abcdefghijklmnopqrstuvwxyz";
    let mut toml =
        format!("tokens = [\"{}\", {{ key = \"{vip_token}\", group = \"vip\" }}]\n\n", crate::support::TOKEN);
    toml += &channel("shared", "openai", &m[0].base_url(), &["gpt-4o-mini"], "groups = [\"default\", \"vip\"]");
    toml += &channel(
        "vip-only",
        "openai",
        &m[1].base_url(),
        &["gpt-4o", "gpt-4o-mini"],
        "groups = [\"vip\"]\npriority = 5",
    );
    let gw = Gateway::start(POLICIES, &toml);

    let models = |token: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            let body: serde_json::Value = crate::support::client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json");
            body["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|m| m["id"].as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(models(crate::support::TOKEN).await, ["gpt-4o-mini"]);
    assert_eq!(models(vip_token).await, ["gpt-4o", "gpt-4o-mini"], "de-duplicated and sorted");

    let (status, err) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "x")).await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("model_not_found")));
    let resp = crate::support::client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(vip_token)
        .json(&chat("gpt-4o-mini", "x"))
        .send()
        .await
        .expect("send");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["system_fingerprint"], "vip", "the vip group's higher-priority channel serves it");
}

/// POST a chat completion in session `session` (the `x-session-id` header).
async fn in_session(gw: &Gateway, model: &str, session: &str) -> String {
    let resp = crate::support::client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(crate::support::TOKEN)
        .header("x-session-id", session)
        .json(&chat(model, "hi"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    body["system_fingerprint"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn affinity_keeps_a_session_on_its_channel_and_cheapest_prefers_the_cheap_one() {
    let m = mocks(&["a", "b", "c"]).await;
    let mut toml = String::from("[upstream]\nmax_attempts = 3\n\n");
    for (i, mock) in m.iter().enumerate() {
        let price = if i == 1 { "settings = { price_ratio = 0.3 }" } else { "settings = { price_ratio = 1.0 }" };
        toml += &channel(&format!("c{i}"), "openai", &mock.base_url(), &["sticky-model", "cheap-model"], price);
    }
    let plugins = [POLICIES, &["affinity.wasm", "cheapest.wasm"]].concat();
    let gw = Gateway::start(&plugins, &toml);
    let table = json!({"policy": "weighted", "rules": [
        {"model": "sticky-model", "policy": "affinity"},
        {"model": "cheap-model", "policy": "cheapest"},
    ]});
    let (status, view) = admin(&gw, Method::PUT, "/api/routing", Some(&table)).await;
    assert_eq!((status, &view["missing_policies"]), (200, &json!([])), "{view}");

    // One session's 100 requests all go to one channel.
    let home = in_session(&gw, "sticky-model", "long-session").await;
    for i in 0..99 {
        assert_eq!(in_session(&gw, "sticky-model", "long-session").await, home, "request {i} moved");
    }
    // Each session sticks to one channel; sessions spread over the channels.
    let mut homes = Vec::new();
    for s in 0..12 {
        let session = format!("session-{s}");
        let home = in_session(&gw, "sticky-model", &session).await;
        for _ in 0..4 {
            assert_eq!(in_session(&gw, "sticky-model", &session).await, home, "{session} moved");
        }
        homes.push(home);
    }
    homes.sort();
    homes.dedup();
    assert!(homes.len() >= 2, "twelve sessions all on {homes:?}");
    // `x-session-id` keeps a session on the translated routes too (without
    // it they would all go to one channel: affinity orders by weight).
    for route in ["/v1/messages", "/v1/responses"] {
        let mut homes = Vec::new();
        for s in 0..12 {
            let session = format!("{route}-session-{s}");
            let mut served = Vec::new();
            for _ in 0..2 {
                let before: Vec<u64> = m.iter().map(|x| x.state.hits.load(Ordering::SeqCst)).collect();
                let body = match route {
                    "/v1/messages" => json!({"model": "sticky-model", "max_tokens": 16,
                        "messages": [{"role": "user", "content": "hi"}]}),
                    _ => json!({"model": "sticky-model", "store": false, "input": "hi"}),
                };
                let resp = crate::support::client()
                    .post(gw.url(route))
                    .bearer_auth(crate::support::TOKEN)
                    .header("x-session-id", &session)
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(resp.status(), 200, "{route}");
                let hit = m.iter().zip(&before).position(|(x, b)| x.state.hits.load(Ordering::SeqCst) > *b);
                served.push(hit.expect("a mock served it"));
            }
            assert!(served.windows(2).all(|w| w[0] == w[1]), "{session} moved: {served:?}");
            homes.push(served[0]);
        }
        homes.sort_unstable();
        homes.dedup();
        assert!(homes.len() >= 2, "twelve {route} sessions all on {homes:?}");
    }
    // The body's `user` keeps a session too.
    let by_user = json!({"model": "sticky-model", "user": "u-42", "messages": [{"role": "user", "content": "hi"}]});
    let mut served = Vec::new();
    for _ in 0..5 {
        let (status, body) = post(&gw, "/v1/chat/completions", &by_user).await;
        assert_eq!(status, 200, "{body}");
        served.push(body["system_fingerprint"].as_str().unwrap_or_default().to_string());
    }
    assert!(served.windows(2).all(|w| w[0] == w[1]), "{served:?}");
    // So does `prompt_cache_key`, ahead of `user`: these five users alone
    // land on several channels, with one cache key on one.
    let homes_of = |cache_key: Option<&'static str>| {
        let gw = &gw;
        async move {
            let mut served = Vec::new();
            for i in 0..5 {
                let mut body = json!({"model": "sticky-model", "user": format!("u-{i}"),
                    "messages": [{"role": "user", "content": "hi"}]});
                if let Some(k) = cache_key {
                    body["prompt_cache_key"] = json!(k);
                }
                let (status, body) = post(gw, "/v1/chat/completions", &body).await;
                assert_eq!(status, 200, "{body}");
                served.push(body["system_fingerprint"].as_str().unwrap_or_default().to_string());
            }
            served.sort();
            served.dedup();
            served
        }
    };
    assert!(homes_of(None).await.len() >= 2, "five users on one channel: the check below would prove nothing");
    assert_eq!(homes_of(Some("cache-7")).await.len(), 1);
    // A session whose channel fails is served elsewhere, not refused.
    let home = in_session(&gw, "sticky-model", "session-0").await;
    let index = ["a", "b", "c"].iter().position(|n| *n == home).expect("a mock");
    m[index].set_mode(Mode::no_healthy_upstream());
    assert_ne!(in_session(&gw, "sticky-model", "session-0").await, home);
    m[index].set_mode(Mode::Healthy);

    // Cheapest: the channel with price_ratio 0.3 serves, while it works.
    for _ in 0..10 {
        assert_eq!(in_session(&gw, "cheap-model", "any").await, "b");
    }
    m[1].set_mode(Mode::no_healthy_upstream());
    let other = in_session(&gw, "cheap-model", "any").await;
    assert!(other == "a" || other == "c", "{other}");
}

/// Key-level affinity: on a channel with several keys, a session keeps its
/// key (a provider's prompt cache is per key), sessions spread over the
/// keys, and requests without a session rotate through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_keeps_its_key_on_a_multi_key_channel() {
    let m = mocks(&["a"]).await;
    let keys = "keys = [\"sk-key-one-000000\", \"sk-key-two-000000\", \"sk-key-three-0000\"]";
    let gw = Gateway::start(&[POLICIES, &["affinity.wasm"]].concat(), &{
        let mut toml = channel("c0", "openai", &m[0].base_url(), &["sticky-model"], keys);
        toml += "[routing]\npolicy = \"affinity\"\n";
        toml
    });
    let key_of = |session: Option<String>| {
        let (gw, mock) = (&gw, &m[0]);
        async move {
            let mut req = client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN);
            if let Some(s) = session {
                req = req.header("x-session-id", s);
            }
            let resp = req.json(&chat("sticky-model", "hi")).send().await.expect("send");
            assert_eq!(resp.status(), 200);
            let headers = mock.state.last_headers.lock().await.clone().expect("headers");
            headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
        }
    };
    let home = key_of(Some("long-session".into())).await;
    for i in 0..30 {
        assert_eq!(key_of(Some("long-session".into())).await, home, "request {i} changed key");
    }
    let mut used = std::collections::BTreeSet::new();
    for s in 0..20 {
        used.insert(key_of(Some(format!("session-{s}"))).await);
    }
    // `channel()` declares one key, `keys` three more.
    assert_eq!(used.len(), 4, "twenty sessions use every key: {used:?}");
    let mut rotated = std::collections::BTreeSet::new();
    for _ in 0..8 {
        rotated.insert(key_of(None).await);
    }
    assert_eq!(rotated.len(), 4, "no session: the keys rotate: {rotated:?}");
}
