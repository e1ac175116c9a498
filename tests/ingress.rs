//! The Responses API, Anthropic Messages and Gemini, served on an OpenAI-style
//! channel through `openai.wasm` by translation: checked with the official
//! `openai`, `anthropic` and `google-genai` Python SDKs, and on the wire for what the SDKs
//! do not show (the conversation sent upstream, token scoping, billing,
//! error shapes, a stream cut by the upstream).

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::accounts::{user_with_token, wait_rows};
use crate::support::mock::{MockUpstream, Mode};
use crate::support::{Gateway, TOKEN, admin, channel, client, run_python};

const MODELS: &[&str] = &["gpt-4o-mini", "claude-mock", "tool-mock", "tool-claude", "gemini-mock", "tool-gemini"];

const PRICING: &str = "[pricing.models.claude-mock]\nratio = 2\n[pricing.models.gpt-4o-mini]\nratio = 1\n";

async fn gateway() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start("mock").await;
    let toml = format!("{PRICING}\n{}", channel("a", "openai", &mock.base_url(), MODELS, ""));
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &toml);
    (mock, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_sdks_speak_responses_messages_and_gemini_through_a_chat_channel() {
    let (_mock, gw) = gateway().await;
    let key = || ("WASMGATE_API_KEY", TOKEN.to_string());
    let out = run_python("anthropic_sdk_check.py", vec![("WASMGATE_ROOT_URL", gw.url("")), key()]).await;
    assert!(out.contains(": 6 passed, 0 failed"), "{out}");
    let out = run_python("responses_check.py", vec![("WASMGATE_BASE_URL", gw.url("/v1")), key()]).await;
    assert!(out.contains(": 6 passed, 0 failed"), "{out}");
    let out = run_python("gemini_sdk_check.py", vec![("WASMGATE_ROOT_URL", gw.url("")), key()]).await;
    assert!(out.contains(": 6 passed, 0 failed"), "{out}");
}

async fn post_as(gw: &Gateway, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = client().post(gw.url(path)).bearer_auth(key).json(body).send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_continued_response_replays_the_conversation_and_only_its_token_sees_it() {
    let (mock, gw) = gateway().await;
    let (_, other) = user_with_token(&gw, 1_000_000, json!({})).await;
    let (status, first) =
        post_as(&gw, TOKEN, "/v1/responses", &json!({"model": "gpt-4o-mini", "input": "first"})).await;
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_str().expect("id").to_string();
    let next = json!({"model": "gpt-4o-mini", "input": "second", "previous_response_id": id, "instructions": "short"});
    let (status, second) = post_as(&gw, TOKEN, "/v1/responses", &next).await;
    assert_eq!(status, 200, "{second}");
    let sent = mock.state.last_body.lock().await.clone().expect("upstream body");
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "short"}, {"role": "user", "content": "first"},
               {"role": "assistant", "content": "echo: first"}, {"role": "user", "content": "second"}])
    );
    // Another token can neither read nor continue it.
    let get = client().get(gw.url(&format!("/v1/responses/{id}"))).bearer_auth(&other).send().await.expect("get");
    assert_eq!(get.status().as_u16(), 404);
    let (status, err) = post_as(&gw, &other, "/v1/responses", &next).await;
    assert_eq!((status, err["error"]["param"].as_str()), (404, Some("previous_response_id")), "{err}");
    let get = client().get(gw.url(&format!("/v1/responses/{id}"))).bearer_auth(TOKEN).send().await.expect("get");
    assert_eq!(get.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn translated_requests_are_billed_and_logged_like_chat_completions() {
    let (_mock, gw) = gateway().await;
    let (uid, key) = user_with_token(&gw, 10_000_000, json!({})).await;
    let msg = json!({"model": "claude-mock", "max_tokens": 20, "stream": true,
                     "messages": [{"role": "user", "content": "bill me"}]});
    let resp = client().post(gw.url("/v1/messages")).header("x-api-key", &key).json(&msg).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("stream");
    assert!(text.starts_with("event: message_start\n"), "{text}");
    assert!(
        text.contains("\"output_tokens\":12") && text.trim_end().ends_with("{\"type\":\"message_stop\"}"),
        "{text}"
    );
    let (status, _) =
        post_as(&gw, &key, "/v1/responses", &json!({"model": "gpt-4o-mini", "input": "bill me too"})).await;
    assert_eq!(status, 200);
    let rows = wait_rows(&gw, &format!("user_id={uid}"), 2).await;
    for row in rows["data"].as_array().expect("rows") {
        assert_eq!((row["prompt_tokens"].as_u64(), row["completion_tokens"].as_u64()), (Some(9), Some(12)), "{row}");
    }
    let (_, user) = admin(&gw, Method::GET, &format!("/api/users/{uid}"), None).await;
    assert!(user["used_quota"].as_i64().is_some_and(|q| q > 0), "{user}");
    assert_eq!(user["request_count"], 2, "{user}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_errors_are_in_anthropic_shape_also_mid_stream() {
    let (mock, gw) = gateway().await;
    let anthropic_error = |body: &Value, kind: &str| {
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    };
    let resp = client().post(gw.url("/v1/messages")).json(&json!({})).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 401);
    anthropic_error(&resp.json().await.expect("json"), "authentication_error");
    let (status, body) = post_as(&gw, TOKEN, "/v1/messages", &json!({"model": "claude-mock", "messages": []})).await;
    assert_eq!(status, 400);
    anthropic_error(&body, "invalid_request_error");
    let resp = client().post(gw.url("/v1/messages")).bearer_auth(TOKEN).body("{not json").send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 400);
    anthropic_error(&resp.json().await.expect("json"), "invalid_request_error");

    mock.set_mode(Mode::DropMidStream);
    let msg = json!({"model": "claude-mock", "max_tokens": 20, "stream": true,
                     "messages": [{"role": "user", "content": "cut me"}]});
    let resp = client().post(gw.url("/v1/messages")).bearer_auth(TOKEN).json(&msg).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.starts_with("event: message_start\n"), "{text}");
    let error = text.split("event: error\ndata: ").nth(1).expect("an error event");
    anthropic_error(&serde_json::from_str(error.trim()).expect("error json"), "api_error");
    assert!(!text.contains("message_stop"), "a cut stream must not look complete: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gemini_takes_the_key_as_a_query_parameter_and_streams_a_json_array_without_alt_sse() {
    let (_mock, gw) = gateway().await;
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "array me"}]}]});
    let url = gw.url(&format!("/v1beta/models/gemini-mock:streamGenerateContent?key={TOKEN}"));
    let resp = client().post(url).json(&body).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let chunks: Vec<Value> = serde_json::from_str(&resp.text().await.expect("body")).expect("a JSON array");
    let text: String =
        chunks.iter().filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str()).collect();
    assert_eq!(text, "echo: array me");
    assert_eq!(chunks.last().expect("last")["candidates"][0]["finishReason"], "STOP");
    let url = gw.url("/v1beta/models/gemini-mock:embedSomething");
    let resp = client().post(url).header("x-goog-api-key", TOKEN).json(&body).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 404);
    let err: Value = resp.json().await.expect("json");
    assert_eq!(
        (err["error"]["code"].as_u64(), err["error"]["status"].as_str()),
        (Some(404), Some("NOT_FOUND")),
        "{err}"
    );
}

