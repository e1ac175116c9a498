//! OpenAI compatibility checked by the official `openai` Python SDK against
//! the real gateway, `openai.wasm` and a loopback mock upstream. The SDK is
//! installed by `cargo xtask test` (WASMGATE_TEST_PYTHON points at it).

use crate::support::{Gateway, MockUpstream, TOKEN, channel, run_python};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_openai_python_sdk_works_against_the_gateway() {
    let mock = MockUpstream::start("mock").await;
    let models = ["gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small"];
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &channel("a", "openai", &mock.base_url(), &models, ""));
    let env = vec![("WASMGATE_BASE_URL", gw.url("/v1")), ("WASMGATE_API_KEY", TOKEN.to_string())];
    let stdout = run_python("openai_sdk_check.py", env).await;
    assert!(stdout.contains(" 7 passed, 0 failed"), "{stdout}");
}
