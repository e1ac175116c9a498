//! Plugins shared through PostgreSQL (when `database_url` is set): a
//! plugin uploaded through `PUT /api/plugins` on one node is validated
//! there, stored in table `plugins` and announced with
//! `NOTIFY wasmgate_plugins, '<name>'`; every node then fetches it and
//! installs it through the same path as an upload of its own — validated
//! again, hot-swapped, written to its plugins directory — or, if it
//! rejects it, reports why in `GET /api/plugins` and keeps its previous
//! version. A delete is shared the same way, and kept as a tombstone, so a
//! node that was down when it happened removes the plugin when it compares
//! again. At start (and every [`RECONCILE`]) a node installs every stored
//! plugin whose bytes differ from its own file. The plugins
//! directory keeps working as on one node for files dropped in by hand.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::Registry;
use crate::store::postgres::Postgres;

/// The notification channel announcing a changed plugin (payload: its name).
pub const PLUGINS_NOTIFY: &str = "wasmgate_plugins";

/// How often every stored plugin is compared with the local ones, whatever
/// was announced.
const RECONCILE: Duration = Duration::from_secs(10);

/// The shared plugin table and this node's registry.
pub struct SharedPlugins {
    pg: Arc<Postgres>,
    registry: Arc<Registry>,
    /// Per plugin name, this node's uploads and deletes: a comparison whose
    /// read overlapped one of them must not undo it (install a version just
    /// deleted here, or an older one).
    local_ops: std::sync::Mutex<std::collections::HashMap<String, LocalOps>>,
}

/// This node's changes of one plugin.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct LocalOps {
    /// Changes begun or ended so far.
    count: u64,
    /// Changes under way (the local install or delete done, the shared
    /// table perhaps not written yet).
    pending: u32,
}

/// A local upload or delete of one plugin, from before it touches this
/// node until the shared table has it (or it failed): while it lives, no
/// comparison with the table acts on that plugin.
pub struct LocalChange<'a> {
    shared: &'a SharedPlugins,
    name: String,
}

impl Drop for LocalChange<'_> {
    fn drop(&mut self) {
        let mut ops = self.shared.local_ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = ops.entry(self.name.clone()).or_default();
        entry.count += 1;
        entry.pending = entry.pending.saturating_sub(1);
    }
}

/// A stored plugin: its name, hash and bytes (`None`: deleted).
type Stored = (String, Option<(String, Vec<u8>)>);

impl SharedPlugins {
    /// Follow the shared table: install what differs now, then whatever is
    /// announced (the work runs on `runtime`, the fetches on the database
    /// thread).
    pub fn start(pg: &Arc<Postgres>, registry: &Arc<Registry>, runtime: &tokio::runtime::Handle) -> Arc<Self> {
        let shared = Arc::new(Self { pg: pg.clone(), registry: registry.clone(), local_ops: Default::default() });
        let (changed, mut names) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
        pg.spawn(listen(pg.clone(), changed));
        let me = shared.clone();
        runtime.spawn(async move {
            while let Some(name) = names.recv().await {
                me.sync(name).await;
            }
        });
        shared
    }

