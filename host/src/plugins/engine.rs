//! The shared wasmtime engine: pooling allocator, epoch interruption, and
//! the linkers for each plugin world.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use super::bindings::{AdapterWorld, RouterWorld, add_clock_to_linker, add_credentials_to_linker};
use super::state::PluginState;
use crate::config::PluginConfig;

/// Bytes of each pooled linear memory reset in place (not decommitted)
/// between uses; covers the stack, data and the heap a call typically
/// touches.
const KEEP_RESIDENT: usize = 4 * 1024 * 1024;

/// How often the epoch advances. Deadlines are whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Engine, linkers and limits shared by all plugins.
pub struct PluginEngine {
    pub(crate) engine: Engine,
    pub(crate) adapter_linker: Linker<PluginState>,
    pub(crate) router_linker: Linker<PluginState>,
    deadline_ticks: u64,
    memory_bytes: usize,
}

impl PluginEngine {
    /// Build the engine and start its epoch ticker thread (which stops when
    /// the engine is dropped).
    pub fn new(config: &PluginConfig) -> Result<Arc<Self>> {
        let memory_bytes = config.memory_limit_mib as usize * 1024 * 1024;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances * 4)
            .total_memories(config.max_instances * 2)
            .total_tables(config.max_instances * 8)
            .max_memory_size(memory_bytes)
            .max_core_instances_per_component(16)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20)
            // A fresh instance per call means a slot is reset after every
            // call. Resetting with madvise costs a TLB shootdown and page
            // faults on the next use; instead find the dirty pages with
            // PAGEMAP_SCAN (Linux ≥ 6.7, ignored elsewhere) and memset them.
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 * 1024);
        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            // Explicit bounds checks instead of guard pages: a fresh instance
            // per call would otherwise mprotect its grown heap back to
            // PROT_NONE on every instantiation (a TLB-shootdown IPI per call).
            .signals_based_traps(false)
            .memory_guard_size(0)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .wasm_component_model(true);
        let engine = Engine::new(&wasm).map_err(wasm_err)?;

        let mut adapter_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut adapter_linker).map_err(wasm_err)?;
        AdapterWorld::add_to_linker::<_, HasSelf<PluginState>>(&mut adapter_linker, |s| s).map_err(wasm_err)?;
        add_credentials_to_linker::<_, HasSelf<PluginState>>(&mut adapter_linker, |s| s).map_err(wasm_err)?;
        add_clock_to_linker::<_, HasSelf<PluginState>>(&mut adapter_linker, |s| s).map_err(wasm_err)?;
        let mut router_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut router_linker).map_err(wasm_err)?;
        RouterWorld::add_to_linker::<_, HasSelf<PluginState>>(&mut router_linker, |s| s).map_err(wasm_err)?;

        spawn_epoch_ticker(engine.weak());
        let tick_ms = EPOCH_TICK.as_millis().max(1) as u64;
        Ok(Arc::new(Self {
            engine,
            adapter_linker,
            router_linker,
            deadline_ticks: (config.call_timeout_ms.max(1)).div_ceil(tick_ms),
            memory_bytes,
        }))
    }

    /// A fresh store for one call of `plugin`, with its deadline armed.
    pub(crate) fn store(&self, plugin: Arc<str>) -> Store<PluginState> {
        let mut store = Store::new(&self.engine, PluginState::new(plugin, self.memory_bytes));
        store.limiter(|s| &mut s.limits);
        self.arm(&mut store);
        store
    }

    /// Re-arm the per-call deadline (before each call on a long-lived store).
    pub(crate) fn arm(&self, store: &mut Store<PluginState>) {
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
    }

    /// The engine's precompiled-code compatibility hash, as a hex string.
    pub(crate) fn compatibility_key(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}

fn spawn_epoch_ticker(engine: wasmtime::EngineWeak) {
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .ok();
}

/// wasmtime's error as an `anyhow::Error` (wasmtime 48 has its own type).
pub(crate) fn wasm_err(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}
