//! OpenAI compatibility checked by the official `openai` Python SDK against
//! the real gateway, `openai.wasm` and a loopback mock upstream. The SDK is
//! installed by `cargo xtask test` (WASMGATE_TEST_PYTHON points at it).

use std::process::Command;

use crate::support::{Gateway, MockUpstream, TOKEN, channel};

pub(crate) fn python() -> String {
    match std::env::var("WASMGATE_TEST_PYTHON") {
        Ok(p) => p,
        Err(_) => {
            let venv = crate::support::root().join("target/py-venv/bin/python");
            assert!(venv.exists(), "no Python with the openai SDK: run the suite with `cargo xtask test`");
            venv.to_string_lossy().into_owned()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_openai_python_sdk_works_against_the_gateway() {
    let mock = MockUpstream::start("mock").await;
    let models = ["gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small"];
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &channel("a", "openai", &mock.base_url(), &models, ""));
    let script = crate::support::root().join("tests/python/openai_sdk_check.py");
    let base = gw.url("/v1");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .env("WASMGATE_BASE_URL", base)
            .env("WASMGATE_API_KEY", TOKEN)
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "openai SDK checks failed:\n{stdout}");
    assert!(stdout.contains(" 7 passed, 0 failed"), "{stdout}");
}
