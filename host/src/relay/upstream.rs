//! The host's HTTP client: all upstream I/O goes through here, never through
//! a plugin. Pooled connections, TCP_NODELAY, timeouts, bounded bodies.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT};
use http::{HeaderMap, StatusCode};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;

use super::http1_pool::{self, SendError};
use super::upstream_body::UpstreamBody;
use super::upstream_client::{Client, ClientSettings, proxy_from_env};
use crate::config::UpstreamConfig;
use crate::plugins::{ErrorKind, Header, HttpMethod, HttpRequest, HttpResponse, UpstreamError};

/// Pooled upstream client: one connection pool per thread, so that a
/// request and its upstream connection live on the same runtime (a pooled
/// connection's task runs where it was created; using it from another
/// thread costs a cross-thread wake-up each way).
#[derive(Clone)]
pub struct Upstream {
    id: u64,
    settings: ClientSettings,
    /// Opens plain-HTTP/1.1 connections ([`http1_pool`]).
    connector: HttpConnector,
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
type Counted = (Client, Arc<AtomicUsize>);

/// A thread's clients: per (`Upstream` id, h2c), the clients opened so far.
type ClientSets = std::cell::RefCell<Vec<((u64, bool), Vec<Counted>)>>;

/// An upstream response, holding its client's in-flight slot until it is
/// read or its body stream is dropped.
pub struct UpstreamResponse {
    head: Head,
    slot: Slot,
    idle_timeout: Duration,
}

enum Head {
    Direct(http::Response<Incoming>),
    Proxied(reqwest::Response),
}

/// A request in flight on a client: released when dropped (none for a
/// request on a thread's own HTTP/1 connections, [`http1_pool`]).
pub(super) struct Slot(Option<Arc<AtomicUsize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl UpstreamResponse {
    /// The status.
    pub fn status(&self) -> StatusCode {
        match &self.head {
            Head::Direct(r) => r.status(),
            Head::Proxied(r) => r.status(),
        }
    }

    fn headers(&self) -> &HeaderMap {
        match &self.head {
            Head::Direct(r) => r.headers(),
            Head::Proxied(r) => r.headers(),
        }
    }

    /// The body's announced length, when it has one.
    fn content_length(&self) -> Option<u64> {
        match &self.head {
            Head::Direct(r) => r.body().size_hint().exact(),
            Head::Proxied(r) => r.content_length(),
        }
    }

    /// The response's `content-type`, when it has one.
    pub fn content_type(&self) -> Option<String> {
        self.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// Response headers with lower-cased names.
    fn header_list(&self) -> Vec<Header> {
        self.headers()
            .iter()
            .filter_map(|(name, value)| {
                value.to_str().ok().map(|v| Header { name: name.as_str().to_string(), value: v.to_string() })
            })
            .collect()
    }

    /// The body as it arrives (the slot is released when it is dropped).
    pub fn body_stream(self) -> UpstreamBody {
        match self.head {
            Head::Direct(r) => UpstreamBody::direct(r.into_body(), self.idle_timeout, self.slot),
            Head::Proxied(r) => UpstreamBody::proxied(r, self.slot),
        }
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
        let proxy = proxy_from_env();
        let settings = ClientSettings::new(
            Duration::from_millis(cfg.connect_timeout_ms),
            Duration::from_secs(cfg.idle_timeout_secs),
            proxy.is_some(),
            cfg.ca_file.as_deref(),
            std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()).map(std::path::PathBuf::from).as_deref(),
        )?;
        let this = Self {
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connector: settings.tcp_connector(),
            settings,
            response_timeout: Duration::from_secs(cfg.response_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_secs),
            exchange_timeout: Duration::from_secs(cfg.exchange_timeout_secs.max(1)),
            max_body: cfg.max_response_bytes,
            per_client: cfg.requests_per_connection.max(1),
        };
        if let Some(var) = proxy {
            tracing::info!(variable = var, "upstream requests go through the proxy the environment names");
        }
        Client::build(&this.settings, false)?;
        Ok(this)
    }

    /// A client of this thread (`h2c`: HTTP/2 with prior knowledge) with
    /// fewer than `per_client` requests in flight, and its slot. Each
    /// client holds its own connections: an HTTP/2 upstream (h2c, or
    /// negotiated over TLS) multiplexes one connection per client, so
    /// streams beyond a connection's stream limit open another client
    /// rather than queue behind it.
    fn client(&self, h2c: bool) -> Result<(Client, Slot), UpstreamError> {
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
                    let client = Client::build(&self.settings, h2c)
                        .map_err(|_| connection_error("client could not be built"))?;
                    set.push((client, Arc::new(AtomicUsize::new(0))));
                    set.last().cloned().expect("just pushed")
                }
            };
            count.fetch_add(1, Ordering::Relaxed);
            Ok((client, Slot(Some(count))))
        })
    }

    /// Send `req`; returns once the response headers are in. `h2c`: speak
    /// HTTP/2 to a plain-HTTP upstream (a channel's `http2` setting), so
    /// every request shares a few connections instead of one each.
    pub async fn send(&self, req: HttpRequest, h2c: bool) -> Result<UpstreamResponse, UpstreamError> {
        let method = match req.method {
            HttpMethod::Get => http::Method::GET,
            HttpMethod::Post => http::Method::POST,
            HttpMethod::Put => http::Method::PUT,
            HttpMethod::Delete => http::Method::DELETE,
        };
        let uri = match self.settings.proxied {
            false => Some(parsed_uri(&req.url).ok_or_else(invalid_request)?),
            true => None,
        };
        // Prior knowledge is for plain HTTP; over TLS, HTTP/2 is negotiated.
        let plain = uri.as_ref().is_some_and(|u| u.scheme() == Some(&http::uri::Scheme::HTTP));
        let h2c = h2c && (plain || uri.is_none());
        // The headers too must come within the idle limit.
        let limit = self.response_timeout.min(self.idle_timeout);
        let uri = match uri {
            Some(uri) if plain && !h2c => return self.send_http1(method, uri, req, limit).await,
            other => other,
        };
        let (client, slot) = self.client(h2c)?;
        let head = match (client, uri) {
            (Client::Direct(client), Some(uri)) => {
                let request = direct_request(method, uri, req)?;
                match tokio::time::timeout(limit, client.request(request)).await {
                    Err(_) => return Err(connection_error("timed out")),
                    Ok(Err(e)) if e.is_connect() => return Err(connection_error("connection failed")),
                    Ok(Err(_)) => return Err(connection_error("request failed")),
                    Ok(Ok(response)) => Head::Direct(response),
                }
            }
            (Client::Direct(_), None) => return Err(invalid_request()),
            (Client::Proxied(client), _) => {
                let url = parsed_url(&req.url).ok_or_else(invalid_request)?;
                let mut builder = client.request(method, url);
                for h in &req.headers {
                    builder = builder.header(&h.name, &h.value);
                }
                if !req.body.is_empty() {
                    builder = builder.body(req.body);
                }
                match tokio::time::timeout(self.response_timeout, builder.send()).await {
                    Err(_) => return Err(connection_error("timed out")),
                    Ok(Err(e)) if e.is_connect() => return Err(connection_error("connection failed")),
                    Ok(Err(e)) if e.is_timeout() => return Err(connection_error("timed out")),
                    Ok(Err(e)) if e.is_builder() => return Err(invalid_request()),
                    Ok(Err(_)) => return Err(connection_error("request failed")),
                    Ok(Ok(inner)) => Head::Proxied(inner),
                }
            }
        };
        Ok(UpstreamResponse { head, slot, idle_timeout: self.idle_timeout })
    }

    /// Send `req` to a plain-HTTP/1.1 upstream over one of this thread's
    /// connections ([`http1_pool`]), its headers due within `limit`.
    async fn send_http1(
        &self,
        method: http::Method,
        uri: http::Uri,
        req: HttpRequest,
        limit: Duration,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let request = direct_request(method, uri, req)?;
        let head = match tokio::time::timeout(limit, http1_pool::send(self.id, request, &self.connector)).await {
            Err(_) => return Err(connection_error("timed out")),
            Ok(Err(SendError::Connect)) => return Err(connection_error("connection failed")),
            Ok(Err(SendError::Request)) => return Err(connection_error("request failed")),
            Ok(Ok(response)) => Head::Direct(response),
        };
        Ok(UpstreamResponse { head, slot: Slot(None), idle_timeout: self.idle_timeout })
    }

    /// Read a whole (non-streamed) response, bounded in size and idle time.
    pub async fn read(&self, resp: UpstreamResponse) -> Result<HttpResponse, UpstreamError> {
        let status = resp.status().as_u16();
        let headers = resp.header_list();
        let expected = resp.content_length().map_or(0, |n| n.min(self.max_body as u64) as usize);
        let mut stream = resp.body_stream();
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

/// `req` as a request for hyper, to `uri`, with reqwest's default
/// `user-agent` and `accept` when the adapter set none.
fn direct_request(
    method: http::Method,
    uri: http::Uri,
    req: HttpRequest,
) -> Result<http::Request<Full<Bytes>>, UpstreamError> {
    let mut request = http::Request::new(Full::new(Bytes::from(req.body)));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    for h in &req.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| invalid_request())?;
        let value = HeaderValue::from_str(&h.value).map_err(|_| invalid_request())?;
        headers.append(name, value);
    }
    if !headers.contains_key(USER_AGENT) {
        headers.insert(USER_AGENT, HeaderValue::from_static(super::upstream_client::USER_AGENT));
    }
    if !headers.contains_key(ACCEPT) {
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    }
    Ok(request)
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

