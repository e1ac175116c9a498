//! Tables an admin may override through the API (routing, filters,
//! pricing): the configuration file's version, or — once set — the stored
//! one, which wins until it is reset. The stored version lives in an
//! [`OptionStore`]: the node's sled store, or, with `database_url`, the
//! shared database, whose `NOTIFY wasmgate_options` makes every node
//! re-read a table another node changed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use anyhow::Result;
use arc_swap::ArcSwap;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Store;
use super::postgres::Postgres;

/// The notification channel announcing a changed option (payload: its key).
pub const OPTIONS_NOTIFY: &str = "wasmgate_options";

/// Where stored options live.
pub trait OptionStore: Send + Sync {
    /// The option `key`, if set.
    fn get(&self, key: &str) -> Result<Option<String>>;
    /// Set the option `key` durably (and tell the other nodes).
    fn set(&self, key: &str, value: &str) -> Result<()>;
    /// Remove the option `key` durably (and tell the other nodes).
    fn remove(&self, key: &str) -> Result<()>;
    /// Ask for `table` to be re-read when another node changes `key`.
    fn follow(&self, _key: &'static str, _table: Weak<dyn Reload>) {}
}

impl OptionStore for Store {
    fn get(&self, key: &str) -> Result<Option<String>> {
        self.option(key)
    }
    fn set(&self, key: &str, value: &str) -> Result<()> {
        self.set_option(key, value)
    }
    fn remove(&self, key: &str) -> Result<()> {
        self.remove_option(key)
    }
}

/// A table that can re-read its stored version.
pub trait Reload: Send + Sync {
    /// Re-read the stored version (another node changed it).
    fn reload(&self);
}

/// The tables to re-read, by option key.
type Followers = Mutex<Vec<(&'static str, Weak<dyn Reload>)>>;

/// Options in the shared database (table `options`).
pub struct PgOptions {
    pg: Arc<Postgres>,
    followers: Arc<Followers>,
}

impl PgOptions {
    /// Options in `pg`; starts following `NOTIFY wasmgate_options`.
    pub fn start(pg: &Arc<Postgres>) -> Arc<Self> {
        let followers: Arc<Followers> = Arc::default();
        let (keys_tx, keys) = std::sync::mpsc::channel::<String>();
        pg.spawn(listen(pg.clone(), keys_tx));
        // Re-reads block on the database: not on its own thread, not on a worker.
        let weak = Arc::downgrade(&followers);
        let _ = std::thread::Builder::new().name("options-reload".into()).spawn(move || {
            while let Ok(key) = keys.recv() {
                let Some(followers) = weak.upgrade() else { return };
                let tables: Vec<Arc<dyn Reload>> = followers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .filter(|(k, _)| *k == key || key.is_empty())
                    .filter_map(|(_, t)| t.upgrade())
                    .collect();
                tables.iter().for_each(|t| t.reload());
            }
        });
        Arc::new(Self { pg: pg.clone(), followers })
    }

    fn write(&self, key: &str, value: Option<&str>) -> Result<()> {
        let (pg, key, value) = (self.pg.clone(), key.to_string(), value.map(str::to_string));
        self.pg.block(async move {
            let mut c = pg.connect().await?;
            let tx = c.transaction().await?;
            match value {
                Some(v) => {
                    tx.execute(
                        "INSERT INTO options (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
                        &[&key, &v],
                    )
                    .await?
                }
                None => tx.execute("DELETE FROM options WHERE key = $1", &[&key]).await?,
            };
            tx.execute("SELECT pg_notify($1, $2)", &[&OPTIONS_NOTIFY, &key]).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

impl OptionStore for PgOptions {
    fn get(&self, key: &str) -> Result<Option<String>> {
        let (pg, key) = (self.pg.clone(), key.to_string());
        self.pg.block(async move {
            let c = pg.connect().await?;
            Ok(c.query_opt("SELECT value FROM options WHERE key = $1", &[&key]).await?.map(|r| r.get(0)))
        })
    }
    fn set(&self, key: &str, value: &str) -> Result<()> {
        self.write(key, Some(value))
    }
    fn remove(&self, key: &str) -> Result<()> {
        self.write(key, None)
    }
    fn follow(&self, key: &'static str, table: Weak<dyn Reload>) {
        self.followers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((key, table));
    }
}

/// Forward announced keys ("" after a reconnection: re-read everything)
/// until the receiver is gone.
async fn listen(pg: Arc<Postgres>, keys: std::sync::mpsc::Sender<String>) {
    loop {
        // The client must live while its notifications are read.
        let (_client, mut rx) = pg.listen(OPTIONS_NOTIFY).await;
        if keys.send(String::new()).is_err() {
            return;
        }
        while let Some(n) = rx.recv().await {
            if keys.send(n.payload().to_string()).is_err() {
                return;
            }
        }
    }
}

/// A table from the configuration, overridable through the API: `T` as
/// stored, `C` as used (compiled from `T` on every change).
pub struct Override<T, C = T> {
    key: &'static str,
    from_config: T,
    compile: fn(&T) -> C,
    raw: ArcSwap<T>,
    current: ArcSwap<C>,
    overridden: AtomicBool,
    options: Arc<dyn OptionStore>,
    /// Held from a store write or read to its publication, so a re-read
    /// started before this node's own write cannot publish after it (the
    /// write's `NOTIFY` would fix it, but not before a client saw it).
    ordered: std::sync::Mutex<()>,
}

impl<T, C> Override<T, C>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Send + Sync + 'static,
{
    /// The stored version of option `key` if there is one (and it reads),
    /// else `from_config`; followed across nodes when the store is shared.
    pub fn load(
        key: &'static str,
        from_config: T,
        compile: fn(&T) -> C,
        options: Arc<dyn OptionStore>,
    ) -> Result<Arc<Self>> {
        let stored = read(key, options.as_ref())?;
        let overridden = stored.is_some();
        let raw = stored.unwrap_or_else(|| from_config.clone());
        let table = Arc::new(Self {
            key,
            current: ArcSwap::from_pointee(compile(&raw)),
            raw: ArcSwap::from_pointee(raw),
            from_config,
            compile,
            overridden: overridden.into(),
            options: options.clone(),
            ordered: std::sync::Mutex::new(()),
        });
        let weak: Weak<dyn Reload> = Arc::downgrade(&(table.clone() as Arc<dyn Reload>));
        options.follow(key, weak);
        Ok(table)
    }

    /// The table in use.
    pub fn current(&self) -> Arc<C> {
        self.current.load_full()
    }

    /// The table as stored (or configured) and whether the API set it.
    pub fn raw(&self) -> (Arc<T>, bool) {
        (self.raw.load_full(), self.overridden.load(Ordering::Relaxed))
    }

    fn ordered(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ordered.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, raw: T, overridden: bool) {
        self.current.store(Arc::new((self.compile)(&raw)));
        self.raw.store(Arc::new(raw));
        self.overridden.store(overridden, Ordering::Relaxed);
    }

    /// Replace the table durably (the caller validated it).
    pub fn set(&self, table: T) -> Result<()> {
        let _ordered = self.ordered();
        self.options.set(self.key, &serde_json::to_string(&table)?)?;
        self.publish(table, true);
        Ok(())
    }

    /// Drop the stored version and return to the configuration's.
    pub fn reset(&self) -> Result<()> {
        let _ordered = self.ordered();
        self.options.remove(self.key)?;
        self.publish(self.from_config.clone(), false);
        Ok(())
    }
}

/// The stored version of `key`; unreadable JSON is logged and ignored.
fn read<T: DeserializeOwned>(key: &str, options: &dyn OptionStore) -> Result<Option<T>> {
    Ok(match options.get(key)? {
        Some(raw) => match serde_json::from_str(&raw) {
            Ok(t) => Some(t),
            Err(error) => {
                tracing::warn!(option = key, %error, "a stored table is unreadable; using the configuration's");
                None
            }
        },
        None => None,
    })
}

impl<T, C> Reload for Override<T, C>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Send + Sync + 'static,
{
    fn reload(&self) {
        let _ordered = self.ordered();
        match read::<T>(self.key, self.options.as_ref()) {
            Ok(Some(t)) => self.publish(t, true),
            Ok(None) => self.publish(self.from_config.clone(), false),
            Err(error) => tracing::warn!(option = self.key, %error, "re-reading a shared table failed"),
        }
    }
}
