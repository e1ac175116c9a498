//! The billing writer: log rows and balance changes are journaled and
//! queued by requests (see [`super::journal`]) and written off the request
//! path, in batches, by one thread at a lower priority that wakes every
//! `flush_interval_ms` (queueing a row wakes nothing). Each batch is **one
//! sled transaction** over the `users`, `tokens`, `logs` and
//! `billing_state` trees, then one flush: a
//! charge is on disk exactly when its log row is, together with the
//! journal sequence number it came from. A crash loses nothing the journal
//! holds: on start [`recover`] applies the journal lines after that number,
//! then bills every stream that was still open (see [`Change::Open`]). A
//! row id is written once (re-running a transaction rewrites the same keys).
//! A clean stop flushes the queue first.

use std::collections::HashMap;
use std::sync::atomic::Ordering::{self, SeqCst};
use std::sync::atomic::{AtomicBool, fence};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tokio::sync::{mpsc, oneshot};

use super::NotRecorded;
use super::accounts::{TokenRecord, UserRecord};
use super::journal::{Change, Entry, Journal, RowJson};
use super::log_blocks;
use super::logs::{self, LogKind, LogRow};
use super::writer_pg::PgSink;
use crate::store::Store;

/// Key of the last committed journal sequence number in `billing_state`.
const JOURNAL_SEQ: &[u8] = b"journal_seq";
/// Prefix of open streams in `billing_state` (followed by the request id).
const OPEN: &[u8] = b"open/";

/// One queued item.
enum Op {
    /// A journaled change, its sequence number and its row's JSON.
    Change(u64, Change, Option<RowJson>),
    /// Acknowledge once everything queued before is on disk.
    Flush(oneshot::Sender<()>),
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most changes per transaction.
    pub max_ops: usize,
    /// Longest a change waits for companions.
    pub max_wait: Duration,
}

/// The trees a batch writes.
#[derive(Clone)]
pub struct Trees {
    /// Users (balances).
    pub users: sled::Tree,
    /// Tokens (balances).
    pub tokens: sled::Tree,
    /// Usage log rows.
    pub logs: sled::Tree,
    /// The committed journal sequence number and the open streams.
    pub state: sled::Tree,
    /// The log's per-minute and per-hour rollups.
    pub rollups: sled::Tree,
    /// Which block of `logs` each row goes to.
    pub layout: log_blocks::Layout,
}

impl Trees {
    /// The trees, fetched from `store` now.
    pub fn open(store: &Store) -> anyhow::Result<Self> {
        let state = store.tree("billing_state")?;
        Ok(Self {
            users: store.tree("users")?,
            tokens: store.tree("tokens")?,
            logs: store.tree("logs")?,
            layout: log_blocks::Layout::read(&state)?,
            state,
            rollups: store.tree("log_rollup")?,
        })
    }

    /// The last journal sequence number committed.
    pub fn committed_seq(&self) -> sled::Result<u64> {
        Ok(self
            .state
            .get(JOURNAL_SEQ)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }
}

/// Handle for queueing.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Op>,
    journal: Arc<Journal>,
    /// Declared after `tx`: dropped with the last handle, once the queue
    /// is closed, it wakes a sleeping writer to finish and end.
    kick: Arc<KickOnDrop>,
    store: Store,
    stats: Arc<WriterStats>,
}

/// The handles' [`Kick`], which kicks the writer when the last handle goes.
struct KickOnDrop(Arc<Kick>);

impl std::ops::Deref for KickOnDrop {
    type Target = Kick;

    fn deref(&self) -> &Kick {
        &self.0
    }
}

impl Drop for KickOnDrop {
    fn drop(&mut self) {
        self.0.kick();
    }
}

/// What the writer thread reports, for metrics.
#[derive(Default)]
struct WriterStats {
    /// Changes waiting to be written.
    pending: std::sync::atomic::AtomicU64,
    /// Unix ms of the last commit (or of the start).
    last_commit_ms: std::sync::atomic::AtomicU64,
}

