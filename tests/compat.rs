//! The WIT compatibility promise: components built against every earlier
//! contract version — `wasmgate:plugin@0.1.0` through `@0.1.5`, golden builds
//! kept in `tests/fixtures/compat/`, each made from the commit that last
//! had that version — still load and serve on this host, through
//! wasmtime's semver-compatible import and export matching.

use crate::support::{Gateway, MockUpstream, admin, channel, chat, load};
use reqwest::Method;

/// A gateway with one channel per mock (`extra` TOML appended) and the
/// shipped plugins `shipped`, into whose plugins directory the golden
/// builds `golden` (file, installed name) are copied; returns once all are
/// loaded, each golden one reporting `wit_version`.
async fn with_golden(
    mocks: &[MockUpstream],
    extra: &str,
    shipped: &[&str],
    golden: &[(&str, &str)],
    wit_version: &str,
) -> Gateway {
    let dir = crate::support::root().join("tests/fixtures/compat");
    let toml: String = mocks
        .iter()
        .enumerate()
        .map(|(i, mock)| channel(&format!("c{i}"), "openai", &mock.base_url(), &["gpt-4o-mini"], ""))
        .collect::<String>()
        + extra;
    let gw = Gateway::start(shipped, &toml);
    for (file, name) in golden {
        std::fs::copy(dir.join(file), gw.plugins_dir.join(name)).expect("copy golden plugin");
    }
    let expected = shipped.len() + golden.len();
    let loaded = crate::support::eventually(std::time::Duration::from_secs(20), || async {
        let (_, list) = admin(&gw, Method::GET, "/api/plugins", None).await;
        list["data"].as_array().is_some_and(|d| d.iter().filter(|p| p["loaded"] == true).count() == expected)
    })
    .await;
    assert!(loaded.is_some(), "the {wit_version} plugins did not load: {}", gw.log());
    for (_, name) in golden {
        let name = name.trim_end_matches(".wasm");
        let (_, status) = admin(&gw, Method::GET, &format!("/api/plugins/{name}"), None).await;
        assert_eq!(status["wit_version"], wit_version, "{status}");
    }
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_built_against_wit_0_1_0_still_load_and_serve() {
    let m = [MockUpstream::start("a").await, MockUpstream::start("b").await];
    let golden = [("openai-wit-0.1.0.wasm", "openai.wasm"), ("weighted-wit-0.1.0.wasm", "weighted.wasm")];
    let gw = with_golden(&m, "", &[], &golden, "0.1.0").await;
    let results = load(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "old plugins"), 200, 8).await;
    assert!(results.iter().all(|(s, b)| *s == 200 && b["choices"][0]["message"]["content"] == "echo: old plugins"));
    assert!(
        m[0].hits() > 20 && m[1].hits() > 20,
        "the 0.1.0 weighted policy spreads traffic: {} / {}",
        m[0].hits(),
        m[1].hits()
    );
}

/// Six requests through a round-robin policy take strict turns over two
/// channels (the policy reads `routing-context.sequence`, added in 0.1.1).
async fn assert_strict_turns(gw: &Gateway) {
    let mut order = Vec::new();
    for _ in 0..6 {
        let (status, body) = crate::support::post(gw, "/v1/chat/completions", &chat("gpt-4o-mini", "turn")).await;
        assert_eq!(status, 200, "{body}");
        order.push(body["system_fingerprint"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(order[..2], order[2..4], "{order:?}");
    assert_ne!(order[0], order[1], "{order:?}");
}

/// 0.1.1 added the `routing-context` import: a round-robin policy and an
/// adapter built against 0.1.1 load and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_built_against_wit_0_1_1_still_load_and_serve() {
    let m = [MockUpstream::start("a").await, MockUpstream::start("b").await];
    let golden = [("openai-wit-0.1.1.wasm", "openai.wasm"), ("round-robin-wit-0.1.1.wasm", "round-robin.wasm")];
    let gw = with_golden(&m, "[routing]\npolicy = \"round-robin\"\n", &["weighted.wasm"], &golden, "0.1.1").await;
    assert_strict_turns(&gw).await;
}

/// 0.1.2 added the `auth` export (credential exchange): the openai and
/// azure adapters built against 0.1.2 load and serve, azure on its own
/// provider mock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_built_against_wit_0_1_2_still_load_and_serve() {
    let m = [MockUpstream::start("a").await];
    let providers = crate::support::providers::ProviderMock::start().await;
    let azure = crate::providers::provider_channel(&providers, "azure");
    let golden = [("openai-wit-0.1.2.wasm", "openai.wasm"), ("azure-wit-0.1.2.wasm", "azure.wasm")];
    let gw = with_golden(&m, &azure, &["weighted.wasm"], &golden, "0.1.2").await;
    let results = load(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "old openai"), 20, 4).await;
    assert!(results.iter().all(|(s, b)| *s == 200 && b["choices"][0]["message"]["content"] == "echo: old openai"));
    let expect = crate::providers::expect("azure");
    let (status, body) = crate::support::post(
        &gw,
        "/v1/chat/completions",
        &chat(expect["model"].as_str().expect("model"), "Hello there"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], expect["text"], "{body}");
}

