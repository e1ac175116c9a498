//! The host's HTTP client: all upstream I/O goes through here, never through
//! a plugin. Pooled connections, TCP_NODELAY, timeouts, bounded bodies.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

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
    /// Requests in flight on one client before another is opened.
    per_client: usize,
}

/// A client and how many of its requests are in flight (their responses
/// not yet dropped).
type Counted = (reqwest::Client, Arc<AtomicUsize>);

/// A thread's clients: per (`Upstream` id, h2c), the clients opened so far.
type ClientSets = std::cell::RefCell<Vec<((u64, bool), Vec<Counted>)>>;

/// An upstream response, holding its client's in-flight slot until it is
/// read or its body stream is dropped.
pub struct UpstreamResponse {
    inner: reqwest::Response,
    slot: Slot,
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamResponse {
    /// The status.
    pub fn status(&self) -> reqwest::StatusCode {
        self.inner.status()
    }

    /// The response's `content-type`, when it has one.
    pub fn content_type(&self) -> Option<String> {
        self.inner.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// The body as it arrives (the slot is released when it is dropped).
    pub fn body_stream(self) -> impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static {
        let slot = self.slot;
        self.inner.bytes_stream().map(move |chunk| {
            let _held = &slot;
            chunk
        })
    }
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
            per_client: cfg.requests_per_connection.max(1),
        };
        this.build_client(false)?;
        Ok(this)
    }

    fn build_client(&self, h2c: bool) -> reqwest::Result<reqwest::Client> {
        let builder = reqwest::Client::builder();
        // HTTP/2 without TLS needs prior knowledge; over TLS it is
        // negotiated (ALPN) whatever this says.
        let builder = if h2c { builder.http2_prior_knowledge() } else { builder };
        builder
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

    /// A client of this thread (`h2c`: HTTP/2 with prior knowledge) with
    /// fewer than `per_client` requests in flight, and its slot. Each
    /// client holds its own connections: an HTTP/2 upstream (h2c, or
    /// negotiated over TLS) multiplexes one connection per client, so
    /// streams beyond a connection's stream limit open another client
    /// rather than queue behind it.
    fn client(&self, h2c: bool) -> Result<(reqwest::Client, Slot), UpstreamError> {
        thread_local! {
            static CLIENTS: ClientSets = const { std::cell::RefCell::new(Vec::new()) };
        }
        CLIENTS.with(|clients| {
            let mut clients = clients.borrow_mut();
            let index = match clients.iter().position(|(key, _)| *key == (self.id, h2c)) {
                Some(i) => i,
                None => {
                    clients.push(((self.id, h2c), Vec::new()));
                    clients.len() - 1
                }
            };
            let set = &mut clients[index].1;
            let free = set.iter().find(|(_, n)| n.load(Ordering::Relaxed) < self.per_client);
            let (client, count) = match free {
                Some(c) => c.clone(),
                None => {
                    let client = self.build_client(h2c).map_err(|_| connection_error("client could not be built"))?;
                    set.push((client, Arc::new(AtomicUsize::new(0))));
                    set.last().cloned().expect("just pushed")
                }
            };
            count.fetch_add(1, Ordering::Relaxed);
            Ok((client, Slot(count)))
        })
    }

    /// Send `req`; returns once the response headers are in. `h2c`: speak
    /// HTTP/2 to a plain-HTTP upstream (a channel's `http2` setting), so
    /// every request shares a few connections instead of one each.
    pub async fn send(&self, req: HttpRequest, h2c: bool) -> Result<UpstreamResponse, UpstreamError> {
        let method = match req.method {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Delete => reqwest::Method::DELETE,
        };
        let url = parsed_url(&req.url).ok_or_else(invalid_request)?;
        let (client, slot) = self.client(h2c)?;
        let mut builder = client.request(method, url);
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
            Ok(Err(e)) if e.is_builder() => Err(invalid_request()),
            Ok(Err(_)) => Err(connection_error("request failed")),
            Ok(Ok(inner)) => Ok(UpstreamResponse { inner, slot }),
        }
    }

    /// Read a whole (non-streamed) response, bounded in size and idle time.
    pub async fn read(&self, resp: UpstreamResponse) -> Result<HttpResponse, UpstreamError> {
        let status = resp.status().as_u16();
        let headers = headers_of(&resp.inner);
        let expected = resp.inner.content_length().map_or(0, |n| n.min(self.max_body as u64) as usize);
        let mut stream = std::pin::pin!(resp.body_stream());
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

/// The error for an upstream request the adapter built wrong.
fn invalid_request() -> UpstreamError {
    UpstreamError {
        kind: ErrorKind::Other,
        message: "the adapter built an invalid upstream request".into(),
        status: None,
    }
}

/// URLs parsed per thread, most recent last: adapters build the same few
/// URLs for every request, and parsing one (IDNA included) costs more than
/// cloning it.
const PARSED_URLS: usize = 32;

/// `url` parsed (`None` when it is not a URL), from this thread's cache.
fn parsed_url(url: &str) -> Option<reqwest::Url> {
    thread_local! {
        static URLS: std::cell::RefCell<Vec<(Box<str>, reqwest::Url)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    URLS.with(|urls| {
        let mut urls = urls.borrow_mut();
        if let Some((_, parsed)) = urls.iter().rev().find(|(text, _)| **text == *url) {
            return Some(parsed.clone());
        }
        let parsed = reqwest::Url::parse(url).ok()?;
        if urls.len() == PARSED_URLS {
            urls.remove(0);
        }
        urls.push((url.into(), parsed.clone()));
        Some(parsed)
    })
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
