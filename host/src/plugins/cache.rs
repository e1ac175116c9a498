//! Precompiled-artifact cache: `<data>/plugin-cache/<sha256>-<engine>.cwasm`,
//! so that a restart deserializes instead of recompiling.

use std::path::PathBuf;

use anyhow::Result;
use wasmtime::component::Component;

use super::engine::{PluginEngine, wasm_err};

/// Where compiled plugins are kept between runs.
pub struct ArtifactCache {
    dir: Option<PathBuf>,
}

impl ArtifactCache {
    /// A cache in `dir`, or none (always compile).
    pub fn new(dir: Option<PathBuf>) -> Self {
        if let Some(Err(e)) = dir.as_ref().map(std::fs::create_dir_all) {
            tracing::warn!(error = %e, "plugin cache directory unusable; cache disabled");
            return Self { dir: None };
        }
        Self { dir }
    }

    /// The compiled component for `bytes` (whose hash is `sha256`), and
    /// whether it came from the cache.
    pub fn load_or_compile(&self, engine: &PluginEngine, sha256: &str, bytes: &[u8]) -> Result<(Component, bool)> {
        let path = self.dir.as_ref().map(|dir| dir.join(format!("{sha256}-{}.cwasm", engine.compatibility_key())));
        if let Some(path) = path.as_ref().filter(|p| p.exists()) {
            // SAFETY: the file was written by `Component::serialize` of this
            // host into its own data directory, keyed by the engine's
            // compatibility hash; wasmtime still checks its header.
            #[allow(unsafe_code)]
            match unsafe { Component::deserialize_file(&engine.engine, path) } {
                Ok(component) => return Ok((component, true)),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cached artifact"),
            }
        }
        let component = Component::new(&engine.engine, bytes).map_err(wasm_err)?;
        if let Some(path) = path {
            let tmp = path.with_extension("cwasm.tmp");
            let written = component
                .serialize()
                .map_err(wasm_err)
                .and_then(|data| std::fs::write(&tmp, data).map_err(Into::into))
                .and_then(|()| std::fs::rename(&tmp, &path).map_err(Into::into));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "cannot write plugin cache");
            }
        }
        Ok((component, false))
    }
}
