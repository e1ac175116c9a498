//! Configuration: defaults, then an optional TOML file, then `WASMGATE_*`
//! environment variables (`__` separates nesting: `WASMGATE_PLUGINS__CALL_TIMEOUT_MS`).
//! The raw form rejects unknown keys, so a typo is an error, not a silent default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything the gateway needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the embedded sled store (and the plugin cache).
    pub data_dir: PathBuf,
    /// Directory of `*.wasm` plugins.
    pub plugins_dir: PathBuf,
    /// Gateway tokens accepted on `/v1/*` (`sk-...`), each a plain string
    /// (group `default`) or `{ key, group }`. When empty, one is generated on
    /// first start, kept in the store and logged.
    pub tokens: Vec<TokenConfig>,
    /// Token for `/api/*`. When unset, one is generated like `tokens`.
    pub admin_token: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Plugin runtime limits.
    pub plugins: PluginConfig,
    /// Upstream HTTP behaviour.
    pub upstream: UpstreamConfig,
    /// Routing.
    pub routing: RoutingConfig,
    /// Traffic filters, each applied to the requests it matches, in order
    /// (`PUT /api/filters` overrides them; see docs/filters.md).
    pub filters: Vec<crate::filters::FilterRule>,
    /// Channel health: automatic disabling, cool-downs, recovery probes.
    pub health: HealthConfig,
    /// Prices (one-api's ratios; `PUT /api/pricing` overrides them).
    pub pricing: crate::billing::pricing::PricingConfig,
    /// Usage logs: batching and retention.
    pub logs: LogConfig,
    /// Per-token and per-user limits that apply when a token sets none.
    pub limits: LimitsConfig,
    /// The HTTP server: timeouts and connection limits.
    pub server: ServerConfig,
    /// Storage safety: free space kept, how often it is checked.
    pub storage: StorageConfig,
    /// Stored responses of the Responses API.
    pub responses: ResponsesConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
    /// The web console at `/` and its sign-in sessions.
    pub console: ConsoleConfig,
    /// PostgreSQL shared by several gateway nodes (`postgres://user@host/db`,
    /// or `WASMGATE_DATABASE_URL`). When set, channels (and their health)
    /// live there and every node follows changes within a round trip; the
    /// rest stays in each node's data directory for now (see
    /// docs/deployment.md). Requires `secrets_key`, the same on every node.
    pub database_url: Option<String>,
    /// Key encrypting upstream keys at rest (`WASMGATE_SECRETS_KEY`); when
    /// unset, a key is generated into `<data_dir>/secret.key`.
    pub secrets_key: Option<String>,
    /// Channels declared in the file, imported into the store on start
    /// (edits made through the admin API are kept; see docs/channels.md).
    pub channels: Vec<ChannelConfig>,
}

/// A gateway token declared in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenConfig {
    /// Just the key; the caller is in group `default`.
    Key(String),
    /// A key and the group its caller belongs to.
    WithGroup {
        /// The `sk-...` key.
        key: String,
        /// Group whose channels serve this caller.
        group: String,
    },
}

impl TokenConfig {
    /// The key.
    pub fn key(&self) -> &str {
        match self {
            Self::Key(k) | Self::WithGroup { key: k, .. } => k,
        }
    }

    /// The caller's group.
    pub fn group(&self) -> &str {
        match self {
            Self::Key(_) => DEFAULT_GROUP,
            Self::WithGroup { group, .. } => group,
        }
    }
}

/// The group of callers and channels that name none.
pub const DEFAULT_GROUP: &str = "default";

/// Limits of the plugin runtime (see `docs/security.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Fuel (about one unit per wasm instruction) every call may spend.
    pub fuel_per_call: u64,
    /// Extra fuel per byte of the call's input (request or response body,
    /// stream bytes), so that big inputs get the work they need.
    pub fuel_per_input_byte: u64,
    /// Wall-clock safety net of one call, in milliseconds. Guest code is
    /// bounded by fuel; this catches a call blocked in an import.
    pub call_timeout_ms: u64,
    /// Linear-memory cap of one plugin instance, in MiB.
    pub memory_limit_mib: u32,
    /// Plugin instances that may exist at once (pooling allocator slots):
    /// calls in progress and idle instances kept for reuse. Open streams
    /// hold none (with adapters built against WIT 0.1.3 or later). A call
    /// that finds every slot taken waits up to `call_timeout_ms` for one.
    pub max_instances: u32,
    /// Calls one instance may serve before it is dropped (1: a fresh
    /// instance per call). Reuse never crosses channel keys, and an instance
    /// is dropped after any failed call.
    pub instance_reuse: u32,
    /// Streams of adapters older than WIT 0.1.3 (whose decoder pins an
    /// instance) that may be open at once, per adapter.
    pub max_pinned_streams: u32,
    /// Largest plugin file accepted, in bytes.
    pub max_plugin_bytes: usize,
    /// Most functions a plugin may define (all its core modules together);
    /// refused before compilation.
    pub max_plugin_functions: u64,
    /// Limit of one plugin compilation, in seconds.
    pub compile_timeout_secs: u64,
    /// Address space of the compiler process, in MiB.
    pub compile_memory_mib: u64,
    /// Compile plugins in a child process (bounded in time and memory).
    pub isolate_compile: bool,
    /// Watch the plugins directory and hot-swap changed files.
    pub watch: bool,
    /// Quiet time before a changed file is reloaded, in milliseconds.
    pub debounce_ms: u64,
    /// Keep compiled plugins between runs.
    pub cache: bool,
    /// Where compiled plugins are kept (default `<data_dir>/plugin-cache`).
    pub cache_dir: Option<PathBuf>,
}

