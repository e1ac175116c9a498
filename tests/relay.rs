//! The OpenAI API through the real gateway binary, the real `openai.wasm`
//! adapter and a real loopback mock upstream.

use std::time::Duration;

use crate::support::{ADMIN, Gateway, MockUpstream, TOKEN, assert_openai_error, channel, chat, client, post};
use futures_util::StreamExt;
use serde_json::{Value, json};

async fn setup() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start("mock-a").await;
    let extra = "[channels.model_mapping]\n\"gpt-4o\" = \"gpt-4o-2024-08-06\"\n";
    let ch = channel(
        "a",
        "openai",
        &mock.base_url(),
        &["gpt-4o-mini", "gpt-4o", "hold-model", "text-embedding-3-small", "gpt-3.5-turbo-instruct"],
        extra,
    );
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &ch);
    (mock, gw)
}

/// Split an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|frame| frame.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_non_stream_passes_unknown_fields_and_usage() {
    let (mock, gw) = setup().await;
    let mut body = chat("gpt-4o-mini", "hi there");
    body["x_vendor_extension"] = json!({"keep": [1, 2, 3]});
    body["temperature"] = json!(0.25);
    let resp = client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&body).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-request-id").is_some_and(|v| v.to_str().unwrap_or("").starts_with("req_")));
    let out: Value = resp.json().await.expect("json");
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["choices"][0]["message"]["content"], "echo: hi there");
    assert_eq!(out["usage"]["total_tokens"], 21);
    // Fields the gateway does not know reach the client untouched.
    assert_eq!(out["choices"][0]["message"]["refusal"], Value::Null);
    assert_eq!(out["system_fingerprint"], "mock-a");

    let upstream = mock.state.last_body.lock().await.clone().expect("upstream saw a request");
    assert_eq!(upstream["x_vendor_extension"], json!({"keep": [1, 2, 3]}));
    assert_eq!(upstream["temperature"], json!(0.25));
    assert_eq!(upstream["model"], "gpt-4o-mini");
    let headers = mock.state.last_headers.lock().await.clone().expect("headers");
    assert_eq!(headers["authorization"], "Bearer sk-upstream-secret-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_mapping_reaches_upstream() {
    let (mock, gw) = setup().await;
    let (status, out) = post(&gw, "/v1/chat/completions", &chat("gpt-4o", "map me")).await;
    assert_eq!(status, 200, "{out}");
    let upstream = mock.state.last_body.lock().await.clone().expect("request");
    assert_eq!(upstream["model"], "gpt-4o-2024-08-06");
    // The openai adapter returns the upstream's body as is: the response
    // names the deployment that answered (docs/channels.md#model-names).
    assert_eq!(out["model"], "gpt-4o-2024-08-06");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_stream_with_and_without_usage() {
    let (mock, gw) = setup().await;
    for include_usage in [true, false] {
        let mut body = chat("gpt-4o-mini", "hello streaming world");
        body["stream"] = json!(true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        let resp =
            client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&body).send().await.expect("send");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let text = resp.text().await.expect("body");
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        let chunks: Vec<Value> =
            data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk json")).collect();
        let content: String =
            chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|ch| ch["delta"]["content"].as_str())).collect();
        assert_eq!(content, "echo: hello streaming world");
        let usage_chunks: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
        if include_usage {
            assert_eq!(usage_chunks.len(), 1, "{text}");
            assert_eq!(usage_chunks[0]["usage"]["completion_tokens"], 12);
            assert_eq!(usage_chunks[0]["choices"], json!([]));
        } else {
            assert!(usage_chunks.is_empty(), "client did not ask for usage: {text}");
        }
        // Usage is always requested upstream, so the gateway can bill it.
        let upstream = mock.state.last_body.lock().await.clone().expect("request");
        assert_eq!(upstream["stream_options"]["include_usage"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_first_chunk_arrives_while_upstream_holds_the_rest() {
    let (mock, gw) = setup().await;
    let mut body = chat("hold-model", "slow answer");
    body["stream"] = json!(true);
    let resp = client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&body).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    // The mock sent one chunk and is now waiting for `release()`.
    while !seen.contains("\n\n") {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        let bytes = next
            .expect("first chunk must arrive while the upstream holds the rest")
            .expect("stream open")
            .expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(seen.starts_with("data: {"), "{seen}");
    assert!(!seen.contains("[DONE]"), "nothing after the first chunk may arrive yet: {seen}");
    mock.release();
    while let Some(bytes) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("rest arrives") {
        seen.push_str(&String::from_utf8_lossy(&bytes.expect("bytes")));
    }
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
    assert!(seen.contains("slow "), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_embeddings_and_models() {
    let (mock, gw) = setup().await;
    let (status, out) =
        post(&gw, "/v1/completions", &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "say"})).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], "echo: say");

    let resp = client()
        .post(gw.url("/v1/completions"))
        .bearer_auth(TOKEN)
        .json(&json!({"model": "gpt-3.5-turbo-instruct", "prompt": "p", "stream": true}))
        .send()
        .await
        .expect("send");
    let text = resp.text().await.expect("body");
    let data = sse_data(&text);
    assert_eq!(data.len(), 3, "{text}");
    assert_eq!(data[2], "[DONE]");

    let (status, out) =
        post(&gw, "/v1/embeddings", &json!({"model": "text-embedding-3-small", "input": ["a", "b"]})).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(out["data"][1]["embedding"].as_array().map(Vec::len), Some(8));
    let upstream = mock.state.last_body.lock().await.clone().expect("request");
    assert!(upstream.get("stream_options").is_none(), "no stream options on embeddings");

    let models: Value =
        client().get(gw.url("/v1/models")).bearer_auth(TOKEN).send().await.expect("send").json().await.expect("json");
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"gpt-4o-mini") && ids.contains(&"text-embedding-3-small"), "{ids:?}");
    assert!(models["data"].as_array().expect("data").iter().all(|m| m["object"] == "model"));

    let one = client().get(gw.url("/v1/models/gpt-4o")).bearer_auth(TOKEN).send().await.expect("send");
    assert_eq!(one.status(), 200);
    let missing = client().get(gw.url("/v1/models/nope")).bearer_auth(TOKEN).send().await.expect("send");
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_client_input_gets_openai_4xx_never_5xx() {
    let (mock, mut gw) = setup().await;
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("non-JSON", c.post(&url).bearer_auth(TOKEN).body("this is not json"), 400),
        ("JSON array", c.post(&url).bearer_auth(TOKEN).body("[1,2,3]"), 400),
        ("truncated JSON", c.post(&url).bearer_auth(TOKEN).body("{\"model\": \"gpt-4o\", \"messages\": ["), 400),
        (
            "missing model",
            c.post(&url).bearer_auth(TOKEN).json(&json!({"messages": [{"role": "user", "content": "x"}]})),
            400,
        ),
        ("model is a number", c.post(&url).bearer_auth(TOKEN).json(&json!({"model": 42, "messages": []})), 400),
        (
            "messages is a string",
            c.post(&url).bearer_auth(TOKEN).json(&json!({"model": "gpt-4o", "messages": "hi"})),
            400,
        ),
        (
            "stream is a string",
            c.post(&url)
                .bearer_auth(TOKEN)
                .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"})),
            400,
        ),
        (
            "10 MB body",
            c.post(&url).bearer_auth(TOKEN).body(format!(
                "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
                "a".repeat(10 * 1024 * 1024)
            )),
            413,
        ),
        ("unknown model", c.post(&url).bearer_auth(TOKEN).json(&chat("no-such-model", "x")), 404),
        ("no token", c.post(&url).json(&chat("gpt-4o", "x")), 401),
        ("wrong token", c.post(&url).bearer_auth("sk-wrong").json(&chat("gpt-4o", "x")), 401),
        ("admin token on /v1", c.post(&url).bearer_auth(ADMIN).json(&chat("gpt-4o", "x")), 401),
        ("unknown URL", c.post(gw.url("/v1/nothing-here")).bearer_auth(TOKEN).json(&json!({})), 404),
        ("wrong method", c.get(&url).bearer_auth(TOKEN), 405),
        (
            "embeddings without input",
            c.post(gw.url("/v1/embeddings")).bearer_auth(TOKEN).json(&json!({"model": "text-embedding-3-small"})),
            400,
        ),
    ];
    let before = mock.hits();
    for (name, request, expected) in cases {
        let resp = request.send().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = resp.status().as_u16();
        if status == 413 {
            // The unread body makes the connection unusable: the client must be told.
            assert_eq!(resp.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]), "{name}");
        }
        let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert_eq!(status, expected, "{name}: {body}");
        let kind = assert_openai_error(&body);
        assert_eq!(kind, "invalid_request_error", "{name}: {body}");
    }
    assert_eq!(mock.hits(), before, "no invalid request may reach the upstream");
    assert!(gw.alive(), "the gateway survived every bad input");
    let (status, _) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "still fine")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_upstream_fails_over_and_never_leaks_its_address_or_key() {
    let mock = MockUpstream::start("good").await;
    // A port that refuses connections: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}/v1", dead.local_addr().expect("addr"));
    drop(dead);
    let channels = channel("dead", "openai", &dead_url, &["gpt-4o-mini", "only-dead"], "priority = 10")
        + &channel("good", "openai", &mock.base_url(), &["gpt-4o-mini"], "priority = 0");
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &channels);

    let (status, out) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "fail over")).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["system_fingerprint"], "good");

    let (status, out) = post(&gw, "/v1/chat/completions", &chat("only-dead", "nowhere")).await;
    assert_eq!(status, 502, "{out}");
    assert_eq!(assert_openai_error(&out), "upstream_error");
    let text = out.to_string();
    let port = dead_url.split(':').nth(2).unwrap_or("x").trim_end_matches("/v1").to_string();
    assert!(!text.contains("127.0.0.1") && !text.contains(&port) && !text.contains("sk-upstream"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_streams_hold_no_plugin_instance_and_abandoned_ones_are_billed_off_the_workers() {
    let mock = MockUpstream::start("mock").await;
    // A pool of 8 instances: were decoders pinning one each (as before WIT
    // 0.1.3), the 9th open stream would already be refused.
    let ch = channel("a", "openai", &mock.base_url(), &["hold-model", "gpt-4o-mini"], "");
    let mut gw = Gateway::start_with(&["openai.wasm", "weighted.wasm"], "max_instances = 8", &ch);
    let mut body = chat("hold-model", "hold me");
    body["stream"] = json!(true);
    let mut held = Vec::new();
    for _ in 0..60 {
        let resp =
            client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&body).send().await.expect("send");
        assert_eq!(resp.status(), 200);
        let mut stream = resp.bytes_stream();
        assert!(tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("first chunk").is_some());
        held.push(stream);
    }
    // 60 streams open on a pool of 8: ordinary requests still find instances.
    for _ in 0..5 {
        let (code, out) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "meanwhile")).await;
        assert_eq!(code, 200, "{out}");
    }
    // Half hang up; the rest finish normally once the upstream goes on.
    held.truncate(30);
    mock.release();
    for mut stream in held {
        let mut text = String::new();
        while let Some(Ok(bytes)) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    assert!(gw.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_beyond_the_instance_pool_waits_for_slots_instead_of_failing() {
    let mock = MockUpstream::start("mock").await;
    let ch = channel("a", "openai", &mock.base_url(), &["gpt-4o-mini"], "")
        + &channel("hostile", "hostile", &mock.base_url(), &["spin"], "");
    // Two slots and a fresh instance for every call. Fuel, not the wall
    // clock, ends a spinning call (seconds of work), so a waiting call's
    // wait (up to the minute-long call timeout) outlasts it on any machine.
    let limits = "max_instances = 2\ninstance_reuse = 1\nfuel_per_call = 20000000000\ncall_timeout_ms = 60000";
    let gw = Gateway::start_with(&["openai.wasm", "weighted.wasm", "hostile.wasm"], limits, &ch);
    let spin = |gw: &Gateway| {
        let (url, body) = (gw.url("/v1/chat/completions"), chat("spin", "hold a slot"));
        tokio::spawn(async move {
            let resp = client().post(url).bearer_auth(TOKEN).json(&body).send().await.expect("send");
            (resp.status().as_u16(), resp.json::<Value>().await.expect("OpenAI error JSON"))
        })
    };
    let spinners = [spin(&gw), spin(&gw)];
    // Both slots taken by the spinning calls: the burst below starts on a full pool.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = client().get(gw.url("/metrics")).send().await.expect("scrape").text().await.expect("text");
        if metric(&text, "wasmgate_plugin_instances_in_use") == Some(2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the spinning calls never held both slots: {text}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let requests = (0..48).map(|i| {
        let mut body = chat("gpt-4o-mini", &format!("burst {i}"));
        body["stream"] = json!(i % 2 == 0);
        let gw = &gw;
        async move {
            let resp = client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&body).send().await;
            let resp = resp.expect("send");
            (resp.status().as_u16(), resp.text().await.expect("body"))
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    for (i, (status, text)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {text}");
        if i % 2 == 0 {
            assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""), "request {i}: {text}");
        } else {
            assert!(text.contains(&format!("echo: burst {i}")), "request {i}: {text}");
        }
    }
    // The spinning calls ran out of fuel: an error for their own requests only.
    for spinner in spinners {
        let (status, body) = spinner.await.expect("spinner");
        assert_eq!(status, 502, "{body}");
        assert_eq!(assert_openai_error(&body), "plugin_error");
    }
    let text = client().get(gw.url("/metrics")).send().await.expect("scrape").text().await.expect("text");
    // The burst found the pool full and waited: the wait, not luck, served everyone.
    assert!(metric(&text, "wasmgate_plugin_instance_waits_total").is_some_and(|n| n > 0), "{text}");
}

/// The value of the unlabelled sample `name` in a Prometheus scrape.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plain_http_upstream_connection_is_reused_and_one_it_closed_is_replaced() {
    use crate::support::bare_upstream;
    // One worker thread: its connections serve every request.
    let one_worker = "[server]\nworkers = 1\n";
    let (kept_url, kept) = bare_upstream::start(false).await;
    // By name: resolved, and tried over IPv4 when `::1` refuses.
    let kept_url = kept_url.replace("127.0.0.1", "localhost");
    let gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &(channel("kept", "openai", &kept_url, &["gpt-4o-mini"], "") + one_worker),
    );
    for i in 0..5 {
        let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", &format!("kept {i}"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], format!("bare: kept {i}"));
    }
    assert_eq!(kept.get(), (1, 5, 0), "five requests, one kept-alive connection");

    // An upstream that closes each connection after its answer, unannounced.
    let (closing_url, closing) = bare_upstream::start(true).await;
    let gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &(channel("closing", "openai", &closing_url, &["gpt-4o-mini"], "") + one_worker),
    );
    for i in 1..=3 {
        let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", &format!("closing {i}"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], format!("bare: closing {i}"));
        // The upstream closed it, and the gateway learned of it on its own
        // (it closed its end): the next request needs a new connection.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while closing.get().2 < i {
            assert!(std::time::Instant::now() < deadline, "the gateway kept a closed connection: {:?}", closing.get());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Each request went out once, on a connection of its own.
    assert_eq!(closing.get(), (3, 3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_set_to_http2_reaches_a_plain_http_upstream_over_h2c() {
    let mock = MockUpstream::start("h2").await;
    let ch = channel("h2", "openai", &mock.base_url(), &["gpt-4o-mini"], "settings = { http2 = true }\n");
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], &ch);
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "over h2")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: over h2");
    assert_eq!(*mock.state.last_version.lock().expect("lock"), Some(axum::http::Version::HTTP_2));
    // Many streams at once share the multiplexed connection.
    let streamed = futures_util::future::join_all((0..40).map(|i| {
        let mut req = chat("gpt-4o-mini", &format!("stream {i}"));
        req["stream"] = json!(true);
        let gw = &gw;
        async move {
            let resp = client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&req).send().await;
            resp.expect("send").text().await.expect("body")
        }
    }))
    .await;
    for (i, text) in streamed.iter().enumerate() {
        // The mock streams word by word: "echo: ", "stream ", "{i}".
        assert!(text.contains(&format!("\"content\":\"{i}\"")) && text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    assert_eq!(*mock.state.last_version.lock().expect("lock"), Some(axum::http::Version::HTTP_2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_requests_go_through_the_proxy_the_environment_names() {
    // The channel's host never resolves (RFC 6761 `.invalid`): only the
    // proxy, which the mock plays, can answer.
    let proxy = MockUpstream::start("proxy").await;
    let ch = channel("far", "openai", "http://upstream.invalid/v1", &["gpt-4o-mini"], "");
    let proxy_url = format!("http://{}", proxy.addr);
    let gw = Gateway::start_with_env(&["openai.wasm", "weighted.wasm"], &ch, &[("HTTP_PROXY", &proxy_url)]);
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "via the proxy")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: via the proxy");
    assert_eq!(proxy.hits(), 1);
    let host = proxy.state.last_headers.lock().await.as_ref().and_then(|h| h.get("host").cloned());
    assert_eq!(host.as_ref().and_then(|h| h.to_str().ok()), Some("upstream.invalid"));
    assert!(gw.log().contains("go through the proxy the environment names"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_upstream_is_reached_through_the_proxys_tunnel_with_the_operators_authority() {
    let mock = MockUpstream::start_tls("tls").await;
    let proxy = crate::support::connect_proxy::start().await;
    let ch = channel("tls", "openai", &mock.tls_base_url(), &["gpt-4o-mini"], "");
    let ca = crate::support::tls_mock::test_ca();
    let config = format!("{ch}\n[upstream]\nca_file = {ca:?}\n");
    let gw = Gateway::start_with_env(&["openai.wasm", "weighted.wasm"], &config, &[("HTTPS_PROXY", &proxy.url)]);
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "tunnelled")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: tunnelled");
    // The TLS session ran end to end inside the tunnel, verified against `ca_file`.
    assert_eq!(*proxy.targets.lock().expect("lock"), vec![mock.addr.to_string()]);
    assert_eq!(mock.hits(), 1);
    assert!(gw.log().contains("go through the proxy the environment names"), "{}", gw.log());

    // Without the authority, the tunnel opens but the certificate is refused.
    let untrusting = Gateway::start_with_env(&["openai.wasm", "weighted.wasm"], &ch, &[("HTTPS_PROXY", &proxy.url)]);
    let (status, body) = post(&untrusting, "/v1/chat/completions", &chat("gpt-4o-mini", "refused")).await;
    assert!(status == 502 || status == 503, "{status} {body}");
    assert_eq!(mock.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_over_tls_is_reached_with_http2_by_alpn_and_an_untrusted_one_is_refused() {
    let mock = MockUpstream::start_tls("tls").await;
    let ch = channel("tls", "openai", &mock.tls_base_url(), &["gpt-4o-mini"], "");
    // `http2 = true` asks for h2c on plain HTTP; over TLS, ALPN decides.
    let h2 = channel("tls-h2", "openai", &mock.tls_base_url(), &["gpt-4o"], "settings = { http2 = true }\n");
    let ca = crate::support::tls_mock::test_ca();
    let trusting =
        Gateway::start(&["openai.wasm", "weighted.wasm"], &format!("{ch}{h2}\n[upstream]\nca_file = {ca:?}\n"));
    let (status, body) = post(&trusting, "/v1/chat/completions", &chat("gpt-4o-mini", "over tls")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: over tls");
    assert_eq!(*mock.state.last_version.lock().expect("lock"), Some(axum::http::Version::HTTP_2));
    let mut req = chat("gpt-4o-mini", "streamed over tls");
    req["stream"] = json!(true);
    let text = client()
        .post(trusting.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&req)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    assert!(text.contains("\"content\":\"tls\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
    let (status, body) = post(&trusting, "/v1/chat/completions", &chat("gpt-4o", "h2 setting over tls")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(*mock.state.last_version.lock().expect("lock"), Some(axum::http::Version::HTTP_2));
    assert_eq!(mock.hits(), 3);

    // Without the authority, the certificate is not trusted: the request
    // fails as a connection failure and never reaches the upstream.
    let untrusting = Gateway::start(&["openai.wasm", "weighted.wasm"], &ch);
    let (status, body) = post(&untrusting, "/v1/chat/completions", &chat("gpt-4o-mini", "refused")).await;
    assert!(status == 502 || status == 503, "{status} {body}");
    let message = assert_openai_error(&body);
    assert!(!message.contains("127.0.0.1") && !message.contains("certificate"), "{message}");
    assert_eq!(mock.hits(), 3);

    // The environment's `SSL_CERT_FILE` is trusted as well, as curl and
    // Go's clients trust it; an unreadable one is a warning, not a refusal to start.
    let plugins = ["openai.wasm", "weighted.wasm"];
    let from_env = Gateway::start_with_env(&plugins, &ch, &[("SSL_CERT_FILE", ca.to_str().expect("utf-8"))]);
    let (status, body) = post(&from_env, "/v1/chat/completions", &chat("gpt-4o-mini", "env ca")).await;
    assert_eq!((status, body["choices"][0]["message"]["content"].as_str()), (200, Some("echo: env ca")), "{body}");
    assert_eq!(mock.hits(), 4);
    let missing = Gateway::start_with_env(&plugins, &ch, &[("SSL_CERT_FILE", "/nonexistent/ca.pem")]);
    let (status, body) = post(&missing, "/v1/chat/completions", &chat("gpt-4o-mini", "refused")).await;
    assert!(status == 502 || status == 503, "{status} {body}");
    assert!(missing.log().contains("SSL_CERT_FILE is not used for upstream TLS"), "{}", missing.log());
    assert_eq!(mock.hits(), 4);
}
