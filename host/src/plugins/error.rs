//! Failures of a plugin call: the plugin's fault or the gateway's capacity,
//! never the channel's. Each cause is reported as what it is.

use wasmtime::Trap;

/// A plugin call that did not produce a usable result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    /// The call used up its fuel (its work budget, scaled to its input).
    #[error("plugin `{plugin}` exceeded its work budget ({fuel} fuel)")]
    OutOfFuel {
        /// Plugin name.
        plugin: String,
        /// The budget it had.
        fuel: u64,
    },
    /// The call ran past the wall-clock safety net (usually a call blocked
    /// in an import, since guest code is bounded by fuel).
    #[error("plugin `{plugin}` exceeded its time limit ({ms} ms)")]
    Timeout {
        /// Plugin name.
        plugin: String,
        /// The limit.
        ms: u64,
    },
    /// The guest needed more memory than its cap.
    #[error("plugin `{plugin}` reached its memory limit ({mib} MiB)")]
    MemoryLimit {
        /// Plugin name.
        plugin: String,
        /// The cap.
        mib: u32,
    },
    /// The guest trapped (panic, unreachable, stack overflow…).
    #[error("plugin `{plugin}` trapped: {detail}")]
    Trap {
        /// Plugin name.
        plugin: String,
        /// What the trap (and the guest's stderr) said, for logs only.
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
    /// Every instance slot of the pool is in use: the gateway's capacity,
    /// not the plugin's fault.
    #[error("no plugin instance is free for `{plugin}` (the instance pool is exhausted)")]
    Capacity {
        /// Plugin name.
        plugin: String,
    },
    /// The instance could not be created for another reason (its start
    /// function failed...).
    #[error("plugin `{plugin}` could not be instantiated: {detail}")]
    Instantiate {
        /// Plugin name.
        plugin: String,
        /// Why.
        detail: String,
    },
}

/// What was known about a failed call, to classify its error.
pub(crate) struct CallFacts<'a> {
    pub plugin: &'a str,
    pub fuel: u64,
    pub memory_hit: bool,
    pub memory_mib: u32,
    pub stderr: Option<String>,
}

impl PluginError {
    /// The failure's label in the metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::OutOfFuel { .. } => "out_of_fuel",
            Self::Timeout { .. } => "timeout",
            Self::MemoryLimit { .. } => "memory_limit",
            Self::Trap { .. } => "trap",
            Self::Malformed { .. } => "malformed",
            Self::Capacity { .. } => "capacity",
            Self::Instantiate { .. } => "instantiate",
        }
    }

    /// Classify a wasmtime error raised while calling (or instantiating) a
    /// plugin.
    pub(crate) fn from_wasm(facts: CallFacts<'_>, err: wasmtime::Error, instantiating: bool) -> Self {
        let plugin = facts.plugin.to_string();
        if err.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
            return Self::Capacity { plugin };
        }
        if facts.memory_hit {
            return Self::MemoryLimit { plugin, mib: facts.memory_mib };
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => Self::OutOfFuel { plugin, fuel: facts.fuel },
            Some(trap) => {
                let mut detail = trap.to_string();
                if let Some(stderr) = facts.stderr {
                    detail.push_str(&format!(" (stderr: {stderr})"));
                }
                Self::Trap { plugin, detail }
            }
            None if instantiating => Self::Instantiate { plugin, detail: format!("{err:#}") },
            None => Self::Trap { plugin, detail: format!("{err:#}") },
        }
    }

    /// A malformed-output error.
    pub(crate) fn malformed(plugin: &str, detail: impl Into<String>) -> Self {
        Self::Malformed { plugin: plugin.to_string(), detail: detail.into() }
    }

    /// Short machine-readable name of the cause (logs, metrics, plugin
    /// statistics).
    pub fn cause(&self) -> &'static str {
        match self {
            Self::OutOfFuel { .. } => "fuel",
            Self::Timeout { .. } => "timeout",
            Self::MemoryLimit { .. } => "memory",
            Self::Trap { .. } => "trap",
            Self::Malformed { .. } => "malformed",
            Self::Capacity { .. } => "capacity",
            Self::Instantiate { .. } => "instantiate",
        }
    }

    /// Whether the plugin is to blame (everything but capacity).
    pub fn is_plugin_fault(&self) -> bool {
        !matches!(self, Self::Capacity { .. })
    }
}
