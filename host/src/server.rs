//! Assembling the gateway from its configuration and serving it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use crate::api::app;
use crate::billing::Billing;
use crate::channels::{ChannelStore, SledChannels};
use crate::config::{Config, DEFAULT_GROUP};
use crate::console::sessions::Sessions;
use crate::health::{self, Health};
use crate::plugins::{ArtifactCache, Compiler, PluginEngine, PluginWatcher, Registry, watch};
use crate::relay::{Credentials, Upstream};
use crate::routing::{Policies, Routing};
use crate::state::{AppState, Inner, secret_hash};
use crate::store::overrides::OptionStore;
use crate::store::{Store, StoreOptions};

/// A gateway ready to serve.
pub struct Gateway {
    /// Shared state (also what tests use).
    pub state: AppState,
    /// Tokens generated because none were configured: (gateway, admin).
    pub generated: (Option<String>, Option<String>),
    _watcher: Option<PluginWatcher>,
    _tasks: [AbortOnDrop; 2],
}

/// Delete old usage log rows and expired stored responses now and then.
async fn retention(state: AppState) {
    loop {
        let s = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            s.billing.sweep_logs();
            if let Err(error) = s.responses.sweep() {
                tracing::warn!(%error, "sweeping stored responses failed");
            }
        })
        .await;
        tokio::time::sleep(state.billing.retention_interval()).await;
    }
}

/// Stops a background task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Open the store, start the plugin engine, load the plugins directory and
/// start watching it.
pub async fn build(config: Config) -> Result<Gateway> {
    let options = StoreOptions {
        min_free_bytes: config.storage.min_free_mb.saturating_mul(1 << 20),
        secrets_key: config.secrets_key.clone(),
        cache_bytes: config.storage.cache_mb.saturating_mul(1 << 20),
    };
    let store = Store::open_with(&config.data_dir, &options)?;
    store.spawn_monitor(Duration::from_millis(config.storage.check_interval_ms.max(50)));
    let mut generated = (None, None);
    let mut token_groups: HashMap<[u8; 32], (Arc<str>, usize)> =
        config.tokens.iter().enumerate().map(|(i, t)| (secret_hash(t.key()), (Arc::from(t.group()), i))).collect();
    if config.tokens.is_empty() {
        let (hash, shown) = store.generated_secret("generated_token", "sk-")?;
        generated.0 = shown;
        token_groups.insert(hash, (Arc::from(DEFAULT_GROUP), 0));
    }
    let admin_hash = match &config.admin_token {
        Some(t) => secret_hash(t),
        None => {
            let (hash, shown) = store.generated_secret("generated_admin_token", "adm-")?;
            generated.1 = shown;
            hash
        }
    };

    std::fs::create_dir_all(&config.plugins_dir)
        .with_context(|| format!("creating plugins directory {}", config.plugins_dir.display()))?;
    let engine = PluginEngine::new(&config.plugins).context("starting the wasm engine")?;
    let owned = config.plugins.cache_dir.is_none();
    let cache_dir = config.plugins.cache_dir.clone().unwrap_or_else(|| config.data_dir.join("plugin-cache"));
    let compiler = match std::env::current_exe() {
        Ok(exe) if config.plugins.isolate_compile => Compiler::Child(exe),
        _ => Compiler::InProcess,
    };
    let cache =
        ArtifactCache::new(config.plugins.cache.then_some(cache_dir), owned, config.data_dir.join("tmp"), compiler);
    let registry = Arc::new(Registry::new(engine, cache, config.plugins_dir.clone()));
    registry.load_dir().await;
    let watcher = if config.plugins.watch {
        Some(watch(registry.clone(), Duration::from_millis(config.plugins.debounce_ms))?)
    } else {
        None
    };

    let postgres = config.database_url.as_deref().map(crate::store::postgres::Postgres::start).transpose()?;
    // Where API overrides (routing, filters, pricing) live.
    let options: Arc<dyn OptionStore> = match &postgres {
        Some(pg) => crate::store::overrides::PgOptions::start(pg),
        None => Arc::new(store.clone()),
    };
    let (channels, report): (Arc<dyn ChannelStore>, _) = match &postgres {
        None => {
            let channels = SledChannels::open(&store).context("loading channels")?;
            let report = channels.import_config(&config.channels).context("importing the configuration's channels")?;
            (Arc::new(channels), report)
        }
        Some(pg) => {
            let channels = crate::channels::PgChannels::open(pg, store.secrets_arc())?;
            let report = channels.import_config(&config.channels).context("importing the configuration's channels")?;
            (Arc::new(channels), report)
        }
    };
    tracing::info!(
        created = report.created,
        updated = report.updated,
        kept_api_version = report.kept_api_version,
        total = channels.snapshot().records.len(),
        shared = postgres.is_some(),
        "channels loaded"
    );
    let shared_plugins = postgres
        .as_ref()
        .map(|pg| crate::plugins::SharedPlugins::start(pg, &registry, &tokio::runtime::Handle::current()));
    let routing = Routing::new(Policies::load(&config.routing, options.clone())?);
    let filters = crate::filters::Filters::load(&config.filters, options.clone())?;

    let billing = Arc::new(
        Billing::open(&store, options, &config.pricing, &config.logs, &config.limits, postgres.as_ref())
            .context("opening billing")?,
    );
    crate::metrics::get().set_enabled(config.metrics.enabled);
    let sessions = Arc::new(Sessions::new(
        store.secrets_arc(),
        &admin_hash,
        config.console.session_secs,
        config.console.max_failed_sign_ins,
    ));
    if let Some(pg) = &postgres {
        crate::console::signouts_pg::PgSignOuts::start(pg, &sessions);
    }
    let inner = Inner {
        billing,
        health: Health::new(config.health.clone(), channels.clone()),
        channels,
        routing,
        filters,
        upstream: Upstream::new(&config.upstream)?,
        credentials: Credentials::default(),
        token_groups,
        admin_hash,
        registry,
        shared_plugins,
        responses: match &postgres {
            Some(pg) => crate::ingress::responses::store::ResponseStore::Pg(pg.clone()),
            None => crate::ingress::responses::store::ResponseStore::Sled(store.clone()),
        },
        store,
        sessions,
        started_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        config,
    };
    let state = AppState(Arc::new(inner));
    let tester = tokio::spawn(health::tester::run(state.clone()));
    let retention = tokio::spawn(retention(state.clone()));
    Ok(Gateway { state, generated, _watcher: watcher, _tasks: [AbortOnDrop(tester), AbortOnDrop(retention)] })
}

