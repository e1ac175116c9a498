//! Channels in the embedded sled store: tree `channels`, key = id
//! (big-endian u64), value = the record as JSON. The master copy lives in
//! memory behind a write lock; every write goes to sled (flushed) before the
//! new snapshot is published, so a change the API acknowledged survives a
//! crash and the relay never sees a change that is not on disk. Keys are
//! stored encrypted (see `store::secrets`).

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
    store: Store,
    records: Mutex<BTreeMap<u64, ChannelRecord>>,
    snapshot: ArcSwap<ChannelSet>,
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
        Ok(Self { store: store.clone(), records: Mutex::new(records), snapshot })
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

    /// Insert `rec` as given (id and times included); used by the config
    /// import, which keeps its own id bookkeeping.
    pub(super) fn put_raw(&self, rec: ChannelRecord) -> anyhow::Result<()> {
        let mut records = self.lock();
        self.persist(&rec)?;
        records.insert(rec.id, rec);
        self.publish(&records);
        Ok(())
    }

    /// A fresh id, never handed out before.
    pub(super) fn allocate_id(&self) -> anyhow::Result<u64> {
        self.store.next_counter(NEXT_ID)
    }

    /// The store the channels live in.
    pub(super) fn store(&self) -> &Store {
        &self.store
    }
}

impl ChannelStore for SledChannels {
    fn snapshot(&self) -> Arc<ChannelSet> {
        self.snapshot.load_full()
    }

    fn create(&self, mut rec: ChannelRecord) -> Result<ChannelRecord, StoreError> {
        rec.id = self.allocate_id()?;
        rec.created_at = unix_now();
        rec.updated_at = rec.created_at;
        let mut records = self.lock();
        self.persist(&rec)?;
        records.insert(rec.id, rec.clone());
        self.publish(&records);
        Ok(rec)
    }

    fn update(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError> {
        let mut records = self.lock();
        let mut rec = records.get(&id).cloned().ok_or(StoreError::NotFound(id))?;
        f(&mut rec).map_err(StoreError::Invalid)?;
        rec.id = id;
        if records.get(&id) == Some(&rec) {
            return Ok(rec);
        }
        rec.updated_at = unix_now();
        self.persist(&rec)?;
        records.insert(id, rec.clone());
        self.publish(&records);
        Ok(rec)
    }

    fn delete(&self, id: u64) -> Result<ChannelRecord, StoreError> {
        let mut records = self.lock();
        let rec = records.get(&id).cloned().ok_or(StoreError::NotFound(id))?;
        self.store.ensure_writable()?;
        let tree = self.store.tree(TREE)?;
        tree.remove(id.to_be_bytes()).map_err(anyhow::Error::from)?;
        tree.flush().map_err(anyhow::Error::from)?;
        records.remove(&id);
        self.publish(&records);
        Ok(rec)
    }
}
