//! The channel admin API on the real gateway: authentication, every
//! endpoint, validation errors naming their field, masked keys, multi-key
//! rotation, changes applied without restart, and persistence across a
//! `kill -9` restart.

use crate::support::{ADMIN, Gateway, MockUpstream, TOKEN, admin, assert_openai_error, channel, chat, client, post};
use reqwest::Method;
use serde_json::{Value, json};

const PLUGINS: &[&str] = &["openai.wasm", "weighted.wasm"];
const SECRET: &str = "sk-live-SECRET-abcdefghijklmnopqrstuvwxyz0123";

fn new_channel(base_url: &str) -> Value {
    json!({
        "name": "api-made", "adapter": "openai", "base_url": base_url,
        "key": format!("{SECRET}\nsk-live-SECOND-abcdefghijklmnopqrstuvwxyz0123"),
        "models": ["gpt-4o", "text-embedding-3-small"],
        "model_mapping": {"gpt-4o": "gpt-4o-2024-08-06"},
        "groups": ["default"], "priority": 3, "weight": 5,
        "settings": {"probe_model": "gpt-4o"}, "tags": ["team-a"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_endpoints_refuse_without_the_admin_token() {
    let gw = Gateway::start(PLUGINS, "");
    for (method, path) in [
        (Method::GET, "/api/channels"),
        (Method::POST, "/api/channels"),
        (Method::GET, "/api/channels/1"),
        (Method::PUT, "/api/channels/1"),
        (Method::PATCH, "/api/channels/1"),
        (Method::DELETE, "/api/channels/1"),
        (Method::POST, "/api/channels/1/test"),
        (Method::GET, "/api/routing"),
        (Method::PUT, "/api/routing"),
    ] {
        for auth in [None, Some("wrong-token"), Some(TOKEN)] {
            let mut req = client().request(method.clone(), gw.url(path));
            if let Some(token) = auth {
                req = req.bearer_auth(token);
            }
            let resp = req.json(&json!({})).send().await.expect("send");
            assert_eq!(resp.status(), 401, "{method} {path} with {auth:?}");
            let body: Value = resp.json().await.expect("json");
            assert_openai_error(&body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn channel_crud_search_test_and_live_effect() {
    let mock = MockUpstream::start("upstream").await;
    let gw = Gateway::start(PLUGINS, "");

    // No channel yet: the model is unknown.
    let (status, _) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "x")).await;
    assert_eq!(status, 404);

    // Create: 201, keys masked, the secret nowhere in the answer.
    let resp =
        client().post(gw.url("/api/channels")).bearer_auth(ADMIN).json(&new_channel(&mock.base_url())).send().await;
    let resp = resp.expect("send");
    assert_eq!(resp.status(), 201);
    let text = resp.text().await.expect("body");
    assert!(!text.contains("SECRET") && !text.contains("SECOND"), "a key leaked: {text}");
    let created: Value = serde_json::from_str(&text).expect("json");
    let id = created["id"].as_u64().expect("id");
    assert_eq!(created["keys"].as_array().map(Vec::len), Some(2));
    assert_eq!(created["keys"][0]["key"], "sk-…0123");
    assert_eq!((created["weight"].as_u64(), created["status"]["state"].as_str()), (Some(5), Some("enabled")));

    // It serves the next request, with the mapped model and rotating keys.
    for _ in 0..2 {
        let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "x")).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(mock.state.last_body.lock().await.clone().expect("body")["model"], "gpt-4o-2024-08-06");
    let (status, _) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "x")).await;
    assert_eq!(status, 200);
    let seen = mock.state.last_headers.lock().await.clone().expect("headers")["authorization"].clone();
    assert_eq!(seen, format!("Bearer {SECRET}"), "keys rotate: the third request uses the first key again");

    // Disable the first key: only the second is used.
    let (status, patched) =
        admin(&gw, Method::PATCH, &format!("/api/channels/{id}"), Some(&json!({"disabled_keys": [0]}))).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["keys"][0]["enabled"], false);
    for _ in 0..3 {
        post(&gw, "/v1/chat/completions", &chat("gpt-4o", "x")).await;
        let seen = mock.state.last_headers.lock().await.clone().expect("headers")["authorization"].clone();
        assert!(seen.to_str().unwrap_or("").contains("SECOND"), "{seen:?}");
    }

    // Read one and list with search, filters and pages.
    let (status, one) = admin(&gw, Method::GET, &format!("/api/channels/{id}"), None).await;
    assert_eq!(status, 200);
    assert!(one["stats"]["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "{one}");
    for i in 0..4 {
        let body = json!({"name": format!("extra-{i}"), "adapter": "openai", "base_url": mock.base_url(), "tags": ["bulk"], "models": ["other-model"]});
        assert_eq!(admin(&gw, Method::POST, "/api/channels", Some(&body)).await.0, 201);
    }
    let (_, page) = admin(&gw, Method::GET, "/api/channels?tag=bulk&per_page=3&page=2", None).await;
    assert_eq!((page["total"].as_u64(), page["data"].as_array().map(Vec::len)), (Some(4), Some(1)), "{page}");
    let (_, found) = admin(&gw, Method::GET, "/api/channels?q=API-MADE", None).await;
    assert_eq!(found["data"][0]["id"].as_u64(), Some(id), "{found}");
    let (status, err) = admin(&gw, Method::GET, "/api/channels?page=zero", None).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("page")));

    // PUT replaces everything but keeps keys; PATCH can disable the channel.
    let put = json!({"name": "renamed", "adapter": "openai", "base_url": mock.base_url(), "models": ["gpt-4o"]});
    let (status, replaced) = admin(&gw, Method::PUT, &format!("/api/channels/{id}"), Some(&put)).await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!((replaced["name"].as_str(), replaced["weight"].as_u64()), (Some("renamed"), Some(1)));
    assert_eq!(replaced["keys"].as_array().map(Vec::len), Some(2));
    assert_eq!(replaced["model_mapping"], json!({}));
    let (status, _) =
        admin(&gw, Method::PATCH, &format!("/api/channels/{id}"), Some(&json!({"status": "disabled"}))).await;
    assert_eq!(status, 200);
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "x")).await;
    // The model exists but its only channel is out of service: 503, not 404.
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("channel_unavailable")), "disabled at once");
    admin(&gw, Method::PATCH, &format!("/api/channels/{id}"), Some(&json!({"status": "enabled"}))).await;

    // Test: the adapter's probe, timed and recorded.
    let (status, tested) = admin(&gw, Method::POST, &format!("/api/channels/{id}/test"), None).await;
    assert_eq!(status, 200, "{tested}");
    assert_eq!((tested["success"].as_bool(), tested["endpoint"].as_str()), (Some(true), Some("chat_completions")));
    let (_, one) = admin(&gw, Method::GET, &format!("/api/channels/{id}"), None).await;
    assert!(one["test_time"].as_u64().is_some() && one["response_time_ms"].as_u64().is_some(), "{one}");
    mock.set_mode(crate::support::mock::Mode::openai_error(401, "invalid_api_key", None));
    let (_, tested) = admin(&gw, Method::POST, &format!("/api/channels/{id}/test"), None).await;
    assert_eq!((tested["success"].as_bool(), tested["error_kind"].as_str()), (Some(false), Some("auth")), "{tested}");
    assert!(!tested.to_string().contains("SECOND") && !tested.to_string().contains(&mock.addr.to_string()));
    mock.set_mode(crate::support::mock::Mode::Healthy);

    // Delete: gone from the API and from routing.
    let (status, deleted) = admin(&gw, Method::DELETE, &format!("/api/channels/{id}"), None).await;
    assert_eq!((status, deleted["deleted"].as_bool()), (200, Some(true)));
    let (status, err) = admin(&gw, Method::GET, &format!("/api/channels/{id}"), None).await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("channel_not_found")));
    let (status, _) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "x")).await;
    assert_eq!(status, 404);
    let leaks: Vec<String> =
        gw.log().lines().filter(|l| l.contains("SECRET") || l.contains("SECOND")).map(str::to_string).collect();
    assert!(leaks.is_empty(), "a key reached the log: {leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_input_gets_a_400_naming_the_field() {
    let gw = Gateway::start(PLUGINS, "");
    let cases = [
        (json!({"adapter": "openai", "base_url": "http://127.0.0.1:9"}), "name"),
        (json!({"name": "x", "adapter": "../evil", "base_url": "http://127.0.0.1:9"}), "adapter"),
        (json!({"name": "x", "adapter": "openai", "base_url": "not a url"}), "base_url"),
        (json!({"name": "x", "adapter": "openai", "base_url": "http://127.0.0.1:9", "weight": "heavy"}), "weight"),
        (json!({"name": "x", "adapter": "openai", "base_url": "http://127.0.0.1:9", "weight": -1}), "weight"),
        (json!({"name": "x", "adapter": "openai", "base_url": "http://127.0.0.1:9", "groups": []}), "groups"),
        (json!({"name": "x", "adapter": "openai", "base_url": "http://127.0.0.1:9", "keys": ["a b"]}), "keys[0]"),
        (
            json!({"name": "x", "adapter": "openai", "base_url": "http://127.0.0.1:9", "status": "cooling_down"}),
            "status",
        ),
        (json!({"name": "x", "adapter": "openai", "base_url": "http://127.0.0.1:9", "settings": [1]}), "settings"),
    ];
    for (body, field) in cases {
        let (status, err) = admin(&gw, Method::POST, "/api/channels", Some(&body)).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_openai_error(&err);
        assert_eq!(err["error"]["param"], field, "{body}: {err}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains(field)), "{err}");
    }
    let (status, err) = admin(&gw, Method::POST, "/api/channels", Some(&json!({"name": "x", "colour": 1}))).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("colour")), "{err}");
    let resp = client().post(gw.url("/api/channels")).bearer_auth(ADMIN).body("{not json").send().await.expect("send");
    assert_eq!(resp.status(), 400);
    let (status, err) = admin(&gw, Method::GET, "/api/channels/abc", None).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("id")));
    let (status, _) = admin(&gw, Method::PATCH, "/api/channels/999", Some(&json!({"weight": 2}))).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_keeps_every_channel_and_config_import_never_clobbers_api_edits() {
    let mock = MockUpstream::start("upstream").await;
    let toml = channel("from-config", "openai", &mock.base_url(), &["gpt-4o-mini"], "weight = 3");
    let mut gw = Gateway::start(PLUGINS, &toml);
    let (_, list) = admin(&gw, Method::GET, "/api/channels", None).await;
    assert_eq!(list["total"], 1, "{list}");
    let config_id = list["data"][0]["id"].as_u64().expect("id");
    assert_eq!(list["data"][0]["source"], "config");

    let (status, created) = admin(&gw, Method::POST, "/api/channels", Some(&new_channel(&mock.base_url()))).await;
    assert_eq!(status, 201);
    let api_id = created["id"].as_u64().expect("id");
    let edit = json!({"weight": 42, "tags": ["edited"]});
    let (status, _) = admin(&gw, Method::PATCH, &format!("/api/channels/{config_id}"), Some(&edit)).await;
    assert_eq!(status, 200);

    gw.restart(); // SIGKILL, then start on the same data directory.
    let (_, list) = admin(&gw, Method::GET, "/api/channels", None).await;
    assert_eq!(list["total"], 2, "{list}");
    let (_, from_config) = admin(&gw, Method::GET, &format!("/api/channels/{config_id}"), None).await;
    assert_eq!(from_config["weight"], 42, "the API edit survives the restart and the import: {from_config}");
    let (_, from_api) = admin(&gw, Method::GET, &format!("/api/channels/{api_id}"), None).await;
    assert_eq!(from_api["model_mapping"]["gpt-4o"], "gpt-4o-2024-08-06");
    let (status, _) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "after restart")).await;
    assert_eq!(status, 200);

    // Deleted through the API: not re-imported on the next start; ids are never reused.
    admin(&gw, Method::DELETE, &format!("/api/channels/{config_id}"), None).await;
    gw.restart();
    let (_, list) = admin(&gw, Method::GET, "/api/channels", None).await;
    assert_eq!(list["total"], 1, "{list}");
    let (_, again) = admin(&gw, Method::POST, "/api/channels", Some(&new_channel(&mock.base_url()))).await;
    assert!(again["id"].as_u64().expect("id") > api_id);
}
