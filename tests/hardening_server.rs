//! The HTTP front door (issue 11, items 5 and 14): idle and slow clients
//! cannot take the gateway offline, bodies and headers arrive in time or
//! get a clear error, oversized URIs and headers get OpenAI-shaped JSON,
//! HTTP/2 without TLS is served next to HTTP/1.1 only when enabled, and the
//! `Bearer` scheme is matched as HTTP says.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Gateway, MockUpstream, TOKEN, assert_openai_error, channel, client};

fn addr(gw: &Gateway) -> String {
    gw.base.trim_start_matches("http://").to_string()
}

/// Read what the server sends until it closes or `limit` passes.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_idle_connections_under_a_small_file_limit_cannot_stop_health() {
    // This test opens more sockets than a default soft limit allows.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(hard) = limit.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit { current: Some(hard), maximum: Some(hard) },
        );
    }
    let mock = MockUpstream::start("up").await;
    let mut gw = Gateway::start_with_file_limit(
        &["openai.wasm", "weighted.wasm"],
        &channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], ""),
        1024,
    );
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(addr(&gw)).await.expect("connect"));
    }
    let resp = client().get(gw.url("/health")).send().await.expect("health answers");
    assert_eq!(resp.status(), 200);
    let (code, out) =
        crate::support::post(&gw, "/v1/chat/completions", &crate::support::chat("gpt-4o-mini", "hi")).await;
    assert_eq!(code, 200, "{out}");
    assert!(gw.log().contains("connection limit reached"), "the operator is told");
    assert!(gw.alive());
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_headers_and_bodies_time_out_and_oversized_requests_get_json() {
    let mock = MockUpstream::start("up").await;
    let gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &format!(
            "[server]\nheader_timeout_secs = 1\nbody_timeout_secs = 1\n{}",
            channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], "")
        ),
    );
    // Headers that never finish: the connection is closed.
    let mut slow = TcpStream::connect(addr(&gw)).await.expect("connect");
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(20)).await;
    assert!(closed, "a connection that never finishes its headers is closed");

    // A body that trickles: 408 in OpenAI's shape.
    let mut drip = TcpStream::connect(addr(&gw)).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    );
    drip.write_all(head.as_bytes()).await.expect("write");
    let (text, _) = read_until_closed(&mut drip, Duration::from_secs(20)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or_default()).expect("JSON body");
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");

    // An over-long URI and oversized headers: 414 and 431 with JSON bodies.
    let long = gw.url(&format!("/v1/models?x={}", "a".repeat(20_000)));
    let resp = client().get(long).bearer_auth(TOKEN).send().await.expect("send");
    assert_eq!(resp.status(), 414);
    assert_openai_error(&resp.json::<Value>().await.expect("json"));
    let resp = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(TOKEN)
        .header("x-big", "b".repeat(70_000))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 431);
    assert_openai_error(&resp.json::<Value>().await.expect("json"));

    // HTTP/2 without TLS (h2c) is not served by default: no HTTP/2 frame
    // comes back.
    let mut h2 = TcpStream::connect(addr(&gw)).await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("write");
    let (text, _) = read_until_closed(&mut h2, Duration::from_secs(10)).await;
    assert!(text.is_empty() || text.starts_with("HTTP/1.1"), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bearer_scheme_is_case_insensitive_and_a_bare_key_is_refused() {
    let mock = MockUpstream::start("up").await;
    let gw = Gateway::start(&["openai.wasm"], &channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], ""));
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = client()
            .get(gw.url("/v1/models"))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200, "{scheme}");
    }
    let resp = client().get(gw.url("/v1/models")).header("authorization", TOKEN).send().await.expect("send");
    assert_eq!(resp.status(), 401);
    assert_openai_error(&resp.json::<Value>().await.expect("json"));
    let resp = client().get(gw.url("/v1/models")).header("x-api-key", TOKEN).send().await.expect("send");
    assert_eq!(resp.status(), 200, "Anthropic-style clients send x-api-key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_http2_on_h2c_and_http1_share_the_port_and_silent_connections_still_time_out() {
    let mock = MockUpstream::start("up").await;
    let gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &format!(
            "[server]\nhttp2 = true\nhttp2_max_streams = 4\nheader_timeout_secs = 1\n{}",
            channel("up", "openai", &mock.base_url(), &["gpt-4o-mini"], "")
        ),
    );
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("h2c client");
    let chat = crate::support::chat("gpt-4o-mini", "hi");

    // More requests at once than one connection may carry streams: the
    // client queues them on its one connection, and every one is answered.
    let sends = (0..12).map(|_| h2.post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&chat).send());
    for resp in futures_util::future::join_all(sends).await {
        let resp = resp.expect("an h2c request is answered");
        assert_eq!((resp.version(), resp.status().as_u16()), (reqwest::Version::HTTP_2, 200));
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["object"], "chat.completion", "{body}");
    }

    // A stream over HTTP/2 arrives whole, and errors keep OpenAI's shape.
    let mut streamed = chat.clone();
    streamed["stream"] = true.into();
    let resp = h2.post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&streamed).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("stream");
    assert!(text.ends_with("data: [DONE]\n\n") && !crate::support::stream_text(&text).is_empty(), "{text}");
    let resp = h2.post(gw.url("/v1/chat/completions")).json(&chat).send().await.expect("send");
    assert_eq!(resp.status(), 401);
    assert_openai_error(&resp.json::<Value>().await.expect("json"));

    // HTTP/1.1 on the same port.
    let resp = client().post(gw.url("/v1/chat/completions")).bearer_auth(TOKEN).json(&chat).send().await.expect("send");
    assert_eq!((resp.version(), resp.status().as_u16()), (reqwest::Version::HTTP_11, 200));

    // A connection that sends nothing, or only part of the preface, is
    // closed after the header timeout, as an HTTP/1.1 one is.
    for opening in [&b""[..], b"PR", b"PRI * HTTP/2.0\r\n"] {
        let mut silent = TcpStream::connect(addr(&gw)).await.expect("connect");
        silent.write_all(opening).await.expect("write");
        let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(20)).await;
        assert!(closed, "a connection that sent {opening:?} is closed");
    }
}
