//! Channels in PostgreSQL, shared by every gateway node on the database:
//! table `channels` (id, the record as JSONB with its keys sealed, a
//! version bumped by every write). Each node keeps the records in memory
//! and serves requests from its snapshot; a write commits to the database
//! and announces itself with `NOTIFY wasmgate_channels, '<id>'`, which every
//! node's listener turns into a re-read of that record — so an admin's
//! change on one node is in every node's snapshot within a round trip — and
//! a full re-read every [`RECONCILE`] catches anything a lost connection
//! missed.
//!
//! Admin writes are read-modify-write with optimistic concurrency (the
//! version must not have moved; otherwise the edit is applied again to the
//! newer record). Health transitions, made on the request path, are
//! published locally at once and written by a task on the database thread,
//! which merges only the health fields into the stored record — an admin's
//! manual disable on another node always wins over an automatic state.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use tokio_postgres::Client;

use super::status::ChannelState;
use super::{ChannelKey, ChannelRecord, ChannelSet, ChannelStore, FieldError, StoreError};
use crate::store::local_writes::{LocalWrites, REREAD_AFTER};
use crate::store::postgres::{CHANNELS_NOTIFY, Postgres};
use crate::store::secrets::SecretBox;
use crate::store::unix_now;

/// Most re-reads of one announcement that this node's own writes overlap.
const MAX_REREADS: usize = 50;

/// How often every record is re-read, whatever was announced.
const RECONCILE: Duration = Duration::from_secs(5);

/// The PostgreSQL-backed channel store.
pub struct PgChannels {
    inner: Arc<Inner>,
}

struct Inner {
    pg: Arc<Postgres>,
    secrets: Arc<SecretBox>,
    records: Mutex<BTreeMap<u64, ChannelRecord>>,
    /// Ids changed locally by a health transition and not written yet: a
    /// re-read must not undo them.
    dirty: Mutex<HashSet<u64>>,
    /// Admin writes of this node: a re-read overlapping one reads again.
    local: LocalWrites,
    snapshot: ArcSwap<ChannelSet>,
    /// The write connection (re-opened when it breaks), used on the
    /// database thread only.
    client: tokio::sync::Mutex<Option<Client>>,
    persist: tokio::sync::mpsc::UnboundedSender<u64>,
    /// This process, for probe leases.
    node: String,
}

/// A database call on the write connection.
type PgFuture<'c, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A stored row's record (keys opened) and version.
fn decode(secrets: &SecretBox, value: serde_json::Value) -> Result<ChannelRecord> {
    let mut rec: ChannelRecord = serde_json::from_value(value).context("a channel record is not valid")?;
    for k in &mut rec.keys {
        k.key = secrets.open_value(&k.key).with_context(|| format!("channel {}", rec.id))?;
    }
    Ok(rec)
}

fn encode(secrets: &SecretBox, rec: &ChannelRecord) -> Result<serde_json::Value> {
    let mut stored = rec.clone();
    for k in &mut stored.keys {
        k.key = secrets.seal(&k.key);
    }
    Ok(serde_json::to_value(&stored)?)
}

