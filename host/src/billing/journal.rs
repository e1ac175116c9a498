//! The billing journal: every change the writer will make durable (a usage
//! row, a balance adjustment, a stream that started serving) is first
//! appended here, on the request path, as one line of JSON with a sequence
//! number. The writer records the last sequence number it committed in the
//! same sled transaction as the change itself, so on start the lines after
//! it are exactly what a crash left unwritten; [`Journal::open`] returns
//! them to be applied before anything is served.
//!
//! An append is a copy into the file's mapping in the page cache, not an
//! `fsync` (nor a system call: see `journal_file.rs`): it survives the
//! process dying (`kill -9`, a panic, the OOM killer), which is what the
//! batching writer alone could not promise. Losing the machine itself can
//! still lose the last unflushed batch (see `docs/billing.md`).
//!
//! Two files take turns (`billing.journal` and `billing.journal.old`;
//! which one is appended to is not recorded: recovery reads both). When the
//! writer has committed everything, both are emptied; under sustained load,
//! once the one appended to passes [`ROTATE_BYTES`], appends move to the
//! other, as soon as that one's lines are all committed and it is emptied.
//! The files are emptied in place, never deleted or created, so their pages
//! stay in the page cache: an append copies into a page already there.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::journal_file::{MappedFile, contents};
use super::logs::LogRow;

/// Size past which appends move to the other file.
pub const ROTATE_BYTES: u64 = 512 << 10;

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

/// The JSON of a journaled change's row, cut from its journal line: the
/// writer stores these bytes in the usage log (and an open stream's
/// record) instead of serializing the row a second time. The line is
/// `{"op":"row",` + the row's members + `,"seq":N}`; a row serialized on
/// its own is `{` + the same members + `}` (`serde` writes an internally
/// tagged variant's tag first, then the struct's fields in order), so the
/// two commas around the members become the row's braces, in place.
pub struct RowJson {
    line: Vec<u8>,
    json: std::ops::Range<usize>,
}

impl RowJson {
    /// The row's JSON in `line` (written to the journal from `change`, its
    /// members ending at `end`), when `change` holds a row.
    fn cut(change: &Change, mut line: Vec<u8>, end: usize) -> Option<Self> {
        let tag: &[u8] = match change {
            Change::Row(_) => b"{\"op\":\"row\",",
            Change::Open(_) => b"{\"op\":\"open\",",
            Change::Adjust { .. } => return None,
        };
        let start = tag.len() - 1;
        if !line.starts_with(tag) || end <= tag.len() || line.get(end) != Some(&b',') {
            return None;
        }
        line[start] = b'{';
        line[end] = b'}';
        Some(Self { line, json: start..end + 1 })
    }

    /// The row's JSON object.
    pub fn bytes(&self) -> &[u8] {
        &self.line[self.json.clone()]
    }

    /// `row`'s JSON: `json`'s bytes when the journal cut them, serialized
    /// otherwise (rows replayed from the journal at start).
    pub fn or_serialized<'a>(json: Option<&'a Self>, row: &LogRow) -> serde_json::Result<Cow<'a, [u8]>> {
        match json {
            Some(json) => Ok(Cow::Borrowed(json.bytes())),
            None => serde_json::to_vec(row).map(Cow::Owned),
        }
    }
}

struct Inner {
    /// The file appended to.
    live: MappedFile,
    /// The other file: the lines before `live`'s until they are committed,
    /// then empty, waiting for its turn.
    other: MappedFile,
    /// Last sequence number handed out.
    last_seq: u64,
    /// Last sequence number in `other`, while it holds lines not known to
    /// be committed.
    other_last: Option<u64>,
}

