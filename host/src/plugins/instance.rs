//! Plugin instances: creating them, lending them to calls, and keeping the
//! healthy ones for reuse.
//!
//! The reuse policy is explicit (`[plugins] instance_reuse`, see
//! `docs/plugins.md`): an instance serves at most that many calls, only
//! calls of the same channel key (a plugin's memory may still hold the last
//! request it saw), and is dropped after any failed call or when its memory
//! grew large. With `instance_reuse = 1` every call gets a fresh instance.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::Store;
use wasmtime::component::{Instance, InstancePre};

use super::engine::{CallBudget, PluginEngine};
use super::epoch_ticker::Running;
use super::error::{CallFacts, PluginError};
use super::state::{CallInputs, PluginState};

/// Idle instances kept per plugin version, over all channel keys (and the
/// engine caps all plugins together, see `PluginEngine::max_idle`).
const MAX_IDLE: usize = 32;
/// An instance whose memory grew past this is not kept.
const MAX_KEPT_MEMORY: usize = 8 << 20;

/// One instance of a plugin, the bindings the host calls on it, and how
/// many calls it served.
pub(crate) struct Lease<B> {
    pub(crate) store: Store<PluginState>,
    pub(crate) bindings: B,
    uses: u32,
    tag: u64,
    /// Keeps the epoch ticking while the instance is lent out (started)
    /// or instantiated; stopped while it is idle.
    running: Running,
    _alive: Alive,
}

/// The engine's live instances (leased or idle, over all plugins), and a
/// signal for calls waiting for a pool slot.
#[derive(Default)]
pub(crate) struct LiveInstances {
    count: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

impl LiveInstances {
    /// How many instances exist now.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counts an instance among the engine's live ones while it exists. Declared
/// after the store in [`Lease`], so it drops after the store has given its
/// pool slot back, and then wakes one call waiting for a slot.
struct Alive(Arc<LiveInstances>);

impl Alive {
    fn new(live: &Arc<LiveInstances>) -> Self {
        live.count.fetch_add(1, Ordering::Relaxed);
        Self(live.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_one();
    }
}

/// How bindings are loaded from a fresh instance.
pub(crate) type LoadBindings<B> = dyn Fn(&mut Store<PluginState>, &Instance) -> wasmtime::Result<B> + Send + Sync;

/// The instances of one plugin version.
pub(crate) struct Instances<B> {
    engine: Arc<PluginEngine>,
    name: Arc<str>,
    pre: InstancePre<PluginState>,
    load: Box<LoadBindings<B>>,
    idle: Mutex<Vec<Lease<B>>>,
    /// Calls made on this version, and how many failed.
    calls: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    /// The plugin's own version (from `info()`), for the metrics' labels.
    version: std::sync::OnceLock<String>,
    /// Each call's metrics, resolved on first use (see [`CALLS`]).
    metrics: [std::sync::OnceLock<crate::metrics::PluginCallHandles>; CALLS.len()],
}

/// The calls made through `plugin_call!`, in the order of
/// [`Instances::metrics`].
const CALLS: [&str; 12] = [
    "info",
    "build_request",
    "parse_response",
    "classify_error",
    "decode_stream",
    "exchange_request",
    "parse_exchange",
    "health_probe",
    "select",
    "on_request",
    "on_response",
    "on_stream_chunk",
];

impl<B: Send + 'static> Instances<B> {
    /// Instances of `pre`, whose bindings `load` builds.
    pub(crate) fn new(
        engine: Arc<PluginEngine>,
        name: Arc<str>,
        pre: InstancePre<PluginState>,
        load: Box<LoadBindings<B>>,
    ) -> Self {
        Self {
            engine,
            name,
            pre,
            load,
            idle: Mutex::new(Vec::new()),
            calls: Default::default(),
            failed: Default::default(),
            version: Default::default(),
            metrics: Default::default(),
        }
    }

    /// Instances of `pre` as a component of `world`, whose bindings
    /// `load` takes from the world's export indices (`indices`, checked
    /// against the component by the caller's `…Indices::new`).
    pub(crate) fn of_world<I: Send + Sync + 'static>(
        engine: Arc<PluginEngine>,
        name: Arc<str>,
        pre: InstancePre<PluginState>,
        world: &str,
        indices: wasmtime::Result<I>,
        load: fn(&I, &mut Store<PluginState>, &Instance) -> wasmtime::Result<B>,
    ) -> Result<Self, PluginError> {
        let indices = indices.map_err(|e| PluginError::Instantiate {
            plugin: name.to_string(),
            detail: format!("does not match the {world} world: {e:#}"),
        })?;
        let load = Box::new(move |store: &mut Store<PluginState>, instance: &Instance| load(&indices, store, instance));
        Ok(Self::new(engine, name, pre, load))
    }

