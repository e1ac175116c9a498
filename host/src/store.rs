//! The embedded sled store: one directory holds every tree (options,
//! channels; users, tokens and logs join with their issues). A schema
//! version key and [`migrate`] carry old data directories forward.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rand::Rng;

/// Schema this build writes. History: 1 — options only; 2 — `channels` tree
/// and the channel id counter; 3 — channel `status` becomes a health state
/// object (`{"state": ...}`) with a `history`.
pub const SCHEMA_VERSION: u32 = 3;

/// The gateway's data store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    options: sled::Tree,
    dir: Arc<Path>,
}

impl Store {
    /// Open (or create) the store in `dir`, migrating older schemas.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let db = sled::open(dir.join("db")).with_context(|| format!("opening sled store in {}", dir.display()))?;
        let options = db.open_tree("options")?;
        let store = Self { db, options, dir: Arc::from(dir) };
        migrate(&store)?;
        Ok(store)
    }

    /// The data directory (the sled store is its `db/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tree `name`.
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    /// The option `key`, if set.
    pub fn option(&self, key: &str) -> Result<Option<String>> {
        Ok(self.options.get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Set the option `key` durably.
    pub fn set_option(&self, key: &str, value: &str) -> Result<()> {
        self.options.insert(key, value.as_bytes())?;
        self.options.flush()?;
        Ok(())
    }

    /// Remove the option `key` durably.
    pub fn remove_option(&self, key: &str) -> Result<()> {
        self.options.remove(key)?;
        self.options.flush()?;
        Ok(())
    }

    /// The option `key`, creating it with `make` on first use.
    pub fn option_or_insert(&self, key: &str, make: impl FnOnce() -> String) -> Result<String> {
        if let Some(v) = self.option(key)? {
            return Ok(v);
        }
        let value = make();
        // Another process may race us; keep whichever landed first.
        let _ = self.options.compare_and_swap(key, None as Option<&[u8]>, Some(value.as_bytes()))?;
        Ok(self.option(key)?.unwrap_or(value))
    }

    /// Increment the counter `key` atomically and durably; returns the new
    /// value (the first call returns 1).
    pub fn next_counter(&self, key: &str) -> Result<u64> {
        let new = self.options.update_and_fetch(key, |old| {
            let n = old.and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        self.options.flush()?;
        let bytes = new.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).context("counter vanished")?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// A unique, increasing id (sled's crash-safe generator; it may skip
    /// numbers after a crash, never repeat one).
    pub fn generate_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Flush everything to disk (on shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn schema_version(&self) -> Result<Option<u32>> {
        Ok(self
            .options
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
            store.options.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
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
            _ => bail!("no migration from schema {version}"),
        }
        version += 1;
        store.options.insert("schema_version", &version.to_be_bytes())?;
        tracing::info!(version, "store migrated");
    }
    store.options.flush()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Open again after a drop: sled's flusher thread may hold the file
    /// lock for a moment after the `Db` is dropped.
    fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            if let Ok(store) = Store::open(dir) {
                return store;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Store::open(dir).expect("reopen")
    }

    #[test]
    fn schema_2_channel_status_becomes_a_health_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.options.insert("schema_version", &2u32.to_be_bytes()).expect("downgrade");
            let tree = store.tree("channels").expect("tree");
            for (id, status) in [(1u64, "enabled"), (2, "disabled")] {
                let rec = serde_json::json!({"id": id, "name": format!("c{id}"), "adapter": "openai",
                                             "base_url": "http://x", "status": status});
                tree.insert(id.to_be_bytes(), serde_json::to_vec(&rec).expect("json")).expect("insert");
            }
            store.flush().expect("flush");
        }
        let store = reopen(dir.path());
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
    fn counters_survive_reopen_and_old_schemas_migrate() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.options.insert("schema_version", &1u32.to_be_bytes()).expect("downgrade");
            assert_eq!(store.next_counter("c").expect("counter"), 1);
            assert_eq!(store.next_counter("c").expect("counter"), 2);
            store.flush().expect("flush");
        }
        let store = reopen(dir.path());
        assert_eq!(store.schema_version().expect("version"), Some(SCHEMA_VERSION));
        assert_eq!(store.next_counter("c").expect("counter"), 3);
    }
}
