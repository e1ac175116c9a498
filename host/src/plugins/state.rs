//! Per-call store data: an empty WASI context (no preopens, environment,
//! network, clocks beyond WASI's defaults) and the resource limits.

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{ClockHost, CredentialsHost, LogHost, LogLevel, RoutingContextHost, TypesHost};

/// What `routing-context` answers during one `select` call.
#[derive(Debug, Clone, Default)]
pub struct RoutingFacts {
    /// Requests routed for this group and model before this one.
    pub sequence: u64,
    /// EWMA time to first token per candidate, in ms (0 = unknown).
    pub ttft_ms: Vec<f64>,
}

/// What a plugin's `Store` holds.
pub struct PluginState {
    plugin: std::sync::Arc<str>,
    /// Built on first use: most plugins import no WASI at all, and building
    /// a context (RNG seeding, clocks) costs more than a whole plugin call.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    /// Facts for the `select` call in progress (routers only).
    pub(crate) routing: RoutingFacts,
    /// What `credentials.current` answers (adapters with an exchange only).
    pub(crate) credential: Option<String>,
}

impl PluginState {
    /// Fresh state for one call of `plugin`, capped at `memory_bytes`.
    pub fn new(plugin: std::sync::Arc<str>, memory_bytes: usize) -> Self {
        Self {
            plugin,
            wasi: None,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(memory_bytes).trap_on_grow_failure(false).build(),
            routing: RoutingFacts::default(),
            credential: None,
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let ctx = self.wasi.get_or_insert_with(|| WasiCtx::builder().build());
        WasiCtxView { ctx, table: &mut self.table }
    }
}

impl TypesHost for PluginState {}

impl LogHost for PluginState {
    fn log(&mut self, level: LogLevel, message: String) {
        // Bound what a plugin can push into the log.
        let message: String = message.chars().take(2048).collect();
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Error => tracing::error!(target: "wasmgate::plugin", plugin, "{message}"),
        }
    }
}

impl RoutingContextHost for PluginState {
    fn sequence(&mut self) -> u64 {
        self.routing.sequence
    }

    fn ttft_ms(&mut self) -> Vec<f64> {
        self.routing.ttft_ms.clone()
    }
}

impl CredentialsHost for PluginState {
    fn current(&mut self) -> Option<String> {
        self.credential.clone()
    }
}

impl ClockHost for PluginState {
    fn now_unix_secs(&mut self) -> u64 {
        crate::store::unix_now()
    }
}