/// Upstream HTTP settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// TCP connect timeout, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Timeout until the response headers arrive, in seconds.
    pub response_timeout_secs: u64,
    /// Longest silence from the upstream, in seconds: waiting for the
    /// headers (also bounded by `response_timeout_secs`), inside a body or a
    /// stream. Enforced by the upstream client's read timeout.
    pub idle_timeout_secs: u64,
    /// Most bytes one upstream stream may send; the gateway ends a longer
    /// stream with an error event (billed for what was delivered).
    pub max_stream_bytes: u64,
    /// Longest one stream may last, in seconds; ended likewise.
    pub max_stream_secs: u64,
    /// Limit of a credential exchange (Baidu's token...), in seconds.
    pub exchange_timeout_secs: u64,
    /// Largest non-streamed upstream body read, in bytes.
    pub max_response_bytes: usize,
    /// Requests in flight on one upstream client (per worker thread)
    /// before another is opened. An HTTP/2 upstream multiplexes them on one
    /// connection, so keep this at or under the servers' stream limit
    /// (OpenAI-style CDNs announce 100).
    pub requests_per_connection: usize,
    /// Attempts per request, first included. Attempts go down the policy's
    /// order; when every candidate has been tried, the order starts again.
    pub max_attempts: u32,
    /// Limit of one attempt, in seconds: until the whole non-streamed
    /// response, or until the first streamed event.
    pub attempt_timeout_secs: u64,
    /// Limit of all attempts of a request together, backoff included.
    pub total_timeout_secs: u64,
    /// Backoff before retrying a channel already tried: full jitter over
    /// `base * 2^n`, capped at `backoff_max_ms`. Moving to an untried
    /// channel does not wait.
    pub backoff_base_ms: u64,
    /// Cap of one backoff.
    pub backoff_max_ms: u64,
    /// Longest upstream `Retry-After` the gateway waits out itself before
    /// a retry; longer ones end the request with 429 and that `Retry-After`.
    pub max_retry_after_secs: u64,
    /// PEM file of certificate authorities trusted for upstream TLS in
    /// addition to the built-in (webpki) roots: an internal CA in front of
    /// self-hosted models, or a TLS-inspecting egress proxy. The file the
    /// environment's `SSL_CERT_FILE` names is trusted as well.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Default limits of tokens that set none of their own, also for the
/// configuration file's tokens (0: no limit).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests one token may have in flight.
    pub token_concurrency: u32,
    /// Streams one token may have open.
    pub token_streams: u32,
    /// Requests one user may have in flight over all their tokens.
    pub user_concurrency: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { token_concurrency: 1024, token_streams: 512, user_concurrency: 2048 }
    }
}

/// The HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Time a client has to send a request's headers, in seconds (also the
    /// longest an idle keep-alive connection is kept).
    pub header_timeout_secs: u64,
    /// Time a client has to send a request's body, in seconds.
    pub body_timeout_secs: u64,
    /// Connections served at once; above it the longest-idle connections
    /// are closed to make room, and a warning is logged. Also capped by the
    /// process's file limit.
    pub max_connections: usize,
    /// Longest request URI accepted, in bytes (414 above).
    pub max_uri_bytes: usize,
    /// Largest total size of a request's headers, in bytes (431 above).
    pub max_header_bytes: usize,
    /// Threads serving requests, each with its own single-threaded runtime
    /// and accept loop (default: one per CPU).
    pub workers: usize,
    /// Also serve HTTP/2 without TLS (h2c, prior knowledge) on the same
    /// port, told apart from HTTP/1.1 by its connection preface: for a TLS
    /// terminator or client that multiplexes many requests over a few
    /// connections. Off by default.
    pub http2: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_timeout_secs: 30,
            body_timeout_secs: 60,
            max_connections: 50_000,
            max_uri_bytes: 16 * 1024,
            max_header_bytes: 64 * 1024,
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            http2: false,
            http2_max_streams: 256,
        }
    }
}

