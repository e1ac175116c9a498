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
//! the connect timeout).
//!
//! Upstreams close connections left idle (uvicorn, and so vLLM, and Node
//! after 5 s, gunicorn after 2 s). A worker busy when the close arrives
//! only learns of it at its next poll of the socket, so a connection idle
//! for [`STALE_CHECK_AFTER`] or longer is first peeked at (one `recv` with
//! `MSG_PEEK`, without blocking): one the upstream closed, or that holds
//! bytes nobody asked for, is dropped instead of carrying the request into
//! a reset. A request hyper hands back unsent (it found the connection
//! closed before writing) is sent again on another; one that was sent is
//! never repeated.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use rustix::net::RecvFlags;
use tower::ServiceExt as _;

use super::upstream_client::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};

/// How often a thread drops the expired connections of every host.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A connection idle this long is peeked at before it is used again
/// (servers' idle timeouts are 2 s and more); one used more recently is
/// not, so a busy thread's connections cost no extra syscall.
const STALE_CHECK_AFTER: Duration = Duration::from_secs(1);

type Sender = http1::SendRequest<Full<Bytes>>;

/// A pooled connection.
struct Conn {
    sender: Sender,
    /// Its socket, open for as long as `sender` is not closed.
    fd: RawFd,
    /// When it was last handed out.
    used: Instant,
}

impl Conn {
    fn expired(&self, now: Instant) -> bool {
        self.sender.is_closed() || (self.sender.is_ready() && now.duration_since(self.used) > POOL_IDLE_TIMEOUT)
    }

    /// Whether the upstream closed this idle connection, or sent on it
    /// unasked, without this thread having noticed yet. Call only while
    /// its sender is not closed.
    fn closed_by_upstream(&self) -> bool {
        // SAFETY: the socket is owned by the connection's task, which runs
        // on this thread (as does every use of the pool) and closes it only
        // when the connection ends, which closes `sender` in the same step;
        // `sender` was seen open just before, with no await in between.
        #[allow(unsafe_code)]
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let mut byte = [0u8; 1];
        match rustix::net::recv(fd, &mut byte[..], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Err(rustix::io::Errno::AGAIN) => false,
            // 0: the upstream's end is closed; more: bytes no request asked for.
            Ok(_) | Err(_) => true,
        }
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
    fn checkout(&mut self, key: &(u64, Authority), now: Instant) -> Option<Conn> {
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
                let conn = conns.remove(i);
                if now.duration_since(conn.used) >= STALE_CHECK_AFTER && conn.closed_by_upstream() {
                    continue;
                }
                return Some(conn);
            }
        }
        None
    }

    /// Keep `conn` (its response under way), handed out at `now`, for
    /// later requests to `key`.
    fn give_back(&mut self, key: (u64, Authority), mut conn: Conn, now: Instant) {
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
            conn.used = now;
            conns.push(conn);
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
        let (mut conn, reused) = match POOL.with_borrow_mut(|pool| pool.checkout(&key, now)) {
            Some(conn) => (conn, true),
            None => (connect(connector, &key.1, now).await?, false),
        };
        match conn.sender.try_send_request(request).await {
            Ok(response) => {
                POOL.with_borrow_mut(|pool| pool.give_back(key, conn, now));
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
/// on this thread's runtime, handed out at `now`.
async fn connect(connector: &HttpConnector, authority: &Authority, now: Instant) -> Result<Conn, SendError> {
    let target = Uri::builder().scheme(Scheme::HTTP).authority(authority.clone()).path_and_query("/").build();
    let target = target.map_err(|_| SendError::Connect)?;
    let io = connector.clone().oneshot(target).await.map_err(|_| SendError::Connect)?;
    let fd = io.inner().as_raw_fd();
    let (sender, connection) = http1::Builder::new().handshake(io).await.map_err(|_| SendError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended");
        }
    });
    Ok(Conn { sender, fd, used: now })
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

    /// Read one request head (no body) from `stream`; returns its first line.
    fn read_head(stream: &mut std::net::TcpStream) -> String {
        use std::io::Read;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).expect("read") == 1 {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string()
    }

    /// What the upstream does to its first connection, once told to.
    #[derive(Clone, Copy)]
    enum Idle {
        /// Close it (its idle timeout).
        Close,
        /// Write on it unasked (a timeout response, say) and keep it open.
        Write,
    }

    /// An upstream that answers one request per connection, keeping the
    /// first connection open (as keep-alive) until told to do `then`.
    fn upstream_that_then(then: Idle) -> (String, std::sync::mpsc::Sender<()>, std::thread::JoinHandle<Vec<String>>) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (go, told) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut kept = Vec::new();
            for n in 0..2 {
                let (mut stream, _) = listener.accept().expect("accept");
                seen.push(format!("connection {n}: {}", read_head(&mut stream)));
                stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").expect("write");
                if n == 0 {
                    let _ = told.recv();
                    match then {
                        Idle::Close => drop(stream.shutdown(std::net::Shutdown::Both)),
                        Idle::Write => {
                            let timeout = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n";
                            stream.write_all(timeout).expect("write");
                            kept.push(stream);
                        }
                    }
                }
            }
            seen
        });
        (base, go, server)
    }

    /// A request on a connection the upstream closed (or wrote on) while
    /// it sat idle in the pool, the thread too busy to notice: it goes out
    /// on a new connection and is answered.
    async fn a_stale_connection_is_not_used_again(then: Idle) {
        use http_body_util::BodyExt;
        let (base, go, server) = upstream_that_then(then);
        let connector = HttpConnector::new();
        let first = send(7, request(&format!("{base}/first")), &connector).await.expect("first response");
        assert_eq!(first.into_body().collect().await.expect("body").to_bytes(), "ok");
        // Let the connection's task settle, idle and ready for another request.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let key = (7, base.trim_start_matches("http://").parse::<Authority>().expect("authority"));
        let ready = POOL.with_borrow(|pool| {
            pool.hosts.iter().find(|(k, _)| *k == key).is_some_and(|(_, conns)| conns[0].sender.is_ready())
        });
        assert!(ready, "the first connection is pooled and ready");
        // The upstream acts while this thread is blocked here, so that the
        // connection's task cannot notice before the next checkout.
        go.send(()).expect("signal");
        std::thread::sleep(STALE_CHECK_AFTER + Duration::from_millis(200));
        let second = send(7, request(&format!("{base}/second")), &connector).await.expect("answered");
        assert_eq!(second.into_body().collect().await.expect("body").to_bytes(), "ok");
        let seen = server.join().expect("upstream");
        assert_eq!(seen, ["connection 0: GET /first HTTP/1.1", "connection 1: GET /second HTTP/1.1"]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
        a_stale_connection_is_not_used_again(Idle::Close).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_wrote_on_unasked_is_not_used_again() {
        a_stale_connection_is_not_used_again(Idle::Write).await;
    }
}
