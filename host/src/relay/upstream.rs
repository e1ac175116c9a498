//! The host's HTTP client: all upstream I/O goes through here, never through
//! a plugin. Pooled connections, TCP_NODELAY, timeouts, bounded bodies.

use std::time::Duration;

use futures_util::StreamExt;

use crate::config::UpstreamConfig;
use crate::plugins::{ErrorKind, Header, HttpMethod, HttpRequest, HttpResponse, UpstreamError};

/// Pooled upstream client: one connection pool per thread, so that a
/// request and its upstream connection live on the same runtime (a pooled
/// connection's task runs where it was created; using it from another
/// thread costs a cross-thread wake-up each way).
#[derive(Clone)]
pub struct Upstream {
    id: u64,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Longest silence allowed inside a streamed body.
    pub idle_timeout: Duration,
    /// Limit of a whole credential exchange.
    pub exchange_timeout: Duration,
    max_body: usize,
}

/// A transient, host-side failure talking to the upstream. Its message names
/// no host, port or path.
pub fn connection_error(what: &str) -> UpstreamError {
    UpstreamError { kind: ErrorKind::Transient, message: format!("upstream {what}"), status: None }
}

impl Upstream {
    /// Build the client.
    pub fn new(cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let this = Self {
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            response_timeout: Duration::from_secs(cfg.response_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
            exchange_timeout: Duration::from_secs(cfg.exchange_timeout_secs.max(1)),
            max_body: cfg.max_response_bytes,
        };
        this.build_client()?;
        Ok(this)
    }

    fn build_client(&self) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(self.connect_timeout)
            // Each read of a response (its headers included) must come
            // within the idle limit: a stalled upstream is cut.
            .read_timeout(self.idle_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("wasmgate/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    /// This thread's client.
    fn client(&self) -> Result<reqwest::Client, UpstreamError> {
        thread_local! {
            static CLIENTS: std::cell::RefCell<Vec<(u64, reqwest::Client)>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        CLIENTS.with(|clients| {
            let mut clients = clients.borrow_mut();
            if let Some((_, c)) = clients.iter().find(|(id, _)| *id == self.id) {
                return Ok(c.clone());
            }
            let client = self.build_client().map_err(|_| connection_error("client could not be built"))?;
            clients.push((self.id, client.clone()));
            Ok(client)
        })
    }

    /// Send `req`; returns once the response headers are in.
    pub async fn send(&self, req: HttpRequest) -> Result<reqwest::Response, UpstreamError> {
        let method = match req.method {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Delete => reqwest::Method::DELETE,
        };
        let mut builder = self.client()?.request(method, &req.url);
        for h in &req.headers {
            builder = builder.header(&h.name, &h.value);
        }
        if !req.body.is_empty() {
            builder = builder.body(req.body);
        }
        match tokio::time::timeout(self.response_timeout, builder.send()).await {
            Err(_) => Err(connection_error("timed out")),
            Ok(Err(e)) if e.is_connect() => Err(connection_error("connection failed")),
            Ok(Err(e)) if e.is_timeout() => Err(connection_error("timed out")),
            Ok(Err(e)) if e.is_builder() => Err(UpstreamError {
                kind: ErrorKind::Other,
                message: "the adapter built an invalid upstream request".into(),
                status: None,
            }),
            Ok(Err(_)) => Err(connection_error("request failed")),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Read a whole (non-streamed) response, bounded in size and idle time.
    pub async fn read(&self, resp: reqwest::Response) -> Result<HttpResponse, UpstreamError> {
        let status = resp.status().as_u16();
        let headers = headers_of(&resp);
        let expected = resp.content_length().map_or(0, |n| n.min(self.max_body as u64) as usize);
        let mut stream = resp.bytes_stream();
        // One copy, into the buffer the plugin call takes.
        let mut body = Vec::with_capacity(expected);
        loop {
            match stream.next().await {
                None => break,
                Some(Err(e)) if e.is_timeout() => return Err(connection_error("stalled while sending its response")),
                Some(Err(_)) => return Err(connection_error("connection dropped mid-response")),
                Some(Ok(chunk)) => {
                    if body.len().saturating_add(chunk.len()) > self.max_body {
                        return Err(connection_error("response exceeded the size limit"));
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
        Ok(HttpResponse { status, headers, body })
    }
}

/// Response headers with lower-cased names.
pub fn headers_of(resp: &reqwest::Response) -> Vec<Header> {
    resp.headers()
        .iter()
        .filter_map(|(name, value)| {
            value.to_str().ok().map(|v| Header { name: name.as_str().to_string(), value: v.to_string() })
        })
        .collect()
}
