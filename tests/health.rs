//! Channel health through the real gateway: automatic disabling from the
//! adapter's classified errors, cool-downs, the recovery tester, and the
//! rule that nothing automatic overrides an admin. Mock upstreams are
//! switched between failure modes at runtime; the tester probes every
//! 200 ms here.

use std::time::{Duration, Instant};

use crate::support::mock::Mode;
use crate::support::{Gateway, MockUpstream, admin, channel, chat, eventually, post};
use reqwest::Method;
use serde_json::{Value, json};

const PLUGINS: &[&str] = &["openai.wasm", "weighted.wasm"];

fn health_toml(max_recovery_attempts: u32) -> String {
    format!(
        "[health]\nprobe_interval_ms = 200\nprobe_timeout_secs = 2\nmax_recovery_attempts = {max_recovery_attempts}\n\
         transient_threshold = 5\ntransient_window_secs = 60\ntransient_cooldown_secs = 30\n\n"
    )
}

async fn channel_view(gw: &Gateway, id: u64) -> Value {
    let (status, view) = admin(gw, Method::GET, &format!("/api/channels/{id}"), None).await;
    assert_eq!(status, 200, "{view}");
    view
}

async fn state(gw: &Gateway, id: u64) -> String {
    channel_view(gw, id).await["status"]["state"].as_str().unwrap_or_default().to_string()
}

/// Wait (bounded) until channel `id` is in `wanted`; returns how long it took.
async fn wait_for_state(gw: &Gateway, id: u64, wanted: &str, limit: Duration) -> Duration {
    let took = eventually(limit, || async { state(gw, id).await == wanted }).await;
    match took {
        Some(t) => t,
        None => panic!("channel {id} did not reach {wanted} within {limit:?}: {}", channel_view(gw, id).await),
    }
}

