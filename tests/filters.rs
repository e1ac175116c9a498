//! Filter plugins (WIT 0.1.5): the three shipped filters and a trapping
//! fixture, configured per model in `[[filters]]`, checked through the
//! official `openai` SDK (tests/python/filters_check.py) and from here:
//! headers a filter adds reach the upstream, a refused request never does,
//! the rules can be replaced live through `/api/filters`, and every
//! verdict is counted.

use reqwest::Method;

use crate::support::{ADMIN, Gateway, MockUpstream, TOKEN, admin, channel, chat, client, run_python, send};

const MODELS: [&str; 8] =
    ["guarded", "guarded-split", "pii", "capped", "trap-closed", "trap-open", "plain", "slow-guarded"];

const FILTERS: &str = r#"
[[filters]]
plugin = "block-list"
models = ["guarded"]
settings = { words = ["forbidden fruit", "echo"], patterns = ["secret-[0-9]+"] }

[[filters]]
plugin = "block-list"
models = ["guarded-split"]
settings = { words = ["echo: hello"] }

[[filters]]
plugin = "block-list"
models = ["slow-guarded"]
settings = { words = ["word5 word6"] }

[[filters]]
plugin = "pii-redact"
models = ["pii"]

[[filters]]
plugin = "prompt-cap"
models = ["capped"]
settings = { max_chars = 60 }

[[filters]]
plugin = "trap-filter"
models = ["trap-closed"]

[[filters]]
plugin = "trap-filter"
models = ["trap-open"]
on_error = "skip"
"#;

