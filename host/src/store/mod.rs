//! The embedded sled store: one directory holds every tree (options,
//! channels, users, tokens, logs, billing state). A schema version key and
//! [`migrate`] carry old data directories forward; the [`manifest`] keeps a
//! damaged store from starting silently empty; the [`guard`] fails closed
//! when the disk does; [`secrets`] encrypts upstream keys at rest.
//!
//! Everything the gateway writes is readable by its own user only: the
//! process runs with umask 077, and the data directory is made 0700 (its
//! files 0600) when opened.

pub mod guard;
pub mod local_writes;
pub mod manifest;
pub mod migrate_pg;
pub mod overrides;
pub mod postgres;
pub mod secrets;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rand::Rng;

pub use guard::{StorageGuard, StorageStatus};
pub use manifest::Manifest;
pub use secrets::SecretBox;

/// Schema this build writes. History: 1 — options only; 2 — `channels` tree
/// and the channel id counter; 3 — channel `status` becomes a health state
/// object (`{"state": ...}`) with a `history`; 4 — channel keys encrypted at
/// rest, generated tokens kept as hashes; 5 — usage rows in blocks of 32
/// from a recorded id on (`billing::log_blocks::Layout`: a build before
/// would misplace rows among them).
pub const SCHEMA_VERSION: u32 = 5;

/// A write refused because the storage is failing (the disk is full...).
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage unavailable: {0}")]
pub struct StorageUnavailable(pub String);

/// Whether `error` is (or wraps) a [`StorageUnavailable`].
pub fn is_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.downcast_ref::<StorageUnavailable>().is_some())
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Free space kept on the data directory's filesystem, in bytes.
    pub min_free_bytes: u64,
    /// Key for secrets at rest (else a generated key file).
    pub secrets_key: Option<String>,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { min_free_bytes: 0, secrets_key: None, cache_bytes: 8 << 20 }
    }
}

/// The open sled database and its `options` tree.
struct Handles {
    db: sled::Db,
    options: sled::Tree,
}

/// The gateway's data store.
///
/// Nothing outside keeps sled handles: every use fetches its tree here, so
/// that after a write failure (sled's errors are permanent until it is
/// reopened) the store can be closed and reopened in place once the disk
/// works again ([`Store::reopen`]), without restarting the gateway.
#[derive(Clone)]
pub struct Store {
    handles: Arc<arc_swap::ArcSwapOption<Handles>>,
    /// Bumped at every reopen (the billing writer re-reads its progress).
    generation: Arc<std::sync::atomic::AtomicU64>,
    dir: Arc<Path>,
    guard: Arc<StorageGuard>,
    secrets: Arc<SecretBox>,
    manifest: Arc<Mutex<Manifest>>,
    cache_bytes: u64,
}

/// Make `dir` and everything in it readable by its owner only.
fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => restrict_permissions(&path),
            Ok(t) if t.is_file() => {
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
            _ => {}
        }
    }
}

/// Open sled with a page cache of `cache_bytes`, turning its panics on some
/// damaged files into an error.
fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let path = dir.join("db");
    let opened = std::panic::catch_unwind(|| sled::Config::new().path(&path).cache_capacity(cache_bytes).open());
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => bail!("opening the sled store in {} failed: {e}. {}", path.display(), manifest::RECOVERY),
        Err(_) => {
            bail!("the sled store in {} is damaged (it could not be read). {}", path.display(), manifest::RECOVERY)
        }
    }
}

