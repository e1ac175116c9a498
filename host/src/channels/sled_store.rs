//! Channels in the embedded sled store: tree `channels`, key = id
//! (big-endian u64), value = the record as JSON. The master copy lives in
//! memory behind a write lock; an admin's write goes to sled (flushed)
//! before the new snapshot is published, so a change the API acknowledged
//! survives a crash. Health transitions, made on the request path, are
//! published at once and written by a persister thread, so no request waits
//! for sled. Keys are stored encrypted (see `store::secrets`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use arc_swap::ArcSwap;

use super::{ChannelRecord, ChannelSet, ChannelStore, FieldError, StoreError};
use crate::store::{Store, unix_now};

const TREE: &str = "channels";
const NEXT_ID: &str = "next_channel_id";

/// The sled-backed channel store.
pub struct SledChannels {
    inner: Arc<Inner>,
    /// Ids whose record changed in memory and awaits the persister.
    dirty: std::sync::mpsc::Sender<u64>,
}

struct Inner {
    store: Store,
    /// Held by every disk write, taken before `records`: the persister's
    /// write of a record cannot land after a newer write or a delete.
    writes: Mutex<()>,
    records: Mutex<BTreeMap<u64, ChannelRecord>>,
    snapshot: ArcSwap<ChannelSet>,
    /// Health transitions sent to the persister and not written yet.
    pending: std::sync::atomic::AtomicUsize,
}

/// A record after an edit.
enum Edit {
    /// The edit changed nothing.
    Unchanged(ChannelRecord),
    /// Changed, `updated_at` set.
    Changed(ChannelRecord),
}

/// `f` applied to a copy of record `id` (its id kept).
fn edit(
    records: &BTreeMap<u64, ChannelRecord>,
    id: u64,
    f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
) -> Result<Edit, StoreError> {
    let current = records.get(&id).ok_or(StoreError::NotFound(id))?;
    let mut rec = current.clone();
    f(&mut rec).map_err(StoreError::Invalid)?;
    rec.id = id;
    if &rec == current {
        return Ok(Edit::Unchanged(rec));
    }
    rec.updated_at = unix_now();
    Ok(Edit::Changed(rec))
}

impl SledChannels {
    /// Load every stored channel.
    pub fn open(store: &Store) -> anyhow::Result<Self> {
        let tree = store.tree(TREE)?;
        let mut records = BTreeMap::new();
        for item in tree.iter() {
            let (key, value) = item?;
            let mut rec: ChannelRecord = serde_json::from_slice(&value)
                .with_context(|| format!("channel record {:?} is not valid JSON", key.as_ref()))?;
            for k in &mut rec.keys {
                k.key = store.secrets().open_value(&k.key).with_context(|| format!("channel {}", rec.id))?;
            }
            records.insert(rec.id, rec);
        }
        let snapshot = ArcSwap::from_pointee(ChannelSet::new(records.values().cloned()));
        let inner = Arc::new(Inner {
            store: store.clone(),
            writes: Mutex::new(()),
            records: Mutex::new(records),
            snapshot,
            pending: Default::default(),
        });
        let (dirty, pending) = std::sync::mpsc::channel();
        let persister = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("channel-persister".into())
            .spawn(move || persist_loop(&persister, &pending))?;
        Ok(Self { inner, dirty })
    }
}

/// Write the records whose ids arrive on `pending`, the latest version of
/// each, until the store is gone. A write that fails is retried.
fn persist_loop(inner: &std::sync::Weak<Inner>, pending: &std::sync::mpsc::Receiver<u64>) {
    let mut ids = std::collections::BTreeSet::new();
    use std::sync::atomic::Ordering;
    let mut received = 0usize;
    while let Ok(id) = pending.recv() {
        ids.insert(id);
        received += 1;
        for id in pending.try_iter() {
            ids.insert(id);
            received += 1;
        }
        let Some(inner) = inner.upgrade() else { return };
        while let Some(id) = ids.pop_first() {
            let writing = inner.writing();
            let rec = inner.lock().get(&id).cloned();
            let Some(rec) = rec else { continue };
            if let Err(error) = inner.persist(&rec) {
                drop(writing);
                tracing::warn!(channel = id, %error, "a channel's health change is not on disk yet; retrying");
                ids.insert(id);
                std::thread::sleep(std::time::Duration::from_millis(500));
                for id in pending.try_iter() {
                    ids.insert(id);
                    received += 1;
                }
            }
        }
        // Everything received so far is on disk.
        inner.pending.fetch_sub(std::mem::take(&mut received), Ordering::SeqCst);
    }
}

