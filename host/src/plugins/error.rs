//! Failures of a plugin call: always the plugin's fault, never the channel's.

use wasmtime::Trap;

/// A plugin call that did not produce a usable result.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The call ran past its epoch deadline.
    #[error("plugin `{plugin}` exceeded its time limit")]
    Timeout {
        /// Plugin name.
        plugin: String,
    },
    /// The guest trapped (panic, unreachable, out of memory...).
    #[error("plugin `{plugin}` trapped: {detail}")]
    Trap {
        /// Plugin name.
        plugin: String,
        /// What the trap said (for logs only).
        detail: String,
    },
    /// The guest returned something the host refuses (not JSON, a URL
    /// outside the channel's origin...).
    #[error("plugin `{plugin}` returned malformed output: {detail}")]
    Malformed {
        /// Plugin name.
        plugin: String,
        /// What was wrong.
        detail: String,
    },
    /// The instance could not be created (pool exhausted...).
    #[error("plugin `{plugin}` could not be instantiated: {detail}")]
    Instantiate {
        /// Plugin name.
        plugin: String,
        /// Why.
        detail: String,
    },
}

impl PluginError {
    /// Classify a wasmtime error raised while calling `plugin`.
    pub(crate) fn from_wasm(plugin: &str, err: wasmtime::Error) -> Self {
        let plugin = plugin.to_string();
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Self::Timeout { plugin },
            Some(trap) => Self::Trap { plugin, detail: trap.to_string() },
            None => Self::Trap { plugin, detail: format!("{err:#}") },
        }
    }

    /// The instance for a call could not be created.
    pub(crate) fn instantiate(plugin: &str, err: wasmtime::Error) -> Self {
        Self::Instantiate { plugin: plugin.to_string(), detail: format!("{err:#}") }
    }

    /// A malformed-output error.
    pub(crate) fn malformed(plugin: &str, detail: impl Into<String>) -> Self {
        Self::Malformed { plugin: plugin.to_string(), detail: detail.into() }
    }
}