fn gateway(mock: &MockUpstream) -> Gateway {
    let plugins =
        ["openai.wasm", "weighted.wasm", "block-list.wasm", "pii-redact.wasm", "prompt-cap.wasm", "trap-filter.wasm"];
    Gateway::start(&plugins, &format!("{}{FILTERS}", channel("a", "openai", &mock.base_url(), &MODELS, "")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shipped_filters_block_redact_and_cap_through_the_openai_sdk() {
    let mock = MockUpstream::start("mock").await;
    let gw = gateway(&mock);
    let env = vec![("WASMGATE_BASE_URL", gw.url("/v1")), ("WASMGATE_API_KEY", TOKEN.to_string())];
    let stdout = run_python("filters_check.py", env).await;
    assert!(stdout.contains("filters: 8 passed, 0 failed"), "{stdout}");

    let metrics = client().get(gw.url("/metrics")).bearer_auth(ADMIN).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("text");
    for needle in [
        r#"wasmgate_filter_actions_total{filter="block-list",hook="request",action="refuse"}"#,
        r#"wasmgate_filter_actions_total{filter="block-list",hook="stream_chunk",action="stop"}"#,
        r#"wasmgate_filter_actions_total{filter="pii-redact",hook="request",action="edit"}"#,
        r#"wasmgate_filter_actions_total{filter="trap-filter",hook="request",action="skipped"}"#,
        r#"wasmgate_filter_actions_total{filter="trap-filter",hook="request",action="failed"}"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_add_upstream_headers_refusals_never_leave_and_rules_change_live() {
    let mock = MockUpstream::start("mock").await;
    let mut gw = gateway(&mock);

    // A header added by a filter reaches the upstream.
    let resp = send(&gw, "/v1/chat/completions", &chat("trap-closed", "fine")).await;
    assert_eq!(resp.status(), 200);
    let headers = mock.state.last_headers.lock().await.clone().expect("headers");
    assert_eq!(headers.get("x-filtered-by").and_then(|v| v.to_str().ok()), Some("trap-filter"));

    // A refused request is never sent upstream, and its error is OpenAI's.
    let before = mock.hits();
    let resp = send(&gw, "/v1/chat/completions", &chat("capped", &"y".repeat(100))).await;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "prompt_too_large", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("at most 60")), "{body}");
    assert_eq!(mock.hits(), before, "a refused request must not reach the upstream");

    // On the Anthropic Messages route, a refusal is in Anthropic's shape.
    let messages = serde_json::json!({"model": "capped", "max_tokens": 16,
        "messages": [{"role": "user", "content": "z".repeat(100)}]});
    let resp = client().post(gw.url("/v1/messages")).header("x-api-key", TOKEN).json(&messages).send().await;
    let resp = resp.expect("send");
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(
        (body["type"].as_str(), body["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error")),
        "{body}"
    );
    assert_eq!(mock.hits(), before, "a refused request must not reach the upstream");

    // A phrase split across chunks that already left stops the stream
    // midway: the client has the chunks before it, then an OpenAI error
    // event, and no `[DONE]`.
    let mut slow = chat("slow-guarded", "count");
    slow["stream"] = true.into();
    let sse = send(&gw, "/v1/chat/completions", &slow).await.text().await.expect("stream");
    let text = crate::support::stream_text(&sse);
    assert!(text.starts_with("word0 ") && text.ends_with("word5 "), "{text}");
    assert!(sse.contains("\"code\":\"content_blocked\"") && !sse.contains("[DONE]"), "{sse}");
    let (status, answer) = crate::support::post(&gw, "/v1/chat/completions", &chat("slow-guarded", "count")).await;
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    assert_eq!(status, 200);
    assert!(content.contains("word4 *** word7"), "not streamed, the phrase is masked: {content}");

    // The rules are replaced live: the cap goes, and a new rule caps `plain`.
    let (status, view) = admin(&gw, Method::GET, "/api/filters", None).await;
    assert_eq!((status, view["source"].as_str()), (200, Some("config")));
    assert_eq!(view["filters"].as_array().map(Vec::len), Some(7));
    assert_eq!(view["loaded_filters"].as_array().map(Vec::len), Some(4), "{view}");
    let rules = serde_json::json!([{"plugin": "prompt-cap", "models": ["plain"], "settings": {"max_messages": 1}}]);
    let (status, view) = admin(&gw, Method::PUT, "/api/filters", Some(&rules)).await;
    assert_eq!((status, view["source"].as_str()), (200, Some("api")), "{view}");
    let resp = send(&gw, "/v1/chat/completions", &chat("capped", &"y".repeat(100))).await;
    assert_eq!(resp.status(), 200, "the cap on `capped` is gone");
    let two = serde_json::json!({"model": "plain", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]});
    let resp = send(&gw, "/v1/chat/completions", &two).await;
    assert_eq!(resp.status(), 400, "the new rule caps `plain`");

    // Invalid rules are refused with the field at fault; the rules in force stay.
    let bad = serde_json::json!([{"plugin": "prompt-cap", "routes": ["chat"]}]);
    let (status, body) = admin(&gw, Method::PUT, "/api/filters", Some(&bad)).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("filters[0].routes")), "{body}");

    // A rule naming a filter that is not loaded fails closed.
    let missing = serde_json::json!({"filters": [{"plugin": "not-there", "models": ["plain"]}]});
    let (status, view) = admin(&gw, Method::PUT, "/api/filters", Some(&missing)).await;
    assert_eq!((status, view["missing_filters"][0].as_str()), (200, Some("not-there")));
    let resp = send(&gw, "/v1/chat/completions", &chat("plain", "hi")).await;
    assert_eq!(resp.status(), 503);

    // The API's rules survive a restart; DELETE returns to the file's.
    gw.restart();
    let (_, view) = admin(&gw, Method::GET, "/api/filters", None).await;
    assert_eq!(view["source"], "api");
    let (status, view) = admin(&gw, Method::DELETE, "/api/filters", None).await;
    assert_eq!((status, view["filters"].as_array().map(Vec::len)), (200, Some(7)));
    let resp = send(&gw, "/v1/chat/completions", &chat("plain", "hi")).await;
    assert_eq!(resp.status(), 200);
}
