//! A node's own writes to a shared database, as seen by its re-reads.
//!
//! Every write to a shared table is announced with `NOTIFY`, also to the
//! node that made it, which re-reads and publishes what it read. A re-read
//! whose query ran before one of this node's writes committed, but whose
//! publication comes after that write's own, would undo the write locally
//! for a moment. A write therefore holds a [`LocalWrite`] from before its
//! statement until after its publication, and a re-read publishes only if
//! no write was under way or finished while it read ([`LocalWrites::stamp`]
//! before the query, [`LocalWrites::overlapped`] under the publication's
//! lock); otherwise it reads again.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How long a re-read that overlapped one of this node's writes waits
/// before reading again.
pub const REREAD_AFTER: Duration = Duration::from_millis(10);

/// The counters of one table's local writes.
#[derive(Default)]
pub struct LocalWrites {
    /// Writes under way.
    writing: AtomicUsize,
    /// Writes finished (published or failed).
    written: AtomicU64,
}

/// One write under way; dropping it ends the write (after its publication).
pub struct LocalWrite<'a>(&'a LocalWrites);

impl Drop for LocalWrite<'_> {
    fn drop(&mut self) {
        self.0.written.fetch_add(1, Ordering::SeqCst);
        self.0.writing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LocalWrites {
    /// Mark a write as started.
    pub fn start(&self) -> LocalWrite<'_> {
        self.writing.fetch_add(1, Ordering::SeqCst);
        LocalWrite(self)
    }

    /// Taken before a re-read's query: `None` while a write is under way.
    pub fn stamp(&self) -> Option<u64> {
        (self.writing.load(Ordering::SeqCst) == 0).then(|| self.written.load(Ordering::SeqCst))
    }

    /// Whether a write started or finished since `stamp` was taken (the
    /// re-read must not be published).
    pub fn overlapped(&self, stamp: Option<u64>) -> bool {
        stamp.is_none_or(|s| self.writing.load(Ordering::SeqCst) > 0 || self.written.load(Ordering::SeqCst) != s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_overlapping_a_write_is_not_published() {
        let writes = LocalWrites::default();
        let quiet = writes.stamp();
        assert!(!writes.overlapped(quiet));
        let write = writes.start();
        assert!(writes.stamp().is_none(), "a read started during a write");
        assert!(writes.overlapped(quiet), "a write started during the read");
        drop(write);
        assert!(writes.overlapped(quiet), "a write finished during the read");
        assert!(!writes.overlapped(writes.stamp()));
    }
}
