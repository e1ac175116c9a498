//! Plugins cannot stall or starve the gateway (issue 11, items 7, 9, 12):
//! big legitimate work (a 2 MB image, an 8 MB response) fits the budget;
//! a compile bomb and a plugin whose `info()` blocks are refused with a
//! clear reason while everything else goes on; concurrent uploads and
//! deletes of one name leave a consistent file, registry and cache.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::mock::Mode;
use crate::support::{ADMIN, Gateway, MockUpstream, admin, artifact, channel, client, post};

async fn upload(gw: &Gateway, name: &str, bytes: Vec<u8>) -> (u16, Value) {
    let resp = client()
        .put(gw.url(&format!("/api/plugins/{name}")))
        .bearer_auth(ADMIN)
        .body(bytes)
        .send()
        .await
        .expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_megabyte_image_and_an_eight_megabyte_response_are_served() {
    let mock = MockUpstream::start("up").await;
    let gw = Gateway::start(
        &["openai.wasm", "anthropic.wasm", "weighted.wasm"],
        &channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], ""),
    );
    let image = format!("data:image/png;base64,{}", "iVBORw0KGgo".repeat(2_000_000 / 11));
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": image}}]}]});
    let (status, out) = post(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{}", out.to_string().chars().take(300).collect::<String>());
    let sent = mock.state.last_body.lock().await.clone().expect("upstream got it");
    assert_eq!(sent["messages"][0]["content"][1]["image_url"]["url"].as_str().map(str::len), Some(image.len()));

    mock.set_mode(Mode::Big(8_000_000));
    let (status, out) = post(&gw, "/v1/chat/completions", &crate::support::chat("gpt-4o-mini", "a lot")).await;
    assert_eq!(status, 200, "{}", out.to_string().chars().take(300).collect::<String>());
    assert_eq!(out["choices"][0]["message"]["content"].as_str().map(str::len), Some(8_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compile_bomb_and_a_blocking_info_are_refused_while_everything_else_goes_on() {
    let mock = MockUpstream::start("up").await;
    let mut gw = Gateway::start_with(
        &["openai.wasm", "weighted.wasm", "round-robin.wasm"],
        "call_timeout_ms = 2000",
        &channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], ""),
    );
    let bomb = std::fs::read(artifact("compile-bomb.wasm")).expect("bomb");
    let (status, err) = upload(&gw, "bomb", bomb.clone()).await;
    assert_eq!(status, 400, "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("more than 50000 functions"), "{message}");

    // A plugin whose info() sleeps: its upload takes the time limit, and
    // meanwhile requests are served and another plugin is deleted at once.
    let slow = std::fs::read(artifact("slow-info.wasm")).expect("slow-info");
    let pending = tokio::spawn({
        let url = gw.url("/api/plugins/slow");
        async move {
            let resp = client().put(url).bearer_auth(ADMIN).body(slow).send().await.expect("send");
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    });
    // Wait until the load is under way (its info() call is sleeping).
    let loading = crate::support::eventually(Duration::from_secs(10), || async {
        std::fs::read_dir(&gw.plugins_dir)
            .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains(".slow.")))
    })
    .await;
    assert!(loading.is_some(), "the upload started");
    let started = Instant::now();
    let (status, _) = admin(&gw, Method::DELETE, "/api/plugins/round-robin", None).await;
    assert_eq!(status, 204);
    eprintln!("DELETE of another plugin during a blocked load took {:?}", started.elapsed());
    assert!(!pending.is_finished(), "the delete did not wait for the blocked load");
    for _ in 0..5 {
        assert_eq!(post(&gw, "/v1/chat/completions", &crate::support::chat("gpt-4o-mini", "hi")).await.0, 200);
    }
    let (status, err) = pending.await.expect("upload");
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("time limit")), "{err}");
    assert!(gw.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compilation_is_bounded_in_memory_and_time() {
    let mock = MockUpstream::start("up").await;
    let gw = Gateway::start_with(
        &["openai.wasm", "weighted.wasm"],
        "max_plugin_functions = 1000000\ncompile_memory_mib = 256\ncompile_timeout_secs = 20",
        &channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], ""),
    );
    let rss_before = gw.rss();
    let bomb = std::fs::read(artifact("compile-bomb.wasm")).expect("bomb");
    let (status, err) = upload(&gw, "bomb", bomb).await;
    assert_eq!(status, 400, "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default().to_string();
    eprintln!("compile bomb with the function limit raised: {message}");
    assert!(
        message.contains("MiB") || message.contains("longer than") || message.contains("compilation failed"),
        "{message}"
    );
    let rss_after = gw.rss();
    assert!(rss_after < rss_before + (100 << 20), "compiling happened elsewhere: {rss_before} -> {rss_after}");
    assert_eq!(post(&gw, "/v1/chat/completions", &crate::support::chat("gpt-4o-mini", "hi")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_and_deletes_leave_file_registry_and_cache_consistent() {
    let mock = MockUpstream::start("up").await;
    // watch = false: only the API changes plugins; the cache is the gateway's own.
    let gw = Gateway::start_with(
        &["weighted.wasm"],
        "watch = false\n# own cache",
        &channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], ""),
    );
    let bytes = std::fs::read(artifact("openai.wasm")).expect("openai");
    let uploads = futures_util::stream::iter(0..30)
        .map(|_| upload(&gw, "openai", bytes.clone()))
        .buffer_unordered(30)
        .collect::<Vec<_>>()
        .await;
    assert!(uploads.iter().all(|(s, _)| *s == 200), "{:?}", uploads.iter().map(|u| u.0).collect::<Vec<_>>());
    assert!(gw.plugins_dir.join("openai.wasm").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&gw.plugins_dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".upload"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let cache = gw.data_dir.join("plugin-cache");
    let cached = || std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert_eq!(cached(), 2, "weighted and openai are cached");

    for round in 0..20 {
        let (up, del) =
            tokio::join!(upload(&gw, "openai", bytes.clone()), admin(&gw, Method::DELETE, "/api/plugins/openai", None));
        // Whatever the order, the file and the registry agree afterwards.
        let listed = admin(&gw, Method::GET, "/api/plugins/openai", None).await.0 == 200;
        let on_disk = gw.plugins_dir.join("openai.wasm").exists();
        assert_eq!(listed, on_disk, "round {round}: upload {} delete {}", up.0, del.0);
        let (status, _) = admin(&gw, Method::DELETE, "/api/plugins/openai", None).await;
        assert!(status == 204 || status == 404);
        assert!(!gw.plugins_dir.join("openai.wasm").exists(), "round {round}: a deleted plugin's file stayed");
    }
    assert_eq!(cached(), 1, "the deleted plugin's compiled artifact is gone; weighted's stays");
    // A rejected upload leaves nothing in the cache either.
    let (status, _) = upload(&gw, "alien", std::fs::read(artifact("alien-world.wasm")).expect("alien")).await;
    assert_eq!(status, 400);
    assert_eq!(cached(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_test_against_a_dripping_upstream_ends_at_the_probe_limit() {
    let mock = MockUpstream::start("drip").await;
    mock.set_mode(Mode::Slow(Duration::from_secs(60)));
    let gw = Gateway::start(
        &["openai.wasm"],
        &format!(
            "[health]\nprobe_timeout_secs = 1\n{}",
            channel("d", "openai", &mock.base_url(), &["gpt-4o-mini"], "")
        ),
    );
    let (status, out) = admin(&gw, Method::POST, "/api/channels/1/test", None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!((out["success"].as_bool(), out["error_kind"].as_str()), (Some(false), Some("transient")), "{out}");
    assert!(out["message"].as_str().is_some_and(|m| m.contains("did not finish")), "{out}");
}
