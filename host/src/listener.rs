//! The HTTP listener: HTTP/1.1, and HTTP/2 without TLS (h2c) when
//! `server.http2` is on (see `docs/security.md`), with a header-read
//! timeout that also ends idle keep-alive connections, and a cap on open
//! connections. At the cap the longest-idle connection is
//! closed to make room (as nginx reuses its idle keep-alive connections),
//! with a warning in the log, so idle or slow clients cannot take the
//! gateway offline. The cap never exceeds what the process's file limit
//! allows; the soft file limit is raised to the hard one at start.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::os::fd::AsFd;

use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::lingering::Lingering;
use crate::server::AbortOnDrop;
use crate::worker_balance::Balance;

/// File descriptors kept for everything but client connections (the store,
/// plugins, logs), before the rest is split between client connections and
/// their upstream connections.
const RESERVED_FDS: u64 = 128;

/// Raise the soft limit on open files to the hard limit; returns the soft
/// limit now in force.
pub fn raise_file_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum
        && limit.current != Some(hard)
    {
        let raised = rustix::process::Rlimit { current: Some(hard), maximum: Some(hard) };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return hard;
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// How many client connections fit: each may need an upstream connection
/// too.
pub fn connection_cap(config: &ServerConfig, file_limit: u64) -> usize {
    let by_files = file_limit.saturating_sub(RESERVED_FDS) / 2;
    config.max_connections.min(usize::try_from(by_files).unwrap_or(usize::MAX)).max(1)
}

/// One open connection.
struct Conn {
    /// Milliseconds since the listener started, of its last request.
    last_active: AtomicU64,
    /// Asks the connection to close once idle.
    close: Notify,
    /// Already asked.
    closing: std::sync::atomic::AtomicBool,
}

/// The open connections.
#[derive(Default)]
struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ask the longest-idle connection not already closing to close.
    fn evict_one(&self) {
        let conns = self.lock();
        let oldest = conns
            .values()
            .filter(|c| !c.closing.load(Ordering::Relaxed))
            .min_by_key(|c| c.last_active.load(Ordering::Relaxed));
        if let Some(conn) = oldest {
            conn.closing.store(true, Ordering::Relaxed);
            conn.close.notify_one();
        }
    }
}

/// What every worker's accept loop shares: the connection slots and table,
/// the HTTP settings, and the stop signal.
struct Shared {
    cap: usize,
    slots: Arc<Semaphore>,
    table: Arc<Table>,
    http: http1::Builder,
    /// Set when h2c is served too.
    h2: Option<http2::Builder<TokioExecutor>>,
    /// How long a new connection has to send its first bytes (HTTP/1.1's
    /// header timeout covers that once it is known not to be HTTP/2).
    header_timeout: Duration,
    started: Instant,
    next_id: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
    stop: watch::Receiver<bool>,
    /// Connections per worker, kept even (`worker_balance`).
    balance: Arc<Balance>,
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting
/// and wait for open connections to finish their requests.
///
/// With `workers` > 1 the other workers are threads of their own, each
/// running a single-threaded runtime with its own accept loop on the same
/// socket: a connection lives on one thread from accept to close, with no
/// hand-off between threads (`docs/performance.md`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ServerConfig,
    workers: usize,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let cap = connection_cap(config, raise_file_limit());
    tracing::info!(max_connections = cap, workers, "accepting connections");
    let (stop_tx, stop_rx) = watch::channel(false);
    let header_timeout = Duration::from_secs(config.header_timeout_secs);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(config.max_header_bytes.saturating_mul(2).max(16 * 1024))
        .max_headers(256)
        .keep_alive(true);
    let shared = Arc::new(Shared {
        cap,
        slots: Arc::new(Semaphore::new(cap)),
        table: Arc::new(Table::default()),
        http,
        h2: config.http2.then(|| h2_builder(config)),
        header_timeout,
        started: Instant::now(),
        next_id: AtomicU64::new(0),
        last_warning: Mutex::new(None),
        stop: stop_rx,
        balance: Arc::new(Balance::new(workers)),
    });
    let mut threads = Vec::new();
    for n in 1..workers.max(1) {
        let std_listener = listener.as_fd().try_clone_to_owned().map(std::net::TcpListener::from)?;
        let (app, shared) = (app.clone(), shared.clone());
        threads.push(std::thread::Builder::new().name(format!("wasmgate-worker-{n}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(error) => return tracing::error!(%error, "a worker could not start"),
            };
            rt.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(listener) => accept_loop(listener, app, &shared, n).await,
                    Err(error) => tracing::error!(%error, "a worker could not listen"),
                }
                drain(&shared).await;
            });
        })?);
    }
    tokio::select! {
        () = accept_loop(listener, app, &shared, 0) => {}
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
    drain(&shared).await;
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(())
}