/// The append-only journal in the data directory.
pub struct Journal {
    inner: Mutex<Inner>,
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
    // The zeros after the contents are the file's allocated space.
    let data = contents(&data);
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
    /// Open the journal `dir/billing.journal*`; returns it and the entries
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
        let live = MappedFile::open(&path)?;
        let other = MappedFile::open(&old)?;
        let other_last = (other.len() > 0).then_some(last_seq);
        let inner = Inner { live, other, last_seq, other_last };
        Ok((Self { inner: Mutex::new(inner) }, pending))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Journal `change` and, under the same lock, hand it with its sequence
    /// number, its row's JSON (see [`RowJson`]) and whether it was journaled
    /// to `then` (which queues it for the writer, so the writer sees changes
    /// in sequence order). An append fails whole (only when the file must
    /// grow and cannot), so no torn line is ever followed by good ones.
    pub fn append<R>(
        &self,
        change: Change,
        then: impl FnOnce(u64, Change, Option<RowJson>, Result<(), AppendError>) -> R,
    ) -> R {
        // Serialized before the lock is taken, so that the lock covers only
        // the sequence number and the write: `{"op":…}` loses its closing
        // brace here and gets `,"seq":N}` under the lock.
        let line = serialized(&change).map_err(|error| AppendError(format!("not serializable: {error}")));
        let mut inner = self.lock();
        inner.last_seq = inner.last_seq.saturating_add(1);
        let seq = inner.last_seq;
        let (line, written) = match line {
            Err(error) => (None, Err(error)),
            Ok(mut line) => {
                debug_assert_eq!(line.last(), Some(&b'}'));
                line.pop();
                let members_end = line.len();
                let _ = writeln!(line, ",\"seq\":{seq}}}");
                let written = inner.live.append(&line).map_err(|error| {
                    tracing::error!(%error, seq, "appending to the billing journal failed");
                    AppendError(error.to_string())
                });
                (Some((line, members_end)), written)
            }
        };
        let row = line.and_then(|(line, end)| RowJson::cut(&change, line, end));
        then(seq, change, row, written)
    }

    /// Bytes of lines in the journal's files.
    pub fn size(&self) -> u64 {
        let inner = self.lock();
        (inner.live.len() + inner.other.len()) as u64
    }

    /// Everything up to `seq` is committed to sled: drop what the journal
    /// no longer needs (empty both files when caught up, else the other
    /// file once its lines are committed; move appends to it when the live
    /// one is large).
    pub fn committed(&self, seq: u64) {
        let inner = &mut *self.lock();
        if inner.last_seq <= seq {
            inner.live.clear();
            if inner.other_last.take().is_some() {
                inner.other.clear();
            }
            return;
        }
        if inner.other_last.is_some_and(|last| last <= seq) {
            inner.other_last = None;
            inner.other.clear();
        }
        if inner.live.len() as u64 > ROTATE_BYTES && inner.other_last.is_none() {
            std::mem::swap(&mut inner.live, &mut inner.other);
            inner.other_last = Some(inner.last_seq);
        }
    }
}