/// A thread's parsed URLs, by their text.
type ParsedUrls<T> = std::cell::RefCell<Vec<(Box<str>, T)>>;

/// `url` as `parse` reads it (`None`: it does not), from `cache`.
fn cached<T: Clone + 'static>(
    cache: &'static std::thread::LocalKey<ParsedUrls<T>>,
    url: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    cache.with(|parsed| {
        let mut parsed = parsed.borrow_mut();
        if let Some((_, hit)) = parsed.iter().rev().find(|(text, _)| **text == *url) {
            return Some(hit.clone());
        }
        let value = parse(url)?;
        if parsed.len() == PARSED_URLS {
            parsed.remove(0);
        }
        parsed.push((url.into(), value.clone()));
        Some(value)
    })
}

/// `url` parsed as an `http` or `https` URI (`None` when it is neither),
/// for the direct client. It goes through `url`'s parser first, as
/// reqwest does: international host names become punycode, and the path
/// is normalized the same way.
fn parsed_uri(url: &str) -> Option<http::Uri> {
    thread_local! {
        static URIS: ParsedUrls<http::Uri> = const { std::cell::RefCell::new(Vec::new()) };
    }
    cached(&URIS, url, |url| {
        let normalized = url::Url::parse(url).ok().filter(|u| matches!(u.scheme(), "http" | "https"))?;
        http::Uri::try_from(normalized.as_str()).ok()
    })
}

/// `url` parsed for reqwest (`None` when it is not a URL).
fn parsed_url(url: &str) -> Option<reqwest::Url> {
    thread_local! {
        static URLS: ParsedUrls<reqwest::Url> = const { std::cell::RefCell::new(Vec::new()) };
    }
    cached(&URLS, url, |url| reqwest::Url::parse(url).ok())
}