/// Serve until SIGINT/SIGTERM, then drain and flush the store.
pub async fn run(config: Config) -> Result<()> {
    let gateway = build(config).await?;
    let listener = TcpListener::bind(gateway.state.config.listen)
        .await
        .with_context(|| format!("binding {}", gateway.state.config.listen))?;
    let addr = listener.local_addr()?;
    if let Some(token) = &gateway.generated.0 {
        println!(
            "gateway token (generated; shown once, only its hash is kept — save it, or set WASMGATE_TOKENS): {token}"
        );
    }
    if let Some(token) = &gateway.generated.1 {
        println!("admin token (generated; shown once — save it, or set WASMGATE_ADMIN_TOKEN): {token}");
    }
    if gateway.state.channels.snapshot().records.is_empty() {
        tracing::warn!(
            "no channels: every model is unknown until you add some with POST /api/channels or [[channels]] in the config"
        );
    }
    let plugins = gateway.state.registry.list();
    tracing::info!(plugins = plugins.iter().filter(|p| p.loaded).count(), %addr, "wasmgate ready");
    // Tests and scripts read this line to find the port.
    println!("wasmgate listening on http://{addr}");
    let state = gateway.state.clone();
    let workers = gateway.state.config.server.workers;
    crate::listener::serve(listener, app(state), &gateway.state.config.server, workers, shutdown_signal()).await?;
    // Requests are drained: write the queued usage rows and charges. What a
    // failing disk keeps from being written stays in the journal for the
    // next start.
    if tokio::time::timeout(Duration::from_secs(30), gateway.state.billing.writer.flush()).await.is_err() {
        tracing::error!("usage rows could not be written at shutdown; the journal keeps them for the next start");
    } else {
        gateway.state.billing.return_leases().await;
    }
    gateway.state.store.flush()?;
    tracing::info!("wasmgate stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received; draining");
}