    /// An instance for a call about channel key `tag`: an idle one that
    /// served that key before, else a fresh one.
    pub(crate) async fn lease(&self, tag: u64) -> Result<Lease<B>, PluginError> {
        {
            let mut idle = self.idle();
            if let Some(i) = idle.iter().rposition(|l| l.tag == tag) {
                self.engine.idle.fetch_sub(1, Ordering::Relaxed);
                let mut lease = idle.swap_remove(i);
                lease.running.start();
                return Ok(lease);
            }
        }
        // Boxed: instantiation is the rare path, and inline its future would
        // make every plugin call's future (and every request's) larger.
        Box::pin(self.fresh_or_wait(tag)).await
    }

    /// A fresh instance; when every pool slot is taken, idle instances give
    /// theirs back, and then the call waits (at most one call timeout) for a
    /// slot to be freed, so that a burst beyond the pool queues briefly
    /// instead of failing.
    async fn fresh_or_wait(&self, tag: u64) -> Result<Lease<B>, PluginError> {
        // Set once the pool was found full; before that, a try registers
        // nothing (a pool with room costs no lock).
        let mut deadline = None;
        loop {
            // Registered before trying, so that a slot freed meanwhile is not missed.
            let mut freed = std::pin::pin!(self.engine.live.freed.notified());
            if deadline.is_some() {
                freed.as_mut().enable();
            }
            let err = match self.fresh(tag).await {
                Err(e @ PluginError::Capacity { .. }) => e,
                other => return other,
            };
            if self.clear() > 0 {
                continue;
            }
            let Some(until) = deadline else {
                deadline = Some(tokio::time::Instant::now() + self.engine.budget(0).wall);
                continue;
            };
            crate::metrics::get().plugin_instance_wait();
            if tokio::time::timeout_at(until, freed).await.is_err() {
                return Err(err);
            }
        }
    }

    /// A new instance, its instantiation bounded like a call.
    pub(crate) async fn fresh(&self, tag: u64) -> Result<Lease<B>, PluginError> {
        // Before instantiation: it runs the guest's start functions.
        let mut running = self.engine.ticker.token();
        running.start();
        let mut store = self.engine.store(self.name.clone());
        let budget = self.engine.budget(0);
        let _ = store.set_fuel(budget.fuel);
        let instance = match tokio::time::timeout(budget.wall, self.pre.instantiate_async(&mut store)).await {
            Err(_) => return Err(self.timeout(budget.wall)),
            Ok(Err(e)) => return Err(PluginError::from_wasm(self.facts(&mut store, budget), e, true)),
            Ok(Ok(instance)) => instance,
        };
        let bindings = (self.load)(&mut store, &instance)
            .map_err(|e| PluginError::Instantiate { plugin: self.name.to_string(), detail: format!("{e:#}") })?;
        Ok(Lease { store, bindings, uses: 0, tag, running, _alive: Alive::new(&self.engine.live) })
    }

    /// Arm `lease` for a call whose inputs are `input_bytes` long, with
    /// what the host's imports answer during it; returns its budget.
    pub(crate) fn prepare(&self, lease: &mut Lease<B>, input_bytes: usize, inputs: CallInputs) -> CallBudget {
        let budget = self.engine.budget(input_bytes);
        let data = lease.store.data_mut();
        data.reset();
        data.credential = inputs.credential;
        data.settings = inputs.settings;
        let _ = lease.store.set_fuel(budget.fuel);
        // The deadline counts from this call: a reused instance whose last
        // deadline has passed would otherwise yield at its first check.
        lease.store.set_epoch_deadline(1);
        lease.uses += 1;
        budget
    }

    fn timeout(&self, wall: Duration) -> PluginError {
        PluginError::Timeout { plugin: self.name.to_string(), ms: wall.as_millis() as u64 }
    }

