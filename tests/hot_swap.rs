//! Hot swap: replacing, breaking, deleting and uploading plugins while the
//! gateway serves, with no restart and no failed request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{
    ADMIN, Gateway, MockUpstream, TOKEN, artifact, assert_openai_error, channel, client, eventually, post,
};
use serde_json::{Value, json};

const V2_MARKER: &str = "wasmgate-hotswap-v2";

async fn setup() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start("v1").await;
    let gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &channel("a", "openai", &mock.base_url(), &["gpt-4o-mini"], ""),
    );
    (mock, gw)
}

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "which version?"}]})
}

async fn plugins(gw: &Gateway) -> Value {
    client().get(gw.url("/api/plugins")).bearer_auth(ADMIN).send().await.expect("send").json().await.expect("json")
}

async fn plugin(gw: &Gateway, name: &str) -> Option<Value> {
    plugins(gw).await["data"].as_array().and_then(|list| list.iter().find(|p| p["name"] == name).cloned())
}

/// Which version served: v2 marks `system_fingerprint` (in every chunk too).
fn served_by_v2(text: &str) -> bool {
    text.contains(V2_MARKER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swap_under_load_fails_no_request_and_serves_v2_within_2s() {
    let (_mock, gw) = setup().await;
    let gw = Arc::new(gw);
    const TOTAL: usize = 2000;
    const CONCURRENCY: usize = 16;
    let started = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (gw, started, done) = (gw.clone(), started.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut results = Vec::new();
            loop {
                let n = started.fetch_add(1, Ordering::SeqCst);
                if n >= TOTAL {
                    break;
                }
                let stream = n % 4 == 0;
                let mut body = chat();
                body["stream"] = json!(stream);
                let sent_at = t0.elapsed();
                let outcome = match c.post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&body).send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let text = resp.text().await.unwrap_or_default();
                        let complete = !stream || text.ends_with("data: [DONE]\n\n");
                        (status, complete, served_by_v2(&text))
                    }
                    Err(_) => (0, false, false),
                };
                results.push((sent_at, outcome));
                done.fetch_add(1, Ordering::SeqCst);
            }
            results
        }));
    }
    // Swap once a good share of the load has gone through.
    while done.load(Ordering::SeqCst) < 400 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let swapped_at = t0.elapsed();
    gw.install_plugin("openai-v2.wasm", "openai.wasm");

    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await.expect("worker"));
    }
    assert_eq!(results.len(), TOTAL);
    let failed: Vec<_> = results.iter().filter(|(_, (status, complete, _))| *status != 200 || !complete).collect();
    assert!(
        failed.is_empty(),
        "{} of {TOTAL} requests failed during the swap: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    let first_v2 = results.iter().filter(|(_, (_, _, v2))| *v2).map(|(at, _)| *at).min().expect("v2 never served");
    let v1_count = results.iter().filter(|(_, (_, _, v2))| !*v2).count();
    let switch = first_v2.saturating_sub(swapped_at);
    println!(
        "swap: {v1_count} requests on v1, {} on v2; first v2 request sent {switch:?} after the file was replaced",
        TOTAL - v1_count
    );
    assert!(switch <= Duration::from_secs(2), "v2 took {switch:?} to serve");
    // Every request sent 2 s after the swap was served by v2.
    let late_v1 = results.iter().filter(|(at, (_, _, v2))| *at > swapped_at + Duration::from_secs(2) && !*v2).count();
    assert_eq!(late_v1, 0, "requests still served by v1 2 s after the swap");
    let status = plugin(&gw, "openai").await.expect("openai listed");
    assert_eq!(status["version"], "0.2.0-hotswap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_files_are_rejected_and_the_old_version_keeps_serving() {
    let (_mock, gw) = setup().await;
    let good_sha = plugin(&gw, "openai").await.expect("loaded")["sha256"].clone();
    let component = std::fs::read(artifact("openai.wasm")).expect("read");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", b"definitely not wasm at all".to_vec(), "not a WebAssembly file"),
        ("truncated component", component[..component.len() / 2].to_vec(), "not a valid WebAssembly component"),
        ("core module", b"\0asm\x01\0\0\0".to_vec(), "core WebAssembly module"),
        (
            "wrong world (a router as an adapter)",
            std::fs::read(artifact("weighted.wasm")).expect("read"),
            "in service as Adapter",
        ),
    ];
    for (name, bytes, expected) in cases {
        gw.write_plugin("openai.wasm", &bytes);
        let sha = Value::String(wasmgate::plugins::sha256_hex(&bytes));
        let rejected = eventually(Duration::from_secs(5), || async {
            plugin(&gw, "openai").await.is_some_and(|p| p["last_error_sha256"] == sha)
        })
        .await;
        assert!(rejected.is_some(), "{name}: never reported as rejected");
        let status = plugin(&gw, "openai").await.expect("still listed");
        let error = status["last_error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(expected), "{name}: unexpected error {error:?}");
        assert_eq!(status["sha256"], good_sha, "{name}: the old version must stay in service");
        assert_eq!(status["loaded"], true);
        let (code, body) = post(&gw, "/v1/chat/completions", &chat()).await;
        assert_eq!(code, 200, "{name}: old version must keep serving: {body}");
        assert!(gw.log().contains("plugin rejected"), "{name}: rejection must be logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_unloads_with_a_clear_503_and_restoring_serves_again() {
    let (_mock, gw) = setup().await;
    std::fs::remove_file(gw.plugins_dir.join("openai.wasm")).expect("rm");
    let unloaded = eventually(Duration::from_secs(5), || async { plugin(&gw, "openai").await.is_none() }).await;
    assert!(unloaded.is_some(), "plugin still listed after deletion");
    let (code, body) = post(&gw, "/v1/chat/completions", &chat()).await;
    assert_eq!(code, 503, "{body}");
    assert_openai_error(&body);
    assert_eq!(body["error"]["code"], "adapter_unavailable");

    gw.install_plugin("openai.wasm", "openai.wasm");
    let back =
        eventually(Duration::from_secs(5), || async { post(&gw, "/v1/chat/completions", &chat()).await.0 == 200 })
            .await;
    assert!(back.is_some(), "restored plugin never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_plugin_api_uploads_validates_and_deletes() {
    let (_mock, gw) = setup().await;
    let c = client();
    for auth in [None, Some("sk-wrong"), Some(TOKEN)] {
        let mut req = c.get(gw.url("/api/plugins"));
        if let Some(a) = auth {
            req = req.bearer_auth(a);
        }
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status(), 401, "admin API with {auth:?}");
        assert_openai_error(&resp.json().await.expect("json"));
    }
    let list = plugins(&gw).await;
    assert_eq!(list["wit"], format!("wasmgate:plugin@{}", wasmgate::plugins::WIT_VERSION));
    let openai = plugin(&gw, "openai").await.expect("listed");
    for key in ["name", "kind", "version", "sha256", "loaded_at", "last_error"] {
        assert!(openai.get(key).is_some(), "plugin status lacks {key}: {openai}");
    }
    assert_eq!(openai["kind"], "adapter");
    assert_eq!(plugin(&gw, "weighted").await.expect("listed")["kind"], "router");

    // Upload v2 over the running adapter.
    let v2 = std::fs::read(artifact("openai-v2.wasm")).expect("read");
    let resp = c.put(gw.url("/api/plugins/openai")).bearer_auth(ADMIN).body(v2.clone()).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let status: Value = resp.json().await.expect("json");
    assert_eq!(status["version"], "0.2.0-hotswap");
    let (_, body) = post(&gw, "/v1/chat/completions", &chat()).await;
    assert_eq!(body["system_fingerprint"], V2_MARKER, "uploaded version serves at once");
    assert_eq!(
        std::fs::read(gw.plugins_dir.join("openai.wasm")).expect("saved"),
        v2,
        "upload is saved to the plugins dir"
    );

    // A bad upload is refused and changes nothing.
    let resp = c.put(gw.url("/api/plugins/openai")).bearer_auth(ADMIN).body("garbage").send().await.expect("send");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_plugin");
    let (_, body) = post(&gw, "/v1/chat/completions", &chat()).await;
    assert_eq!(body["system_fingerprint"], V2_MARKER);
    let resp = c.put(gw.url("/api/plugins/Bad%20Name")).bearer_auth(ADMIN).body(v2).send().await.expect("send");
    assert_eq!(resp.status(), 400);

    let one = c.get(gw.url("/api/plugins/openai")).bearer_auth(ADMIN).send().await.expect("send");
    assert_eq!(one.status(), 200);
    let resp = c.delete(gw.url("/api/plugins/openai")).bearer_auth(ADMIN).send().await.expect("send");
    assert_eq!(resp.status(), 204);
    assert!(!gw.plugins_dir.join("openai.wasm").exists());
    let resp = c.delete(gw.url("/api/plugins/openai")).bearer_auth(ADMIN).send().await.expect("send");
    assert_eq!(resp.status(), 404);
    let (code, _) = post(&gw, "/v1/chat/completions", &chat()).await;
    assert_eq!(code, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_loads_plugins_from_the_compiled_cache() {
    let (_mock, mut gw) = setup().await;
    gw.restart();
    let status = plugin(&gw, "openai").await.expect("listed");
    assert_eq!(status["from_cache"], true, "{status}");
    let (code, _) = post(&gw, "/v1/chat/completions", &chat()).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cargo_component_style_wasip1_build_loads_and_serves() {
    let mock = MockUpstream::start("p1").await;
    let gw = Gateway::start(
        &["openai-wasip1.wasm:openai.wasm"],
        &channel("a", "openai", &mock.base_url(), &["gpt-4o-mini"], ""),
    );
    let status = plugin(&gw, "openai").await.expect("listed");
    assert_eq!(status["loaded"], true, "{status}");
    let (code, body) = post(&gw, "/v1/chat/completions", &chat()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: which version?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_built_against_another_wit_version_is_refused_clearly() {
    let (_mock, gw) = setup().await;
    gw.install_plugin("future-wit.wasm", "future.wasm");
    let seen = eventually(Duration::from_secs(5), || async { plugin(&gw, "future").await.is_some() }).await;
    assert!(seen.is_some(), "the file was never reported");
    let status = plugin(&gw, "future").await.expect("listed");
    assert_eq!(status["loaded"], false, "{status}");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("wasmgate:plugin@0.2.0") && error.contains("supports wasmgate:plugin@0.1.x"),
        "unclear rejection: {error}"
    );
    let (code, _) = post(&gw, "/v1/chat/completions", &chat()).await;
    assert_eq!(code, 200, "other plugins keep serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_refused_for_a_kind_clash_loads_once_the_clash_is_gone() {
    let (_mock, gw) = setup().await;
    let c = client();
    let router = std::fs::read(artifact("weighted.wasm")).expect("read");
    let put = || c.put(gw.url("/api/plugins/openai")).bearer_auth(ADMIN).body(router.clone()).send();
    assert_eq!(put().await.expect("send").status(), 400, "a router cannot replace an adapter in service");
    let resp = c.delete(gw.url("/api/plugins/openai")).bearer_auth(ADMIN).send().await.expect("send");
    assert_eq!(resp.status(), 204);
    let resp = put().await.expect("send");
    assert_eq!(resp.status(), 200, "the same bytes load once nothing clashes");
    let status: Value = resp.json().await.expect("json");
    assert_eq!(status["kind"], "router");
}
