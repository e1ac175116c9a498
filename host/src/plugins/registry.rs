//! The hot-swappable plugin registry: one `ArcSwap` snapshot of every loaded
//! plugin. A request takes the snapshot once and keeps it, so in-flight
//! requests and open streams finish on the version they started with while
//! new requests see the new one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::adapter::AdapterPlugin;
use super::cache::ArtifactCache;
use super::engine::PluginEngine;
use super::loader::{self, LoadedPlugin, PluginKind};
use super::router::RouterPlugin;

/// Every plugin in service at one instant.
#[derive(Default)]
pub struct PluginSet {
    /// Provider adapters by name.
    pub adapters: HashMap<String, Arc<AdapterPlugin>>,
    /// Routing policies by name.
    pub routers: HashMap<String, Arc<RouterPlugin>>,
}

impl PluginSet {
    fn kind_of(&self, name: &str) -> Option<PluginKind> {
        if self.adapters.contains_key(name) {
            Some(PluginKind::Adapter)
        } else if self.routers.contains_key(name) {
            Some(PluginKind::Router)
        } else {
            None
        }
    }
}

/// What `GET /api/plugins` shows for one plugin file.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PluginStatus {
    /// Plugin name (file stem).
    pub name: String,
    /// `adapter` or `router`; absent when the file never loaded.
    pub kind: Option<PluginKind>,
    /// Version reported by the plugin's `info()`.
    pub version: Option<String>,
    /// Description reported by `info()`.
    pub description: Option<String>,
    /// WIT version the component was built against.
    pub wit_version: Option<String>,
    /// SHA-256 of the version in service.
    pub sha256: Option<String>,
    /// Unix time (seconds) the version in service was published.
    pub loaded_at: Option<u64>,
    /// Whether its compiled code came from the artifact cache.
    pub from_cache: bool,
    /// Whether a version of this plugin is in service.
    pub loaded: bool,
    /// Why the most recent attempt to load a new version failed, if it did.
    pub last_error: Option<String>,
    /// SHA-256 of the rejected file.
    pub last_error_sha256: Option<String>,
    /// Unix time (seconds) of that failure.
    pub last_error_at: Option<u64>,
    /// Calls of the version in service that failed (trap, timeout, invalid
    /// output) and were answered by a fallback or an error.
    pub call_failures: u64,
    /// The most recent such failure.
    pub last_call_error: Option<String>,
    /// Unix time (seconds) of that failure.
    pub last_call_error_at: Option<u64>,
}

