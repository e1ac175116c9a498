//! Process metrics read at scrape time (`/proc/self`): resident memory,
//! open file descriptors, start time; plus the gateway's open
//! client connections and open streams, counted as they open and close.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

static OPEN_STREAMS: AtomicI64 = AtomicI64::new(0);
static OPEN_CONNECTIONS: AtomicI64 = AtomicI64::new(0);

/// Counts an open stream while alive.
pub struct OpenStream(());

/// Mark a stream open until the returned guard drops.
pub fn open_streams() -> OpenStream {
    OPEN_STREAMS.fetch_add(1, Ordering::Relaxed);
    OpenStream(())
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts an open client connection while alive.
pub struct OpenConnection(());

impl OpenConnection {
    /// Mark a client connection open until the guard drops.
    pub fn new() -> Self {
        OPEN_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Default for OpenConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) struct ProcessMetrics {
    resident: Gauge,
    fds: Gauge,
    start: Gauge,
    streams: Gauge,
    connections: Gauge,
}

impl ProcessMetrics {
    pub(super) fn new() -> Self {
        let this = Self {
            resident: Gauge::default(),
            fds: Gauge::default(),
            start: Gauge::default(),
            streams: Gauge::default(),
            connections: Gauge::default(),
        };
        this.start.set(i64::try_from(crate::store::unix_now()).unwrap_or(0));
        this
    }

    /// Register the standard process collector's names in `process`.
    pub(super) fn register_process(&self, process: &mut Registry) {
        process.register("resident_memory_bytes", "Resident memory size in bytes", self.resident.clone());
        process.register("open_fds", "Number of open file descriptors", self.fds.clone());
        process.register("start_time_seconds", "Start time of the process since the Unix epoch", self.start.clone());
    }

    /// Register the gateway's own gauges in `gateway`.
    pub(super) fn register_gateway(&self, gateway: &mut Registry) {
        gateway.register("open_streams", "Streams being relayed now", self.streams.clone());
        gateway.register("open_connections", "Client connections open now", self.connections.clone());
    }

    pub(super) fn refresh(&self) {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        if let Some(pages) = statm.split_whitespace().nth(1).and_then(|p| p.parse::<i64>().ok()) {
            self.resident.set(pages.saturating_mul(4096));
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.fds.set(i64::try_from(dir.count()).unwrap_or(0));
        }
        self.streams.set(OPEN_STREAMS.load(Ordering::Relaxed));
        self.connections.set(OPEN_CONNECTIONS.load(Ordering::Relaxed));
    }
}