/// Wait (bounded) for open connections to finish their requests.
async fn drain(shared: &Shared) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.slots.available_permits() < shared.cap && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often [`keep_a_near_timer`] fires: sooner than the timers requests
/// arm (header, plugin call and upstream timeouts, all seconds long).
const NEAR_TIMER: Duration = Duration::from_secs(1);

/// Keep a timer due within [`NEAR_TIMER`] on this runtime. tokio wakes its
/// own driver (an eventfd write, then one more turn of its loop) whenever
/// a timer is armed that is due sooner than every other; on a runtime with
/// no near timer, that was each request's header timer.
async fn keep_a_near_timer() {
    loop {
        tokio::time::sleep(NEAR_TIMER).await;
    }
}

/// Accept connections on `listener` until the stop signal, serving each on
/// this thread's runtime (worker `me`).
async fn accept_loop(listener: TcpListener, app: Router, shared: &Arc<Shared>, me: usize) {
    let _near = AbortOnDrop(tokio::spawn(keep_a_near_timer()));
    let mut stop = shared.stop.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let permit = match shared.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                {
                    let mut last = shared.last_warning.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(
                            max_connections = shared.cap,
                            "connection limit reached; closing the longest-idle connections to make room"
                        );
                        *last = Some(Instant::now());
                    }
                }
                shared.table.evict_one();
                tokio::select! {
                    p = shared.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    _ = stop.changed() => return,
                }
            }
        };
        shared.balance.turn(me).await;
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // EMFILE and the like: wait a moment instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    shared.table.evict_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let counted = shared.balance.opened(me);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            last_active: AtomicU64::new(shared.started.elapsed().as_millis() as u64),
            close: Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
        });
        shared.table.lock().insert(id, conn.clone());
        let (app, shared) = (app.clone(), shared.clone());
        tokio::spawn(async move {
            let (_permit, _counted) = (permit, counted);
            let _open = crate::metrics::OpenConnection::new();
            let touch = conn.clone();
            let started = shared.started;
            // With h2c on, which protocol the connection speaks (a silent
            // one is dropped after the header timeout, as HTTP/1.1's is).
            let h2 = match &shared.h2 {
                Some(builder) => speaks_h2(&stream, shared.header_timeout).await.map(|h2| h2.then_some(builder)),
                None => Some(None),
            };
            let Some(h2) = h2 else {
                shared.table.lock().remove(&id);
                return;
            };
            let stream = Lingering::new(stream);
            let linger = stream.flag();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                touch.last_active.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                req.extensions_mut().insert(ConnectInfo(addr));
                let (app, linger) = (app.clone(), linger.clone());
                async move {
                    let response = app.oneshot(req.map(axum::body::Body::new)).await.unwrap_or_else(|e| match e {});
                    if response.headers().get(hyper::header::CONNECTION).is_some_and(|v| v == "close") {
                        linger.store(true, Ordering::Relaxed);
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let stop = shared.stop.clone();
            match h2 {
                Some(builder) => {
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    drive(connection, |c| c.graceful_shutdown(), &conn.close, stop).await;
                }
                _ => {
                    let connection = shared.http.serve_connection(TokioIo::new(stream), service);
                    drive(connection, |c| c.graceful_shutdown(), &conn.close, stop).await;
                }
            }
            shared.table.lock().remove(&id);
        });
    }
}

/// The HTTP/2 settings: streams per connection, header size, and pings
/// that find dead peers.
fn h2_builder(config: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_streams)
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(config.header_timeout_secs.max(1)))
        .keep_alive_timeout(Duration::from_secs(20));
    h2
}

/// Whether a new connection opens with HTTP/2's connection preface, read
/// without consuming it; `None` when it did not send the preface, or enough
/// of its first bytes to rule it out, in time (or failed).
async fn speaks_h2(stream: &tokio::net::TcpStream, timeout: Duration) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + timeout;
    let mut head = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut head)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        if head[..n] != PREFACE[..n] {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // The preface so far: wait for the rest (a client that stops
        // halfway is dropped at the deadline).
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Run `connection` to its end, closing it gracefully when the listener
/// asks it to make room (`close`) or stops.
async fn drive<C: std::future::Future>(
    connection: C,
    graceful_shutdown: impl Fn(std::pin::Pin<&mut C>),
    close: &Notify,
    mut stop: watch::Receiver<bool>,
) {
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => break,
            () = close.notified(), if !closing => {
                closing = true;
                graceful_shutdown(connection.as_mut());
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                graceful_shutdown(connection.as_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_upstream_connections_and_files() {
        let c = ServerConfig::default();
        assert_eq!(connection_cap(&c, 1024), (1024 - 128) / 2);
        assert_eq!(connection_cap(&c, u64::MAX), c.max_connections);
        assert_eq!(connection_cap(&c, 10), 1);
    }
}
