//! Precompiled-artifact cache: `<data>/plugin-cache/<sha256>-<engine>.cwasm`,
//! so that a restart deserializes instead of recompiling. Only plugins that
//! passed validation are kept; a plugin's entry goes when the plugin is
//! deleted, and entries no plugin file refers to are swept at start — in
//! the default cache (`<data>/plugin-cache`) only: a `cache_dir` set in the
//! configuration may be shared by several gateways and is never pruned.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Result;
use wasmtime::component::Component;

use super::compile::{Compiled, Compiler, compile};
use super::engine::PluginEngine;

/// Where compiled plugins are kept between runs.
pub struct ArtifactCache {
    dir: Option<PathBuf>,
    /// Whether this gateway owns the directory (prunes it).
    owned: bool,
    /// Temporary files of compilations in progress.
    scratch: PathBuf,
    compiler: Compiler,
}

/// A component from the cache or a fresh compilation.
pub struct Artifact {
    /// The component.
    pub component: Component,
    /// Whether it came from the cache.
    pub from_cache: bool,
    /// A fresh compilation's serialized form, to keep once it is validated.
    pending: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl ArtifactCache {
    /// A cache in `dir` (or none: always compile), compiling with `compiler`
    /// and using `scratch` for temporary files; `owned` when this gateway
    /// alone uses `dir` (then it is pruned).
    pub fn new(dir: Option<PathBuf>, owned: bool, scratch: PathBuf, compiler: Compiler) -> Self {
        if let Some(Err(e)) = dir.as_ref().map(std::fs::create_dir_all) {
            tracing::warn!(error = %e, "plugin cache directory unusable; cache disabled");
            return Self { dir: None, owned, scratch, compiler };
        }
        Self { dir, owned, scratch, compiler }
    }

    /// No cache, compiling in this process (checks, benchmarks).
    pub fn none() -> Self {
        Self::new(None, false, std::env::temp_dir(), Compiler::InProcess)
    }

    fn path(&self, engine: &PluginEngine, sha256: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.join(format!("{sha256}-{}.cwasm", engine.compatibility_key())))
    }

    /// The compiled component for `bytes` (whose hash is `sha256`): from
    /// the cache, or compiled now (call [`Self::keep`] once it is valid).
    pub fn load_or_compile(&self, engine: &PluginEngine, sha256: &str, bytes: &[u8]) -> Result<Artifact> {
        let key = self.path(engine, sha256);
        if let Some(path) = key.as_ref().filter(|p| p.exists()) {
            // SAFETY: the file was written by this gateway's own compiler
            // (`Component::serialize` or `plugin compile`) into its data
            // directory, keyed by the engine's compatibility hash; wasmtime
            // still checks its header.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize_file(&engine.engine, path) } {
                Ok(component) => return Ok(Artifact { component, from_cache: true, pending: None, key: None }),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cached artifact"),
            }
        }
        let Compiled { component, artifact } = compile(engine, &self.compiler, bytes, &self.scratch)?;
        Ok(Artifact { component, from_cache: false, pending: artifact, key })
    }

    /// Keep a validated fresh compilation in the cache.
    pub fn keep(&self, artifact: &mut Artifact) {
        let Some(key) = artifact.key.take() else {
            discard(&mut artifact.pending);
            return;
        };
        let written = match artifact.pending.take() {
            Some(file) => std::fs::rename(&file, &key).map_err(anyhow::Error::from),
            None => artifact
                .component
                .serialize()
                .map_err(super::engine::wasm_err)
                .and_then(|data| write_atomically(&key, &data)),
        };
        if let Err(e) = written {
            tracing::warn!(path = %key.display(), error = %e, "cannot write plugin cache");
        }
    }

    /// Drop the cached artifact of `sha256` (its plugin was deleted).
    pub fn forget(&self, engine: &PluginEngine, sha256: &str) {
        if !self.owned {
            return;
        }
        if let Some(path) = self.path(engine, sha256) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Delete every cached artifact whose hash is not in `keep`, and those
    /// of other engine versions.
    pub fn sweep(&self, engine: &PluginEngine, keep: &HashSet<String>) -> usize {
        let Some(dir) = self.dir.as_ref().filter(|_| self.owned) else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let suffix = format!("-{}.cwasm", engine.compatibility_key());
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let wanted = name.strip_suffix(&suffix).is_some_and(|sha| keep.contains(sha));
            if !wanted && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

impl Drop for Artifact {
    fn drop(&mut self) {
        discard(&mut self.pending);
    }
}

fn discard(pending: &mut Option<PathBuf>) {
    if let Some(file) = pending.take() {
        let _ = std::fs::remove_file(file);
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{:016x}.tmp", rand::random::<u64>()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path).inspect_err(|_| drop(std::fs::remove_file(&tmp)))?;
    Ok(())
}