    /// This node begins changing plugin `name`: hold the answer from
    /// before the local install or delete until after [`Self::publish`] or
    /// [`Self::unpublish`].
    pub fn change(&self, name: &str) -> LocalChange<'_> {
        let mut ops = self.local_ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = ops.entry(name.to_string()).or_default();
        entry.count += 1;
        entry.pending += 1;
        LocalChange { shared: self, name: name.to_string() }
    }

    fn ops(&self) -> std::collections::HashMap<String, LocalOps> {
        self.local_ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Store `bytes` as plugin `name` (already validated and in service
    /// here) and announce it to the other nodes.
    pub async fn publish(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.write(name, super::sha256_hex(&bytes), Some(bytes)).await
    }

    /// Mark plugin `name` deleted in the shared table (a tombstone) and
    /// announce it.
    pub async fn unpublish(&self, name: &str) -> Result<()> {
        self.write(name, String::new(), None).await
    }

    /// Upsert plugin `name` — its bytes, or `None` for a tombstone — and
    /// announce it, in one transaction.
    async fn write(&self, name: &str, sha: String, bytes: Option<Vec<u8>>) -> Result<()> {
        let (pg, name) = (self.pg.clone(), name.to_string());
        self.pg
            .call(async move {
                let mut c = pg.connect().await?;
                let tx = c.transaction().await?;
                let deleted = bytes.is_none();
                tx.execute(
                    "INSERT INTO plugins (name, sha256, bytes, updated_at, deleted) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (name) DO UPDATE SET sha256 = $2, bytes = $3, updated_at = $4, deleted = $5",
                    &[&name, &sha, &bytes, &(crate::store::unix_now() as i64), &deleted],
                )
                .await?;
                tx.execute("SELECT pg_notify($1, $2)", &[&PLUGINS_NOTIFY, &name]).await?;
                tx.commit().await?;
                Ok(())
            })
            .await
    }

    /// Fetch plugin `name` (or, for `None`, every stored plugin).
    async fn fetch(&self, name: Option<String>) -> Result<Vec<Stored>> {
        let pg = self.pg.clone();
        self.pg
            .call(async move {
                let c = pg.connect().await?;
                // A deleted plugin (a tombstone, or no row) reads as `None`.
                let live =
                    |sha: String, bytes: Option<Vec<u8>>, deleted: bool| bytes.filter(|_| !deleted).map(|b| (sha, b));
                Ok(match name {
                    Some(name) => {
                        let row =
                            c.query_opt("SELECT sha256, bytes, deleted FROM plugins WHERE name = $1", &[&name]).await?;
                        vec![(name, row.and_then(|r| live(r.get(0), r.get(1), r.get(2))))]
                    }
                    None => c
                        .query("SELECT name, sha256, bytes, deleted FROM plugins", &[])
                        .await?
                        .into_iter()
                        .map(|r| (r.get(0), live(r.get(1), r.get(2), r.get(3))))
                        .collect(),
                })
            })
            .await
    }

    /// Bring this node in line with the stored plugin `name` (or all).
    async fn sync(&self, name: Option<String>) {
        let before = self.ops();
        let stored = match self.fetch(name.clone()).await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(plugin = ?name, error = format!("{error:#}"), "cannot read the shared plugins");
                return;
            }
        };
        let local = self.registry.list();
        let after = self.ops();
        for (name, row) in stored {
            let changing = after.get(&name).is_some_and(|o| o.pending > 0);
            if changing || before.get(&name) != after.get(&name) {
                continue; // Changed here meanwhile: what was read is older.
            }
            let here = local.iter().find(|p| p.name == name);
            match row {
                Some((sha, bytes)) => {
                    if here.and_then(|p| p.sha256.as_deref()) == Some(sha.as_str())
                        || here.and_then(|p| p.last_error_sha256.as_deref()) == Some(sha.as_str())
                    {
                        continue;
                    }
                    match self.registry.install(&name, bytes).await {
                        Ok(_) => tracing::info!(plugin = %name, sha256 = %sha, "shared plugin installed"),
                        Err(error) => tracing::error!(plugin = %name, sha256 = %sha, %error,
                            "a shared plugin was rejected on this node; the previous version keeps serving"),
                    }
                }
                // Deleted on some node (a tombstone): delete it here too.
                None if here.is_some_and(|p| p.loaded) => {
                    self.registry.remove(&name).await;
                    tracing::info!(plugin = %name, "shared plugin removed");
                }
                None => {}
            }
        }
    }
}

/// Forward announced names (and a full comparison at start, after every
/// reconnection and every [`RECONCILE`]) until the receiver is gone.
async fn listen(pg: Arc<Postgres>, changed: tokio::sync::mpsc::UnboundedSender<Option<String>>) {
    loop {
        let (client, mut rx) = pg.listen(PLUGINS_NOTIFY).await;
        if changed.send(None).is_err() {
            return;
        }
        let mut tick = tokio::time::interval(RECONCILE);
        tick.tick().await;
        loop {
            tokio::select! {
                n = rx.recv() => {
                    let Some(n) = n else { break };
                    // An empty payload (a migration) asks for a full comparison.
                    let name = Some(n.payload().to_string()).filter(|p| !p.is_empty());
                    if changed.send(name).is_err() {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if client.is_closed() {
                        break;
                    }
                    if changed.send(None).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