/// 0.1.4 added functions to `routing-context`: a policy built against 0.1.3
/// (importing the older interface) and an adapter built against 0.1.3
/// (golden builds from before the change) load and serve on this host.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_built_against_wit_0_1_3_still_load_and_serve() {
    let m = [MockUpstream::start("a").await, MockUpstream::start("b").await];
    let golden = [("openai-wit-0.1.3.wasm", "openai.wasm"), ("round-robin-wit-0.1.3.wasm", "round-robin.wasm")];
    let gw = with_golden(&m, "[routing]\npolicy = \"round-robin\"\n", &["weighted.wasm"], &golden, "0.1.3").await;
    assert_strict_turns(&gw).await;
}

/// 0.1.5 added the filter world: the affinity policy and the openai
/// adapter built against 0.1.4 load and serve — one session stays on one
/// channel while others spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_built_against_wit_0_1_4_still_load_and_serve() {
    let m = [MockUpstream::start("a").await, MockUpstream::start("b").await];
    let golden = [("openai-wit-0.1.4.wasm", "openai.wasm"), ("affinity-wit-0.1.4.wasm", "affinity.wasm")];
    let gw = with_golden(&m, "[routing]\npolicy = \"affinity\"\n", &["weighted.wasm"], &golden, "0.1.4").await;
    let served_by = |session: String| {
        let gw = &gw;
        async move {
            let resp = crate::support::client()
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(crate::support::TOKEN)
                .header("x-session-id", session)
                .json(&chat("gpt-4o-mini", "sticky"))
                .send()
                .await
                .expect("send");
            let body: serde_json::Value = resp.json().await.expect("json");
            body["system_fingerprint"].as_str().unwrap_or_default().to_string()
        }
    };
    let mut one = std::collections::HashSet::new();
    for _ in 0..10 {
        one.insert(served_by("session-1".into()).await);
    }
    assert_eq!(one.len(), 1, "one session, one channel: {one:?}");
    let mut many = std::collections::HashSet::new();
    for i in 0..20 {
        many.insert(served_by(format!("session-{i}")).await);
    }
    assert_eq!(many.len(), 2, "sessions spread over both channels: {many:?}");
}

/// 0.1.6 added `passthrough` (images, audio, moderations, rerank): the
/// openai adapter and the block-list filter built against 0.1.5 load and
/// serve chat, filtered; the old adapter, exporting no `passthrough`, is
/// never chosen for the new operations (a clear 400, not a 5xx).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugins_built_against_wit_0_1_5_still_load_and_serve() {
    let m = [MockUpstream::start("a").await];
    let filter = "[[filters]]\nplugin = \"block-list\"\nmodels = [\"gpt-4o-mini\"]\n\
                  [filters.settings]\nwords = [\"forbidden\"]\n";
    let golden = [("openai-wit-0.1.5.wasm", "openai.wasm"), ("block-list-wit-0.1.5.wasm", "block-list.wasm")];
    let gw = with_golden(&m, filter, &["weighted.wasm"], &golden, "0.1.5").await;
    let (status, body) = crate::support::post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "hello")).await;
    assert_eq!((status, &body["choices"][0]["message"]["content"]), (200, &serde_json::json!("echo: hello")));
    let (status, _) = crate::support::post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "forbidden")).await;
    assert_eq!(status, 400, "the 0.1.5 filter still refuses");
    let moderation = serde_json::json!({"model": "gpt-4o-mini", "input": "x"});
    let (status, err) = crate::support::post(&gw, "/v1/moderations", &moderation).await;
    assert_eq!((status, err["error"]["code"].as_str()), (400, Some("unsupported_operation")), "{err}");
}