/// An Anthropic channel gets `/v1/messages` as the client wrote it (native
/// pass-through: fields the chat translation would drop, such as
/// `thinking`, reach it; its answer and event stream come back unchanged):
/// the official `anthropic` SDK passes the same checks as through the
/// translation, and both ways are billed by the usage Anthropic reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_channels_get_messages_natively_billed_by_their_usage() {
    let mock = MockUpstream::start("anthropic").await;
    let root = mock.base_url().trim_end_matches("/v1").to_string();
    let toml = format!("{PRICING}\n{}", channel("claude", "anthropic", &root, &["claude-mock", "tool-claude"], ""));
    let gw = Gateway::start(&["anthropic.wasm", "weighted.wasm"], &toml);
    let key = || ("WASMGATE_API_KEY", TOKEN.to_string());
    let out = run_python("anthropic_sdk_check.py", vec![("WASMGATE_ROOT_URL", gw.url("")), key()]).await;
    assert!(out.contains(": 6 passed, 0 failed"), "{out}");

    let (uid, user_key) = user_with_token(&gw, 1_000_000, json!({})).await;
    let thinking = json!({"type": "enabled", "budget_tokens": 1024});
    let body = json!({"model": "claude-mock", "max_tokens": 2048, "thinking": thinking,
        "metadata": {"user_id": "u-1"}, "messages": [{"role": "user", "content": "native please"}]});
    let beta = "interleaved-thinking-2025-05-14";
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &user_key)
        .header("anthropic-beta", beta)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.expect("json");
    assert_eq!(answer["id"], "msg_native_1", "the upstream's own answer: {answer}");
    let sent = mock.state.last_body.lock().await.clone().expect("upstream body");
    assert_eq!((&sent["thinking"], &sent["metadata"]), (&thinking, &json!({"user_id": "u-1"})), "{sent}");
    let headers = mock.state.last_headers.lock().await.clone().expect("upstream headers");
    assert_eq!(headers["anthropic-beta"], beta, "the client's beta features go upstream");
    assert_eq!(headers["x-api-key"], "sk-upstream-secret-claude", "with the channel's key, not the client's");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &user_key)
        .json(&streamed)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut events = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        events.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    assert!(events.contains("\"id\":\"msg_native_1\"") && events.contains("event: message_stop"), "{events}");

    // Both billed by Anthropic's usage: ((9 − 3) + 3 + 12) × 2 = 42.
    let rows = wait_rows(&gw, &format!("type=consume&model=claude-mock&user_id={uid}"), 2).await;
    for row in rows["data"].as_array().expect("rows") {
        assert_eq!((row["prompt_tokens"].as_u64(), row["completion_tokens"].as_u64()), (Some(9), Some(12)), "{row}");
        assert_eq!((row["quota"].as_i64(), row["estimated"].as_bool()), (Some(42), Some(false)), "{row}");
    }
}

