//! The hot-swappable plugin registry: one `ArcSwap` snapshot of every loaded
//! plugin. A request takes the snapshot once and keeps it, so in-flight
//! requests and open streams finish on the version they started with while
//! new requests see the new one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::adapter::AdapterPlugin;
use super::cache::ArtifactCache;
use super::engine::PluginEngine;
use super::filter::FilterPlugin;
use super::loader::{self, LoadedPlugin, PluginKind};
use super::router::RouterPlugin;

/// Every plugin in service at one instant.
#[derive(Default, Clone)]
pub struct PluginSet {
    /// Provider adapters by name.
    pub adapters: HashMap<String, Arc<AdapterPlugin>>,
    /// Routing policies by name.
    pub routers: HashMap<String, Arc<RouterPlugin>>,
    /// Traffic filters by name.
    pub filters: HashMap<String, Arc<FilterPlugin>>,
}

impl PluginSet {
    fn kind_of(&self, name: &str) -> Option<PluginKind> {
        if self.adapters.contains_key(name) {
            Some(PluginKind::Adapter)
        } else if self.routers.contains_key(name) {
            Some(PluginKind::Router)
        } else if self.filters.contains_key(name) {
            Some(PluginKind::Filter)
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
    /// `adapter`, `router` or `filter`; absent when the file never loaded.
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
    /// The models an adapter offers on a channel that lists none.
    pub default_models: Vec<String>,
    /// Why the most recent attempt to load a new version failed, if it did.
    pub last_error: Option<String>,
    /// SHA-256 of the rejected file.
    pub last_error_sha256: Option<String>,
    /// Unix time (seconds) of that failure.
    pub last_error_at: Option<u64>,
    /// Calls of the version in service (every adapter and router call).
    pub calls: u64,
    /// Of those, the calls that failed inside the plugin (trap, timeout,
    /// fuel, memory, instantiation).
    pub failed_calls: u64,
    /// Calls of the version in service that failed (trap, timeout, invalid
    /// output) and were answered by a fallback or an error.
    pub call_failures: u64,
    /// The most recent such failure.
    pub last_call_error: Option<String>,
    /// Unix time (seconds) of that failure.
    pub last_call_error_at: Option<u64>,
}

/// Loads, publishes and unloads plugins.
///
/// Loading (compilation, `info()`) runs without any registry-wide lock:
/// operations on one plugin name are serialized by that name's own lock,
/// in arrival order, so a slow or hostile upload delays only later
/// operations on the same name. Only the swap of the snapshot itself is
/// serialized globally, and it is instantaneous.
pub struct Registry {
    engine: Arc<PluginEngine>,
    cache: Arc<ArtifactCache>,
    dir: PathBuf,
    current: ArcSwap<PluginSet>,
    statuses: Mutex<BTreeMap<String, PluginStatus>>,
    swap: Mutex<()>,
    names: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            swap: Mutex::new(()),
            names: Mutex::new(HashMap::new()),
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

    /// Plugin instances kept idle for reuse and serving calls now, over all
    /// plugins.
    pub fn instance_gauges(&self) -> crate::metrics::InstanceGauges {
        use std::sync::atomic::Ordering::Relaxed;
        let idle = self.engine.idle.load(Relaxed);
        crate::metrics::InstanceGauges { idle, in_use: self.engine.live.count().saturating_sub(idle) }
    }

    /// Status of every plugin file seen, sorted by name.
    pub fn list(&self) -> Vec<PluginStatus> {
        let set = self.snapshot();
        let counts = |name: &str| {
            set.adapters
                .get(name)
                .map(|a| a.call_counts())
                .or_else(|| set.routers.get(name).map(|r| r.call_counts()))
                .or_else(|| set.filters.get(name).map(|f| f.call_counts()))
        };
        let mut list: Vec<PluginStatus> = lock(&self.statuses).values().cloned().collect();
        for status in &mut list {
            (status.calls, status.failed_calls) = counts(&status.name).unwrap_or_default();
            status.default_models =
                set.adapters.get(&status.name).map(|a| a.info.default_models.clone()).unwrap_or_default();
        }
        list
    }

    /// Record that a call of plugin `name` failed, for `GET /api/plugins`.
    pub fn report_call_failure(&self, name: &str, error: &str) {
        if let Some(status) = lock(&self.statuses).get_mut(name) {
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

    /// The lock serializing operations on plugin `name`.
    fn name_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.names).entry(name.to_string()).or_default().clone()
    }

    /// Load every `*.wasm` in the plugins directory, then drop cached
    /// artifacts that no loaded plugin uses.
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
        let keep: HashSet<String> = self.list().into_iter().filter_map(|s| s.sha256).collect();
        let removed = self.cache.sweep(&self.engine, &keep);
        if removed > 0 {
            tracing::info!(removed, "stale compiled plugins removed from the cache");
        }
    }

    /// Bring the registry in line with `path`: load it if it exists and
    /// changed, unload it if it is gone.
    pub async fn sync_file(&self, path: &Path) -> Result<(), String> {
        let Some(name) = Self::name_for(path) else { return Ok(()) };
        let name_lock = self.name_lock(&name);
        let _serial = name_lock.lock().await;
        match tokio::fs::read(path).await {
            Ok(bytes) => self.publish(&name, bytes).await.map(|_| ()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.unload(&name);
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
        let name_lock = self.name_lock(name);
        let _serial = name_lock.lock().await;
        let path = self.dir.join(format!("{name}.wasm"));
        let tmp = self.dir.join(format!(".{name}.{:016x}.upload", rand::random::<u64>()));
        // Write the file first (under a private name): once published, the
        // plugin must survive a restart.
        if let Err(e) = tokio::fs::write(&tmp, &bytes).await {
            return Err(format!("the plugin could not be saved: {e}"));
        }
        match self.publish(name, bytes).await {
            Ok(status) => match tokio::fs::rename(&tmp, &path).await {
                Ok(()) => Ok(status),
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Err(format!("the plugin loaded but could not be saved: {e}"))
                }
            },
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Delete plugin `name`'s file and take it out of service.
    pub async fn remove(&self, name: &str) -> bool {
        let name_lock = self.name_lock(name);
        let _serial = name_lock.lock().await;
        let path = self.dir.join(format!("{name}.wasm"));
        let existed = tokio::fs::remove_file(&path).await.is_ok();
        existed | self.unload(name)
    }

    fn unload(&self, name: &str) -> bool {
        let _swap = lock(&self.swap);
        let current = self.snapshot();
        let removed = current
            .adapters
            .get(name)
            .map(|a| (a.sha256.clone(), Retired::Adapter(a.clone())))
            .or_else(|| current.routers.get(name).map(|r| (r.sha256.clone(), Retired::Router(r.clone()))))
            .or_else(|| current.filters.get(name).map(|f| (f.sha256.clone(), Retired::Filter(f.clone()))));
        if let Some((sha, old)) = &removed {
            let mut next = current.as_ref().clone();
            next.adapters.remove(name);
            next.routers.remove(name);
            next.filters.remove(name);
            self.current.store(Arc::new(next));
            old.retire();
            self.cache.forget(&self.engine, sha);
            tracing::info!(plugin = name, "plugin unloaded");
        }
        lock(&self.statuses).remove(name);
        removed.is_some()
    }

    /// Validate and publish (the caller holds `name`'s lock); on failure
    /// keep the version in service and record the error.
    async fn publish(&self, name: &str, bytes: Vec<u8>) -> Result<PluginStatus, String> {
        let sha = loader::sha256_hex(&bytes);
        if let Some(status) = lock(&self.statuses).get(name) {
            if status.loaded && status.sha256.as_deref() == Some(&sha) {
                return Ok(status.clone());
            }
            if status.last_error_sha256.as_deref() == Some(&sha) {
                return Err(status.last_error.clone().unwrap_or_default());
            }
        }
        let result = loader::load(&self.engine, &self.cache, name, bytes).await;
        let _swap = lock(&self.swap);
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
                let mut next = current.as_ref().clone();
                let (version, description, replaced) = match &report.plugin {
                    LoadedPlugin::Adapter(a) => {
                        let old = next.adapters.insert(name.to_string(), a.clone()).map(Retired::Adapter);
                        (a.info.version.clone(), a.info.description.clone(), old)
                    }
                    LoadedPlugin::Router(r) => {
                        let old = next.routers.insert(name.to_string(), r.clone()).map(Retired::Router);
                        (r.info.version.clone(), r.info.description.clone(), old)
                    }
                    LoadedPlugin::Filter(f) => {
                        let old = next.filters.insert(name.to_string(), f.clone()).map(Retired::Filter);
                        (f.info.version.clone(), f.info.description.clone(), old)
                    }
                };
                self.current.store(Arc::new(next));
                if let Some(old) = replaced {
                    old.retire();
                    if old.sha256() != sha {
                        self.cache.forget(&self.engine, old.sha256());
                    }
                }
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
                crate::metrics::get().plugin_load("published");
                lock(&self.statuses).insert(name.to_string(), status.clone());
                Ok(status)
            }
            Err(error) => {
                tracing::error!(plugin = name, sha256 = %sha, %error, "plugin rejected; the previous version (if any) keeps serving");
                crate::metrics::get().plugin_load("rejected");
                let mut statuses = lock(&self.statuses);
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

/// A plugin version leaving service.
enum Retired {
    Adapter(Arc<AdapterPlugin>),
    Router(Arc<RouterPlugin>),
    Filter(Arc<FilterPlugin>),
}

impl Retired {
    /// Free its idle instances (in-flight requests keep theirs).
    fn retire(&self) {
        match self {
            Self::Adapter(a) => a.retire(),
            Self::Router(r) => r.retire(),
            Self::Filter(f) => f.retire(),
        }
    }

    fn sha256(&self) -> &str {
        match self {
            Self::Adapter(a) => &a.sha256,
            Self::Router(r) => &r.sha256,
            Self::Filter(f) => &f.sha256,
        }
    }
}
