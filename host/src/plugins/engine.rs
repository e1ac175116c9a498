//! The shared wasmtime engine: pooling allocator, fuel metering, the epoch
//! ticker, and the linkers for each plugin world.
//!
//! Every plugin call is bounded three ways (see `docs/security.md`):
//! - **fuel**, scaled to the call's input size: the limit a plugin can be
//!   blamed for, independent of how busy the machine is;
//! - **memory**, per instance;
//! - a generous **wall-clock** limit, as a safety net for what fuel cannot
//!   see (a call blocked in a WASI import). Guest code yields to the tokio
//!   scheduler at every epoch tick, so a long call never holds a worker.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline};

use super::bindings::{
    AdapterWorld, FilterWorld, RouterWorld, add_channel_context_to_linker, add_clock_to_linker,
    add_credentials_to_linker,
};
use super::epoch_ticker::EpochTicker;
use super::state::PluginState;
use crate::config::PluginConfig;

/// Bytes of each pooled linear memory reset in place (not decommitted)
/// between uses; covers the stack, data and the heap a call typically
/// touches.
const KEEP_RESIDENT: usize = 1024 * 1024;

/// Stack of one async call (wasm frames and host frames on its fiber).
const ASYNC_STACK: usize = 1024 * 1024;
/// Part of it wasm may use.
const WASM_STACK: usize = 512 * 1024;

/// What one call may spend.
#[derive(Debug, Clone, Copy)]
pub struct CallBudget {
    /// Fuel (roughly, wasm instructions executed).
    pub fuel: u64,
    /// Wall-clock safety net.
    pub wall: Duration,
}

/// Engine, linkers and limits shared by all plugins.
pub struct PluginEngine {
    pub(crate) engine: Engine,
    pub(crate) adapter_linker: Linker<PluginState>,
    pub(crate) router_linker: Linker<PluginState>,
    pub(crate) filter_linker: Linker<PluginState>,
    pub(crate) config: PluginConfig,
    memory_bytes: usize,
    /// Instances kept idle for reuse, over all plugins.
    pub(crate) idle: std::sync::atomic::AtomicUsize,
    /// Instances alive (leased or idle), over all plugins.
    pub(crate) live: Arc<super::instance::LiveInstances>,
    /// Advances the epoch while instances are in use.
    pub(crate) ticker: EpochTicker,
}

/// The wasmtime configuration every gateway and compiler process shares
/// (compiled artifacts must match it), without the instance allocator.
pub(crate) fn wasm_config() -> Config {
    let mut wasm = Config::new();
    wasm.epoch_interruption(true)
        .consume_fuel(true)
        // Explicit bounds checks instead of guard pages: a fresh instance
        // would otherwise mprotect its grown heap back to PROT_NONE on every
        // instantiation (a TLB-shootdown IPI per call).
        .signals_based_traps(false)
        .memory_guard_size(0)
        .async_stack_size(ASYNC_STACK)
        .max_wasm_stack(WASM_STACK)
        .wasm_component_model(true);
    wasm
}

impl PluginEngine {
    /// Build the engine and start its epoch ticker thread (which stops when
    /// the engine is dropped, and sleeps while no instance is in use).
    pub fn new(config: &PluginConfig) -> Result<Arc<Self>> {
        let memory_bytes = config.memory_limit_mib as usize * 1024 * 1024;
        let instances = config.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances * 4)
            .total_memories(instances * 2)
            .total_tables(instances * 8)
            .total_stacks(instances)
            .max_memory_size(memory_bytes)
            .max_core_instances_per_component(16)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20)
            // Find the dirty pages of a released slot with PAGEMAP_SCAN
            // (Linux ≥ 6.7, ignored elsewhere) and reset them in place rather
            // than with madvise (a TLB shootdown and page faults on reuse).
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 * 1024);
        let mut wasm = wasm_config();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(wasm_err)?;

        let mut adapter_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut adapter_linker).map_err(wasm_err)?;
        AdapterWorld::add_to_linker::<_, HasSelf<PluginState>>(&mut adapter_linker, |s| s).map_err(wasm_err)?;
        add_credentials_to_linker::<_, HasSelf<PluginState>>(&mut adapter_linker, |s| s).map_err(wasm_err)?;
        add_clock_to_linker::<_, HasSelf<PluginState>>(&mut adapter_linker, |s| s).map_err(wasm_err)?;
        add_channel_context_to_linker::<_, HasSelf<PluginState>>(&mut adapter_linker, |s| s).map_err(wasm_err)?;
        let mut router_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut router_linker).map_err(wasm_err)?;
        RouterWorld::add_to_linker::<_, HasSelf<PluginState>>(&mut router_linker, |s| s).map_err(wasm_err)?;

        let mut filter_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut filter_linker).map_err(wasm_err)?;
        FilterWorld::add_to_linker::<_, HasSelf<PluginState>>(&mut filter_linker, |s| s).map_err(wasm_err)?;

        let ticker = EpochTicker::start(engine.weak());
        Ok(Arc::new(Self {
            engine,
            adapter_linker,
            router_linker,
            filter_linker,
            config: config.clone(),
            memory_bytes,
            idle: std::sync::atomic::AtomicUsize::new(0),
            live: Arc::default(),
            ticker,
        }))
    }

    /// A store for calls of `plugin`: its memory capped, its guest code
    /// yielding to the scheduler at every epoch tick.
    pub(crate) fn store(&self, plugin: Arc<str>) -> Store<PluginState> {
        let mut store = Store::new(&self.engine, PluginState::new(plugin, self.memory_bytes));
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))));
        store.set_epoch_deadline(1);
        store
    }

    /// Most instances kept idle over all plugins: a quarter of the pool, so
    /// that reuse never starves calls of slots.
    pub(crate) fn max_idle(&self) -> usize {
        (self.config.max_instances as usize / 4).clamp(1, 256)
    }

    /// The budget of a call whose inputs are `input_bytes` long.
    pub fn budget(&self, input_bytes: usize) -> CallBudget {
        let c = &self.config;
        CallBudget {
            fuel: c.fuel_per_call.saturating_add(c.fuel_per_input_byte.saturating_mul(input_bytes as u64)),
            wall: Duration::from_millis(c.call_timeout_ms),
        }
    }

    /// The engine's precompiled-code compatibility hash, as a hex string.
    pub(crate) fn compatibility_key(&self) -> String {
        compatibility_key(&self.engine)
    }
}

/// `engine`'s precompiled-code compatibility hash, as a hex string.
pub(crate) fn compatibility_key(engine: &Engine) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// wasmtime's error as an `anyhow::Error` (wasmtime 48 has its own type).
pub(crate) fn wasm_err(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}