/// Wakes the writer thread before its interval ends (for a flush), or
/// from its sleep when it had nothing to write for a while.
#[derive(Default)]
struct Kick {
    pending: Mutex<bool>,
    cv: Condvar,
    /// The writer sleeps until kicked (or [`ASLEEP_AT_MOST`]): the next
    /// change queued must kick it.
    asleep: AtomicBool,
}

/// Intervals with nothing to write before the writer sleeps until kicked.
const QUIET_BEFORE_SLEEP: Duration = Duration::from_secs(1);
/// Longest sleep of an idle writer (a safety net; a queued change kicks it).
const ASLEEP_AT_MOST: Duration = Duration::from_secs(60);

impl Kick {
    fn kick(&self) {
        *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.cv.notify_one();
    }

    /// Sleep until kicked or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let guard = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut pending, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |kicked| !*kicked)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *pending = false;
    }
}

/// Niceness of the writer thread: batches yield the CPU to request workers.
const WRITER_NICE: i32 = 10;

impl Writer {
    /// Start the writer thread.
    pub fn spawn(
        journal: Arc<Journal>,
        limits: BatchLimits,
        store: Store,
        sink: Option<Arc<PgSink>>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let kick = Arc::new(Kick::default());
        let stats = Arc::new(WriterStats::default());
        stats.last_commit_ms.store(crate::store::unix_now_ms(), Ordering::Relaxed);
        let (j, k, s, st, pg) = (journal.clone(), kick.clone(), store.clone(), stats.clone(), sink.clone());
        std::thread::Builder::new().name("billing-writer".into()).spawn(move || {
            if let Err(error) = rustix::process::nice(WRITER_NICE) {
                tracing::debug!(%error, "could not lower the billing writer's priority");
            }
            run(rx, &j, &k, limits, &s, &st, pg.as_deref());
        })?;
        Ok(Self { tx, journal, kick: Arc::new(KickOnDrop(kick)), store, stats })
    }

    /// The writer's backlog, last commit and journal size, for metrics.
    pub fn gauges(&self) -> crate::metrics::BillingGauges {
        let last = self.stats.last_commit_ms.load(Ordering::Relaxed);
        // A writer asleep has nothing to write: it is as fresh as it can be.
        let age = match self.kick.asleep.load(Ordering::Relaxed) {
            true => Duration::ZERO,
            false => Duration::from_millis(crate::store::unix_now_ms().saturating_sub(last)),
        };
        crate::metrics::BillingGauges {
            pending: self.stats.pending.load(Ordering::Relaxed),
            last_commit_age: age,
            journal_bytes: self.journal.size(),
        }
    }

    /// Journal `change` and queue it; when it cannot be journaled it is
    /// not queued either (the caller must not serve what it bills). Nothing
    /// is woken: the writer drains the queue every `max_wait` (or when a
    /// flush asks).
    pub fn send(&self, change: Change) -> Result<(), NotRecorded> {
        self.journal.append(change, |seq, change, json, written| match written {
            Ok(()) => {
                self.queue(seq, change, json);
                Ok(())
            }
            Err(e) => {
                self.store.guard().report_failure(&format!("billing journal: {e}"));
                Err(NotRecorded(e.0))
            }
        })
    }

    /// Journal `change` and queue it even when it cannot be journaled (a
    /// row that moves no money, or the end of a stream already delivered):
    /// the writer commits it once the storage recovers; only a crash
    /// before that loses it. Returns whether it was journaled.
    pub fn send_or_keep(&self, change: Change) -> Result<(), NotRecorded> {
        self.journal.append(change, |seq, change, json, written| {
            self.queue(seq, change, json);
            written.map_err(|e| {
                self.store.guard().report_failure(&format!("billing journal: {e}"));
                NotRecorded(e.0)
            })
        })
    }