/// Storage safety.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Free space kept on the data directory's filesystem, in MiB: below
    /// it, billed requests and admin writes are refused (503) until space
    /// returns.
    pub min_free_mb: u64,
    /// How often the free space is checked, in milliseconds.
    pub check_interval_ms: u64,
    /// Memory sled may use to cache the store's pages, in MiB (usage logs
    /// grow with traffic; the hot data is in memory anyway).
    pub cache_mb: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { min_free_mb: 64, check_interval_ms: 500, cache_mb: 8 }
    }
}

/// Stored responses (`POST /v1/responses` with `store`, the default).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponsesConfig {
    /// How long a stored response can be read or continued
    /// (`previous_response_id`), in seconds (OpenAI keeps them 30 days).
    pub retention_secs: u64,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self { retention_secs: 30 * 24 * 3600 }
    }
}

/// The web console (served at `/`) and its sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console (off: `/` answers 404; the API is unaffected).
    pub enabled: bool,
    /// How long a sign-in lasts, in seconds.
    pub session_secs: u64,
    /// Always mark the session cookie `Secure`. Without it the cookie is
    /// `Secure` when the request came over TLS (`X-Forwarded-Proto: https`
    /// from the proxy that terminates it).
    pub secure_cookie: bool,
    /// Failed sign-ins allowed per client address in 5 minutes.
    pub max_failed_sign_ins: u32,
    /// Most tokens a user can own through the self-service view.
    pub max_tokens_per_user: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            session_secs: 12 * 3600,
            secure_cookie: false,
            max_failed_sign_ins: 10,
            max_tokens_per_user: 20,
        }
    }
}

/// `GET /metrics` (Prometheus).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Record metrics and serve `/metrics` on the main listener (off: no
    /// recording cost at all, `/metrics` answers 404).
    pub enabled: bool,
    /// Bearer token scrapers must present (`WASMGATE_METRICS__TOKEN`);
    /// unset: open, like most exporters — it shows counts, model and
    /// channel ids, never users, tokens, keys or prompts.
    pub token: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, token: None }
    }
}

/// OpenTelemetry traces, exported over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (`/v1/traces` is added), e.g.
    /// `http://127.0.0.1:4318`. Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT` if set, else no traces.
    pub otlp_endpoint: Option<String>,
    /// `service.name` (`OTEL_SERVICE_NAME` wins).
    pub service_name: String,
    /// Longest a finished span waits before its batch is sent, in ms.
    pub export_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { otlp_endpoint: None, service_name: "wasmgate".into(), export_interval_ms: 5000 }
    }
}

/// Usage log settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Delete rows older than this many seconds (0: keep forever).
    pub retention_secs: u64,
    /// How often the retention sweep runs, in seconds.
    pub retention_interval_secs: u64,
    /// Most rows (and balance changes) per write transaction.
    pub batch_max: usize,
    /// Longest a row waits in memory before its batch is written, in ms.
    pub flush_interval_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { retention_secs: 0, retention_interval_secs: 3600, batch_max: 512, flush_interval_ms: 50 }
    }
}

/// Channel health settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Transient failures inside the window that cool a channel down.
    pub transient_threshold: u32,
    /// The sliding window for transient failures, in seconds.
    pub transient_window_secs: u64,
    /// How long a channel rests after that many transient failures.
    pub transient_cooldown_secs: u64,
    /// How long a rate-limited channel rests when the upstream sent no
    /// `Retry-After`.
    pub rate_limit_cooldown_secs: u64,
    /// How often the recovery tester probes auto-disabled channels, in ms.
    pub probe_interval_ms: u64,
    /// Limit of one probe, in seconds.
    pub probe_timeout_secs: u64,
    /// Probes in flight at once.
    pub probe_concurrency: usize,
    /// Failed probes after which an auto-disabled channel (or key) needs an
    /// admin and is no longer probed.
    pub max_recovery_attempts: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            transient_threshold: 5,
            transient_window_secs: 60,
            transient_cooldown_secs: 30,
            rate_limit_cooldown_secs: 10,
            probe_interval_ms: 60_000,
            probe_timeout_secs: 10,
            probe_concurrency: 4,
            max_recovery_attempts: 10,
        }
    }
}

