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
    /// Channel health: automatic disabling, cool-downs, recovery probes.
    pub health: HealthConfig,
    /// Prices (one-api's ratios; `PUT /api/pricing` overrides them).
    pub pricing: crate::billing::pricing::PricingConfig,
    /// Usage logs: batching and retention.
    pub logs: LogConfig,
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

/// Limits of the plugin runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Deadline of one plugin call, in milliseconds.
    pub call_timeout_ms: u64,
    /// Linear-memory cap of one plugin instance, in MiB.
    pub memory_limit_mib: u32,
    /// Plugin instances that may exist at once (pooling allocator slots);
    /// each open stream holds one.
    pub max_instances: u32,
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
    /// Longest silence inside a streamed body, in seconds.
    pub idle_timeout_secs: u64,
    /// Largest non-streamed upstream body read, in bytes.
    pub max_response_bytes: usize,
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
            health: HealthConfig::default(),
            pricing: crate::billing::pricing::PricingConfig::default(),
            logs: LogConfig::default(),
            channels: Vec::new(),
        }
    }
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            call_timeout_ms: 50,
            memory_limit_mib: 64,
            max_instances: 1000,
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
            max_response_bytes: 64 * 1024 * 1024,
            max_attempts: 3,
            attempt_timeout_secs: 300,
            total_timeout_secs: 600,
            backoff_base_ms: 100,
            backoff_max_ms: 2_000,
            max_retry_after_secs: 10,
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
    "health",
    "pricing",
    "logs",
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
        let env = Env::prefixed("WASMGATE_")
            .split("__")
            .filter(|key| KEYS.iter().any(|k| key.as_str().split('.').next() == Some(k)));
        let config: Config = figment.merge(env).extract().context("invalid configuration")?;
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
        if self.plugins.call_timeout_ms == 0 || self.plugins.memory_limit_mib == 0 || self.plugins.max_instances == 0 {
            bail!("plugins: call_timeout_ms, memory_limit_mib and max_instances must be positive");
        }
        if self.upstream.max_attempts == 0 {
            bail!("upstream.max_attempts must be at least 1");
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_config_defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.plugins.call_timeout_ms, 50);
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
