//! Prometheus metrics (`GET /metrics`, OpenMetrics text): what operators
//! of a Prometheus/Grafana stack expect from a gateway — requests, latency
//! split into upstream time and the gateway's own overhead, tokens and
//! quota, attempts and failovers, plugin calls, channel health, rate
//! limits, billing lag and the process. Labels stay low-cardinality: no
//! user or token ids; models are the configured ones, capped (see
//! [`MAX_MODELS`]). `docs/observability.md` lists every metric.

mod process;

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use process::{OpenConnection, OpenStream, open_streams};

/// Distinct values kept per label (models, plugins); later ones are
/// counted as `other`.
pub const MAX_MODELS: usize = 200;

/// Label values as `&'static str`, so that a hot-path update allocates
/// nothing: each distinct value is leaked once, at most [`MAX_MODELS`] of
/// them, then `other`.
#[derive(Default)]
struct Interner(RwLock<HashMap<Box<str>, &'static str>>);

impl Interner {
    fn get(&self, value: &str) -> &'static str {
        if let Some(v) = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(value) {
            return v;
        }
        let mut map = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = map.get(value) {
            return v;
        }
        if map.len() >= MAX_MODELS {
            return "other";
        }
        let leaked: &'static str = Box::leak(value.into());
        map.insert(value.into(), leaked);
        leaked
    }
}

/// Buckets for request and upstream durations: 100 µs … ~105 s.
fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// Buckets for the gateway's own time and plugin calls: 5 µs … ~5 s.
fn fine_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_005, 2.0, 21))
}