/// Loads, publishes and unloads plugins.
pub struct Registry {
    engine: Arc<PluginEngine>,
    cache: Arc<ArtifactCache>,
    dir: PathBuf,
    current: ArcSwap<PluginSet>,
    statuses: Mutex<BTreeMap<String, PluginStatus>>,
    updates: tokio::sync::Mutex<()>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Registry {
    /// An empty registry over the plugins directory `dir`.
    pub fn new(engine: Arc<PluginEngine>, cache: ArtifactCache, dir: PathBuf) -> Self {
        Self {
            engine,
            cache: Arc::new(cache),
            dir,
            current: ArcSwap::from_pointee(PluginSet::default()),
            statuses: Mutex::new(BTreeMap::new()),
            updates: tokio::sync::Mutex::new(()),
        }
    }

    /// The plugins directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The plugins in service now. Hold the `Arc` for the whole request.
    pub fn snapshot(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Status of every plugin file seen, sorted by name.
    pub fn list(&self) -> Vec<PluginStatus> {
        self.lock_statuses().values().cloned().collect()
    }

    fn lock_statuses(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PluginStatus>> {
        self.statuses.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Record that a call of plugin `name` failed, for `GET /api/plugins`.
    pub fn report_call_failure(&self, name: &str, error: &str) {
        if let Some(status) = self.lock_statuses().get_mut(name) {
            status.call_failures += 1;
            status.last_call_error = Some(error.chars().take(512).collect());
            status.last_call_error_at = Some(now());
        }
    }

    /// The plugin name for a path in the plugins directory, if it is one.
    pub fn name_for(path: &Path) -> Option<String> {
        if path.extension()? != "wasm" {
            return None;
        }
        let stem = path.file_stem()?.to_str()?;
        loader::valid_name(stem).then(|| stem.to_string())
    }

    /// Load every `*.wasm` in the plugins directory.
    pub async fn load_dir(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            tracing::warn!(dir = %self.dir.display(), "plugins directory is not readable");
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if Self::name_for(&path).is_some() {
                let _ = self.sync_file(&path).await;
            }
        }
    }

    /// Bring the registry in line with `path`: load it if it exists and
    /// changed, unload it if it is gone.
    pub async fn sync_file(&self, path: &Path) -> Result<(), String> {
        let Some(name) = Self::name_for(path) else { return Ok(()) };
        match tokio::fs::read(path).await {
            Ok(bytes) => self.publish(&name, bytes).await.map(|_| ()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.unload(&name).await;
                Ok(())
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Validate `bytes` as plugin `name`, then write them to the plugins
    /// directory and publish them (the admin upload). A rejected upload
    /// leaves both the file and the plugin in service untouched.
    pub async fn install(&self, name: &str, bytes: Vec<u8>) -> Result<PluginStatus, String> {
        if !loader::valid_name(name) {
            return Err("plugin names use lowercase letters, digits, '-' and '_' (at most 64)".into());
        }
        let status = self.publish(name, bytes.clone()).await?;
        let path = self.dir.join(format!("{name}.wasm"));
        let tmp = self.dir.join(format!(".{name}.wasm.upload"));
        let write = async {
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        };
        write.await.map_err(|e| format!("plugin loaded but could not be saved: {e}"))?;
        Ok(status)
    }

    /// Delete plugin `name`'s file and take it out of service.
    pub async fn remove(&self, name: &str) -> bool {
        let path = self.dir.join(format!("{name}.wasm"));
        let existed = tokio::fs::remove_file(&path).await.is_ok();
        existed | self.unload(name).await
    }

    async fn unload(&self, name: &str) -> bool {
        let _guard = self.updates.lock().await;
        let current = self.snapshot();
        let had = current.kind_of(name).is_some();
        if had {
            let mut next = PluginSet { adapters: current.adapters.clone(), routers: current.routers.clone() };
            next.adapters.remove(name);
            next.routers.remove(name);
            self.current.store(Arc::new(next));
            tracing::info!(plugin = name, "plugin unloaded");
        }
        self.lock_statuses().remove(name);
        had
    }

    /// Validate and publish; on failure keep the version in service and
    /// record the error.
    async fn publish(&self, name: &str, bytes: Vec<u8>) -> Result<PluginStatus, String> {
        let _guard = self.updates.lock().await;
        let sha = loader::sha256_hex(&bytes);
        if let Some(status) = self.lock_statuses().get(name) {
            if status.loaded && status.sha256.as_deref() == Some(&sha) {
                return Ok(status.clone());
            }
            if status.last_error_sha256.as_deref() == Some(&sha) {
                return Err(status.last_error.clone().unwrap_or_default());
            }
        }
        let (engine, cache, owned) = (self.engine.clone(), self.cache.clone(), name.to_string());
        let result = tokio::task::spawn_blocking(move || loader::load(&engine, &cache, &owned, &bytes))
            .await
            .unwrap_or_else(|e| Err(format!("loader crashed: {e}")));
        let current = self.snapshot();
        let result = result.and_then(|report| match current.kind_of(name) {
            Some(kind) if kind != report.plugin.kind() => Err(format!(
                "plugin `{name}` is in service as {kind:?}; the new file implements {:?}",
                report.plugin.kind()
            )),
            _ => Ok(report),
        });
        match result {
            Ok(report) => {
                let mut next = PluginSet { adapters: current.adapters.clone(), routers: current.routers.clone() };
                let (version, description) = match &report.plugin {
                    LoadedPlugin::Adapter(a) => {
                        next.adapters.insert(name.to_string(), a.clone());
                        (a.info.version.clone(), a.info.description.clone())
                    }
                    LoadedPlugin::Router(r) => {
                        next.routers.insert(name.to_string(), r.clone());
                        (r.info.version.clone(), r.info.description.clone())
                    }
                };
                self.current.store(Arc::new(next));
                let status = PluginStatus {
                    name: name.to_string(),
                    kind: Some(report.plugin.kind()),
                    version: Some(version),
                    description: Some(description),
                    wit_version: Some(report.wit_version),
                    sha256: Some(sha),
                    loaded_at: Some(now()),
                    from_cache: report.from_cache,
                    loaded: true,
                    ..Default::default()
                };
                tracing::info!(plugin = name, kind = ?status.kind, version = ?status.version,
                    sha256 = ?status.sha256, from_cache = status.from_cache, "plugin published");
                self.lock_statuses().insert(name.to_string(), status.clone());
                Ok(status)
            }
            Err(error) => {
                tracing::error!(plugin = name, sha256 = %sha, %error, "plugin rejected; the previous version (if any) keeps serving");
                let mut statuses = self.lock_statuses();
                let status = statuses
                    .entry(name.to_string())
                    .or_insert_with(|| PluginStatus { name: name.to_string(), ..Default::default() });
                status.last_error = Some(error.clone());
                status.last_error_sha256 = Some(sha);
                status.last_error_at = Some(now());
                Err(error)
            }
        }
    }
}