impl Inner {
    /// The write connection, opened (again) when needed.
    async fn with_client<T>(&self, f: impl for<'c> FnOnce(&'c mut Client) -> PgFuture<'c, T>) -> Result<T> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.pg.connect().await?);
        }
        let client = guard.as_mut().context("no database connection")?;
        match f(client).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if client.is_closed() {
                    *guard = None;
                }
                Err(e.into())
            }
        }
    }

    fn publish(&self, records: &BTreeMap<u64, ChannelRecord>) {
        self.snapshot.store(Arc::new(ChannelSet::new(records.values().cloned())));
    }

    /// Re-read channel `id` (or every channel) into memory, keeping the
    /// local versions of records with a health write pending.
    async fn reload(&self, id: Option<u64>) -> Result<()> {
        for _ in 0..MAX_REREADS {
            if self.reload_once(id).await? {
                return Ok(());
            }
            tokio::time::sleep(REREAD_AFTER).await;
        }
        // This node's writes kept overlapping: each of them announces
        // itself, and the announcement brings another re-read.
        Ok(())
    }

    /// [`Inner::reload`] once; false when one of this node's writes
    /// overlapped the read (nothing published).
    async fn reload_once(&self, id: Option<u64>) -> Result<bool> {
        let stamp = self.local.stamp();
        let rows = self
            .with_client(move |c| {
                Box::pin(async move {
                    match id {
                        Some(id) => c.query("SELECT id, record FROM channels WHERE id = $1", &[&(id as i64)]).await,
                        None => c.query("SELECT id, record FROM channels", &[]).await,
                    }
                })
            })
            .await?;
        let mut fresh = BTreeMap::new();
        for row in rows {
            let id: i64 = row.get(0);
            match decode(&self.secrets, row.get(1)) {
                Ok(rec) => {
                    fresh.insert(id as u64, rec);
                }
                Err(error) => tracing::error!(channel = id, %error, "a stored channel could not be read; skipped"),
            }
        }
        let dirty = lock(&self.dirty).clone();
        let mut records = lock(&self.records);
        if self.local.overlapped(stamp) {
            return Ok(false);
        }
        match id {
            Some(id) if dirty.contains(&id) => return Ok(true),
            // The node's own write comes back announced: when the record is
            // what this node already publishes, keep the snapshot (and its
            // channels' key rotation) as it is.
            Some(id) => match fresh.remove(&id) {
                Some(rec) if records.get(&id) == Some(&rec) => return Ok(true),
                Some(rec) => {
                    records.insert(id, rec);
                }
                None if !records.contains_key(&id) => return Ok(true),
                None => {
                    records.remove(&id);
                }
            },
            None => {
                let before = records.clone();
                records.retain(|id, _| dirty.contains(id) || fresh.contains_key(id));
                for (id, rec) in fresh {
                    if !dirty.contains(&id) {
                        records.insert(id, rec);
                    }
                }
                // The periodic reconcile usually finds nothing new: keep the
                // snapshot (and its channels' key rotation) as it is.
                if *records == before {
                    return Ok(true);
                }
            }
        }
        self.publish(&records);
        Ok(true)
    }
}

impl PgChannels {
    /// Load every stored channel and start the listener and the health
    /// writer on the database thread.
    pub fn open(pg: &Arc<Postgres>, secrets: Arc<SecretBox>) -> Result<Self> {
        let (persist, pending) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            pg: pg.clone(),
            secrets,
            records: Mutex::new(BTreeMap::new()),
            dirty: Mutex::new(HashSet::new()),
            local: LocalWrites::default(),
            snapshot: ArcSwap::from_pointee(ChannelSet::new(std::iter::empty())),
            client: tokio::sync::Mutex::new(None),
            persist,
            node: format!("{:016x}", rand::random::<u64>()),
        });
        let first = inner.clone();
        pg.block(async move { first.reload(None).await }).context("loading channels from PostgreSQL")?;
        pg.spawn(listen(Arc::downgrade(&inner)));
        pg.spawn(persist_health(Arc::downgrade(&inner), pending));
        Ok(Self { inner })
    }

    /// Run `f(client)` on the database thread with the write connection.
    fn call<T: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut Client) -> PgFuture<'c, T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        self.inner.pg.block(async move { inner.with_client(f).await })
    }

    /// Read-modify-write of record `id` with `f`, applied again when
    /// another node wrote the record in between.
    fn write(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError> {
        let _writing = self.inner.local.start();
        for _ in 0..8 {
            let row = self.call(move |c| {
                Box::pin(async move {
                    c.query_opt("SELECT record, version FROM channels WHERE id = $1", &[&(id as i64)]).await
                })
            })?;
            let Some(row) = row else { return Err(StoreError::NotFound(id)) };
            let version: i64 = row.get(1);
            let mut current = decode(&self.inner.secrets, row.get(0))?;
            // This node's health changes still on their way to the database
            // count: an admin's enable right after an automatic disable must
            // see the disable (or it changes nothing, and the disable lands).
            let pending = lock(&self.inner.dirty).contains(&id);
            if pending && let Some(local) = lock(&self.inner.records).get(&id).cloned() {
                merge_health(&mut current, &local);
            }
            let mut rec = current.clone();
            f(&mut rec).map_err(StoreError::Invalid)?;
            rec.id = id;
            if rec == current {
                return Ok(rec);
            }
            rec.updated_at = unix_now();
            let value = encode(&self.inner.secrets, &rec)?;
            let written = self.call(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let n = tx
                        .execute(
                            "UPDATE channels SET record = $2, version = version + 1 WHERE id = $1 AND version = $3",
                            &[&(id as i64), &value, &version],
                        )
                        .await?;
                    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNELS_NOTIFY, &id.to_string()]).await?;
                    tx.commit().await?;
                    Ok(n == 1)
                })
            })?;
            if written {
                let mut records = lock(&self.inner.records);
                records.insert(id, rec.clone());
                self.inner.publish(&records);
                return Ok(rec);
            }
        }
        Err(StoreError::Backend(anyhow::anyhow!("channel {id} kept changing under this write; try again")))
    }

    /// Insert `rec` with a fresh id from the shared sequence; returns it.
    pub(super) fn insert_new(&self, mut rec: ChannelRecord) -> Result<ChannelRecord> {
        let _writing = self.inner.local.start();
        let id: i64 = self
            .call(move |c| Box::pin(async move { c.query_one("SELECT nextval('channel_ids')", &[]).await }))?
            .get(0);
        rec.id = id as u64;
        let value = encode(&self.inner.secrets, &rec)?;
        self.call(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute("INSERT INTO channels (id, record) VALUES ($1, $2)", &[&id, &value]).await?;
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNELS_NOTIFY, &id.to_string()]).await?;
                tx.commit().await
            })
        })?;
        let mut records = lock(&self.inner.records);
        records.insert(rec.id, rec.clone());
        self.inner.publish(&records);
        Ok(rec)
    }

    /// A shared option (the configuration import's markers).
    pub(super) fn option(&self, key: &str) -> Result<Option<String>> {
        let key = key.to_string();
        let row = self.call(move |c| {
            Box::pin(async move { c.query_opt("SELECT value FROM options WHERE key = $1", &[&key]).await })
        })?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Set a shared option.
    pub(super) fn set_option(&self, key: &str, value: &str) -> Result<()> {
        let (key, value) = (key.to_string(), value.to_string());
        self.call(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO options (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
                    &[&key, &value],
                )
                .await
            })
        })?;
        Ok(())
    }

    /// Run `f` while holding the schema's advisory lock on a connection of
    /// its own (nodes starting together import the configuration once).
    pub(super) fn exclusively<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let pg = self.inner.pg.clone();
        let locker = self.inner.pg.block(async move {
            let c = pg.connect().await?;
            c.execute("SELECT pg_advisory_lock($1)", &[&crate::store::postgres::SCHEMA_LOCK]).await?;
            Ok(c)
        })?;
        let result = f();
        let _ = self.inner.pg.block(async move {
            locker.execute("SELECT pg_advisory_unlock($1)", &[&crate::store::postgres::SCHEMA_LOCK]).await?;
            Ok(())
        });
        result
    }
}