impl Inner {
    fn writing(&self) -> MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, ChannelRecord>> {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn persist(&self, rec: &ChannelRecord) -> anyhow::Result<()> {
        self.store.ensure_writable()?;
        let mut stored = rec.clone();
        for k in &mut stored.keys {
            k.key = self.store.secrets().seal(&k.key);
        }
        let tree = self.store.tree(TREE)?;
        tree.insert(rec.id.to_be_bytes(), serde_json::to_vec(&stored)?)?;
        tree.flush()?;
        Ok(())
    }

    fn publish(&self, records: &BTreeMap<u64, ChannelRecord>) {
        self.snapshot.store(Arc::new(ChannelSet::new(records.values().cloned())));
    }
}

impl SledChannels {
    /// Insert `rec` as given (id and times included); used by the config
    /// import, which keeps its own id bookkeeping.
    pub(super) fn put_raw(&self, rec: ChannelRecord) -> anyhow::Result<()> {
        let _writing = self.inner.writing();
        let mut records = self.inner.lock();
        self.inner.persist(&rec)?;
        records.insert(rec.id, rec);
        self.inner.publish(&records);
        Ok(())
    }

    /// A fresh id, never handed out before.
    pub(super) fn allocate_id(&self) -> anyhow::Result<u64> {
        self.inner.store.next_counter(NEXT_ID)
    }

    /// The store the channels live in.
    pub(super) fn store(&self) -> &Store {
        &self.inner.store
    }
}

impl ChannelStore for SledChannels {
    fn snapshot(&self) -> Arc<ChannelSet> {
        self.inner.snapshot.load_full()
    }

    fn create(&self, mut rec: ChannelRecord) -> Result<ChannelRecord, StoreError> {
        rec.id = self.allocate_id()?;
        rec.created_at = unix_now();
        rec.updated_at = rec.created_at;
        let _writing = self.inner.writing();
        let mut records = self.inner.lock();
        self.inner.persist(&rec)?;
        records.insert(rec.id, rec.clone());
        self.inner.publish(&records);
        Ok(rec)
    }

    fn update(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError> {
        let _writing = self.inner.writing();
        let mut records = self.inner.lock();
        let rec = match edit(&records, id, f)? {
            Edit::Unchanged(rec) => return Ok(rec),
            Edit::Changed(rec) => rec,
        };
        self.inner.persist(&rec)?;
        records.insert(id, rec.clone());
        self.inner.publish(&records);
        Ok(rec)
    }

    fn update_soon(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError> {
        let mut records = self.inner.lock();
        let rec = match edit(&records, id, f)? {
            Edit::Unchanged(rec) => return Ok(rec),
            Edit::Changed(rec) => rec,
        };
        records.insert(id, rec.clone());
        self.inner.publish(&records);
        self.inner.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.dirty.send(id).is_err() {
            self.inner.pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(rec)
    }

    fn pending_writes(&self) -> usize {
        self.inner.pending.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn delete(&self, id: u64) -> Result<ChannelRecord, StoreError> {
        let _writing = self.inner.writing();
        let mut records = self.inner.lock();
        let rec = records.get(&id).cloned().ok_or(StoreError::NotFound(id))?;
        self.inner.store.ensure_writable()?;
        let tree = self.inner.store.tree(TREE)?;
        tree.remove(id.to_be_bytes()).map_err(anyhow::Error::from)?;
        tree.flush().map_err(anyhow::Error::from)?;
        records.remove(&id);
        self.inner.publish(&records);
        Ok(rec)
    }
}
