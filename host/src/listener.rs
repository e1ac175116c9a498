//! The HTTP listener: HTTP/1.1 only (see `docs/security.md`), with a
//! header-read timeout that also ends idle keep-alive connections, and a
//! cap on open connections. At the cap the longest-idle connection is
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
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tower::ServiceExt;

use crate::config::ServerConfig;

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

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting
/// and wait for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let cap = connection_cap(config, raise_file_limit());
    tracing::info!(max_connections = cap, "accepting connections");
    let slots = Arc::new(Semaphore::new(cap));
    let table = Arc::new(Table::default());
    let started = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(config.header_timeout_secs))
        .max_buf_size(config.max_header_bytes.saturating_mul(2).max(16 * 1024))
        .max_headers(256)
        .keep_alive(true);
    let http = Arc::new(http);
    let mut last_warning: Option<Instant> = None;
    let mut next_id: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        max_connections = cap,
                        "connection limit reached; closing the longest-idle connections to make room"
                    );
                    last_warning = Some(Instant::now());
                }
                table.evict_one();
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // EMFILE and the like: wait a moment instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    table.evict_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        next_id = next_id.wrapping_add(1);
        let id = next_id;
        let now_ms = started.elapsed().as_millis() as u64;
        let conn = Arc::new(Conn {
            last_active: AtomicU64::new(now_ms),
            close: Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
        });
        table.lock().insert(id, conn.clone());
        let (app, http, table, mut stop) = (app.clone(), http.clone(), table.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let touch = conn.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                touch.last_active.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                req.extensions_mut().insert(ConnectInfo(addr));
                let app = app.clone();
                async move {
                    Ok::<_, Infallible>(
                        app.oneshot(req.map(axum::body::Body::new)).await.unwrap_or_else(|e| match e {}),
                    )
                }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = connection.as_mut() => break,
                    () = conn.close.notified(), if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    _ = stop.changed(), if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            table.lock().remove(&id);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Wait (bounded) for open connections to finish their requests.
    let deadline = Instant::now() + Duration::from_secs(30);
    while slots.available_permits() < cap && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
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