/// Routing settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Name of the routing-policy plugin used when no rule matches.
    pub policy: String,
    /// Per group and/or model policies; the most specific match wins
    /// (group and model, then model, then group).
    pub rules: Vec<RoutingRule>,
}

/// A routing policy for some group and/or model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    /// Caller group this rule applies to (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Requested model this rule applies to (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Routing-policy plugin name.
    pub policy: String,
}

/// A channel: one upstream account.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Display name.
    pub name: String,
    /// Adapter plugin name (file stem in the plugins directory).
    pub adapter: String,
    /// Upstream base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Upstream credential; several may be given one per line.
    #[serde(default)]
    pub key: String,
    /// More credentials: a multi-key channel rotates through them.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Groups this channel serves (default: `["default"]`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Free-form labels for search.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Models offered; empty means the adapter's default models.
    #[serde(default)]
    pub models: Vec<String>,
    /// Requested model → upstream model name.
    #[serde(default)]
    pub model_mapping: BTreeMap<String, String>,
    /// Higher priority tiers are tried first.
    #[serde(default)]
    pub priority: i64,
    /// Relative weight inside a tier.
    #[serde(default = "one")]
    pub weight: u32,
    /// Adapter-specific settings (a table, passed as JSON).
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

fn one() -> u32 {
    1
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            data_dir: PathBuf::from("./data"),
            plugins_dir: PathBuf::from("./plugins"),
            tokens: Vec::new(),
            admin_token: None,
            max_body_bytes: 8 * 1024 * 1024,
            plugins: PluginConfig::default(),
            upstream: UpstreamConfig::default(),
            routing: RoutingConfig::default(),
            filters: Vec::new(),
            health: HealthConfig::default(),
            pricing: crate::billing::pricing::PricingConfig::default(),
            logs: LogConfig::default(),
            limits: LimitsConfig::default(),
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
            responses: ResponsesConfig::default(),
            metrics: MetricsConfig::default(),
            telemetry: TelemetryConfig::default(),
            console: ConsoleConfig::default(),
            database_url: None,
            secrets_key: None,
            channels: Vec::new(),
        }
    }
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            fuel_per_call: 200_000_000,
            fuel_per_input_byte: 2_000,
            call_timeout_ms: 10_000,
            memory_limit_mib: 64,
            max_instances: 1000,
            instance_reuse: 256,
            max_pinned_streams: 256,
            max_plugin_bytes: 32 << 20,
            max_plugin_functions: 50_000,
            compile_timeout_secs: 60,
            compile_memory_mib: 2048,
            isolate_compile: true,
            watch: true,
            debounce_ms: 200,
            cache: true,
            cache_dir: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 10_000,
            response_timeout_secs: 300,
            idle_timeout_secs: 300,
            max_stream_bytes: 256 << 20,
            max_stream_secs: 3600,
            exchange_timeout_secs: 15,
            max_response_bytes: 64 * 1024 * 1024,
            requests_per_connection: 100,
            max_attempts: 3,
            attempt_timeout_secs: 300,
            total_timeout_secs: 600,
            backoff_base_ms: 100,
            backoff_max_ms: 2_000,
            max_retry_after_secs: 10,
            ca_file: None,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self { policy: "weighted".into(), rules: Vec::new() }
    }
}

/// Top-level keys, so unrelated `WASMGATE_*` variables are not mistaken
/// for configuration.
const KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "plugins_dir",
    "tokens",
    "admin_token",
    "max_body_bytes",
    "plugins",
    "upstream",
    "routing",
    "filters",
    "health",
    "pricing",
    "logs",
    "limits",
    "server",
    "storage",
    "responses",
    "metrics",
    "telemetry",
    "console",
    "database_url",
    "secrets_key",
    "channels",
];

