//! The contract is language-neutral: an adapter written in Python
//! (`examples/python-adapter`, componentize-py) and a filter written in
//! JavaScript (`examples/js-filter`, componentize-js), built by
//! `cargo xtask test` from PyPI and npm, pass `plugin check` and serve
//! through the gateway — the Python adapter under the official `openai`
//! SDK's suite, the JavaScript filter on requests, answers and streams.

use std::process::Command;

use crate::support::{Gateway, MockUpstream, TOKEN, artifact, channel, chat, post, run_python};

/// `plugin check`, taking the code the gateway compiled from the suite's
/// shared cache (these components are 12–18 MB: compiling one takes a
/// while in the debug build).
fn check(file: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["plugin", "check"])
        .arg(artifact(file))
        .arg("--cache-dir")
        .arg(crate::support::root().join("target/test-plugin-cache"))
        .output()
        .expect("plugin check");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(out.status.success() && report.contains("result: PASS"), "{file}:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_adapter_and_a_javascript_filter_check_and_serve() {
    let mock = MockUpstream::start("mock").await;
    let models = ["gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small", "js-model"];
    let rule = "[[filters]]\nplugin = \"js-clamp\"\nmodels = [\"js-model\"]\n\
                settings = { max_tokens = 50, replace = { \"echo\" = \"ECHO\" } }\n";
    let toml = format!("{}{rule}", channel("py", "py-openai", &mock.base_url(), &models, ""));
    // Compiling these components in the debug build on a fresh, busy CI
    // machine can take minutes; the production limit (60 s) is for release
    // builds.
    let gw =
        Gateway::start_with(&["py-openai.wasm", "js-clamp.wasm", "weighted.wasm"], "compile_timeout_secs = 900", &toml);
    // Both components loaded before anything else, so that `plugin check`
    // takes their compiled code from the shared cache instead of compiling
    // them a second time alongside the gateway.
    for plugin in ["py-openai", "js-clamp"] {
        let path = format!("/api/plugins/{plugin}");
        let loaded = crate::support::eventually(std::time::Duration::from_secs(900), || async {
            let (_, status) = crate::support::admin(&gw, reqwest::Method::GET, &path, None).await;
            // Settled: in service, or rejected (then the assert says why).
            status["loaded"] == true || !status["last_error"].is_null()
        })
        .await;
        let (_, status) = crate::support::admin(&gw, reqwest::Method::GET, &path, None).await;
        assert!(loaded.is_some() && status["loaded"] == true, "{plugin} never loaded: {status}\n{}", gw.log());
    }
    tokio::task::spawn_blocking(|| {
        check("py-openai.wasm");
        check("js-clamp.wasm");
    })
    .await
    .expect("checks");

    // The official SDK's whole suite through the Python adapter.
    let env = vec![("WASMGATE_BASE_URL", gw.url("/v1")), ("WASMGATE_API_KEY", TOKEN.to_string())];
    let stdout = run_python("openai_sdk_check.py", env).await;
    assert!(stdout.contains(" 7 passed, 0 failed"), "{stdout}\n{}", gw.log());

    // The JavaScript filter clamps the request and rewrites the answer.
    let mut body = chat("js-model", "hello js");
    body["max_tokens"] = 500.into();
    let (status, answer) = post(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "ECHO: hello js", "{answer}");
    let sent = mock.state.last_body.lock().await.clone().expect("upstream body");
    assert_eq!(sent["max_tokens"], 50, "{sent}");
    let headers = mock.state.last_headers.lock().await.clone().expect("headers");
    assert_eq!(headers.get("x-js-filter").and_then(|v| v.to_str().ok()), Some("js-clamp"));

    // Streamed: every chunk went through the filter.
    body["stream"] = true.into();
    let resp = crate::support::send(&gw, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let sse = resp.text().await.expect("stream");
    let text = crate::support::stream_text(&sse);
    assert_eq!(text, "ECHO: hello js", "{sse}");
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
}
