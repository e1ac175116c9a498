//! Configuration and health details (issue 11, items 15 and 19): every
//! documented `WASMGATE_*` variable takes effect, and a channel is probed
//! with a model it offers, so a non-OpenAI channel can recover.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::support::mock::Mode;
use crate::support::{Gateway, MockUpstream, artifact, channel, client, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_environment_variable_takes_effect() {
    let mock = MockUpstream::start("env").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins");
    for p in ["openai.wasm", "weighted.wasm"] {
        std::fs::copy(artifact(p), plugins.join(p)).expect("copy");
    }
    let config = dir.path().join("from-env.toml");
    std::fs::write(
        &config,
        channel("env", "openai", &mock.base_url(), &["gpt-4o-mini"], "") + "[pricing]\nunpriced = \"free\"\n",
    )
    .expect("config");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .env("WASMGATE_CONFIG", &config)
        .env("WASMGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("WASMGATE_DATA_DIR", dir.path().join("data"))
        .env("WASMGATE_PLUGINS_DIR", &plugins)
        .env("WASMGATE_TOKENS", "sk-env-one-0123456789abcdefghijklmnop, sk-env-two-0123456789abcdefghijklmnop")
        .env("WASMGATE_ADMIN_TOKEN", "adm-env-0123456789abcdefghijklmnopqr")
        .env("WASMGATE_SECRETS_KEY", "a-long-operator-chosen-secrets-key")
        .env("WASMGATE_PLUGINS__CALL_TIMEOUT_MS", "4321")
        .env("WASMGATE_UPSTREAM__MAX_ATTEMPTS", "2")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let line =
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with("wasmgate listening"));
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(line.as_deref(), Some(format!("wasmgate listening on {base}").as_str()), "WASMGATE_LISTEN");
    for token in ["sk-env-one-0123456789abcdefghijklmnop", "sk-env-two-0123456789abcdefghijklmnop"] {
        let resp = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(token)
            .json(&crate::support::chat("gpt-4o-mini", "hi"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200, "WASMGATE_TOKENS: {token}");
    }
    let resp = client()
        .get(format!("{base}/api/status"))
        .bearer_auth("adm-env-0123456789abcdefghijklmnopqr")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200, "WASMGATE_ADMIN_TOKEN");
    assert!(dir.path().join("data/store.manifest").exists(), "WASMGATE_DATA_DIR");
    assert!(!dir.path().join("data/secret.key").exists(), "WASMGATE_SECRETS_KEY: no generated key file");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_is_probed_with_a_model_it_offers_and_recovers() {
    let mock = MockUpstream::start("deepseek").await;
    let toml = format!(
        "[health]\nprobe_interval_ms = 200\n{}",
        channel("deepseek", "openai", &mock.base_url(), &["deepseek-chat"], "")
    );
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &toml);
    // The key is refused: the channel is disabled automatically.
    mock.set_mode(Mode::RejectKey("sk-upstream-secret-deepseek".into()));
    let (status, _) =
        crate::support::post(&gw, "/v1/chat/completions", &crate::support::chat("deepseek-chat", "x")).await;
    assert_eq!(status, 503);
    let state = || async {
        crate::support::admin(&gw, Method::GET, "/api/channels/1", None).await.1["status"]["state"].clone()
    };
    assert_eq!(state().await, "auto_disabled");
    // The key works again: the recovery probe asks for `deepseek-chat` (not
    // gpt-4o-mini, which this upstream does not serve) and it recovers.
    mock.set_mode(Mode::Healthy);
    let recovered = eventually(Duration::from_secs(10), || async { state().await == "enabled" }).await;
    assert!(recovered.is_some(), "the channel recovered");
    let probed = mock.state.last_body.lock().await.clone().unwrap_or_default();
    assert_eq!(probed["model"], json!("deepseek-chat"), "{probed}");
}