impl Config {
    /// Defaults ← `file` (if given) ← environment.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        // figment hands the filter the key as written (`LISTEN`) and
        // lower-cases it afterwards: compare case-insensitively.
        let env = Env::prefixed("WASMGATE_").split("__").filter(|key| {
            let top = key.as_str().split('.').next().unwrap_or_default().to_ascii_lowercase();
            KEYS.contains(&top.as_str()) && top != "tokens"
        });
        let mut config: Config = figment.merge(env).extract().context("invalid configuration")?;
        // `WASMGATE_TOKENS`: keys separated by commas (or a TOML array).
        if let Ok(raw) = std::env::var("WASMGATE_TOKENS") {
            config.tokens = parse_env_tokens(&raw)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks serde cannot express.
    pub fn validate(&self) -> Result<()> {
        let mut names = std::collections::BTreeSet::new();
        for (i, ch) in self.channels.iter().enumerate() {
            if !names.insert(ch.name.as_str()) {
                bail!("channels[{i}].name: `{}` is declared twice (names identify imported channels)", ch.name);
            }
            let url = reqwest::Url::parse(&ch.base_url)
                .with_context(|| format!("channels[{i}].base_url: not a valid URL"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                bail!("channels[{i}].base_url: must be an http(s) URL with a host");
            }
            if ch.adapter.is_empty() {
                bail!("channels[{i}].adapter: must name an adapter plugin");
            }
        }
        let p = &self.plugins;
        if p.call_timeout_ms == 0 || p.memory_limit_mib == 0 || p.max_instances == 0 || p.fuel_per_call == 0 {
            bail!("plugins: call_timeout_ms, memory_limit_mib, max_instances and fuel_per_call must be positive");
        }
        if p.instance_reuse == 0 || p.compile_timeout_secs == 0 || p.compile_memory_mib < 256 {
            bail!("plugins: instance_reuse and compile_timeout_secs must be positive, compile_memory_mib at least 256");
        }
        if self.upstream.max_attempts == 0 {
            bail!("upstream.max_attempts must be at least 1");
        }
        if let Err((field, message)) = crate::filters::validate(&self.filters) {
            bail!("{field}: {message}");
        }
        if let Err((field, message)) = self.pricing.validate() {
            bail!("pricing.{field}: {message}");
        }
        if self.health.transient_threshold == 0 || self.health.max_recovery_attempts == 0 {
            bail!("health.transient_threshold and health.max_recovery_attempts must be at least 1");
        }
        if self.upstream.attempt_timeout_secs == 0 || self.upstream.total_timeout_secs == 0 {
            bail!("upstream.attempt_timeout_secs and upstream.total_timeout_secs must be positive");
        }
        let srv = &self.server;
        if srv.header_timeout_secs == 0 || srv.body_timeout_secs == 0 || srv.max_connections == 0 {
            bail!("server.header_timeout_secs, server.body_timeout_secs and server.max_connections must be positive");
        }
        if let Some(url) = &self.database_url {
            if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
                bail!("database_url: a PostgreSQL URL (postgres://user:password@host:port/database)");
            }
            if self.secrets_key.is_none() {
                bail!(
                    "database_url needs secrets_key (WASMGATE_SECRETS_KEY), the same on every node: \
                     upstream keys are stored encrypted with it"
                );
            }
        }
        if self.tokens.iter().any(|t| t.key().trim().is_empty()) {
            bail!("tokens: a gateway token must not be empty");
        }
        Ok(())
    }
}

/// `WASMGATE_TOKENS`: `sk-a,sk-b` or a TOML array (`["sk-a", {key = "sk-b", group = "vip"}]`).
fn parse_env_tokens(raw: &str) -> Result<Vec<TokenConfig>> {
    let raw = raw.trim();
    if raw.starts_with('[') {
        #[derive(Deserialize)]
        struct Tokens {
            tokens: Vec<TokenConfig>,
        }
        let parsed: Tokens = toml_tokens(raw).context("WASMGATE_TOKENS: not a valid TOML array of tokens")?;
        return Ok(parsed.tokens);
    }
    Ok(raw.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| TokenConfig::Key(t.to_string())).collect())
}

fn toml_tokens<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T> {
    Ok(Figment::from(Toml::string(&format!("tokens = {raw}"))).extract()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_config_defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.plugins.call_timeout_ms, 10_000);
        assert_eq!(c.plugins.memory_limit_mib, 64);
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wasmgate.example.toml");
        let c = Config::load(Some(&path)).expect("example config");
        assert_eq!(c.channels.len(), 3);
        assert_eq!(c.channels[0].model_mapping["gpt-4o"], "gpt-4o-2024-08-06");
        assert_eq!(c.channels[1].keys.len(), 2);
        assert_eq!(c.channels[2].settings["probe_model"], "gpt-4o-mini");
        assert_eq!((c.tokens[0].group(), c.tokens[1].group()), ("default", "vip"));
        assert_eq!(c.routing.rules.len(), 2);
    }

    #[test]
    fn unknown_keys_and_bad_urls_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let typo = dir.path().join("typo.toml");
        std::fs::write(&typo, "listen = \"127.0.0.1:1\"\n[plugins]\ncall_timeout = 5\n").expect("write");
        assert!(Config::load(Some(&typo)).is_err());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[[channels]]\nname = \"x\"\nadapter = \"openai\"\nbase_url = \"ftp://x\"\n")
            .expect("write");
        let err = format!("{:#}", Config::load(Some(&bad)).expect_err("bad url"));
        assert!(err.contains("channels[0].base_url"), "{err}");
    }
}
