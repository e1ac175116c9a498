//! Every provider adapter end to end: the real gateway binary with the real
//! adapter components, a loopback mock of each provider's own API serving
//! recorded examples (`tests/fixtures/providers/`), and the official `openai`
//! Python SDK as the client. Then what each provider received is checked
//! field by field, and Baidu's token exchange is checked under load.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::providers::{KEYS, ProviderMock, Recorded};
use crate::support::{Gateway, TOKEN, admin, chat, post, run_python};

const PROVIDERS: &[&str] = &["anthropic", "gemini", "baidu", "qwen", "ollama", "azure"];

pub(crate) fn expect(provider: &str) -> Value {
    let path = crate::support::root().join(format!("tests/fixtures/providers/{provider}/expect.json"));
    serde_json::from_slice(&std::fs::read(path).expect("expect.json")).expect("expect JSON")
}

/// A channel for `provider` on the mock, offering the models its
/// `expect.json` names.
pub(crate) fn provider_channel(mock: &ProviderMock, provider: &str) -> String {
    let e = expect(provider);
    let models: Vec<String> = ["model", "fail_model", "embed_model", "blocked_model"]
        .iter()
        .filter_map(|k| e.get(*k).and_then(Value::as_str))
        .map(|m| format!("{m:?}"))
        .collect();
    let key = KEYS.iter().find(|(p, _)| *p == provider).map_or("", |(_, k)| k);
    format!(
        "[[channels]]\nname = {provider:?}\nadapter = {provider:?}\nbase_url = {:?}\nkey = {key:?}\nmodels = [{}]\n",
        mock.base_url(provider),
        models.join(", ")
    )
}

fn all_adapters() -> Vec<String> {
    PROVIDERS.iter().map(|p| format!("{p}.wasm")).chain(["weighted.wasm".to_string()]).collect()
}

fn start_gateway(mock: &ProviderMock) -> Gateway {
    let channels: String = PROVIDERS.iter().map(|p| provider_channel(mock, p)).collect();
    let plugins = all_adapters();
    let plugins: Vec<&str> = plugins.iter().map(String::as_str).collect();
    Gateway::start(&plugins, &channels)
}

/// The last request `provider` received whose path contains `fragment`
/// and whose body matches `pred`.
fn received(mock: &ProviderMock, provider: &str, fragment: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
    let all = mock.requests(provider);
    all.iter()
        .rev()
        .find(|r| r.path.contains(fragment) && pred(r))
        .cloned()
        .unwrap_or_else(|| panic!("{provider} received no request on {fragment}: {all:#?}"))
}