impl Store {
    /// Open (or create) the store in `dir` with default options.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, &StoreOptions::default())
    }

    /// Open (or create) the store in `dir`, check it against its manifest,
    /// and migrate older schemas.
    pub fn open_with(dir: &Path, opts: &StoreOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict_permissions(dir);
        let recorded = Manifest::read(dir)?;
        let db = open_sled(dir, opts.cache_bytes)?;
        let options = db.open_tree("options")?;
        let secrets = Arc::new(SecretBox::open(opts.secrets_key.as_deref(), dir)?);
        let guard = Arc::new(StorageGuard::new(dir, opts.min_free_bytes));
        let store_id = options.get("store_id")?.map(|v| String::from_utf8_lossy(&v).into_owned());
        let manifest = match (recorded, store_id) {
            (Some(m), None) => bail!(
                "the store in {} is empty, but its manifest says it held store {} — its data is gone \
                 (a deleted or truncated db). {}",
                dir.display(),
                m.store_id,
                manifest::RECOVERY
            ),
            (Some(m), Some(id)) if m.store_id != id => bail!(
                "the store in {} is store {id}, but its manifest belongs to store {}. {}",
                dir.display(),
                m.store_id,
                manifest::RECOVERY
            ),
            (Some(m), Some(_)) => m,
            (None, Some(id)) => Manifest { store_id: id, ..Manifest::default() },
            (None, None) => {
                let id = hex::encode(rand::random::<[u8; 16]>());
                options.insert("store_id", id.as_bytes())?;
                options.flush()?;
                Manifest { store_id: id, ..Manifest::default() }
            }
        };
        let store = Self {
            handles: Arc::new(arc_swap::ArcSwapOption::from_pointee(Handles { db, options })),
            generation: Arc::default(),
            dir: Arc::from(dir),
            guard,
            secrets,
            manifest: Arc::new(Mutex::new(manifest)),
            cache_bytes: opts.cache_bytes,
        };
        store.check_counters()?;
        migrate(&store)?;
        store.write_manifest();
        Ok(store)
    }

    /// The storage guard.
    pub fn guard(&self) -> &StorageGuard {
        &self.guard
    }

    /// The shared guard (to start its monitor).
    pub fn guard_arc(&self) -> Arc<StorageGuard> {
        self.guard.clone()
    }

    /// Secrets at rest.
    pub fn secrets(&self) -> &SecretBox {
        &self.secrets
    }

    /// Secrets at rest, shared (for a store of another backend).
    pub fn secrets_arc(&self) -> Arc<SecretBox> {
        self.secrets.clone()
    }

    /// Fail with [`StorageUnavailable`] when the store cannot take writes
    /// now (admin writes).
    pub fn ensure_writable(&self) -> Result<()> {
        if self.guard.writable() {
            return Ok(());
        }
        let reason = self.guard.status().reason.unwrap_or_else(|| "storage unavailable".into());
        Err(StorageUnavailable(reason).into())
    }

    fn check_counters(&self) -> Result<()> {
        let manifest = self.manifest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for name in manifest.marks.keys().filter(|k| k.starts_with("next_")) {
            manifest.check_mark(name, self.counter(name)?)?;
        }
        Ok(())
    }

    /// Refuse the store when its mark `name` is behind the manifest's.
    pub fn check_mark(&self, name: &str, actual: u64) -> Result<()> {
        self.manifest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).check_mark(name, actual)
    }

    /// Record mark `name` at `value` (after sled flushed what it covers).
    pub fn mark(&self, name: &str, value: u64) {
        let mut m = self.manifest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = m.marks.entry(name.to_string()).or_insert(0);
        if *entry >= value {
            return;
        }
        *entry = value;
        if let Err(error) = m.write(&self.dir) {
            tracing::warn!(%error, "the store manifest could not be updated");
        }
    }

    /// The billing writer committed the journal up to `seq`.
    pub fn committed(&self, seq: u64) {
        self.mark("journal_seq", seq);
    }

    fn write_manifest(&self) {
        let m = self.manifest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = m.write(&self.dir) {
            tracing::warn!(%error, "the store manifest could not be written");
        }
    }

    /// The data directory (the sled store is its `db/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn handles(&self) -> Result<Arc<Handles>> {
        self.handles.load_full().ok_or_else(|| StorageUnavailable("the store is being reopened".into()).into())
    }

    fn options(&self) -> Result<sled::Tree> {
        Ok(self.handles()?.options.clone())
    }

    /// The tree `name` (fetch it for each use; do not keep it).
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.handles()?.db.open_tree(name)?)
    }

    /// How many times the store was reopened.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Close sled and open it again (after a write failure, once the disk
    /// works): waits for the old handles in use to be released. Blocking.
    pub fn reopen(&self) -> Result<()> {
        let old = self.handles.swap(None);
        drop(old);
        let started = std::time::Instant::now();
        let db = loop {
            match open_sled(&self.dir, self.cache_bytes) {
                Ok(db) => break db,
                // Handles still in use keep sled's file lock for a moment.
                Err(e) if started.elapsed() < std::time::Duration::from_secs(30) => {
                    tracing::debug!(error = %e, "waiting to reopen the store");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        let options = db.open_tree("options")?;
        self.handles.store(Some(Arc::new(Handles { db, options })));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::warn!("the store was reopened after a write failure");
        Ok(())
    }

    /// Watch the storage: the guard's free-space and probe checks, and a
    /// reopen of the store once a failed one can work again.
    pub fn spawn_monitor(&self, interval: std::time::Duration) {
        let store = self.clone();
        let _ = std::thread::Builder::new().name("storage-monitor".into()).spawn(move || {
            loop {
                store.guard.refresh();
                if store.guard.needs_reopen() && store.guard.space_ok() {
                    match store.reopen() {
                        Ok(()) => store.guard.reopened(),
                        Err(error) => tracing::error!(%error, "reopening the store failed; retrying"),
                    }
                }
                std::thread::sleep(interval);
            }
        });
    }

    /// The option `key`, if set.
    pub fn option(&self, key: &str) -> Result<Option<String>> {
        Ok(self.options()?.get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// This data directory's node id: random on first use, then kept. On a
    /// shared database it names this node's usage rows and quota leases,
    /// so it must survive restarts (and differ between nodes).
    pub fn node_id(&self) -> Result<String> {
        if let Some(id) = self.option("node_id")? {
            return Ok(id);
        }
        let id = format!("{:016x}", rand::random::<u64>());
        self.set_option("node_id", &id)?;
        Ok(id)
    }

    /// Set the option `key` durably.
    pub fn set_option(&self, key: &str, value: &str) -> Result<()> {
        self.ensure_writable()?;
        let options = self.options()?;
        options.insert(key, value.as_bytes())?;
        options.flush()?;
        Ok(())
    }

    /// Remove the option `key` durably.
    pub fn remove_option(&self, key: &str) -> Result<()> {
        self.ensure_writable()?;
        let options = self.options()?;
        options.remove(key)?;
        options.flush()?;
        Ok(())
    }

    /// A generated secret kept as its hash in option `{name}_sha256`: the
    /// hash, and the secret itself when it was generated just now (shown
    /// once, never stored).
    pub fn generated_secret(&self, name: &str, prefix: &str) -> Result<([u8; 32], Option<String>)> {
        let option = format!("{name}_sha256");
        if let Some(hash) = self.option(&option)?
            && let Some(bytes) = hex::decode(hash.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            return Ok((bytes, None));
        }
        let secret = random_key(prefix);
        let hash = crate::state::secret_hash(&secret);
        let options = self.options()?;
        options.insert(option.as_bytes(), hex::encode(hash).as_bytes())?;
        options.flush()?;
        Ok((hash, Some(secret)))
    }

    /// Increment the counter `key` atomically and durably; returns the new
    /// value (the first call returns 1).
    pub fn next_counter(&self, key: &str) -> Result<u64> {
        self.ensure_writable()?;
        let options = self.options()?;
        let new = options.update_and_fetch(key, |old| {
            let n = old.and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes);
            Some(n.saturating_add(1).to_be_bytes().to_vec())
        })?;
        options.flush()?;
        let bytes = new.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).context("counter vanished")?;
        let value = u64::from_be_bytes(bytes);
        self.mark(key, value);
        Ok(value)
    }

    /// The counter `key`'s current value (0 before its first use).
    pub fn counter(&self, key: &str) -> Result<u64> {
        Ok(self.options()?.get(key)?.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).map_or(0, u64::from_be_bytes))
    }

    /// A unique, increasing id (sled's crash-safe generator; it may skip
    /// numbers after a crash, never repeat one).
    pub fn generate_id(&self) -> Result<u64> {
        Ok(self.handles()?.db.generate_id()?)
    }

    /// Flush everything to disk (on shutdown).
    pub fn flush(&self) -> Result<()> {
        self.handles()?.db.flush()?;
        Ok(())
    }

    fn schema_version(&self) -> Result<Option<u32>> {
        Ok(self
            .options()?
            .get("schema_version")?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map(u32::from_be_bytes))
    }
}

/// Bring the store to [`SCHEMA_VERSION`], one step at a time; refuse a
/// store written by a newer build.
fn migrate(store: &Store) -> Result<()> {
    let mut version = match store.schema_version()? {
        None => {
            settle_log_layout(store)?;
            store.options()?.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            return Ok(());
        }
        Some(v) => v,
    };
    if version > SCHEMA_VERSION {
        bail!(
            "the data directory was written by a newer wasmgate (schema {version}, this build knows {SCHEMA_VERSION})"
        );
    }
    while version < SCHEMA_VERSION {
        match version {
            // 1 → 2 only adds trees, created on first use.
            1 => {}
            2 => migrate_channel_status(store)?,
            3 => migrate_secrets(store)?,
            4 => settle_log_layout(store)?,
            _ => bail!("no migration from schema {version}"),
        }
        version += 1;
        store.options()?.insert("schema_version", &version.to_be_bytes())?;
        tracing::info!(version, "store migrated");
    }
    store.options()?.flush()?;
    Ok(())
}

/// 4 → 5 (and a new store): record from which row id on usage rows go to
/// blocks of 32 — all of them when the log is empty, otherwise from an id
/// above every row id given out so far (the rows a crash left in the
/// journal included: they are written after this, below the boundary).
fn settle_log_layout(store: &Store) -> Result<()> {
    crate::billing::log_blocks::Layout::settle(&store.tree("billing_state")?, &store.tree("logs")?, || {
        store.generate_id()
    })?;
    Ok(())
}

/// 2 → 3: `"status": "enabled" | "disabled"` becomes `{"state": "enabled"}`
/// or `{"state": "manually_disabled", ...}` (an admin set it), with the
/// change recorded in the channel's history.
fn migrate_channel_status(store: &Store) -> Result<()> {
    let tree = store.tree("channels")?;
    let now = unix_now_ms();
    for item in tree.iter() {
        let (key, value) = item?;
        let mut rec: serde_json::Value = serde_json::from_slice(&value).context("channel record is not JSON")?;
        let Some(old) = rec.get("status").and_then(|s| s.as_str()).map(str::to_string) else { continue };
        let state = if old == "disabled" {
            serde_json::json!({"state": "manually_disabled", "by": "migration", "at": now / 1000,
                               "note": "disabled before health states existed"})
        } else {
            serde_json::json!({"state": "enabled"})
        };
        let to = state["state"].clone();
        rec["status"] = state;
        let event = serde_json::json!({"at_ms": now, "from": old, "to": to, "source": "migration",
                                        "reason": "schema 3: health states"});
        match rec.get_mut("history").and_then(|h| h.as_array_mut()) {
            Some(history) => history.push(event),
            None => rec["history"] = serde_json::json!([event]),
        }
        tree.insert(key, serde_json::to_vec(&rec)?)?;
    }
    tree.flush()?;
    Ok(())
}

/// 3 → 4: channel keys are encrypted at rest; a generated gateway or
/// admin token is kept as its hash only (it was printed at every start).
fn migrate_secrets(store: &Store) -> Result<()> {
    let tree = store.tree("channels")?;
    for item in tree.iter() {
        let (key, value) = item?;
        let mut rec: serde_json::Value = serde_json::from_slice(&value).context("channel record is not JSON")?;
        if let Some(keys) = rec.get_mut("keys").and_then(|k| k.as_array_mut()) {
            for k in keys {
                if let Some(secret) = k.get("key").and_then(|s| s.as_str()).filter(|s| !SecretBox::is_sealed(s)) {
                    k["key"] = serde_json::Value::String(store.secrets.seal(secret));
                }
            }
        }
        tree.insert(key, serde_json::to_vec(&rec)?)?;
    }
    tree.flush()?;
    for name in ["generated_token", "generated_admin_token"] {
        if let Some(token) = store.option(name)? {
            let hash = hex::encode(crate::state::secret_hash(&token));
            store.options()?.insert(format!("{name}_sha256"), hash.as_bytes())?;
            store.options()?.remove(name)?;
            tracing::warn!(
                option = name,
                "a generated token is now kept as its hash only: it stays valid (an earlier start printed it), \
                 or choose your own with WASMGATE_TOKENS / WASMGATE_ADMIN_TOKEN"
            );
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A random gateway key: `sk-` and 48 alphanumerics.
pub fn random_key(prefix: &str) -> String {
    let mut rng = rand::rng();
    let body: String = (0..48).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect();
    format!("{prefix}{body}")
}

/// Open the store in `dir` again after a drop, for tests: sled's flusher
/// thread may hold the file lock for a moment after the `Db` is dropped.
#[cfg(test)]
pub(crate) fn reopen_after_drop(dir: &Path) -> Store {
    for _ in 0..100 {
        if let Ok(store) = Store::open(dir) {
            return store;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Store::open(dir).expect("reopen")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_2_channel_status_becomes_a_health_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.options().expect("options").insert("schema_version", &2u32.to_be_bytes()).expect("downgrade");
            let tree = store.tree("channels").expect("tree");
            for (id, status) in [(1u64, "enabled"), (2, "disabled")] {
                let rec = serde_json::json!({"id": id, "name": format!("c{id}"), "adapter": "openai",
                                             "base_url": "http://x", "status": status});
                tree.insert(id.to_be_bytes(), serde_json::to_vec(&rec).expect("json")).expect("insert");
            }
            store.flush().expect("flush");
        }
        let store = reopen_after_drop(dir.path());
        let tree = store.tree("channels").expect("tree");
        let read = |id: u64| -> crate::channels::ChannelRecord {
            serde_json::from_slice(&tree.get(id.to_be_bytes()).expect("get").expect("present")).expect("record")
        };
        assert_eq!(read(1).status, crate::channels::ChannelState::Enabled);
        let disabled = read(2);
        assert_eq!(disabled.status.name(), "manually_disabled");
        assert_eq!(disabled.history.len(), 1);
        assert_eq!(disabled.history[0].source, crate::channels::EventSource::Migration);
    }

    #[test]
    fn the_store_reopens_in_place_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let clone = store.clone();
        store.tree("t").expect("tree").insert(b"k", b"v").expect("insert");
        store.flush().expect("flush");
        assert_eq!(store.generation(), 0);
        store.reopen().expect("reopen");
        assert_eq!(clone.generation(), 1, "every clone sees the reopened store");
        assert_eq!(clone.tree("t").expect("tree").get(b"k").expect("get").as_deref(), Some(&b"v"[..]));
        assert_eq!(clone.next_counter("c").expect("counter"), 1);
    }

    #[test]
    fn counters_survive_reopen_and_old_schemas_migrate() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.options().expect("options").insert("schema_version", &1u32.to_be_bytes()).expect("downgrade");
            assert_eq!(store.next_counter("c").expect("counter"), 1);
            assert_eq!(store.next_counter("c").expect("counter"), 2);
            store.flush().expect("flush");
        }
        let store = reopen_after_drop(dir.path());
        assert_eq!(store.schema_version().expect("version"), Some(SCHEMA_VERSION));
        assert_eq!(store.next_counter("c").expect("counter"), 3);
    }
}
