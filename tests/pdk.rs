//! The PDKs as a third-party author uses them: the WIT they vendor is the
//! contract's, and crates `wasmgate plugin new` writes outside this
//! repository (no workspace of ours above them), built the documented way
//! (xtask/src/standalone.rs), pass `plugin check` and serve.

use std::process::Command;

use crate::support::{Gateway, MockUpstream, artifact, channel, chat, post, root};

#[test]
fn the_vendored_wit_is_the_contract_and_the_kits_say_which() {
    let contract = root().join("wit");
    let mut files: Vec<_> =
        std::fs::read_dir(&contract).expect("wit/").map(|e| e.expect("entry").file_name()).collect();
    files.sort();
    let package = std::fs::read_to_string(contract.join("types.wit")).expect("types.wit");
    let version =
        package.lines().next().and_then(|l| l.strip_prefix("package wasmgate:plugin@")).expect("package line");
    let version = version.trim_end_matches(';');
    for kit in ["plugins/pdk", "plugins/pdk-router", "plugins/pdk-filter"] {
        let vendored = root().join(kit).join("wit");
        let mut theirs: Vec<_> =
            std::fs::read_dir(&vendored).expect("vendored wit").map(|e| e.expect("entry").file_name()).collect();
        theirs.sort();
        assert_eq!(theirs, files, "{kit}/wit must hold exactly the contract's files");
        for f in &files {
            let (a, b) =
                (std::fs::read(contract.join(f)).expect("read"), std::fs::read(vendored.join(f)).expect("read"));
            assert!(a == b, "{kit}/wit/{} differs from wit/: copy wit/*.wit into {kit}/wit", f.to_string_lossy());
        }
        let manifest = std::fs::read_to_string(root().join(kit).join("Cargo.toml")).expect("manifest");
        assert!(!manifest.contains(".workspace = true"), "{kit} must build outside the workspace");
        assert!(manifest.contains(&format!("version = \"{version}\"")), "{kit}'s version follows the contract's");
        assert!(manifest.contains(&format!("contract = \"wasmgate:plugin@{version}\"")), "{kit} names its contract");
        let lib = std::fs::read_to_string(root().join(kit).join("src/lib.rs")).expect("lib.rs");
        assert!(lib.contains(&format!("pub const CONTRACT: &str = \"wasmgate:plugin@{version}\";")), "{kit}");
    }
}

/// `wasmgate plugin new KIND NAME --dir DIR --kits plugins/`; the crate's path.
fn scaffold(kind: &str, name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["plugin", "new", kind, name, "--dir"])
        .arg(dir)
        .arg("--kits")
        .arg(root().join("plugins"))
        .output()
        .expect("plugin new");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.join(name)
}

/// Build a standalone crate the documented way (`cargo xtask component`,
/// i.e. `cargo build --target wasm32-wasip2`, or the project's fallback)
/// into `target/wasm-fixtures/NAME.wasm`.
fn build(crate_dir: &std::path::Path, name: &str) {
    let xtask = root().join("target/debug/xtask");
    assert!(xtask.exists(), "run the suite with `cargo xtask test` (it builds xtask)");
    let dest = root().join(format!("target/wasm-fixtures/{name}.wasm"));
    let out = Command::new(xtask).arg("component").arg(crate_dir).arg(&dest).output().expect("xtask component");
    assert!(out.status.success(), "building {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_new_scaffolds_an_adapter_a_policy_and_a_filter_that_build_check_and_serve() {
    let dir = tempfile::tempdir().expect("tmp");
    let adapter = scaffold("adapter", "acme-new", dir.path());
    let policy = scaffold("router", "calm-policy", dir.path());
    let filter = scaffold("filter", "tag-filter", dir.path());
    let (a, p, f) = (adapter.clone(), policy.clone(), filter.clone());
    tokio::task::spawn_blocking(move || {
        build(&a, "acme-new");
        build(&p, "calm-policy");
        build(&f, "tag-filter");
    })
    .await
    .expect("build");
    for name in ["acme-new", "calm-policy", "tag-filter"] {
        let file = artifact(&format!("{name}.wasm"));
        let out =
            Command::new(env!("CARGO_BIN_EXE_wasmgate")).args(["plugin", "check"]).arg(&file).output().expect("check");
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && report.contains("result: PASS"), "{name}:\n{report}");
    }
    let mock = MockUpstream::start("scaffolded").await;
    let tenant = "settings = { tenant = \"t-42\" }\n";
    let toml = format!(
        "[routing]\npolicy = \"calm-policy\"\n{}{}\n[[filters]]\nplugin = \"tag-filter\"\nsettings = {{ tag = \"t1\" }}\n",
        channel("one", "acme-new", &mock.base_url(), &["gpt-4o-mini"], tenant),
        channel("two", "acme-new", &mock.base_url(), &["gpt-4o-mini"], tenant)
    );
    let plugins = ["acme-new.wasm", "calm-policy.wasm", "tag-filter.wasm", "weighted.wasm"];
    let gw = Gateway::start(&plugins, &toml);
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "scaffolded")).await;
    assert_eq!(status, 200, "{body}");
    // The scaffolded filter ran on the answer, and refuses an empty prompt.
    assert_eq!(body["x_filter_tag"], "t1", "{body}");
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", " ")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("empty_prompt")), "{body}");
    let headers = mock.state.last_headers.lock().await.clone().expect("upstream headers");
    // The author's code ran: the key moved to `x-api-key`, the tenant header added.
    assert_eq!(headers.get("x-acme-new-tenant").map(|v| v.as_bytes()), Some(&b"t-42"[..]));
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(key.starts_with("sk-upstream-secret-") && headers.get("authorization").is_none(), "{headers:?}");
    let (_, plugins) = crate::support::admin(&gw, reqwest::Method::GET, "/api/plugins", None).await;
    let policy = plugins["data"].as_array().and_then(|d| d.iter().find(|p| p["name"] == "calm-policy").cloned());
    assert!(policy.is_some_and(|p| p["calls"].as_u64() >= Some(2)), "the scaffolded policy routed the request");
}
