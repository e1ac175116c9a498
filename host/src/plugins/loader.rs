//! Turning component bytes into a validated plugin: check the file is a
//! component, compile it (or take it from the cache), find which wasmgate
//! world it implements and at which WIT version, pre-instantiate it, and call
//! `info()`. The hot-swap path and the admin upload use this same function.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::adapter::AdapterPlugin;
use super::cache::{Artifact, ArtifactCache};
use super::engine::PluginEngine;
use super::filter::FilterPlugin;
use super::router::RouterPlugin;

/// The WIT package plugins implement.
pub const WIT_PACKAGE: &str = "wasmgate:plugin";
/// The WIT version this host implements. Plugins built against any
/// `0.1.z` load; other versions are refused with a clear message.
pub const WIT_VERSION: &str = "0.1.6";

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// `adapter-plugin`: a provider adapter.
    Adapter,
    /// `router-plugin`: a routing policy.
    Router,
    /// `filter-plugin` (since 0.1.5): a traffic filter.
    Filter,
}

/// A plugin that passed validation.
pub enum LoadedPlugin {
    /// A provider adapter.
    Adapter(Arc<AdapterPlugin>),
    /// A routing policy.
    Router(Arc<RouterPlugin>),
    /// A traffic filter.
    Filter(Arc<FilterPlugin>),
}

/// Load results besides the plugin itself.
pub struct LoadReport {
    /// The plugin.
    pub plugin: LoadedPlugin,
    /// WIT version the component was built against.
    pub wit_version: String,
    /// Whether the compiled code came from the artifact cache.
    pub from_cache: bool,
}