    fn facts<'a>(&'a self, store: &mut Store<PluginState>, budget: CallBudget) -> CallFacts<'a> {
        let data = store.data();
        CallFacts {
            plugin: &self.name,
            fuel: budget.fuel,
            memory_hit: data.limits.hit,
            memory_mib: self.engine.config.memory_limit_mib,
            stderr: data.stderr.take(),
        }
    }

    /// [`Self::settle`] for the call `what` that began at `started`,
    /// counted in the metrics by outcome.
    pub(crate) fn settle_call<R>(
        &self,
        what: &'static str,
        started: std::time::Instant,
        lease: Lease<B>,
        budget: CallBudget,
        outcome: Result<wasmtime::Result<R>, tokio::time::error::Elapsed>,
    ) -> Result<R, PluginError> {
        let result = self.settle(lease, budget, outcome);
        self.calls.fetch_add(1, Ordering::Relaxed);
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                e.metric_label()
            }
        };
        let metrics = crate::metrics::get();
        // `info` runs before the version is known: its calls are not cached.
        let version = self.version.get().map_or("", String::as_str);
        match CALLS.iter().position(|c| *c == what).filter(|_| !version.is_empty()) {
            Some(slot) => {
                let handles = self.metrics[slot].get_or_init(|| metrics.plugin_handles(&self.name, version, what));
                handles.record(metrics, label, started.elapsed());
            }
            None => metrics.plugin_call(&self.name, version, what, label, started.elapsed()),
        }
        result
    }

    /// Record the plugin's own version, which labels its calls' metrics.
    pub(crate) fn set_version(&self, version: &str) {
        let _ = self.version.set(version.to_string());
    }

    /// The plugin's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Calls made on this version and how many of them failed.
    pub(crate) fn call_counts(&self) -> (u64, u64) {
        (self.calls.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    /// The result of a call made on `lease`: the instance goes back to the
    /// idle set after a success (within the reuse policy) and is dropped
    /// after any failure.
    pub(crate) fn settle<R>(
        &self,
        lease: Lease<B>,
        budget: CallBudget,
        outcome: Result<wasmtime::Result<R>, tokio::time::error::Elapsed>,
    ) -> Result<R, PluginError> {
        match outcome {
            Err(_) => Err(self.failure(lease, budget, None)),
            Ok(Err(e)) => Err(self.failure(lease, budget, Some(e))),
            Ok(Ok(value)) => {
                if let Some(stderr) = lease.store.data().stderr.take() {
                    tracing::info!(target: "wasmgate::plugin", plugin = &*self.name, "stderr: {stderr}");
                }
                self.give_back(lease);
                Ok(value)
            }
        }
    }

    /// The error of a call on `lease` that failed with `error` (`None`: it
    /// ran out of time). The instance is dropped.
    pub(crate) fn failure(
        &self,
        mut lease: Lease<B>,
        budget: CallBudget,
        error: Option<wasmtime::Error>,
    ) -> PluginError {
        match error {
            None => self.timeout(budget.wall),
            Some(e) => PluginError::from_wasm(self.facts(&mut lease.store, budget), e, false),
        }
    }

    /// Keep `lease` for another call if the policy allows.
    pub(crate) fn give_back(&self, mut lease: Lease<B>) {
        if lease.uses >= self.engine.config.instance_reuse || memory_size(&lease.store) > MAX_KEPT_MEMORY {
            return;
        }
        lease.running.stop();
        let mut idle = self.idle();
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        } else if self.engine.idle.fetch_add(1, Ordering::Relaxed) >= self.engine.max_idle() {
            self.engine.idle.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        idle.push(lease);
    }
}

impl<B> Instances<B> {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Lease<B>>> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drop every idle instance (the plugin is leaving service, or the pool
    /// needs the slots); returns how many.
    pub(crate) fn clear(&self) -> usize {
        let mut idle = self.idle();
        let n = idle.len();
        idle.clear();
        self.engine.idle.fetch_sub(n, Ordering::Relaxed);
        n
    }
}

impl<B> Drop for Instances<B> {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Linear memory an instance holds, in bytes (summed over its memories as
/// the limiter saw them grow).
fn memory_size(store: &Store<PluginState>) -> usize {
    store.data().limits.peak
}

/// Make one call (`$what`, its name in the metrics) on a lease of
/// `$instances`: lease an instance for channel
/// key `$tag`, arm it with a budget for `$bytes` of input and `$cred`, run
/// `$call` (an expression using `$store` and `$b`, the bindings) under the
/// wall-clock limit, and settle.
macro_rules! plugin_call {
    ($what:literal, $instances:expr, $tag:expr, $bytes:expr, $cred:expr, |$store:ident, $b:ident| $call:expr) => {{
        let instances = &$instances;
        let started = std::time::Instant::now();
        let mut lease = instances.lease($tag).await?;
        let budget = instances.prepare(&mut lease, $bytes, $cred);
        let span = tracing::debug_span!(target: "wasmgate::plugin", "plugin",
            otel.name = concat!("plugin ", $what), plugin.name = instances.name(), plugin.call = $what);
        let outcome = {
            let $store = &mut lease.store;
            let $b = &lease.bindings;
            tracing::Instrument::instrument(tokio::time::timeout(budget.wall, $call), span.clone()).await
        };
        let result = instances.settle_call($what, started, lease, budget, outcome);
        if let Err(e) = &result {
            crate::telemetry::span_attribute(&span, "error.type", e.metric_label());
        }
        result
    }};
}
pub(crate) use plugin_call;
