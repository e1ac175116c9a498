//! Plain-HTTP/1.1 upstream connections, pooled per thread.
//!
//! Each worker thread runs its own runtime, and a connection's task runs on
//! the thread that opened it, so a thread's connections are only ever used
//! by that thread: the pool is a thread-local list, with no lock, no hash
//! of a pool key and no task spawned per request to return a connection
//! (what `hyper_util`'s shared pool does, about 3.7 % of the gateway's CPU
//! per request). `https` and HTTP/2 upstreams keep going through
//! `hyper_util`, whose pool negotiates and multiplexes them.
//!
//! A connection goes back on its thread's list as soon as its response's
//! headers are in; hyper reports it ready again only once that response's
//! body has been read to its end, so a checkout takes the most recently
//! used ready connection and leaves busy ones alone. New connections are
//! opened by `hyper_util`'s TCP connector (name resolution, happy eyeballs,
//! the connect timeout). A request that meets a
//! connection the upstream closed while idle is sent again on another, as
//! hyper hands it back unsent; one that was sent is never repeated.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt as _;

use super::upstream_client::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};

/// How often a thread drops the expired connections of every host.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

type Sender = http1::SendRequest<Full<Bytes>>;

/// A pooled connection.
struct Conn {
    sender: Sender,
    /// When it was last handed out.
    used: Instant,
}

impl Conn {
    fn expired(&self, now: Instant) -> bool {
        self.sender.is_closed() || (self.sender.is_ready() && now.duration_since(self.used) > POOL_IDLE_TIMEOUT)
    }
}

/// A thread's connections, per (client id, upstream authority).
#[derive(Default)]
struct Pool {
    hosts: Vec<((u64, Authority), Vec<Conn>)>,
    swept: Option<Instant>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

impl Pool {
    /// The most recently used ready connection to `key`, if any; drops
    /// the closed and expired ones on the way, and every host's once per
    /// [`SWEEP_EVERY`].
    fn checkout(&mut self, key: &(u64, Authority), now: Instant) -> Option<Sender> {
        if self.swept.is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY) {
            self.swept = Some(now);
            for (_, conns) in &mut self.hosts {
                conns.retain(|c| !c.expired(now));
            }
            self.hosts.retain(|(_, conns)| !conns.is_empty());
        }
        let conns = &mut self.hosts.iter_mut().find(|(k, _)| k == key)?.1;
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            if conns[i].expired(now) {
                conns.swap_remove(i);
            } else if conns[i].sender.is_ready() {
                return Some(conns.remove(i).sender);
            }
        }
        None
    }

    /// Keep `sender` (its response under way) for later requests to `key`.
    fn give_back(&mut self, key: (u64, Authority), sender: Sender, now: Instant) {
        let conns = match self.hosts.iter().position(|(k, _)| *k == key) {
            Some(i) => &mut self.hosts[i].1,
            None => {
                self.hosts.push((key, Vec::new()));
                &mut self.hosts.last_mut().expect("just pushed").1
            }
        };
        // Past the cap the connection is dropped: hyper closes it once
        // the response under way is read.
        if conns.len() < POOL_MAX_IDLE_PER_HOST {
            conns.push(Conn { sender, used: now });
        }
    }
}

/// Why a request got no response.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SendError {
    /// No connection could be opened.
    Connect,
    /// The request failed on an open connection.
    Request,
}

/// Send `request` (an absolute `http://` URI) over one of this thread's
/// connections to its host, opened through `connector` when none is ready.
/// `client` keeps different clients' connections apart.
pub(super) async fn send(
    client: u64,
    mut request: Request<Full<Bytes>>,
    connector: &HttpConnector,
) -> Result<Response<Incoming>, SendError> {
    let authority = request.uri().authority().cloned().ok_or(SendError::Request)?;
    to_origin_form(&mut request, &authority)?;
    let key = (client, authority);
    loop {
        let now = Instant::now();
        let (mut sender, reused) = match POOL.with_borrow_mut(|pool| pool.checkout(&key, now)) {
            Some(sender) => (sender, true),
            None => (connect(connector, &key.1).await?, false),
        };
        match sender.try_send_request(request).await {
            Ok(response) => {
                POOL.with_borrow_mut(|pool| pool.give_back(key, sender, now));
                return Ok(response);
            }
            // Closed by the upstream while idle, before the request went
            // out: send it again on another connection.
            Err(mut e) if reused => match e.take_message() {
                Some(unsent) => request = unsent,
                None => return Err(SendError::Request),
            },
            Err(_) => return Err(SendError::Request),
        }
    }
}

/// Make `request`'s URI origin-form (the path and query) and give it a
/// `Host` header (the authority, without a default port) unless it has one.
fn to_origin_form(request: &mut Request<Full<Bytes>>, authority: &Authority) -> Result<(), SendError> {
    let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !request.headers().contains_key(HOST) {
        let host = match authority.port_u16() {
            Some(80) => HeaderValue::from_str(authority.host()),
            _ => HeaderValue::from_str(authority.as_str()),
        };
        request.headers_mut().insert(HOST, host.map_err(|_| SendError::Request)?);
    }
    *request.uri_mut() = Uri::from(path);
    Ok(())
}

/// A new connection to `authority` through `connector`, its task spawned
/// on this thread's runtime.
async fn connect(connector: &HttpConnector, authority: &Authority) -> Result<Sender, SendError> {
    let target = Uri::builder().scheme(Scheme::HTTP).authority(authority.clone()).path_and_query("/").build();
    let target = target.map_err(|_| SendError::Connect)?;
    let io = connector.clone().oneshot(target).await.map_err(|_| SendError::Connect)?;
    let (sender, connection) = http1::Builder::new().handshake(io).await.map_err(|_| SendError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> Request<Full<Bytes>> {
        Request::builder().uri(uri).body(Full::new(Bytes::new())).expect("request")
    }

    #[test]
    fn requests_go_out_in_origin_form_with_their_host() {
        for (uri, path, host) in [
            ("http://up.example:8080/v1/chat?x=1", "/v1/chat?x=1", "up.example:8080"),
            ("http://up.example:80/v1", "/v1", "up.example"),
            ("http://[::1]:9000", "/", "[::1]:9000"),
        ] {
            let mut req = request(uri);
            let authority = req.uri().authority().cloned().expect("authority");
            to_origin_form(&mut req, &authority).expect("origin form");
            assert_eq!(req.uri(), path);
            assert_eq!(req.headers()[HOST], host);
        }
        let mut req = request("http://up.example/v1");
        req.headers_mut().insert(HOST, HeaderValue::from_static("override"));
        to_origin_form(&mut req, &"up.example".parse().expect("authority")).expect("origin form");
        assert_eq!(req.headers()[HOST], "override", "an adapter's Host header is kept");
    }
}