/// Copy what health transitions change from `local` into `stored`; an
/// admin's manual disable in `stored` stays.
fn merge_health(stored: &mut ChannelRecord, local: &ChannelRecord) {
    let manual = |s: &ChannelState| matches!(s, ChannelState::ManuallyDisabled { .. });
    if !manual(&stored.status) || manual(&local.status) {
        stored.status = local.status.clone();
    }
    stored.history.clone_from(&local.history);
    for key in &mut stored.keys {
        if let Some(l) = local.keys.iter().find(|l| l.key == key.key) {
            key.enabled = l.enabled;
            key.auto.clone_from(&l.auto);
        }
    }
    stored.test_time = local.test_time;
    stored.response_time_ms = local.response_time_ms;
}

/// How many times one health write is redone because the record changed on
/// this node while it was written.
const MAX_HEALTH_REWRITES: u32 = 3;

/// Whether record `id`'s status or keys on this node differ from the
/// `written` ones.
fn health_changed(inner: &Inner, id: u64, written: &(ChannelState, Vec<ChannelKey>)) -> bool {
    lock(&inner.records).get(&id).is_some_and(|now| (&now.status, &now.keys) != (&written.0, &written.1))
}

/// Write health transitions (ids arriving on `pending`) until the store is
/// gone, merging them into the stored record; a failed write is retried.
async fn persist_health(inner: std::sync::Weak<Inner>, mut pending: tokio::sync::mpsc::UnboundedReceiver<u64>) {
    while let Some(id) = pending.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        // A local write: the re-read its own NOTIFY triggers is not
        // published while it is under way (it could carry the state this
        // write is about to correct, below).
        let writing = inner.local.start();
        let mut rewrites = 0;
        loop {
            let Some(local) = lock(&inner.records).get(&id).cloned() else { break };
            let written = (local.status.clone(), local.keys.clone());
            let secrets = inner.secrets.clone();
            let result = inner
                .with_client(move |c| {
                    Box::pin(async move {
                        let tx = c.transaction().await?;
                        let row = tx
                            .query_opt("SELECT record FROM channels WHERE id = $1 FOR UPDATE", &[&(id as i64)])
                            .await?;
                        let Some(row) = row else { return Ok(()) };
                        if let Ok(mut stored) = decode(&secrets, row.get(0)) {
                            merge_health(&mut stored, &local);
                            if let Ok(value) = encode(&secrets, &stored) {
                                tx.execute(
                                    "UPDATE channels SET record = $2, version = version + 1 WHERE id = $1",
                                    &[&(id as i64), &value],
                                )
                                .await?;
                                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNELS_NOTIFY, &id.to_string()]).await?;
                            }
                        }
                        tx.commit().await
                    })
                })
                .await;
            match result {
                // An admin's change made on this node while this write was
                // on its way (`enable` after an automatic disable) is in
                // memory but was just overwritten by `local`'s older state:
                // write again from the newer one.
                Ok(()) if rewrites < MAX_HEALTH_REWRITES && health_changed(&inner, id, &written) => rewrites += 1,
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(channel = id, %error, "a channel's health change is not in the database yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        lock(&inner.dirty).remove(&id);
        drop(writing);
        // Take the merged record (an admin's change may have won).
        let _ = inner.reload(Some(id)).await;
    }
}