/// `change` as JSON in a buffer of its own length, with room for the
/// `,"seq":N}` and newline that follow. Serialized into a per-thread
/// buffer first: serde_json's own `to_vec` grows a small vector three
/// times for a usage row.
fn serialized(change: &Change) -> serde_json::Result<Vec<u8>> {
    /// Room for `,"seq":` + the largest u64 + `}` and a newline.
    const SEQ_SUFFIX: usize = 30;
    /// Past this, a buffer that grew for an unusual change is let go.
    const KEPT: usize = 64 << 10;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(4096));
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        let written = serde_json::to_writer(&mut *scratch, change);
        let mut line = Vec::with_capacity(scratch.len() + SEQ_SUFFIX);
        line.extend_from_slice(scratch);
        if scratch.capacity() > KEPT {
            *scratch = Vec::with_capacity(4096);
        }
        written.map(|()| line)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64) -> Change {
        Change::Row(Box::new(LogRow { id, request_id: format!("r{id}"), ..LogRow::default() }))
    }

    fn append(j: &Journal, change: Change) -> u64 {
        j.append(change, |seq, _, _, written| {
            written.expect("journaled");
            seq
        })
    }

    #[test]
    fn a_rows_json_cut_from_its_journal_line_is_the_row_serialized_on_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (j, _) = Journal::open(dir.path(), 0).expect("open");
        let full = LogRow {
            id: 41,
            request_id: "req_\"quoted\"\n".into(),
            user_id: Some(3),
            token_id: Some(9),
            token_name: "ünïcode \u{1F600}".into(),
            ttft_ms: Some(12),
            error_kind: Some("rate_limited".into()),
            note: Some("top-up".into()),
            quota: -17,
            ..LogRow::default()
        };
        for change in [Change::Row(Box::new(full.clone())), Change::Open(Box::new(full.clone())), row(42)] {
            let expected = match &change {
                Change::Row(r) | Change::Open(r) => serde_json::to_vec(r.as_ref()).expect("serialize"),
                Change::Adjust { .. } => unreachable!(),
            };
            let cut = j.append(change, |_, _, json, written| {
                written.expect("journaled");
                json.expect("a row's JSON").bytes().to_vec()
            });
            assert_eq!(String::from_utf8_lossy(&cut), String::from_utf8_lossy(&expected));
        }
        let adjust = j.append(Change::Adjust { user: Some(1), token: None, delta: 5 }, |_, _, json, _| json.is_none());
        assert!(adjust, "an adjustment has no row");
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
        let path = dir.path().join("billing.journal");
        let text = || std::fs::read(&path).map(|d| contents(&d).to_vec()).expect("file");
        j.committed(1);
        assert!(j.size() > 0 && !text().is_empty(), "seq 2 still needed");
        j.committed(2);
        assert_eq!((j.size(), text()), (0, Vec::new()));
        append(&j, row(3));
        drop(j);
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(b"{\"seq\":4,\"op\":\"ro", text().len() as u64).expect("torn write");
        let (_, pending) = Journal::open(dir.path(), 2).expect("reopen");
        assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn emptying_cut_short_by_a_crash_leaves_a_readable_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (j, _) = Journal::open(dir.path(), 0).expect("open");
            for id in 1..=3 {
                append(&j, row(id));
            }
        }
        // `MappedFile::clear` zeroes from the end: stopped part way, it
        // leaves whole lines and a cut one.
        let path = dir.path().join("billing.journal");
        let mut data = std::fs::read(&path).expect("read");
        let second = data.iter().position(|b| *b == b'\n').expect("a line") + 1;
        let end = contents(&data).len();
        data[second + 10..end].fill(0);
        std::fs::write(&path, &data).expect("write");
        let (_, pending) = Journal::open(dir.path(), 3).expect("everything was committed");
        assert!(pending.is_empty());
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
    fn a_large_file_hands_over_to_the_other_and_both_are_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ["billing.journal", "billing.journal.old"].map(|f| dir.path().join(f));
        let lines = |i: usize| std::fs::read(&files[i]).map(|d| contents(&d).to_vec()).expect("file");
        let (j, _) = Journal::open(dir.path(), 0).expect("open");
        let large = LogRow { id: 1, request_id: "r".repeat(ROTATE_BYTES as usize), ..LogRow::default() };
        append(&j, Change::Row(Box::new(large)));
        j.committed(0);
        append(&j, row(2));
        assert!(lines(0).len() as u64 > ROTATE_BYTES, "seq 1 stays until committed");
        assert!(String::from_utf8_lossy(&lines(1)).contains("\"seq\":2"), "seq 2 went to the other file");
        drop(j);
        let (j, pending) = Journal::open(dir.path(), 0).expect("reopen");
        assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        // Reopened, `billing.journal` is appended to again; the other file
        // holds up to seq 2.
        append(&j, row(3));
        j.committed(2);
        assert!(lines(1).is_empty(), "the other file's lines are committed: emptied");
        assert!(String::from_utf8_lossy(&lines(0)).contains("\"seq\":3"), "seq 3 still needed");
        j.committed(3);
        assert_eq!((j.size(), lines(0), lines(1)), (0, Vec::new(), Vec::new()));
    }
}