/// A primary (priority 10) and a backup (priority 0) channel.
async fn pair(extra: &str) -> (MockUpstream, MockUpstream, Gateway) {
    let a = MockUpstream::start("primary").await;
    let b = MockUpstream::start("backup").await;
    let toml = format!(
        "{extra}{}{}",
        channel("primary", "openai", &a.base_url(), &["gpt-4o-mini"], "priority = 10"),
        channel("backup", "openai", &b.base_url(), &["gpt-4o-mini"], "priority = 0"),
    );
    (a, b, Gateway::start(PLUGINS, &toml))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_an_admin_disabled_stays_disabled_through_many_probe_cycles() {
    let (a, _b, gw) = pair(&health_toml(3)).await;
    let (status, view) =
        admin(&gw, Method::POST, "/api/channels/1/disable", Some(&json!({"note": "maintenance window"}))).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"]["state"], "manually_disabled");
    assert_eq!(view["status"]["note"], "maintenance window");

    // Ten probe cycles against a perfectly healthy upstream, plus a "test all".
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, tested) = admin(&gw, Method::POST, "/api/channels/test", None).await;
    assert_eq!(status, 200, "{tested}");
    assert_eq!(tested["data"].as_array().map(Vec::len), Some(1), "only the backup is tested: {tested}");
    for _ in 0..5 {
        let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
        assert_eq!((status, body["system_fingerprint"].as_str()), (200, Some("backup")));
    }
    assert_eq!(state(&gw, 1).await, "manually_disabled");
    assert_eq!(a.hits(), 0, "a manually disabled channel is never probed nor used");
    let (_, status) = admin(&gw, Method::GET, "/api/status", None).await;
    assert_eq!(status["channels"]["by_status"]["manually_disabled"], 1, "{status}");
    assert_eq!(status["channels"]["by_status"]["enabled"], 1, "{status}");

    let (status, view) = admin(&gw, Method::POST, "/api/channels/1/enable", None).await;
    assert_eq!((status, view["status"]["state"].as_str()), (200, Some("enabled")));
    let history: Vec<&str> =
        view["history"].as_array().expect("history").iter().filter_map(|e| e["source"].as_str()).collect();
    assert_eq!(history, ["manual", "manual"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_key_disables_at_once_and_a_probe_brings_the_channel_back() {
    let (a, b, gw) = pair(&health_toml(100)).await;
    a.set_mode(Mode::openai_error(401, "invalid_api_key", None));
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
    assert_eq!((status, body["system_fingerprint"].as_str()), (200, Some("backup")));
    let view = channel_view(&gw, 1).await;
    assert_eq!(view["status"]["state"], "auto_disabled", "disabled by the first 401: {view}");
    assert_eq!(view["status"]["error_kind"], "auth");
    for _ in 0..5 {
        let (_, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
        assert_eq!(body["system_fingerprint"], "backup");
    }

    a.set_mode(Mode::Healthy);
    let recovered = Instant::now();
    wait_for_state(&gw, 1, "enabled", Duration::from_secs(5)).await;
    eprintln!("auto-disabled channel back in service {:?} after its upstream recovered", recovered.elapsed());
    let before = b.hits();
    let (_, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
    assert_eq!(body["system_fingerprint"], "primary", "traffic returns to the recovered channel");
    assert_eq!(b.hits(), before);
    let view = channel_view(&gw, 1).await;
    let sources: Vec<&str> =
        view["history"].as_array().expect("history").iter().filter_map(|e| e["source"].as_str()).collect();
    assert_eq!(sources, ["auto", "probe"], "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_channel_cools_for_retry_after_then_serves_without_a_probe() {
    let (a, _b, gw) = pair(&health_toml(3)).await;
    a.set_mode(Mode::Times(
        1,
        Box::new(Mode::openai_error(429, "rate_limit_exceeded", Some(2))),
        Box::new(Mode::Healthy),
    ));
    let started = Instant::now();
    let (_, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
    assert_eq!(body["system_fingerprint"], "backup");
    let view = channel_view(&gw, 1).await;
    assert_eq!(view["status"]["state"], "cooling_down", "{view}");
    assert_eq!(view["status"]["error_kind"], "rate_limited");

    // While it cools, nothing reaches it: no traffic, no probe.
    while started.elapsed() < Duration::from_millis(1500) {
        let (_, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
        assert_eq!(body["system_fingerprint"], "backup");
    }
    assert_eq!(a.hits(), 1);
    let back = wait_for_state(&gw, 1, "enabled", Duration::from_secs(4)).await;
    let cooled = started.elapsed();
    eprintln!("cooled {cooled:?} for Retry-After: 2 (state seen enabled after {back:?} of polling)");
    assert!(cooled >= Duration::from_secs(2));
    let (_, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
    assert_eq!(body["system_fingerprint"], "primary");
    assert_eq!(a.hits(), 2, "it served again without any probe in between");
    let view = channel_view(&gw, 1).await;
    assert_eq!(view["history"][1]["source"], "timer", "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_errors_cool_down_only_at_the_threshold_and_a_success_resets() {
    let mock = MockUpstream::start("only").await;
    let toml = format!(
        "[upstream]\nmax_attempts = 1\n\n{}{}",
        health_toml(3),
        channel("only", "openai", &mock.base_url(), &["gpt-4o-mini"], "")
    );
    let gw = Gateway::start(PLUGINS, &toml);
    let fail = |n: usize| {
        let gw = &gw;
        async move {
            for _ in 0..n {
                let (status, _) = post(gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
                assert_eq!(status, 502);
            }
        }
    };
    mock.set_mode(Mode::no_healthy_upstream());
    fail(4).await;
    assert_eq!(state(&gw, 1).await, "enabled", "4 transient errors do not cool a channel down");
    mock.set_mode(Mode::Healthy);
    assert_eq!(post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await.0, 200);
    mock.set_mode(Mode::no_healthy_upstream());
    fail(4).await;
    assert_eq!(state(&gw, 1).await, "enabled", "the success in between reset the window");
    fail(1).await;
    let view = channel_view(&gw, 1).await;
    assert_eq!(view["status"]["state"], "cooling_down", "the 5th cools it down: {view}");
    assert_eq!(view["status"]["error_kind"], "transient");

    // A cooling channel is not "unknown model": the client gets a 503 with Retry-After.
    let resp = crate::support::send(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((28..=30).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "channel_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_that_keeps_failing_needs_attention_and_is_no_longer_probed() {
    let mock = MockUpstream::start("broken").await;
    let toml = format!("{}{}", health_toml(3), channel("broken", "openai", &mock.base_url(), &["gpt-4o-mini"], ""));
    let mut gw = Gateway::start(PLUGINS, &toml);
    mock.set_mode(Mode::openai_error(401, "invalid_api_key", None));
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("channel_unavailable")), "{body}");
    assert_eq!(state(&gw, 1).await, "auto_disabled");
    let took = wait_for_state(&gw, 1, "needs_attention", Duration::from_secs(5)).await;
    eprintln!("needs_attention after 3 failed probes, {took:?}");
    let view = channel_view(&gw, 1).await;
    assert_eq!(view["status"]["recovery_attempts"], 3, "{view}");
    assert_eq!(mock.hits(), 4, "one request and three probes");

    // No more probes, also across a restart, even once the upstream is fine.
    mock.set_mode(Mode::Healthy);
    written(&gw).await;
    gw.restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mock.hits(), 4);
    let view = channel_view(&gw, 1).await;
    assert_eq!(view["status"]["state"], "needs_attention");
    let sources: Vec<&str> =
        view["history"].as_array().expect("history").iter().filter_map(|e| e["source"].as_str()).collect();
    assert_eq!(sources, ["auto", "probe"], "{view}");

    let (_, view) = admin(&gw, Method::POST, "/api/channels/1/enable", Some(&json!({"note": "key rotated"}))).await;
    assert_eq!(view["status"]["state"], "enabled");
    assert_eq!(post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_embeddings_only_channel_is_probed_with_an_embeddings_request() {
    let mock = MockUpstream::start("embedder").await;
    let extra = "[channels.settings]\nprobe_endpoint = \"embeddings\"\nprobe_model = \"text-embedding-3-small\"";
    let toml = format!(
        "{}{}",
        health_toml(100),
        channel("embedder", "openai", &mock.base_url(), &["text-embedding-3-small"], extra)
    );
    let gw = Gateway::start(PLUGINS, &toml);
    mock.set_mode(Mode::openai_error(401, "invalid_api_key", None));
    let body = json!({"model": "text-embedding-3-small", "input": "hello"});
    let (status, _) = post(&gw, "/v1/embeddings", &body).await;
    assert_eq!(status, 503);
    assert_eq!(state(&gw, 1).await, "auto_disabled");
    mock.set_mode(Mode::Healthy);
    wait_for_state(&gw, 1, "enabled", Duration::from_secs(5)).await;
    let chats = mock.state.chat_hits.load(std::sync::atomic::Ordering::SeqCst);
    let embeddings = mock.state.embedding_hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(chats, 0, "never probed with a chat request");
    assert!(embeddings >= 2, "the request and at least one embeddings probe: {embeddings}");
    let (status, tested) = admin(&gw, Method::POST, "/api/channels/1/test", None).await;
    assert_eq!((status, tested["endpoint"].as_str()), (200, Some("embeddings")), "{tested}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_key_is_disabled_alone_and_re_enabled_when_it_works() {
    let mock = MockUpstream::start("pool").await;
    let extra = "keys = [\"sk-pool-key-one-0123456789abcdef\", \"sk-pool-key-two-0123456789abcdef\"]";
    let toml = format!("{}{}", health_toml(100), channel("pool", "openai", &mock.base_url(), &["gpt-4o-mini"], extra));
    let gw = Gateway::start(PLUGINS, &toml.replace("key = \"sk-upstream-secret-pool\"\n", ""));
    mock.set_mode(Mode::RejectKey("sk-pool-key-one-0123456789abcdef".into()));
    for _ in 0..6 {
        let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
        assert_eq!(status, 200, "the other key keeps the channel serving: {body}");
    }
    let view = channel_view(&gw, 1).await;
    assert_eq!(view["status"]["state"], "enabled", "{view}");
    assert_eq!((view["keys"][0]["enabled"].as_bool(), view["keys"][1]["enabled"].as_bool()), (Some(false), Some(true)));
    assert_eq!(view["keys"][0]["auto"]["error_kind"], "auth");
    mock.set_mode(Mode::Healthy);
    let ok =
        eventually(Duration::from_secs(5), || async { channel_view(&gw, 1).await["keys"][0]["enabled"] == true }).await;
    assert!(ok.is_some(), "the key was not re-enabled by a probe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_keeps_every_state_and_its_history() {
    let mocks = [
        MockUpstream::start("manual").await,
        MockUpstream::start("cooling").await,
        MockUpstream::start("auto").await,
        MockUpstream::start("backup").await,
    ];
    let mut toml = health_toml(1000);
    for (m, prio) in mocks.iter().zip([10, 10, 10, 0]) {
        toml += &channel(&m.state.name, "openai", &m.base_url(), &["gpt-4o-mini"], &format!("priority = {prio}"));
    }
    let mut gw = Gateway::start(PLUGINS, &toml);
    admin(&gw, Method::POST, "/api/channels/1/disable", Some(&json!({"note": "by hand"}))).await;
    mocks[1].set_mode(Mode::openai_error(429, "rate_limit_exceeded", Some(300)));
    mocks[2].set_mode(Mode::openai_error(401, "invalid_api_key", None));
    for _ in 0..4 {
        let (status, _) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "x")).await;
        assert_eq!(status, 200);
    }
    let wanted = [(1, "manually_disabled"), (2, "cooling_down"), (3, "auto_disabled"), (4, "enabled")];
    let mut before = Vec::new();
    for (id, s) in wanted {
        let view = channel_view(&gw, id).await;
        assert_eq!(view["status"]["state"], s, "{view}");
        before.push(view);
    }
    written(&gw).await;
    gw.restart();
    for ((id, s), old) in wanted.into_iter().zip(before) {
        let view = channel_view(&gw, id).await;
        assert_eq!(view["status"]["state"], s, "after restart: {view}");
        assert_eq!(view["history"], old["history"], "history survives the restart");
        if s == "cooling_down" {
            assert_eq!(view["status"]["until_ms"], old["status"]["until_ms"]);
        }
    }
    let (_, status) = admin(&gw, Method::GET, "/api/status", None).await;
    let counts = &status["channels"]["by_status"];
    assert_eq!(
        [&counts["manually_disabled"], &counts["cooling_down"], &counts["auto_disabled"], &counts["enabled"]],
        [1, 1, 1, 1],
        "{status}"
    );
}

/// Wait until every health transition the gateway published is written
/// (`/api/status` `channels.pending_writes`): a `kill -9` keeps what is.
async fn written(gw: &Gateway) {
    let done = eventually(Duration::from_secs(20), || async {
        let (_, status) = admin(gw, Method::GET, "/api/status", None).await;
        status["channels"]["pending_writes"] == 0
    })
    .await;
    assert!(done.is_some(), "health transitions were never written");
}