fn has_header(r: &Recorded, name: &str, value: &str) -> bool {
    r.headers.iter().any(|(k, v)| k == name && v == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_adapter_passes_its_fixture_suite_with_the_openai_sdk() {
    let mock = ProviderMock::start().await;
    let gw = start_gateway(&mock);
    let fixtures = crate::support::root().join("tests/fixtures/providers").to_string_lossy().into_owned();
    let env = vec![
        ("WASMGATE_BASE_URL", gw.url("/v1")),
        ("WASMGATE_API_KEY", TOKEN.to_string()),
        ("WASMGATE_FIXTURES", fixtures),
        ("WASMGATE_PROVIDERS", PROVIDERS.join(",")),
    ];
    let stdout = run_python("provider_check.py", env).await;
    assert!(stdout.contains(&format!("{} passed, 0 failed", PROVIDERS.len() * 10)), "{stdout}\n{}", gw.log());

    // What each provider actually received from the non-stream check.
    let sent = |r: &Recorded| r.body.to_string().contains("Hello there") && r.body.to_string().contains("END");

    let r = received(&mock, "anthropic", "/v1/messages", sent);
    assert!(has_header(&r, "anthropic-version", "2023-06-01"), "{r:?}");
    assert_eq!(r.body["system"], json!([{"type": "text", "text": "You are terse."}]));
    assert_eq!(r.body["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]));
    assert_eq!((r.body["max_tokens"].clone(), r.body["stop_sequences"].clone()), (json!(64), json!(["END"])));
    assert_eq!((r.body["temperature"].clone(), r.body["top_p"].clone()), (json!(0.5), json!(0.9)));
    let tools = received(&mock, "anthropic", "/v1/messages", |r| {
        r.body.get("tools").is_some() && r.body["messages"].as_array().is_some_and(|m| m.len() == 1)
    });
    assert_eq!(tools.body["tools"][0]["name"], "get_weather");
    assert_eq!(tools.body["tools"][0]["input_schema"]["required"], json!(["location"]));
    assert_eq!(tools.body["tool_choice"], json!({"type": "auto"}));
    let round =
        received(&mock, "anthropic", "/v1/messages", |r| r.body["messages"].as_array().is_some_and(|m| m.len() == 3));
    assert_eq!(round.body["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(round.body["messages"][1]["content"][0]["input"], json!({"location": "Paris"}));
    assert_eq!(round.body["messages"][2]["content"][0]["type"], "tool_result");
    assert_eq!(round.body["messages"][2]["content"][0]["tool_use_id"], "call_1");

    let r = received(&mock, "gemini", ":generateContent", sent);
    assert!(!r.path.contains("key="), "the Gemini key must travel in a header, not the URL: {}", r.path);
    assert!(r.path.starts_with("/v1beta/models/gemini-2.5-flash:generateContent"), "{}", r.path);
    assert_eq!(r.body["systemInstruction"], json!({"parts": [{"text": "You are terse."}]}));
    assert_eq!(r.body["contents"], json!([{"role": "user", "parts": [{"text": "Hello there"}]}]));
    let config = &r.body["generationConfig"];
    assert_eq!((config["maxOutputTokens"].clone(), config["stopSequences"].clone()), (json!(64), json!(["END"])));
    let round =
        received(&mock, "gemini", ":generateContent", |r| r.body["contents"].as_array().is_some_and(|c| c.len() == 3));
    assert_eq!(round.body["contents"][1]["parts"][0]["functionCall"]["name"], "get_weather");
    assert_eq!(
        round.body["contents"][2]["parts"][0]["functionResponse"],
        json!({"name": "get_weather", "response": {"temp_c": 21}})
    );
    let image = received(&mock, "gemini", ":generateContent", |r| r.body.to_string().contains("inlineData"));
    assert_eq!(image.body["contents"][0]["parts"][1]["inlineData"]["mimeType"], "image/png");
    let embed = received(&mock, "gemini", ":batchEmbedContents", |_| true);
    assert_eq!(embed.body["requests"][1]["content"]["parts"][0]["text"], "second text");

    let r = received(&mock, "baidu", "/chat/completions_pro", sent);
    assert!(r.path.contains("access_token=24.mock-token-"), "{}", r.path);
    assert_eq!(r.body["system"], "You are terse.");
    assert_eq!(r.body["messages"], json!([{"role": "user", "content": "Hello there"}]));
    assert_eq!((r.body["max_output_tokens"].clone(), r.body["stop"].clone()), (json!(64), json!(["END"])));
    assert_eq!(mock.token_exchanges(), 1, "one token exchange for the whole suite");

    let r = received(&mock, "qwen", "/api/v1/services/aigc/text-generation/generation", sent);
    assert_eq!(r.body["model"], "qwen-plus");
    assert_eq!(r.body["input"]["messages"][0], json!({"role": "system", "content": "You are terse."}));
    let p = &r.body["parameters"];
    assert_eq!(
        (p["result_format"].clone(), p["max_tokens"].clone(), p["stop"].clone()),
        (json!("message"), json!(64), json!(["END"]))
    );
    let s = received(&mock, "qwen", "/generation", |r| has_header(r, "x-dashscope-sse", "enable"));
    assert_eq!(s.body["parameters"]["incremental_output"], true);

    let r = received(&mock, "ollama", "/api/chat", sent);
    assert_eq!((r.body["model"].clone(), r.body["stream"].clone()), (json!("llama3.2"), json!(false)));
    assert_eq!(r.body["options"], json!({"temperature": 0.5, "top_p": 0.9, "num_predict": 64, "stop": ["END"]}));
    let image = received(&mock, "ollama", "/api/chat", |r| r.body["messages"][0].get("images").is_some());
    assert!(image.body["messages"][0]["images"][0].as_str().is_some_and(|b| b.starts_with("iVBOR")), "{image:?}");
    let round = received(&mock, "ollama", "/api/chat", |r| r.body["messages"].as_array().is_some_and(|m| m.len() == 3));
    assert_eq!(round.body["messages"][1]["tool_calls"][0]["function"]["arguments"], json!({"location": "Paris"}));

    let r = received(&mock, "azure", "/openai/deployments/gpt-4o/chat/completions?api-version=", sent);
    assert!(!r.headers.iter().any(|(k, _)| k == "authorization"), "Azure takes api-key, not a bearer token");
    let s = received(&mock, "azure", "/chat/completions", |r| {
        r.body["stream"] == true && r.body.get("stream_options").is_some()
    });
    assert_eq!(s.body["stream_options"]["include_usage"], true);

    // Every request was billed with the adapter's usage: one log row each.
    let (_, logs) = admin(&gw, reqwest::Method::GET, "/api/logs?model=claude-sonnet-4-5&page_size=100", None).await;
    let rows = logs["data"].as_array().expect("rows");
    assert!(
        rows.iter().any(|r| r["prompt_tokens"] == 16 && r["completion_tokens"] == 9 && r["cached_tokens"] == 4),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn baidu_exchanges_its_token_once_per_expiry_window_under_load() {
    let mock = ProviderMock::start().await;
    mock.set_token_ttl(3);
    let gw = Arc::new(Gateway::start(&["baidu.wasm", "weighted.wasm"], &provider_channel(&mock, "baidu")));

    // 200 requests, 50 at a time, before the first token exists.
    let burst = |n: usize| {
        let gw = gw.clone();
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let gw = gw.clone();
                    tokio::spawn(async move { post(&gw, "/v1/chat/completions", &chat("ernie-4.0-8k", "hi")).await.0 })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                ok += usize::from(t.await.expect("join") == 200);
            }
            ok
        }
    };
    let mut served = 0;
    for _ in 0..4 {
        served += burst(50).await;
    }
    assert_eq!(served, 200, "{}", gw.log());
    assert_eq!(mock.token_exchanges(), 1, "200 concurrent requests shared one token exchange");

    // The token lives 3 s and is refreshed 10% early: after it expires,
    // the next burst exchanges exactly once more.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(burst(50).await, 50);
    assert_eq!(mock.token_exchanges(), 2, "one new exchange after the expiry window");
    let chats = mock.requests("baidu").iter().filter(|r| r.path.contains("/chat/")).count();
    assert_eq!(chats, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_baidu_key_disables_the_channel_and_names_no_secret() {
    let mock = ProviderMock::start().await;
    let channel = provider_channel(&mock, "baidu").replace("ak-test|sk-test", "ak-test|wrong-secret");
    let gw = Gateway::start(&["baidu.wasm", "weighted.wasm"], &channel);
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("ernie-4.0-8k", "hi")).await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.to_string().contains("wrong-secret") && !body.to_string().contains("127.0.0.1"), "{body}");
    let (_, list) = admin(&gw, reqwest::Method::GET, "/api/channels", None).await;
    assert_eq!(list["data"][0]["status"]["state"], "auto_disabled", "{list}");
    assert!(!gw.log().contains("wrong-secret"), "the secret reached the log");
}
