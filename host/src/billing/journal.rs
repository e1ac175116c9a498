//! The billing journal: every change the writer will make durable (a usage
//! row, a balance adjustment, a stream that started serving) is first
//! appended here, on the request path, as one line of JSON with a sequence
//! number. The writer records the last sequence number it committed in the
//! same sled transaction as the change itself, so on start the lines after
//! it are exactly what a crash left unwritten; [`Journal::open`] returns
//! them to be applied before anything is served.
//!
//! An append is one `write(2)` to the page cache, not an `fsync`: it
//! survives the process dying (`kill -9`, a panic, the OOM killer), which
//! is what the batching writer alone could not promise. Losing the machine
//! itself can still lose the last unflushed batch (see `docs/billing.md`).
//!
//! The file is kept short: when the writer has committed everything it is
//! truncated, and under sustained load it is rotated to `*.old` once it
//! passes [`ROTATE_BYTES`] (the `.old` file is deleted when all of it is
//! committed).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::logs::LogRow;

/// Size past which the live file is rotated.
pub const ROTATE_BYTES: u64 = 8 << 20;

/// A change of usage logs or balances, as journaled and as the writer
/// applies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// A log row; `consume` rows also move balances, and end the request's
    /// open stream if it had one.
    Row(Box<LogRow>),
    /// An admin's change of a balance by `delta`.
    Adjust {
        /// User whose quota changes.
        user: Option<u64>,
        /// Token whose own quota changes.
        token: Option<u64>,
        /// Amount.
        delta: i64,
    },
    /// A stream began reaching its client. The row is what it is billed
    /// (prompt only, `interrupted`) if the process dies before the stream
    /// settles; the stream's own `consume` row replaces it.
    Open(Box<LogRow>),
}

/// One journal line, as read back (`append` writes the line itself: the
/// change's JSON object with `"seq"` as its last member).
#[derive(Debug, Deserialize)]
pub struct Entry {
    /// Sequence number, increasing by one per change.
    pub seq: u64,
    /// The change.
    #[serde(flatten)]
    pub change: Change,
}

struct Inner {
    file: File,
    /// Last sequence number handed out.
    last_seq: u64,
    /// Bytes in the live file.
    bytes: u64,
    /// Last sequence number in the `.old` file, while it exists.
    old_last: Option<u64>,
}

/// The append-only journal in the data directory.
pub struct Journal {
    path: PathBuf,
    old: PathBuf,
    inner: Mutex<Inner>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The entries of `path` after `applied`, in order. Only a last line
/// without its newline (a write torn by a power loss, never acknowledged)
/// is skipped; any other unreadable line is damage, reported as an error:
/// it may hold a charge, and skipping it would lose it silently.
fn read_after(path: &Path, applied: u64, out: &mut Vec<Entry>) -> io::Result<()> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let complete = data.ends_with(b"\n");
    let lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    let last = lines.len().saturating_sub(1);
    for (n, line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(entry) if entry.seq > applied => out.push(entry),
            Ok(_) => {}
            Err(error) if n == last && !complete => {
                tracing::warn!(file = %path.display(), line = n + 1, %error, "ignoring a torn last journal line (never acknowledged)")
            }
            Err(error) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} line {}: {error}. The billing journal is damaged and may hold usage not yet \
                         written to the store. Inspect the line; to start anyway, move the file aside \
                         (its rows are then not billed) — see docs/security.md, \"Recovering a damaged store\"",
                        path.display(),
                        n + 1
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Why a change could not be journaled.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AppendError(pub String);

impl Journal {
    /// Open the journal `dir/billing.journal`; returns it and the entries
    /// after `applied` (the writer's last committed sequence number) that
    /// must be applied before serving. Call [`Self::committed`] once they
    /// are.
    pub fn open(dir: &Path, applied: u64) -> io::Result<(Self, Vec<Entry>)> {
        let path = dir.join("billing.journal");
        let old = dir.join("billing.journal.old");
        let mut pending = Vec::new();
        read_after(&old, applied, &mut pending)?;
        read_after(&path, applied, &mut pending)?;
        pending.sort_by_key(|e| e.seq);
        pending.dedup_by_key(|e| e.seq);
        let last_seq = pending.last().map_or(applied, |e| e.seq);
        let file = open_append(&path)?;
        let bytes = file.metadata()?.len();
        let old_last = old.exists().then_some(last_seq);
        let inner = Inner { file, last_seq, bytes, old_last };
        Ok((Self { path, old, inner: Mutex::new(inner) }, pending))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Journal `change` and, under the same lock, hand it with its sequence
    /// number and whether it was journaled to `then` (which queues it for
    /// the writer, so the writer sees changes in sequence order). A failed
    /// append is rolled back (the file is cut back to its previous length),
    /// so no torn line is ever followed by good ones.
    pub fn append<R>(&self, change: Change, then: impl FnOnce(u64, Change, Result<(), AppendError>) -> R) -> R {
        // Serialized before the lock is taken, so that the lock covers only
        // the sequence number and the write: `{"op":…}` loses its closing
        // brace here and gets `,"seq":N}` under the lock.
        let line = serde_json::to_vec(&change).map_err(|error| AppendError(format!("not serializable: {error}")));
        let mut inner = self.lock();
        inner.last_seq = inner.last_seq.saturating_add(1);
        let seq = inner.last_seq;
        let written = line.and_then(|mut line| {
            debug_assert_eq!(line.last(), Some(&b'}'));
            line.pop();
            let _ = writeln!(line, ",\"seq\":{seq}}}");
            match inner.file.write_all(&line) {
                Ok(()) => {
                    inner.bytes = inner.bytes.saturating_add(line.len() as u64);
                    Ok(())
                }
                Err(error) => {
                    let rollback = inner.file.set_len(inner.bytes);
                    tracing::error!(%error, seq, rolled_back = rollback.is_ok(), "appending to the billing journal failed");
                    Err(AppendError(error.to_string()))
                }
            }
        });
        then(seq, change, written)
    }

    /// Bytes in the live journal file.
    pub fn size(&self) -> u64 {
        self.lock().bytes
    }

    /// Everything up to `seq` is committed to sled: drop what the journal
    /// no longer needs (truncate when caught up, rotate when large).
    pub fn committed(&self, seq: u64) {
        let mut inner = self.lock();
        let result = (|| -> io::Result<()> {
            if inner.last_seq <= seq {
                inner.file.set_len(0)?;
                inner.bytes = 0;
                if inner.old_last.take().is_some() {
                    std::fs::remove_file(&self.old)?;
                }
                return Ok(());
            }
            if inner.old_last.is_some_and(|old| old <= seq) {
                inner.old_last = None;
                std::fs::remove_file(&self.old)?;
            }
            if inner.bytes > ROTATE_BYTES && inner.old_last.is_none() {
                std::fs::rename(&self.path, &self.old)?;
                inner.file = open_append(&self.path)?;
                inner.bytes = 0;
                inner.old_last = Some(inner.last_seq);
            }
            Ok(())
        })();
        if let Err(error) = result {
            tracing::warn!(%error, "trimming the billing journal failed; it will be retried");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64) -> Change {
        Change::Row(Box::new(LogRow { id, request_id: format!("r{id}"), ..LogRow::default() }))
    }

    fn append(j: &Journal, change: Change) -> u64 {
        j.append(change, |seq, _, written| {
            written.expect("journaled");
            seq
        })
    }

    #[test]
    fn entries_after_the_committed_one_come_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (j, pending) = Journal::open(dir.path(), 0).expect("open");
            assert!(pending.is_empty());
            assert_eq!(append(&j, row(1)), 1);
            assert_eq!(append(&j, Change::Adjust { user: Some(3), token: None, delta: -5 }), 2);
            assert_eq!(append(&j, row(2)), 3);
        } // dropped without `committed`: what a crash leaves
        let (j, pending) = Journal::open(dir.path(), 1).expect("reopen");
        let seqs: Vec<u64> = pending.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(pending[0].change, Change::Adjust { user: Some(3), token: None, delta: -5 });
        assert_eq!(append(&j, row(3)), 4, "numbering continues after the pending entries");
    }

