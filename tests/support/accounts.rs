//! Users, tokens and their requests: what the billing and hardening tests
//! share.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::{Gateway, admin, eventually};

/// A user with `quota` and a token for them (extra token fields merged in);
/// returns (user id, token key).
pub async fn user_with_token(gw: &Gateway, quota: i64, token: Value) -> (u64, String) {
    let (status, user) = admin(gw, Method::POST, "/api/users", Some(&json!({"name": "alice", "quota": quota}))).await;
    assert_eq!(status, 201, "{user}\n{}", gw.log());
    let id = user["id"].as_u64().expect("id");
    let mut body = json!({"name": "t", "user_id": id});
    for (k, v) in token.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let (status, t) = admin(gw, Method::POST, "/api/tokens", Some(&body)).await;
    assert_eq!(status, 201, "{t}\n{}", gw.log());
    let key = t["key"].as_str().expect("full key at creation").to_string();
    assert!(key.starts_with("sk-") && key.len() >= 35);
    (id, key)
}

/// POST a chat completion with a user's `key`; the raw response.
pub async fn send_chat(gw: &Gateway, key: &str, body: &Value) -> reqwest::Response {
    crate::support::client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("send")
}

pub async fn call(gw: &Gateway, key: &str, body: &Value) -> (u16, Value, String) {
    let resp = send_chat(gw, key, body).await;
    let status = resp.status().as_u16();
    let id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), id)
}

/// Start a streamed chat request; returns its request id and the body stream.
pub async fn open_stream(
    gw: &Gateway,
    key: &str,
    body: &Value,
) -> (String, impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + use<>) {
    let resp = send_chat(gw, key, body).await;
    let id = resp.headers()["x-request-id"].to_str().expect("id").to_string();
    (id, resp.bytes_stream())
}

pub async fn logs(gw: &Gateway, query: &str) -> Value {
    let (status, body) = admin(gw, Method::GET, &format!("/api/logs?per_page=100&{query}"), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Wait until `query` matches `n` rows (the writer batches every 50 ms;
/// the limit only bounds a broken run, a busy machine may take seconds).
pub async fn wait_rows(gw: &Gateway, query: &str, n: u64) -> Value {
    let ok = eventually(Duration::from_secs(30), || async { logs(gw, query).await["total"] == n }).await;
    let body = logs(gw, query).await;
    assert!(ok.is_some(), "expected {n} rows for {query}: {body}\n{}", gw.log());
    body
}

/// Send `n` copies of `body` with `key` at once, request `i` to
/// `gateways[i % len]`; returns how many were answered, every other one
/// having been refused with a 429 of `code`.
pub async fn concurrent_calls(
    gateways: &[std::sync::Arc<Gateway>],
    key: &str,
    body: &Value,
    n: usize,
    code: &str,
) -> usize {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (gw, key, body) = (gateways[i % gateways.len()].clone(), key.to_string(), body.clone());
            tokio::spawn(async move { call(&gw, &key, &body).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (status, body, _) = t.await.expect("task");
        match status {
            200 => ok += 1,
            429 => assert_eq!(body["error"]["code"], code, "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    ok
}