/// Endpoint, model and outcome of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `chat_completions`, `responses`, `messages`, …
    pub endpoint: &'static str,
    /// The requested model (capped).
    pub model: &'static str,
    /// `2xx`, `4xx` or `5xx`.
    pub status: &'static str,
    /// The error code (`""` for success), a fixed set.
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    channel: u64,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: &'static str,
    version: &'static str,
    call: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginCallLabels {
    plugin: &'static str,
    version: &'static str,
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilterLabels {
    filter: &'static str,
    hook: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelStateLabels {
    channel: u64,
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// `[metrics] enabled`: when off, recording is skipped altogether.
    enabled: std::sync::atomic::AtomicBool,
    models: Interner,
    plugins: Interner,
    versions: Interner,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<EndpointLabels>,
    upstream_duration: HistogramFamily<EndpointLabels>,
    overhead: HistogramFamily<EndpointLabels>,
    ttft: HistogramFamily<EndpointLabels>,
    tokens: Family<TokenLabels, Counter>,
    quota: Family<ModelLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    failovers: Counter,
    plugin_calls: Family<PluginLabels, Counter>,
    plugin_duration: HistogramFamily<PluginCallLabels>,
    rate_limited: Family<KindLabels, Counter>,
    quota_leases: Family<KindLabels, Counter>,
    health_transitions: Family<ChannelStateLabels, Counter>,
    probes: Family<KindLabels, Counter>,
    /// Refreshed at scrape time.
    channel_state: Family<ChannelStateLabels, Gauge>,
    billing_pending: Gauge,
    billing_batch: Histogram,
    plugin_loads: Family<KindLabels, Counter>,
    filter_actions: Family<FilterLabels, Counter>,
    instances_idle: Gauge,
    instances_in_use: Gauge,
    instance_waits: Counter,
    billing_last_commit_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    journal_bytes: Gauge,
    process: process::ProcessMetrics,
}

/// Handles of the per-request metrics, kept per thread: an update is then
/// an atomic add (and a histogram's own lock) without a family lookup — a
/// shared `RwLock` and a hash of the label strings — each time. Keyed by
/// where the `&'static str` label values lie (interned or literals); equal
/// values at two places only take two entries.
#[derive(Default)]
struct Handles {
    requests: HashMap<[Place; 4], Counter>,
    endpoints: HashMap<Place, [Histogram; 4]>,
    models: HashMap<Place, [Counter; 3]>,
    attempts: HashMap<(u64, Place), Counter>,
}

/// A label value's address and length (the length too: the linker may lay
/// one literal at the start of a longer one).
type Place = (usize, usize);

thread_local! {
    static HANDLES: std::cell::RefCell<Handles> = std::cell::RefCell::default();
}

/// Where a label value lies, its key in [`Handles`].
fn at(label: &'static str) -> Place {
    (label.as_ptr() as usize, label.len())
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("wasmgate");
        let requests = Family::default();
        registry.register("requests", "Requests by endpoint, model, status class and error code", requests.clone());
        let h = || HistogramFamily::<EndpointLabels>::new_with_constructor(seconds_buckets as fn() -> Histogram);
        let fine = || HistogramFamily::<EndpointLabels>::new_with_constructor(fine_buckets as fn() -> Histogram);
        let (request_duration, upstream_duration, overhead, ttft) = (h(), h(), fine(), h());
        registry.register(
            "request_duration_seconds",
            "Time from the request to its answer (a stream: to its first event)",
            request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time spent waiting for upstreams, all attempts of a request together",
            upstream_duration.clone(),
        );
        registry.register(
            "overhead_seconds",
            "The gateway's own time in a request: request duration minus upstream time",
            overhead.clone(),
        );
        registry.register("time_to_first_token_seconds", "Time to a stream's first event", ttft.clone());
        let tokens = Family::default();
        registry.register("tokens", "Tokens billed, by model and direction (input, output)", tokens.clone());
        let quota = Family::default();
        registry.register("quota_charged", "Quota charged, by model", quota.clone());
        let attempts = Family::default();
        registry.register(
            "attempts",
            "Upstream attempts by channel and outcome (success or the error kind)",
            attempts.clone(),
        );
        let failovers = Counter::default();
        registry.register("failovers", "Requests served by another attempt after a failed one", failovers.clone());
        let plugin_calls = Family::default();
        registry.register("plugin_calls", "Plugin calls by plugin, call and outcome", plugin_calls.clone());
        let plugin_duration =
            HistogramFamily::<PluginCallLabels>::new_with_constructor(fine_buckets as fn() -> Histogram);
        registry.register("plugin_call_duration_seconds", "Plugin call duration", plugin_duration.clone());
        let rate_limited = Family::default();
        registry.register("rate_limited", "Requests refused by a limit, by kind", rate_limited.clone());
        let quota_leases = Family::default();
        registry.register(
            "quota_leases",
            "Quota leases taken from and given back to the shared database, by kind",
            quota_leases.clone(),
        );
        let health_transitions = Family::default();
        registry.register(
            "channel_transitions",
            "Channel health transitions, by the state entered",
            health_transitions.clone(),
        );
        let probes = Family::default();
        registry.register(
            "recovery_probes",
            "Recovery probes of cooling or disabled channels, by outcome",
            probes.clone(),
        );
        let channel_state = Family::default();
        registry.register("channel_state", "1 for each channel's current health state", channel_state.clone());
        let billing_batch = fine_buckets();
        registry.register(
            "billing_batch_duration_seconds",
            "Time the batch writer takes to commit one batch of usage rows and charges",
            billing_batch.clone(),
        );
        let filter_actions = Family::default();
        registry.register(
            "filter_actions",
            "Filter verdicts by filter, hook (request, response, stream_chunk) and action",
            filter_actions.clone(),
        );
        let plugin_loads = Family::default();
        registry.register(
            "plugin_loads",
            "Plugin files handled by the loader: published (a hot swap) or rejected",
            plugin_loads.clone(),
        );
        let instances_idle = Gauge::default();
        registry.register(
            "plugin_instances_idle",
            "Plugin instances kept idle for reuse, all plugins",
            instances_idle.clone(),
        );
        let instances_in_use = Gauge::default();
        registry.register(
            "plugin_instances_in_use",
            "Plugin instances serving a call now, all plugins (the pool holds `max_instances`)",
            instances_in_use.clone(),
        );
        let instance_waits = Counter::default();
        registry.register(
            "plugin_instance_waits",
            "Plugin calls that found every instance slot taken (`max_instances`) and waited for one",
            instance_waits.clone(),
        );
        let billing_pending = Gauge::default();
        registry.register("billing_rows_pending", "Usage rows waiting for the batch writer", billing_pending.clone());
        let billing_last_commit_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "billing_last_commit_age_seconds",
            "Seconds since the batch writer last committed",
            billing_last_commit_age.clone(),
        );
        let journal_bytes = Gauge::default();
        registry.register("billing_journal_bytes", "Size of the crash journal", journal_bytes.clone());
        let process = process::ProcessMetrics::new();
        process.register_gateway(registry);
        process.register_process(root.sub_registry_with_prefix("process"));
        Self {
            registry: root,
            enabled: std::sync::atomic::AtomicBool::new(true),
            models: Interner::default(),
            plugins: Interner::default(),
            versions: Interner::default(),
            requests,
            request_duration,
            upstream_duration,
            overhead,
            ttft,
            tokens,
            quota,
            attempts,
            failovers,
            plugin_calls,
            plugin_duration,
            rate_limited,
            quota_leases,
            health_transitions,
            probes,
            channel_state,
            billing_pending,
            billing_batch,
            plugin_loads,
            filter_actions,
            instances_idle,
            instances_in_use,
            instance_waits,
            billing_last_commit_age,
            journal_bytes,
            process,
        }
    }

    /// Turn recording on or off (`[metrics] enabled`).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn on(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A request that ended: its labels, total time and upstream time.
    pub fn request(
        &self,
        endpoint: &'static str,
        model: &str,
        status: u16,
        code: &'static str,
        total: Duration,
        upstream: Duration,
    ) {
        if !self.on() {
            return;
        }
        let status_class = match status {
            200..=299 => "2xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let model = self.models.get(model);
        HANDLES.with_borrow_mut(|h| {
            let key = [at(endpoint), at(model), at(status_class), at(code)];
            let labels = || RequestLabels { endpoint, model, status: status_class, code };
            h.requests.entry(key).or_insert_with(|| self.requests.get_or_create(&labels()).clone()).inc();
            let [duration, upstream_duration, overhead, _] =
                h.endpoints.entry(at(endpoint)).or_insert_with(|| self.endpoint_handles(endpoint));
            duration.observe(total.as_secs_f64());
            if !upstream.is_zero() {
                upstream_duration.observe(upstream.as_secs_f64());
                overhead.observe(total.saturating_sub(upstream).as_secs_f64());
            }
        });
    }

    /// A stream's first event came after `ttft`.
    pub fn first_token(&self, endpoint: &'static str, ttft: Duration) {
        if !self.on() {
            return;
        }
        HANDLES.with_borrow_mut(|h| {
            let [.., first_token] = h.endpoints.entry(at(endpoint)).or_insert_with(|| self.endpoint_handles(endpoint));
            first_token.observe(ttft.as_secs_f64());
        });
    }

    /// A settled request: its tokens and charge.
    pub fn billed(&self, model: &str, input: u64, output: u64, quota: i64) {
        if !self.on() {
            return;
        }
        let model = self.models.get(model);
        HANDLES.with_borrow_mut(|h| {
            let [tokens_in, tokens_out, charged] = h.models.entry(at(model)).or_insert_with(|| {
                // One at a time: a family's guard holds its lock until dropped.
                let tokens_in = self.tokens.get_or_create(&TokenLabels { model, direction: "input" }).clone();
                let tokens_out = self.tokens.get_or_create(&TokenLabels { model, direction: "output" }).clone();
                let charged = self.quota.get_or_create(&ModelLabels { model }).clone();
                [tokens_in, tokens_out, charged]
            });
            tokens_in.inc_by(input);
            tokens_out.inc_by(output);
            charged.inc_by(u64::try_from(quota).unwrap_or(0));
        });
    }

    /// An attempt on `channel` ended with `outcome` (`success` or an error kind).
    pub fn attempt(&self, channel: u64, outcome: &'static str) {
        if !self.on() {
            return;
        }
        HANDLES.with_borrow_mut(|h| {
            let counter = h.attempts.entry((channel, at(outcome)));
            counter.or_insert_with(|| self.attempts.get_or_create(&AttemptLabels { channel, outcome }).clone()).inc();
        });
    }

    /// An endpoint's duration, upstream, overhead and first-token histograms.
    fn endpoint_handles(&self, endpoint: &'static str) -> [Histogram; 4] {
        let e = EndpointLabels { endpoint };
        let duration = self.request_duration.get_or_create(&e).clone();
        let upstream = self.upstream_duration.get_or_create(&e).clone();
        let overhead = self.overhead.get_or_create(&e).clone();
        let first_token = self.ttft.get_or_create(&e).clone();
        [duration, upstream, overhead, first_token]
    }

    /// A plugin call found every instance slot taken and waits for one.
    pub fn plugin_instance_wait(&self) {
        if self.on() {
            self.instance_waits.inc();
        }
    }

    /// A request was served after at least one failed attempt.
    pub fn failover(&self) {
        if !self.on() {
            return;
        }
        self.failovers.inc();
    }

    /// A call of `version` of `plugin` ended with `outcome` after `elapsed`.
    pub fn plugin_call(
        &self,
        plugin: &str,
        version: &str,
        call: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        if !self.on() {
            return;
        }
        self.plugin_handles(plugin, version, call).record(self, outcome, elapsed);
    }

    /// The metrics of `call` on `version` of `plugin`, resolved once so
    /// that a caller that keeps them records a successful call with an
    /// atomic add and one histogram observation, no label lookup.
    pub fn plugin_handles(&self, plugin: &str, version: &str, call: &'static str) -> PluginCallHandles {
        let plugin = self.plugins.get(plugin);
        let version = self.versions.get(version);
        PluginCallHandles {
            plugin,
            version,
            call,
            ok: self.plugin_calls.get_or_create(&PluginLabels { plugin, version, call, outcome: "ok" }).clone(),
            duration: self.plugin_duration.get_or_create(&PluginCallLabels { plugin, version, call }).clone(),
        }
    }

    /// A request refused by a limit of `kind` (`rpm`, `tpm`, `concurrency`, …).
    pub fn rate_limited(&self, kind: &'static str) {
        if !self.on() {
            return;
        }
        self.rate_limited.get_or_create(&KindLabels { kind }).inc();
    }

    /// A quota lease was `acquired` or `returned` (several nodes on one
    /// database).
    pub fn quota_lease(&self, kind: &'static str) {
        if !self.on() {
            return;
        }
        self.quota_leases.get_or_create(&KindLabels { kind }).inc();
    }

    /// Channel `channel` entered `state`.
    pub fn transition(&self, channel: u64, state: &'static str) {
        if !self.on() {
            return;
        }
        self.health_transitions.get_or_create(&ChannelStateLabels { channel, state }).inc();
    }

    /// The batch writer committed a batch in `elapsed`.
    pub fn billing_batch(&self, elapsed: Duration) {
        if !self.on() {
            return;
        }
        self.billing_batch.observe(elapsed.as_secs_f64());
    }

    /// A plugin file was `published` (hot-swapped in) or `rejected`.
    pub fn plugin_load(&self, outcome: &'static str) {
        if !self.on() {
            return;
        }
        self.plugin_loads.get_or_create(&KindLabels { kind: outcome }).inc();
    }

    /// Filter `filter` answered `action` (`pass`, `edit`, `refuse`,
    /// `rewrite`, `drop`, `stop`, `skipped`, `failed`) on `hook`.
    pub fn filter_action(&self, filter: &str, hook: &'static str, action: &'static str) {
        if !self.on() {
            return;
        }
        let filter = self.plugins.get(filter);
        self.filter_actions.get_or_create(&FilterLabels { filter, hook, action }).inc();
    }

    /// A recovery probe ended with `outcome`.
    pub fn probe(&self, outcome: &'static str) {
        if !self.on() {
            return;
        }
        self.probes.get_or_create(&KindLabels { kind: outcome }).inc();
    }

    /// The OpenMetrics text, after refreshing the gauges read at scrape
    /// time: every channel's `state`, billing's writer, the process.
    pub fn render(
        &self,
        channels: &[(u64, &'static str)],
        billing: BillingGauges,
        instances: InstanceGauges,
    ) -> String {
        self.instances_idle.set(i64::try_from(instances.idle).unwrap_or(i64::MAX));
        self.instances_in_use.set(i64::try_from(instances.in_use).unwrap_or(i64::MAX));
        self.channel_state.clear();
        for (id, state) in channels {
            self.channel_state.get_or_create(&ChannelStateLabels { channel: *id, state }).set(1);
        }
        self.billing_pending.set(i64::try_from(billing.pending).unwrap_or(i64::MAX));
        self.billing_last_commit_age.set(billing.last_commit_age.as_secs_f64());
        self.journal_bytes.set(i64::try_from(billing.journal_bytes).unwrap_or(i64::MAX));
        self.process.refresh();
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }
}

/// Plugin instances, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstanceGauges {
    /// Kept idle for reuse.
    pub idle: usize,
    /// Serving a call now.
    pub in_use: usize,
}

/// One plugin call's metrics, resolved (see [`Metrics::plugin_handles`]).
#[derive(Clone)]
pub struct PluginCallHandles {
    plugin: &'static str,
    version: &'static str,
    call: &'static str,
    ok: Counter,
    duration: Histogram,
}

impl PluginCallHandles {
    /// Record a call that ended with `outcome` after `elapsed`.
    pub fn record(&self, metrics: &Metrics, outcome: &'static str, elapsed: Duration) {
        if !metrics.on() {
            return;
        }
        if outcome == "ok" {
            self.ok.inc();
        } else {
            let labels = PluginLabels { plugin: self.plugin, version: self.version, call: self.call, outcome };
            metrics.plugin_calls.get_or_create(&labels).inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// Billing's writer, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct BillingGauges {
    /// Rows queued for the writer.
    pub pending: u64,
    /// Since the last commit.
    pub last_commit_age: Duration,
    /// The journal's size.
    pub journal_bytes: u64,
}