/// The Responses API natively: on a channel whose upstream serves it (the
/// `openai` adapter's `"responses": "native"` setting), a request that keeps
/// no state in the gateway (`store: false`, what Codex CLI sends) goes
/// upstream as written and the upstream's own objects and events come
/// back, billed by their usage; a stored one is translated and kept here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stateless_responses_pass_through_to_a_native_upstream() {
    let mock = MockUpstream::start("native").await;
    let native = channel("native", "openai", &mock.base_url(), MODELS, "settings = { responses = \"native\" }");
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &format!("{PRICING}\n{native}"));
    let env = vec![("WASMGATE_BASE_URL", gw.url("/v1")), ("WASMGATE_API_KEY", TOKEN.to_string())];
    let out = run_python("responses_native_check.py", env).await;
    assert!(out.contains(": 4 passed, 0 failed"), "{out}");

    let (uid, key) = user_with_token(&gw, 1_000_000, json!({})).await;
    let body = json!({"model": "gpt-4o-mini", "input": "bill me", "store": false, "reasoning": {"effort": "low"}});
    let (status, answer) = post_as(&gw, &key, "/v1/responses", &body).await;
    assert_eq!((status, answer["id"].as_str()), (200, Some("resp_native_1")), "{answer}");
    let sent = mock.state.last_body.lock().await.clone().expect("upstream body");
    assert_eq!(sent["reasoning"], json!({"effort": "low"}), "the request went as written: {sent}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = client().post(gw.url("/v1/responses")).bearer_auth(&key).json(&streamed).send().await.expect("send");
    let events = resp.text().await.expect("events");
    assert!(events.contains("event: response.completed") && events.contains("resp_native_1"), "{events}");
    // Both billed by the Responses usage: ((9 − 3) + 3 + 12) × 1 = 21.
    let rows = wait_rows(&gw, &format!("type=consume&user_id={uid}"), 2).await;
    for row in rows["data"].as_array().expect("rows") {
        assert_eq!((row["prompt_tokens"].as_u64(), row["completion_tokens"].as_u64()), (Some(9), Some(12)), "{row}");
        assert_eq!((row["quota"].as_i64(), row["estimated"].as_bool()), (Some(21), Some(false)), "{row}");
    }
}