    fn queue(&self, seq: u64, change: Change, json: Option<RowJson>) {
        if self.tx.send(Op::Change(seq, change, json)).is_err() {
            tracing::error!("billing writer stopped; a usage record is only in the journal until the next start");
        }
        // Pairs with the writer's fence between setting `asleep` and
        // looking at the queue: one of the two sides sees the other.
        fence(SeqCst);
        if self.kick.asleep.load(SeqCst) {
            self.kick.kick();
        }
    }

    /// Wait until everything queued so far is on disk.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Op::Flush(ack)).is_ok() {
            self.kick.kick();
            let _ = done.await;
        }
    }
}

/// The writer thread: every `max_wait` (or when kicked), drain the queue
/// and commit it in transactions of at most `max_ops` changes. A batch that
/// fails is kept and retried with backoff; its changes stay in the journal.
fn run(
    mut rx: mpsc::UnboundedReceiver<Op>,
    journal: &Journal,
    kick: &Kick,
    limits: BatchLimits,
    store: &Store,
    stats: &WriterStats,
    sink: Option<&PgSink>,
) {
    let mut pending: Vec<(u64, Change)> = Vec::new();
    // The JSON of pending rows, by sequence number (ascending).
    let mut json = RowsJson::default();
    let mut generation = store.generation();
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut backoff = Duration::from_millis(100);
    let mut mark = ManifestMark::default();
    let mut open = true;
    let mut quiet = Duration::ZERO;
    while open || !pending.is_empty() {
        if quiet >= QUIET_BEFORE_SLEEP && pending.is_empty() && acks.is_empty() {
            mark.write(store);
            sleep_until_kicked(&rx, kick);
            quiet = Duration::ZERO;
        } else {
            kick.wait(limits.max_wait);
        }
        let mut received = false;
        loop {
            match rx.try_recv() {
                Ok(Op::Change(seq, change, row)) => {
                    received = true;
                    if let Some(row) = row {
                        json.0.push((seq, row));
                    }
                    pending.push((seq, change));
                }
                Ok(Op::Flush(ack)) => {
                    received = true;
                    acks.push(ack);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // A full disk must not reach sled (its errors are permanent until
        // a restart): wait for the space to come back.
        let writable = pending.is_empty() || store.guard().writable_now();
        // The store was reopened after a failure: what it holds now is what
        // reached the disk; drop what it already has, write the rest.
        if writable && store.generation() != generation {
            generation = store.generation();
            if let Ok(done) = Trees::open(store).and_then(|t| Ok(t.committed_seq()?)) {
                pending.retain(|(seq, _)| *seq > done);
                json.drop_through(done);
            }
        }
        while writable && !pending.is_empty() {
            let n = pending.len().min(limits.max_ops);
            let last = pending[n - 1].0;
            // While the store is being reopened there are no trees: wait.
            let Ok(trees) = Trees::open(store) else {
                std::thread::sleep(Duration::from_millis(100));
                break;
            };
            let started = std::time::Instant::now();
            // The shared database first: the journal is trimmed only once
            // the node's store holds the batch too. Its failure is not the
            // local store's (admission does not stop): the batch waits.
            if let Some(sink) = sink
                && let Err(error) = sink.write(&pending[..n])
            {
                tracing::error!(
                    error = format!("{error:#}"),
                    changes = pending.len(),
                    "writing usage to the database failed; retrying"
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                break;
            }
            match write(&trees, &pending[..n], &json, Some(last)) {
                Ok(()) => {
                    crate::metrics::get().billing_batch(started.elapsed());
                    pending.drain(..n);
                    json.drop_through(last);
                    journal.committed(last);
                    mark.committed(store, last);
                    stats.last_commit_ms.store(crate::store::unix_now_ms(), Ordering::Relaxed);
                    backoff = Duration::from_millis(100);
                }
                Err(error) => {
                    tracing::error!(%error, changes = pending.len(), "writing usage logs and charges failed; retrying");
                    store.guard().report_store_failure(&error);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    break;
                }
            }
        }
        stats.pending.store(pending.len() as u64, Ordering::Relaxed);
        if pending.is_empty() {
            // Nothing waits: the writer is as fresh as it can be.
            stats.last_commit_ms.store(crate::store::unix_now_ms(), Ordering::Relaxed);
        }
        if !writable {
            std::thread::sleep(limits.max_wait.max(Duration::from_millis(100)));
        }
        if pending.is_empty() && !acks.is_empty() {
            mark.write(store);
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
        }
        quiet = match received || !pending.is_empty() {
            true => Duration::ZERO,
            false => quiet + limits.max_wait,
        };
    }
    mark.write(store);
}

/// Sleep until a change is queued (the writer had nothing to write for
/// [`QUIET_BEFORE_SLEEP`]): an idle gateway's writer then wakes no more
/// than every [`ASLEEP_AT_MOST`], instead of every interval.
fn sleep_until_kicked(rx: &mpsc::UnboundedReceiver<Op>, kick: &Kick) {
    kick.asleep.store(true, SeqCst);
    // Pairs with `Writer::queue`'s fence: a change queued before the flag
    // was set is seen here; one queued after it sees the flag and kicks.
    fence(SeqCst);
    if rx.is_empty() {
        kick.wait(ASLEEP_AT_MOST);
    }
    kick.asleep.store(false, SeqCst);
}

/// How often, at most, the store's manifest is rewritten for the journal's
/// committed sequence number.
const MANIFEST_MARK_INTERVAL: Duration = Duration::from_secs(1);

/// The journal's committed sequence number, recorded in the store's
/// manifest ([`Store::committed`]) at most every [`MANIFEST_MARK_INTERVAL`]
/// and at every flush: under load the writer commits every few
/// milliseconds, and rewriting the file each time cost more than the
/// commit's bookkeeping. A mark behind the store only narrows what the
/// manifest's check catches; it never refuses a sound store.
struct ManifestMark {
    /// Committed and not yet recorded.
    unwritten: Option<u64>,
    /// When it was last recorded.
    written: Option<std::time::Instant>,
    /// Least time between two records ([`MANIFEST_MARK_INTERVAL`]).
    interval: Duration,
}

impl Default for ManifestMark {
    fn default() -> Self {
        Self { unwritten: None, written: None, interval: MANIFEST_MARK_INTERVAL }
    }
}

impl ManifestMark {
    fn committed(&mut self, store: &Store, seq: u64) {
        self.unwritten = Some(seq);
        if self.written.is_none_or(|at| at.elapsed() >= self.interval) {
            self.write(store);
        }
    }

    fn write(&mut self, store: &Store) {
        if let Some(seq) = self.unwritten.take() {
            store.committed(seq);
            self.written = Some(std::time::Instant::now());
        }
    }
}

/// Apply what a crash left: the journal `entries` after the committed
/// sequence number, then every stream still open, billed by its
/// prepared row; then trim the journal. Returns (journal entries applied,
/// open streams billed).
pub fn recover(
    trees: &Trees,
    journal: &Journal,
    entries: Vec<Entry>,
    sink: Option<&PgSink>,
) -> Result<(usize, usize), String> {
    let replayed = entries.len();
    let last = entries.last().map(|e| e.seq);
    let changes: Vec<(u64, Change)> = entries.into_iter().map(|e| (e.seq, e.change)).collect();
    let shared = |changes: &[(u64, Change)]| match sink {
        Some(sink) => sink.write(changes).map_err(|e| format!("writing recovered usage to the database: {e:#}")),
        None => Ok(()),
    };
    shared(&changes)?;
    write(trees, &changes, &RowsJson::default(), last)?;
    if let Some(seq) = last {
        journal.committed(seq);
    }
    let mut open = Vec::new();
    for item in trees.state.scan_prefix(OPEN) {
        let (_, raw) = item.map_err(|e| e.to_string())?;
        match serde_json::from_slice::<LogRow>(&raw) {
            Ok(row) => open.push((0, Change::Row(Box::new(row)))),
            Err(error) => tracing::warn!(%error, "skipping an unreadable open-stream record"),
        }
    }
    shared(&open)?;
    write(trees, &open, &RowsJson::default(), None)?;
    Ok((replayed, open.len()))
}

#[derive(Default)]
pub(super) struct Deltas {
    /// Change of the balance (charges are negative).
    pub quota: i64,
    /// Quota charged.
    pub used: i64,
    /// Requests charged.
    pub requests: u64,
}

type TxResult<T> = Result<T, ConflictableTransactionError<String>>;

fn abort(e: impl std::fmt::Display) -> ConflictableTransactionError<String> {
    ConflictableTransactionError::Abort(e.to_string())
}

fn update<T: serde::de::DeserializeOwned + serde::Serialize>(
    tree: &TransactionalTree,
    id: u64,
    f: impl FnOnce(&mut T),
) -> TxResult<()> {
    let Some(raw) = tree.get(id.to_be_bytes())? else { return Ok(()) };
    let Ok(mut rec) = serde_json::from_slice::<T>(&raw) else { return Ok(()) };
    f(&mut rec);
    tree.insert(&id.to_be_bytes(), serde_json::to_vec(&rec).map_err(abort)?)?;
    Ok(())
}

fn open_key(request_id: &str) -> Vec<u8> {
    [OPEN, request_id.as_bytes()].concat()
}

/// What a consume row moves in the balances.
#[derive(Debug, Clone, Copy)]
pub(super) struct Charge {
    user: Option<u64>,
    token: Option<u64>,
    token_limited: bool,
    quota: i64,
}

impl Charge {
    /// The charge of `row`, if it is a consume row.
    pub(super) fn of(row: &LogRow) -> Option<Self> {
        (row.kind == LogKind::Consume).then_some(Self {
            user: row.user_id,
            token: row.token_id,
            token_limited: row.token_limited,
            quota: row.quota,
        })
    }
}

/// Balance changes by user and by token.
pub(super) type Sums = (HashMap<u64, Deltas>, HashMap<u64, Deltas>);

/// Add `c` to the balance changes.
pub(super) fn add_charge((users, tokens): &mut Sums, c: Charge) {
    if let Some(u) = c.user {
        let d = users.entry(u).or_default();
        d.quota = d.quota.saturating_sub(c.quota);
        d.used = d.used.saturating_add(c.quota);
        d.requests = d.requests.saturating_add(1);
    }
    if let Some(t) = c.token {
        let d = tokens.entry(t).or_default();
        if c.token_limited {
            d.quota = d.quota.saturating_sub(c.quota);
        }
        d.used = d.used.saturating_add(c.quota);
    }
}

/// Sum the balance changes of `changes` (by user, by token).
pub(super) fn deltas(changes: &[(u64, Change)]) -> Sums {
    let mut sums = Sums::default();
    for (_, change) in changes {
        match change {
            Change::Row(row) => {
                if let Some(c) = Charge::of(row) {
                    add_charge(&mut sums, c);
                }
            }
            Change::Adjust { user, token, delta } => {
                let (users, tokens) = &mut sums;
                if let Some(u) = user {
                    let d = users.entry(*u).or_default();
                    d.quota = d.quota.saturating_add(*delta);
                }
                if let Some(t) = token {
                    let d = tokens.entry(*t).or_default();
                    d.quota = d.quota.saturating_add(*delta);
                }
            }
            Change::Open(_) => {}
        }
    }
    sums
}

/// Rows' JSON as cut from their journal lines, by sequence number
/// (ascending): what [`write`] stores instead of serializing them again.
#[derive(Default)]
struct RowsJson(Vec<(u64, RowJson)>);

impl RowsJson {
    /// The JSON of the row journaled as `seq`, if kept.
    fn get(&self, seq: u64) -> Option<&RowJson> {
        self.0.binary_search_by_key(&seq, |(s, _)| *s).ok().map(|i| &self.0[i].1)
    }

    /// Forget the rows up to `seq` (committed, or already in the store).
    fn drop_through(&mut self, seq: u64) {
        let n = self.0.partition_point(|(s, _)| *s <= seq);
        self.0.drain(..n);
    }
}

/// Commit `changes` in one transaction (recording `seq` as the last
/// journal sequence number committed, when given), then flush. `json`
/// holds the rows' JSON where the journal had it.
fn write(trees: &Trees, changes: &[(u64, Change)], json: &RowsJson, seq: Option<u64>) -> Result<(), String> {
    if changes.is_empty() {
        return Ok(());
    }
    let (user_deltas, token_deltas) = deltas(changes);
    let Trees { users, tokens, logs, state, rollups, layout } = trees;
    (users, tokens, logs, state, rollups)
        .transaction(|(u, t, l, s, r)| {
            for (line_seq, change) in changes {
                match change {
                    Change::Row(row) => {
                        // Only a stream has an open record to end.
                        if row.kind == LogKind::Consume && row.stream {
                            s.remove(open_key(&row.request_id))?;
                        }
                    }
                    Change::Open(row) => {
                        let value = RowJson::or_serialized(json.get(*line_seq), row).map_err(abort)?;
                        s.insert(open_key(&row.request_id), &value[..])?;
                    }
                    Change::Adjust { .. } => {}
                }
            }
            // A row written again (a replay) is counted once.
            let rows = changes.iter().filter_map(|(line_seq, change)| match change {
                Change::Row(row) => Some((row.as_ref(), json.get(*line_seq))),
                _ => None,
            });
            let mut fresh = Vec::new();
            for (key, rows) in &layout.by_block(rows) {
                let (value, new) = log_blocks::merge(l.get(key)?.as_deref(), rows).map_err(abort)?;
                l.insert(&key[..], value)?;
                fresh.extend(new);
            }
            for (k, v) in logs::derived(fresh.iter().copied(), |k| r.get(k))? {
                r.insert(&k[..], v)?;
            }
            for (id, d) in &user_deltas {
                update::<UserRecord>(u, *id, |r| {
                    r.quota = r.quota.saturating_add(d.quota);
                    r.used_quota = r.used_quota.saturating_add(d.used);
                    r.request_count = r.request_count.saturating_add(d.requests);
                })?;
            }
            for (id, d) in &token_deltas {
                update::<TokenRecord>(t, *id, |r| {
                    r.remain_quota = r.remain_quota.saturating_add(d.quota);
                    r.used_quota = r.used_quota.saturating_add(d.used);
                })?;
            }
            if let Some(seq) = seq {
                s.insert(JOURNAL_SEQ, &seq.to_be_bytes())?;
            }
            Ok(())
        })
        .map_err(|e| format!("{e:?}"))?;
    logs.flush().map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Manifest;
    use crate::testing::until;

    fn recorded(dir: &std::path::Path) -> Option<u64> {
        Manifest::read(dir).expect("manifest").and_then(|m| m.marks.get("journal_seq").copied())
    }

    #[test]
    fn the_journal_mark_is_recorded_at_most_once_an_interval_and_at_every_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        // An interval no test run outlasts: the second commit always falls within it.
        let mut mark = ManifestMark { interval: Duration::from_secs(24 * 3600), ..ManifestMark::default() };
        mark.committed(&store, 5);
        assert_eq!(recorded(dir.path()), Some(5), "the first commit is recorded at once");
        mark.committed(&store, 9);
        assert_eq!(recorded(dir.path()), Some(5), "a commit within the interval waits");
        mark.write(&store);
        assert_eq!(recorded(dir.path()), Some(9), "a flush records what waited");
        mark.write(&store);
        assert_eq!(recorded(dir.path()), Some(9), "nothing waits: nothing to record");
    }

    #[test]
    fn an_idle_writer_sleeps_a_row_wakes_it_and_its_last_handle_ends_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let (journal, _) = Journal::open(dir.path(), 0).expect("journal");
        let limits = BatchLimits { max_ops: 64, max_wait: Duration::from_millis(20) };
        let writer = Writer::spawn(Arc::new(journal), limits, store.clone(), None).expect("writer");
        let trees = Trees::open(&store).expect("trees");
        let row = |id| Change::Row(Box::new(LogRow { id, model: "m".into(), ..LogRow::default() }));
        writer.send(row(store.generate_id().expect("id"))).expect("journaled");
        assert!(until(Duration::from_secs(30), || trees.committed_seq() == Ok(1)), "the first row is written");
        // Nothing more to write: it falls asleep, and reports itself fresh.
        assert!(until(Duration::from_secs(30), || writer.kick.asleep.load(SeqCst)), "an idle writer sleeps");
        assert_eq!(writer.gauges().last_commit_age, Duration::ZERO);
        // A row queued now wakes it: written long before its longest sleep.
        writer.send(row(store.generate_id().expect("id"))).expect("journaled");
        assert!(
            until(ASLEEP_AT_MOST / 2, || trees.committed_seq() == Ok(2)),
            "a row queued while the writer slept waited for its safety-net wake-up"
        );
        // Asleep again, its last handle dropped: the thread ends (and lets
        // go of the store) long before the safety net.
        assert!(until(Duration::from_secs(30), || writer.kick.asleep.load(SeqCst)));
        let kick = Arc::downgrade(&writer.kick.0);
        drop(writer);
        assert!(until(ASLEEP_AT_MOST / 2, || kick.strong_count() == 0), "the writer thread ended");
    }

    /// The first byte of every key in the `logs` tree, in key order.
    fn log_key_tags(trees: &Trees) -> Vec<u8> {
        trees.logs.iter().keys().map(|k| k.expect("key")[0]).collect()
    }

    fn written(trees: &Trees, store: &Store) -> u64 {
        let row = LogRow { id: store.generate_id().expect("id"), model: "m".into(), ..LogRow::default() };
        let id = row.id;
        write(trees, &[(0, Change::Row(Box::new(row)))], &RowsJson::default(), None).expect("write");
        id
    }

    #[test]
    fn a_store_from_before_wide_blocks_keeps_its_narrow_ones_and_writes_wide_ones_from_its_next_row() {
        // A new store: every row in wide blocks.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let trees = Trees::open(&store).expect("trees");
        assert_eq!(trees.layout, log_blocks::Layout::WIDE);
        written(&trees, &store);
        assert_eq!(log_key_tags(&trees), vec![b'C']);

        // A store of schema 4 (before wide blocks): rows in narrow ones.
        let dir = tempfile::tempdir().expect("tempdir");
        let old = {
            let store = Store::open(dir.path()).expect("store");
            let trees = Trees::open(&store).expect("trees");
            trees.state.remove(log_blocks::WIDE_FROM).expect("remove");
            store.tree("options").expect("options").insert("schema_version", &4u32.to_be_bytes()).expect("downgrade");
            let trees = Trees::open(&store).expect("trees");
            assert_ne!(trees.layout, log_blocks::Layout::WIDE, "no boundary recorded: narrow blocks");
            let old: Vec<u64> = (0..3).map(|_| written(&trees, &store)).collect();
            assert_eq!(log_key_tags(&trees), vec![b'B']);
            store.flush().expect("flush");
            old
        };
        // Opened by this build: its old rows stay where they are, new ones go wide.
        let store = crate::store::reopen_after_drop(dir.path());
        let trees = Trees::open(&store).expect("trees");
        let new: Vec<u64> = (0..3).map(|_| written(&trees, &store)).collect();
        assert_eq!(log_key_tags(&trees), vec![b'B', b'C']);
        let ids: Vec<u64> = log_blocks::oldest_first(&trees.logs)
            .map(|r| log_blocks::id_of(r.expect("row").bytes()).expect("id"))
            .collect();
        assert_eq!(ids, old.into_iter().chain(new).collect::<Vec<_>>(), "one log, in id order");
    }
}
