//! Storage health: whether the data directory can take writes now.
//!
//! The gateway fails closed: while the disk is (nearly) full or a write
//! failed, requests that would be billed are refused with a clear 503,
//! admin writes too, and `/health` says why; nothing is served unbilled.
//! sled's own I/O errors are permanent until it is reopened, so the guard
//! keeps sled from meeting a full disk where it can: writes stop while the
//! free space is under `storage.min_free_mb`, and resume when it returns
//! (with a margin), without a restart. A probe write clears a journal
//! failure once the disk works again; a store that failed anyway is
//! reopened in place (see `Store::reopen`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the guard knows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StorageStatus {
    /// Whether writes are accepted.
    pub writable: bool,
    /// Why not.
    pub reason: Option<String>,
    /// Bytes free for the gateway on the data directory's filesystem.
    pub free_bytes: Option<u64>,
}

/// Storage health of one data directory.
pub struct StorageGuard {
    dir: PathBuf,
    min_free: u64,
    low_space: AtomicBool,
    /// A write failed; cleared by a successful probe.
    failed: AtomicBool,
    /// sled failed: only a restart clears it.
    broken: AtomicBool,
    reason: Mutex<Option<String>>,
}

/// Bytes available to unprivileged writers on `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

impl StorageGuard {
    /// A guard for `dir` keeping `min_free` bytes free.
    pub fn new(dir: &Path, min_free: u64) -> Self {
        let guard = Self {
            dir: dir.to_path_buf(),
            min_free,
            low_space: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            reason: Mutex::new(None),
        };
        guard.refresh();
        guard
    }

    fn set_reason(&self, reason: Option<String>) {
        *self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }

    /// Whether writes are accepted (as of the last check; no system call).
    pub fn writable(&self) -> bool {
        !self.low_space.load(Ordering::Relaxed)
            && !self.failed.load(Ordering::Relaxed)
            && !self.broken.load(Ordering::Relaxed)
    }

    /// Whether writes are accepted, the free space checked now (before a
    /// batch is handed to sled).
    pub fn writable_now(&self) -> bool {
        self.check_space();
        self.writable()
    }

    /// A write (the journal's) failed.
    pub fn report_failure(&self, what: &str) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(what, "storage write failed; refusing billed requests until it works again");
        }
        self.set_reason(Some(format!("a write failed: {what}")));
    }

    /// sled failed to write: its errors last until it is reopened, which
    /// the store's monitor does once the disk has room again.
    pub fn report_store_failure(&self, what: &str) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::error!(what, "the store failed to write; it will be reopened once the disk has room");
        }
        self.set_reason(Some(format!("the store failed to write ({what})")));
    }

    /// Whether the store must be reopened.
    pub fn needs_reopen(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Whether the disk has room (as of the last check).
    pub fn space_ok(&self) -> bool {
        !self.low_space.load(Ordering::Relaxed)
    }

    /// The store was reopened.
    pub fn reopened(&self) {
        self.broken.store(false, Ordering::Relaxed);
        tracing::warn!("storage works again; serving billed requests");
        if self.writable() {
            self.set_reason(None);
        }
    }

    /// Refresh the free-space state; returns the bytes free.
    fn check_space(&self) -> Option<u64> {
        let free = free_bytes(&self.dir)?;
        let was_low = self.low_space.load(Ordering::Relaxed);
        // Leave the low state only with a margin, so it does not flap.
        let low = if was_low {
            free < self.min_free.saturating_mul(2).max(self.min_free + (8 << 20))
        } else {
            free < self.min_free
        };
        if low != was_low {
            self.low_space.store(low, Ordering::Relaxed);
            if low {
                tracing::error!(
                    free_bytes = free,
                    min_free_bytes = self.min_free,
                    "disk nearly full; refusing billed requests and admin writes"
                );
                self.set_reason(Some(format!("the disk is nearly full ({free} bytes free)")));
            } else {
                tracing::warn!(free_bytes = free, "disk space is back");
            }
        }
        Some(free)
    }

    /// One round of the monitor: free space, and a probe write while a
    /// failure is recorded.
    pub fn refresh(&self) {
        self.check_space();
        if self.failed.load(Ordering::Relaxed) && !self.low_space.load(Ordering::Relaxed) && self.probe().is_ok() {
            self.failed.store(false, Ordering::Relaxed);
            tracing::warn!("storage writes work again; serving billed requests");
        }
        if self.writable() {
            self.set_reason(None);
        }
    }

    /// Write, sync and remove a small file.
    fn probe(&self) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.dir.join(".storage-probe");
        let result = (|| {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&[0u8; 4096])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        result
    }

    /// What `/health` shows.
    pub fn status(&self) -> StorageStatus {
        let free = free_bytes(&self.dir);
        let reason = self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        StorageStatus {
            writable: self.writable(),
            reason: if self.writable() { None } else { reason },
            free_bytes: free,
        }
    }
}
