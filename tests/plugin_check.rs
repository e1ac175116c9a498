//! `wasmgate plugin check`: the real binary on the real plugin files.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{artifact, root};

/// Run `wasmgate plugin check FILE [--fixtures DIR]`: (exit success, stdout).
fn check(file: &Path, fixtures: Option<PathBuf>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmgate"));
    cmd.args(["plugin", "check"]).arg(file);
    if let Some(dir) = fixtures {
        cmd.arg("--fixtures").arg(dir);
    }
    let out = cmd.output().expect("run wasmgate plugin check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), stdout)
}

#[test]
fn every_shipped_adapter_passes_with_its_recorded_examples() {
    for provider in ["anthropic", "gemini", "baidu", "qwen", "ollama", "azure", "openai"] {
        let dir = root().join("tests/fixtures/providers").join(provider);
        let (ok, out) = check(&artifact(&format!("{provider}.wasm")), dir.exists().then_some(dir));
        println!("{out}");
        assert!(ok, "{provider} failed its conformance suite:\n{out}");
        assert!(out.contains(&format!("adapter `{provider}`")) && out.contains("result: PASS"), "{out}");
        assert!(!out.contains("FAIL"), "{out}");
        if provider != "openai" {
            assert!(out.contains("recorded stream, split every 7 bytes"), "fixtures were not run:\n{out}");
            assert!(out.contains("as expect.json says"), "expect.json was not compared:\n{out}");
        }
    }
}

#[test]
fn a_recorded_example_that_translates_wrong_fails_and_says_how() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = root().join("tests/fixtures/providers/anthropic");
    for f in ["chat.json", "stream.sse"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let expect = r#"{"text": "Something else", "completion_tokens": 9, "stream_completion_tokens": 70}"#;
    std::fs::write(dir.path().join("expect.json"), expect).expect("expect");
    let (ok, out) = check(&artifact("anthropic.wasm"), Some(dir.path().to_path_buf()));
    assert!(!ok, "{out}");
    assert!(out.contains("text: expected \"Something else\", got \"Hello! How can I help you today?\""), "{out}");
    assert!(!out.contains("completion_tokens: expected 9"), "a matching count is not reported:\n{out}");
    assert!(out.contains("stream_completion_tokens: expected 70, got 7"), "{out}");
}

#[test]
fn every_shipped_policy_passes() {
    for policy in ["weighted", "round-robin", "latency", "affinity", "cheapest"] {
        let (ok, out) = check(&artifact(&format!("{policy}.wasm")), None);
        println!("{out}");
        assert!(ok && out.contains(&format!("router `{policy}`")), "{out}");
        assert!(out.contains("PASS  select: the same seed and candidates give the same order"), "{out}");
    }
}

#[test]
fn cargo_component_style_and_older_contract_builds_pass() {
    // WASI preview 1 + adapter (what `cargo component build` produces), and
    // components built against wasmgate:plugin@0.1.0.
    let files = [
        artifact("openai-wasip1.wasm"),
        root().join("tests/fixtures/compat/openai-wit-0.1.0.wasm"),
        root().join("tests/fixtures/compat/weighted-wit-0.1.0.wasm"),
    ];
    for file in files.into_iter().chain(cargo_component_builds()) {
        let (ok, out) = check(&file, None);
        println!("{out}");
        assert!(ok, "{}:\n{out}", file.display());
    }
}

#[test]
fn incompatible_or_broken_files_fail_with_a_clear_reason() {
    let (ok, out) = check(&artifact("future-wit.wasm"), None);
    assert!(!ok && out.contains("built against wasmgate:plugin@0.2.0") && out.contains("result: FAIL"), "{out}");
    let (ok, out) = check(&artifact("alien-world.wasm"), None);
    assert!(!ok && out.contains("wrong world"), "{out}");
    let dir = tempfile::tempdir().expect("tempdir");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let (ok, out) = check(&core, None);
    assert!(!ok && out.contains("not a component"), "{out}");
    let (ok, out) = check(&dir.path().join("missing.wasm"), None);
    assert!(!ok && out.contains("FAIL  read the file"), "{out}");
    // A policy that returns bad indices fails its suite.
    let (ok, out) = check(&artifact("bad-policy.wasm"), None);
    assert!(!ok && out.contains("FAIL  select: valid"), "{out}");
}

/// The template crate built by `cargo component build` (WASI preview 1
/// with the preview 1 adapter inside): the fresh build when xtask could make
/// one (cargo-component installed), and always the golden build.
fn cargo_component_builds() -> Vec<PathBuf> {
    let fresh = root().join("target/wasm-fixtures/acme-cargo-component.wasm");
    let golden = root().join("tests/fixtures/compat/acme-cargo-component.wasm");
    [fresh, golden].into_iter().filter(|p| p.exists()).collect()
}

/// The template crate (`plugins/template`, the tutorial's adapter), built
/// as a core module componentized by the project's build and by
/// `cargo component build`, passes `plugin check` and serves through the
/// gateway with its own headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_adapter_passes_and_serves_whichever_way_it_was_built() {
    let builds: Vec<PathBuf> = std::iter::once(artifact("acme.wasm")).chain(cargo_component_builds()).collect();
    assert!(builds.len() >= 2, "no cargo-component build of the template: {builds:?}");
    for build in builds {
        println!("template build: {}", build.display());
        serve_through_template(&build).await;
    }
}

async fn serve_through_template(build: &Path) {
    let (ok, out) = check(build, None);
    assert!(ok && out.contains("adapter `acme`"), "{out}");

    let mock = crate::support::MockUpstream::start("acme-upstream").await;
    let extra = "[channels.settings]\ntenant = \"team-7\"\n";
    let ch = crate::support::channel("acme", "acme", &mock.base_url(), &["acme-chat"], extra);
    let gw = crate::support::Gateway::start(&["weighted.wasm"], &ch);
    gw.write_plugin("acme.wasm", &std::fs::read(build).expect("read the build"));
    let loaded = crate::support::eventually(std::time::Duration::from_secs(10), || async {
        crate::support::post(&gw, "/v1/chat/completions", &crate::support::chat("acme-chat", "probe")).await.0 == 200
    })
    .await;
    assert!(loaded.is_some(), "the build never served: {}", gw.log());
    let (status, body) =
        crate::support::post(&gw, "/v1/chat/completions", &crate::support::chat("acme-chat", "hi acme")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hi acme");
    let headers = mock.state.last_headers.lock().await.clone().expect("headers");
    assert_eq!(headers["x-api-key"], "sk-upstream-secret-acme");
    assert_eq!(headers["x-acme-tenant"], "team-7");
    assert!(headers.get("authorization").is_none());
}