    #[test]
    fn appends_from_several_threads_each_come_back_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (j, _) = Journal::open(dir.path(), 0).expect("open");
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let j = &j;
                    s.spawn(move || {
                        for i in 0..250 {
                            append(j, row(t * 1000 + i));
                        }
                    });
                }
            });
        }
        let (_, pending) = Journal::open(dir.path(), 0).expect("reopen");
        assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=1000).collect::<Vec<_>>());
        let mut ids: Vec<u64> = pending
            .iter()
            .map(|e| match &e.change {
                Change::Row(row) => row.id,
                other => panic!("unexpected change {other:?}"),
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 1000, "every row once");
    }

    #[test]
    fn caught_up_truncates_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (j, _) = Journal::open(dir.path(), 0).expect("open");
        append(&j, row(1));
        append(&j, row(2));
        j.committed(1);
        assert!(std::fs::metadata(dir.path().join("billing.journal")).expect("file").len() > 0, "seq 2 still needed");
        j.committed(2);
        assert_eq!(std::fs::metadata(dir.path().join("billing.journal")).expect("file").len(), 0);
        append(&j, row(3));
        drop(j);
        let mut f = open_append(&dir.path().join("billing.journal")).expect("append");
        f.write_all(b"{\"seq\":4,\"op\":\"ro").expect("torn write");
        let (_, pending) = Journal::open(dir.path(), 2).expect("reopen");
        assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_damaged_line_before_good_ones_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (j, _) = Journal::open(dir.path(), 0).expect("open");
            append(&j, row(1));
            append(&j, row(2));
        }
        let path = dir.path().join("billing.journal");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replacen("\"seq\":1", "\"seq\":1x", 1)).expect("damage");
        let err = Journal::open(dir.path(), 0).err().expect("refused");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn a_large_file_rotates_and_both_files_are_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (j, _) = Journal::open(dir.path(), 0).expect("open");
        append(&j, row(1));
        j.lock().bytes = ROTATE_BYTES + 1; // as if it were large
        j.committed(0);
        assert!(dir.path().join("billing.journal.old").exists());
        append(&j, row(2));
        drop(j);
        let (j, pending) = Journal::open(dir.path(), 0).expect("reopen");
        assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        j.committed(2);
        assert!(!dir.path().join("billing.journal.old").exists(), "all committed: .old removed");
    }
}