impl LoadedPlugin {
    /// The plugin's kind.
    pub fn kind(&self) -> PluginKind {
        match self {
            Self::Adapter(_) => PluginKind::Adapter,
            Self::Router(_) => PluginKind::Router,
            Self::Filter(_) => PluginKind::Filter,
        }
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `name` is acceptable as a plugin name (it becomes a file name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_header(bytes: &[u8]) -> Result<(), String> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err("not a WebAssembly file".into());
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err("a core WebAssembly module, not a component: componentize it (`cargo component build`, \
                    `--target wasm32-wasip2`, or wit-component; see docs/plugins.md)"
            .into());
    }
    Ok(())
}

/// Find the wasmgate interface the component exports and its version.
fn detect_world(
    engine: &PluginEngine,
    component: &wasmtime::component::Component,
) -> Result<(PluginKind, String), String> {
    let ty = component.component_type();
    let mut found = None;
    for (name, _) in ty.exports(&engine.engine) {
        let Some(rest) = name.strip_prefix(WIT_PACKAGE).and_then(|r| r.strip_prefix('/')) else { continue };
        let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
        let kind = match iface {
            "adapter" => PluginKind::Adapter,
            "router" => PluginKind::Router,
            "filter" => PluginKind::Filter,
            _ => continue,
        };
        found = Some((kind, version.to_string()));
    }
    let (kind, version) = found.ok_or_else(|| {
        format!(
            "component exports none of {WIT_PACKAGE}/adapter, {WIT_PACKAGE}/router, {WIT_PACKAGE}/filter (wrong world)"
        )
    })?;
    if !version_compatible(&version) {
        return Err(format!(
            "component was built against {WIT_PACKAGE}@{version}; this gateway supports {WIT_PACKAGE}@0.1.x"
        ));
    }
    Ok((kind, version))
}

/// Whether the component exports `wasmgate:plugin/{iface}` at any version.
pub(crate) fn exports_interface(
    engine: &PluginEngine,
    component: &wasmtime::component::Component,
    iface: &str,
) -> bool {
    let prefix = format!("{WIT_PACKAGE}/{iface}@");
    component.component_type().exports(&engine.engine).any(|(name, _)| name.starts_with(&prefix))
}

/// Semver compatibility for 0.x: same major and minor.
fn version_compatible(version: &str) -> bool {
    let mut parts = version.split('.');
    let mut ours = WIT_VERSION.split('.');
    parts.next() == ours.next() && parts.next() == ours.next() && parts.next().is_some()
}

/// A component that passed the checks that need no instance: limits,
/// compilation, world and version.
pub struct Prepared {
    artifact: Artifact,
    sha256: String,
    kind: PluginKind,
    wit_version: String,
}

/// First half of loading, blocking (it compiles): call it off the async
/// workers. Refuses oversized components and compile bombs before any
/// compilation (see `compile.rs`).
pub fn prepare(engine: &PluginEngine, cache: &ArtifactCache, bytes: &[u8]) -> Result<Prepared, String> {
    check_header(bytes)?;
    super::compile::check_limits(&engine.config, bytes)?;
    let sha256 = sha256_hex(bytes);
    let artifact = cache.load_or_compile(engine, &sha256, bytes).map_err(|e| format!("compilation failed: {e:#}"))?;
    let (kind, wit_version) = detect_world(engine, &artifact.component)?;
    Ok(Prepared { artifact, sha256, kind, wit_version })
}

/// Second half of loading: pre-instantiate, call `info()` (bounded like any
/// call), and keep the compiled artifact in the cache once all passed.
pub async fn finish(
    engine: &Arc<PluginEngine>,
    cache: &ArtifactCache,
    name: &str,
    prepared: Prepared,
) -> Result<LoadReport, String> {
    let Prepared { mut artifact, sha256, kind, wit_version } = prepared;
    let name: Arc<str> = Arc::from(name);
    let plugin = match kind {
        PluginKind::Adapter => {
            let pre = engine
                .adapter_linker
                .instantiate_pre(&artifact.component)
                .map_err(|e| format!("does not match the adapter-plugin world: {e:#}"))?;
            let plugin = AdapterPlugin::new(name, sha256, pre, engine.clone())
                .await
                .map_err(|e| format!("info() failed: {e}"))?;
            LoadedPlugin::Adapter(Arc::new(plugin))
        }
        PluginKind::Router => {
            let pre = engine
                .router_linker
                .instantiate_pre(&artifact.component)
                .map_err(|e| format!("does not match the router-plugin world: {e:#}"))?;
            let plugin = RouterPlugin::new(name, sha256, pre, engine.clone())
                .await
                .map_err(|e| format!("info() failed: {e}"))?;
            LoadedPlugin::Router(Arc::new(plugin))
        }
        PluginKind::Filter => {
            let pre = engine
                .filter_linker
                .instantiate_pre(&artifact.component)
                .map_err(|e| format!("does not match the filter-plugin world: {e:#}"))?;
            let plugin = FilterPlugin::new(name, sha256, pre, engine.clone())
                .await
                .map_err(|e| format!("info() failed: {e}"))?;
            LoadedPlugin::Filter(Arc::new(plugin))
        }
    };
    let from_cache = artifact.from_cache;
    cache.keep(&mut artifact);
    Ok(LoadReport { plugin, wit_version, from_cache })
}

/// Validate and prepare a plugin: [`prepare`] on a blocking thread, then
/// [`finish`].
pub async fn load(
    engine: &Arc<PluginEngine>,
    cache: &Arc<ArtifactCache>,
    name: &str,
    bytes: Vec<u8>,
) -> Result<LoadReport, String> {
    let (e, c) = (engine.clone(), cache.clone());
    let prepared = tokio::task::spawn_blocking(move || prepare(&e, &c, &bytes))
        .await
        .unwrap_or_else(|e| Err(format!("the plugin loader crashed: {e}")))?;
    finish(engine, cache, name, prepared).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(version_compatible("0.1.0"));
        assert!(version_compatible("0.1.7"));
        assert!(!version_compatible("0.2.0"));
        assert!(!version_compatible("1.1.0"));
        assert!(!version_compatible(""));
    }

    #[test]
    fn headers() {
        assert!(check_header(b"garbage!").is_err());
        assert!(check_header(b"\0asm\x01\0\0\0").is_err_and(|e| e.contains("core")));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn names() {
        assert!(valid_name("openai"));
        assert!(valid_name("openai-v2_x"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("Open AI"));
        assert!(!valid_name(""));
    }
}
