//! The rest of the OpenAI surface — images, speech, transcriptions,
//! translations, moderations, rerank — relayed through the `openai`
//! adapter's `passthrough` export (WIT 0.1.6) to the mock upstream: the
//! official `openai` SDK (tests/python/relayed_check.py), each billed at
//! its unit and logged, and bad input refused in OpenAI's shape.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::accounts::{logs, user_with_token, wait_rows};
use crate::support::{Gateway, MockUpstream, admin, channel, client, run_python};

/// Per-unit prices at 500,000 quota per dollar: an image 20,000, a
/// thousand characters of speech 7,500, a minute of audio 3,000, a rerank
/// 500; moderations free.
const PRICING: &str = "[pricing]\n\
[pricing.models.dall-e-3]\nprice = 0.04\n\
[pricing.models.tts-1]\nprice = 0.015\n\
[pricing.models.whisper-1]\nprice = 0.006\n\
[pricing.models.omni-moderation-latest]\nratio = 0\n\
[pricing.models.rerank-1]\nprice = 0.001\n\
[pricing.models.claude-only]\nprice = 0.001\n";

const MODELS: [&str; 5] = ["dall-e-3", "tts-1", "whisper-1", "omni-moderation-latest", "rerank-1"];

async fn raw(gw: &Gateway, key: &str, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = client()
        .post(gw.url(path))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn multipart(model: &str, file: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--B0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--B0undary\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(b"\r\n--B0undary--\r\n");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_audio_moderations_and_rerank_are_relayed_billed_and_logged() {
    let mock = MockUpstream::start("m").await;
    let anthropic = MockUpstream::start("a").await;
    let config = format!(
        "{PRICING}\n{}{}",
        channel("openai", "openai", &mock.base_url(), &MODELS, ""),
        channel("messages-only", "anthropic", &anthropic.base_url(), &["claude-only"], "")
    );
    let gw = Gateway::start(&["openai.wasm", "anthropic.wasm", "weighted.wasm"], &config);
    let (uid, key) = user_with_token(&gw, 1_000_000, json!({})).await;

    let env = vec![("WASMGATE_BASE_URL", gw.url("/v1")), ("WASMGATE_API_KEY", key.clone())];
    let out = run_python("relayed_check.py", env).await;
    assert!(out.contains("relayed: 6 passed, 0 failed"), "{out}");

    // Each billed at its unit: 2 images, 3 started thousands of characters,
    // 2 minutes (75 s) of audio twice, a free moderation, one rerank.
    let rows = wait_rows(&gw, "type=consume", 6).await;
    let mut charged: Vec<(String, i64)> = rows["data"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["model"].as_str().unwrap_or_default().to_string(), r["quota"].as_i64().unwrap_or(-1)))
        .collect();
    charged.sort();
    let want = [
        ("dall-e-3", 40_000),
        ("omni-moderation-latest", 0),
        ("rerank-1", 500),
        ("tts-1", 22_500),
        ("whisper-1", 6_000),
        ("whisper-1", 6_000),
    ];
    let want: Vec<(String, i64)> = want.iter().map(|(m, q)| (m.to_string(), *q)).collect();
    assert_eq!(charged, want);
    let (_, user) = admin(&gw, Method::GET, &format!("/api/users/{uid}"), None).await;
    assert_eq!(user["used_quota"], 75_000, "{user}");

    // Bad input: that protocol's error shape, a 4xx, never a 5xx.
    let json_ct = "application/json";
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("/v1/images/generations", json_ct, br#"{"model":"dall-e-3","prompt":"x","n":50}"#.to_vec(), 400, "n"),
        ("/v1/images/generations", json_ct, br#"{"model":"dall-e-3"}"#.to_vec(), 400, "prompt"),
        ("/v1/audio/speech", json_ct, br#"{"model":"tts-1","input":"hi"}"#.to_vec(), 400, "voice"),
        ("/v1/audio/transcriptions", json_ct, br#"{"model":"whisper-1"}"#.to_vec(), 400, "file"),
        (
            "/v1/audio/transcriptions",
            "multipart/form-data; boundary=B0undary",
            b"--B0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--B0undary--\r\n"
                .to_vec(),
            400,
            "file",
        ),
        ("/v1/rerank", json_ct, br#"{"model":"rerank-1","query":"q","documents":[]}"#.to_vec(), 400, "documents"),
        ("/v1/moderations", json_ct, br#"{"model":"no-such-model","input":"x"}"#.to_vec(), 404, "model"),
        ("/v1/moderations", json_ct, br#"{"model":"claude-only","input":"x"}"#.to_vec(), 400, "model"),
        ("/v1/moderations", json_ct, b"not json".to_vec(), 400, ""),
    ];
    for (path, ct, body, status, param) in cases {
        let (got, err) = raw(&gw, &key, path, ct, body).await;
        assert_eq!(got, status, "{path}: {err}");
        assert!(err["error"]["message"].is_string() && err["error"]["type"].is_string(), "{path}: {err}");
        if !param.is_empty() {
            assert_eq!(err["error"]["param"], param, "{path}: {err}");
        }
    }
    // An upload past the audio limit is refused before it is read.
    let (status, err) = raw(
        &gw,
        &key,
        "/v1/audio/transcriptions",
        "multipart/form-data; boundary=B0undary",
        multipart("whisper-1", &vec![0u8; 27 << 20]),
    )
    .await;
    assert_eq!(status, 413, "{err}");
    assert_eq!(anthropic.hits(), 0, "a channel whose adapter does not relay was never tried");
    // Nothing refused was charged.
    let rows = logs(&gw, "type=consume").await;
    assert_eq!(rows["total"], 6, "{rows}");
}