/// Follow `NOTIFY wasmgate_channels` and re-read every record every
/// [`RECONCILE`], reconnecting after failures, until the store is gone.
async fn listen(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(pg) = inner.upgrade().map(|i| i.pg.clone()) else { return };
        let (client, mut rx) = pg.listen(CHANNELS_NOTIFY).await;
        drop(pg);
        // What was missed while not listening.
        if let Some(i) = inner.upgrade() {
            let _ = i.reload(None).await;
        }
        let mut tick = tokio::time::interval(RECONCILE);
        loop {
            tokio::select! {
                n = rx.recv() => {
                    let Some(n) = n else { break };
                    let Some(i) = inner.upgrade() else { return };
                    let id = n.payload().parse::<u64>().ok();
                    if let Err(error) = i.reload(id).await {
                        tracing::warn!(%error, "re-reading a changed channel failed");
                    }
                }
                _ = tick.tick() => {
                    let Some(i) = inner.upgrade() else { return };
                    if client.is_closed() {
                        break;
                    }
                    if let Err(error) = i.reload(None).await {
                        tracing::warn!(%error, "re-reading the channels failed");
                    }
                }
            }
        }
    }
}

impl ChannelStore for PgChannels {
    fn snapshot(&self) -> Arc<ChannelSet> {
        self.inner.snapshot.load_full()
    }

    fn create(&self, mut rec: ChannelRecord) -> Result<ChannelRecord, StoreError> {
        rec.created_at = unix_now();
        rec.updated_at = rec.created_at;
        Ok(self.insert_new(rec)?)
    }

    fn update(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError> {
        self.write(id, f)
    }

    fn update_soon(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError> {
        let mut records = lock(&self.inner.records);
        let current = records.get(&id).ok_or(StoreError::NotFound(id))?;
        let mut rec = current.clone();
        f(&mut rec).map_err(StoreError::Invalid)?;
        rec.id = id;
        if &rec == current {
            return Ok(rec);
        }
        rec.updated_at = unix_now();
        records.insert(id, rec.clone());
        self.inner.publish(&records);
        lock(&self.inner.dirty).insert(id);
        let _ = self.inner.persist.send(id);
        Ok(rec)
    }

    fn pending_writes(&self) -> usize {
        lock(&self.inner.dirty).len()
    }

    fn claim_probes(&self, ids: &[u64], lease: Duration) -> Vec<u64> {
        if ids.is_empty() {
            return Vec::new();
        }
        let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        let (node, lease_ms) = (self.inner.node.clone(), lease.as_millis() as i64);
        let claimed = self.call(move |c| {
            Box::pin(async move {
                let now = crate::store::unix_now_ms() as i64;
                c.query(
                    "UPDATE channels SET probe_lease_until = $2 + $3, probe_lease_node = $4
                     WHERE id = ANY($1) AND (probe_lease_until < $2 OR probe_lease_node = $4) RETURNING id",
                    &[&ids, &now, &lease_ms, &node],
                )
                .await
            })
        });
        match claimed {
            Ok(rows) => rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect(),
            Err(error) => {
                // Without the database no node can coordinate: probe nothing
                // rather than everything from every node.
                tracing::warn!(%error, "cannot claim recovery probes; skipping this round");
                Vec::new()
            }
        }
    }

    fn delete(&self, id: u64) -> Result<ChannelRecord, StoreError> {
        let _writing = self.inner.local.start();
        let row = self.call(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let row = tx.query_opt("DELETE FROM channels WHERE id = $1 RETURNING record", &[&(id as i64)]).await?;
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNELS_NOTIFY, &id.to_string()]).await?;
                tx.commit().await?;
                Ok(row)
            })
        })?;
        let row = row.ok_or(StoreError::NotFound(id))?;
        let rec = decode(&self.inner.secrets, row.get(0))?;
        let mut records = lock(&self.inner.records);
        records.remove(&id);
        self.inner.publish(&records);
        Ok(rec)
    }
}
