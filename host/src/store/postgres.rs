//! PostgreSQL, for several gateway nodes sharing one state
//! (`database_url = "postgres://…"`, see `docs/deployment.md`).
//!
//! Every database call runs on one dedicated thread with its own tokio
//! runtime, never on a request worker: the request path reads in-memory
//! snapshots, which the database's `LISTEN/NOTIFY` (and a periodic
//! reconcile) keep current. Synchronous callers (the admin API's writes,
//! which run on their own thread) wait for their call with a timeout.
//!
//! The schema is versioned: [`MIGRATIONS`] run in order on start, each in a
//! transaction, under an advisory lock so nodes starting together apply
//! each once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio_postgres::{Client, NoTls};

/// How long a caller waits for the database.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits for the database (a quota lease, an in-flight
/// slot, a shared rate window) before it is answered 503: a database that
/// hangs (a network partition that drops packets, a stopped server) must
/// not hold requests for as long as TCP takes to notice.
pub const REQUEST_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long bringing the schema up to date, or `wasmgate migrate`'s copy
/// of a data directory, may take: both grow with the usage log (schema
/// migration 7 rewrites it at about 1.6 s per million rows).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long opening a connection may take (TCP and PostgreSQL's startup).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in the pool billing uses.
const POOL_SIZE: usize = 4;

/// Advisory lock key held while migrating (and importing the configuration).
pub const SCHEMA_LOCK: i64 = 0x7761_736d_6761_7465; // "wasmgate"

/// The schema, one migration per version, applied in order.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE channels (
         id BIGINT PRIMARY KEY,
         record JSONB NOT NULL,
         version BIGINT NOT NULL DEFAULT 1
     );
     CREATE SEQUENCE channel_ids;
     CREATE TABLE options (
         key TEXT PRIMARY KEY,
         value TEXT NOT NULL
     );",
    ),
    (
        2,
        "CREATE TABLE plugins (
         name TEXT PRIMARY KEY,
         sha256 TEXT NOT NULL,
         bytes BYTEA NOT NULL,
         updated_at BIGINT NOT NULL
     );",
    ),
    (
        3,
        "ALTER TABLE channels
         ADD COLUMN probe_lease_until BIGINT NOT NULL DEFAULT 0,
         ADD COLUMN probe_lease_node TEXT NOT NULL DEFAULT '';",
    ),
    (
        4,
        "CREATE TABLE console_signouts (
         id TEXT PRIMARY KEY,
         expires BIGINT NOT NULL
     );",
    ),
    (
        5,
        "ALTER TABLE plugins
         ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT false,
         ALTER COLUMN bytes DROP NOT NULL;",
    ),
    (
        6,
        "CREATE TABLE users (
         id BIGINT PRIMARY KEY,
         record JSONB NOT NULL,
         quota BIGINT NOT NULL DEFAULT 0,
         used_quota BIGINT NOT NULL DEFAULT 0,
         request_count BIGINT NOT NULL DEFAULT 0
     );
     CREATE TABLE tokens (
         id BIGINT PRIMARY KEY,
         user_id BIGINT NOT NULL,
         record JSONB NOT NULL,
         remain_quota BIGINT NOT NULL DEFAULT 0,
         used_quota BIGINT NOT NULL DEFAULT 0
     );
     CREATE SEQUENCE user_ids;
     CREATE SEQUENCE token_ids;
     CREATE TABLE quota_leases (
         node TEXT NOT NULL,
         kind CHAR(1) NOT NULL,
         id BIGINT NOT NULL,
         amount BIGINT NOT NULL,
         PRIMARY KEY (node, kind, id)
     );
     CREATE TABLE usage_logs (
         node TEXT NOT NULL,
         id BIGINT NOT NULL,
         at_ms BIGINT NOT NULL,
         kind TEXT NOT NULL,
         request_id TEXT NOT NULL,
         user_id BIGINT,
         token_id BIGINT,
         model TEXT NOT NULL,
         quota BIGINT NOT NULL,
         row JSONB NOT NULL,
         PRIMARY KEY (node, id)
     );
     CREATE INDEX usage_logs_at ON usage_logs (at_ms);
     CREATE INDEX usage_logs_user ON usage_logs (user_id, at_ms);
     CREATE TABLE rate_windows (
         token_id BIGINT PRIMARY KEY,
         state JSONB NOT NULL
     );
     CREATE TABLE responses (
         id TEXT PRIMARY KEY,
         owner TEXT NOT NULL,
         expires_at BIGINT NOT NULL,
         record JSONB NOT NULL
     );
     CREATE INDEX responses_expiry ON responses (expires_at);
     CREATE TABLE in_flight (
         token_id BIGINT NOT NULL,
         node TEXT NOT NULL,
         count BIGINT NOT NULL,
         PRIMARY KEY (token_id, node)
     );",
    ),
    (
        7,
        // Every field of a usage row a column of its own (the writer sends
        // one array per column: no JSON parsed per row), and a BRIN index on
        // the time, which rows arrive in.
        "ALTER TABLE usage_logs
         ADD COLUMN token_name TEXT NOT NULL DEFAULT '',
         ADD COLUMN \"group\" TEXT NOT NULL DEFAULT '',
         ADD COLUMN channel_id BIGINT NOT NULL DEFAULT 0,
         ADD COLUMN upstream_model TEXT NOT NULL DEFAULT '',
         ADD COLUMN prompt_tokens BIGINT NOT NULL DEFAULT 0,
         ADD COLUMN completion_tokens BIGINT NOT NULL DEFAULT 0,
         ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0,
         ADD COLUMN token_limited BOOLEAN NOT NULL DEFAULT false,
         ADD COLUMN estimated BOOLEAN NOT NULL DEFAULT false,
         ADD COLUMN latency_ms BIGINT NOT NULL DEFAULT 0,
         ADD COLUMN ttft_ms BIGINT,
         ADD COLUMN stream BOOLEAN NOT NULL DEFAULT false,
         ADD COLUMN status INTEGER NOT NULL DEFAULT 0,
         ADD COLUMN error_kind TEXT,
         ADD COLUMN client_disconnected BOOLEAN NOT NULL DEFAULT false,
         ADD COLUMN interrupted BOOLEAN NOT NULL DEFAULT false,
         ADD COLUMN upstream_cut BOOLEAN NOT NULL DEFAULT false,
         ADD COLUMN limited BOOLEAN NOT NULL DEFAULT false,
         ADD COLUMN plugin TEXT NOT NULL DEFAULT '',
         ADD COLUMN plugin_sha256 TEXT NOT NULL DEFAULT '',
         ADD COLUMN note TEXT;
     UPDATE usage_logs SET
         token_name = COALESCE(row->>'token_name', ''),
         \"group\" = COALESCE(row->>'group', ''),
         channel_id = COALESCE((row->>'channel_id')::bigint, 0),
         upstream_model = COALESCE(row->>'upstream_model', ''),
         prompt_tokens = COALESCE((row->>'prompt_tokens')::bigint, 0),
         completion_tokens = COALESCE((row->>'completion_tokens')::bigint, 0),
         cached_tokens = COALESCE((row->>'cached_tokens')::bigint, 0),
         token_limited = COALESCE((row->>'token_limited')::boolean, false),
         estimated = COALESCE((row->>'estimated')::boolean, false),
         latency_ms = COALESCE((row->>'latency_ms')::bigint, 0),
         ttft_ms = (row->>'ttft_ms')::bigint,
         stream = COALESCE((row->>'stream')::boolean, false),
         status = COALESCE((row->>'status')::integer, 0),
         error_kind = row->>'error_kind',
         client_disconnected = COALESCE((row->>'client_disconnected')::boolean, false),
         interrupted = COALESCE((row->>'interrupted')::boolean, false),
         upstream_cut = COALESCE((row->>'upstream_cut')::boolean, false),
         limited = COALESCE((row->>'limited')::boolean, false),
         plugin = COALESCE(row->>'plugin', ''),
         plugin_sha256 = COALESCE(row->>'plugin_sha256', ''),
         note = row->>'note';
     ALTER TABLE usage_logs DROP COLUMN row;
     DROP INDEX usage_logs_at;
     CREATE INDEX usage_logs_at ON usage_logs USING brin (at_ms);",
    ),
    (
        8,
        // Nothing in the gateway reads the usage log by user (each node's
        // console reads its own copy), and keeping this index cost about a
        // sixth of the database's CPU per request: reports by user go
        // through the time index (see docs/deployment.md).
        "DROP INDEX IF EXISTS usage_logs_user;",
    ),
];

/// The notification channel announcing a changed channel (payload: its id).
pub const CHANNELS_NOTIFY: &str = "wasmgate_channels";

/// The database thread and how to reach the server.
pub struct Postgres {
    /// The server, with [`CONNECT_TIMEOUT`] set.
    config: tokio_postgres::Config,
    handle: tokio::runtime::Handle,
    /// Pooled connections for billing's calls (leases, rate windows,
    /// usage batches); used on the database thread only.
    pool: deadpool_postgres::Pool,
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Postgres {
    /// Start the database thread, connect once and bring the schema up to
    /// date.
    pub fn start(url: &str) -> Result<Arc<Self>> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("postgres".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = handle_tx.send(Err(anyhow!("database runtime: {e}")));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        })?;
        let handle = handle_rx.recv().context("database thread")??;
        let mut config = url.parse::<tokio_postgres::Config>().context("database_url")?;
        config.connect_timeout(CONNECT_TIMEOUT);
        let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config.clone(), NoTls))
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CALL_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .context("database connection pool")?;
        let pg = Arc::new(Self { config, handle, pool, stop: std::sync::Mutex::new(Some(stop_tx)) });
        let me = pg.clone();
        pg.block_within(MIGRATION_TIMEOUT, async move {
            let mut client = me.connect().await?;
            migrate(&mut client).await
        })
        .context("preparing the PostgreSQL schema")?;
        Ok(pg)
    }

    /// Run `fut` on the database thread and wait for it (at most
    /// [`CALL_TIMEOUT`]). Never call this on a request worker.
    pub fn block<T: Send + 'static>(&self, fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        self.block_within(CALL_TIMEOUT, fut)
    }

    /// [`Self::block`], given up after `limit`: `fut` is dropped then (an
    /// open transaction rolls back; one whose commit was already sent may
    /// still commit), so a retry never runs beside the call it replaces.
    pub fn block_within<T: Send + 'static>(
        &self,
        limit: Duration,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let result = tokio::time::timeout(limit, fut)
                .await
                .unwrap_or_else(|_| Err(anyhow!("the database did not answer within {limit:?}")));
            let _ = tx.send(result);
        });
        rx.recv().map_err(|_| anyhow!("the database thread stopped"))?
    }

    /// Run `fut` on the database thread and await it (from any runtime,
    /// without blocking a thread), at most [`CALL_TIMEOUT`].
    pub async fn call<T: Send + 'static>(&self, fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        self.call_within(CALL_TIMEOUT, fut).await
    }

    /// [`Self::call`], given up (and `fut` dropped: an open transaction
    /// rolls back) after `limit`. A transaction whose commit was already
    /// sent may still commit: what it leased stays counted for this node
    /// until the node stops or starts again.
    pub async fn call_within<T: Send + 'static>(
        &self,
        limit: Duration,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.handle.spawn(async move {
            let result = tokio::time::timeout(limit, fut)
                .await
                .unwrap_or_else(|_| Err(anyhow!("the database did not answer within {limit:?}")));
            let _ = tx.send(result);
        });
        rx.await.map_err(|_| anyhow!("the database thread stopped"))?
    }

    /// Run `fut` on the database thread without waiting.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(fut);
    }

    /// A new connection (call on the database thread: its driver task runs
    /// there). Notifications received on it go to `notify` when given.
    pub async fn connect_listening(
        &self,
        notify: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> Result<Client> {
        let connecting = tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(NoTls));
        let (client, mut connection) = connecting
            .await
            .map_err(|_| anyhow!("connecting to PostgreSQL took longer than {CONNECT_TIMEOUT:?}"))?
            .context("connecting to PostgreSQL")?;
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if let Some(tx) = &notify {
                            let _ = tx.send(n);
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "PostgreSQL connection lost");
                        break;
                    }
                }
            }
        });
        Ok(client)
    }

    /// A connection listening on `channel` and its notifications; retried
    /// every second until it succeeds (call on the database thread). A
    /// follower re-reads what it follows after each (re)connection.
    pub async fn listen(
        &self,
        channel: &str,
    ) -> (Client, tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>) {
        loop {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let result = match self.connect_listening(Some(tx)).await {
                Ok(client) => {
                    client.batch_execute(&format!("LISTEN {channel}")).await.map(|()| client).map_err(Into::into)
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(client) => return (client, rx),
                Err(error) => {
                    tracing::warn!(channel, error = format!("{error:#}"), "cannot listen to the database; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// A pooled connection (call on the database thread).
    pub async fn pooled(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| anyhow!("no database connection: {e}"))
    }

    /// A new connection (see [`Self::connect_listening`]).
    pub async fn connect(&self) -> Result<Client> {
        self.connect_listening(None).await
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = stop.send(());
        }
    }
}

/// Apply the migrations not applied yet, in order, under [`SCHEMA_LOCK`].
async fn migrate(client: &mut Client) -> Result<()> {
    client.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK]).await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS wasmgate_schema (
                     version INT PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
        let applied: Option<i32> = client.query_one("SELECT max(version) FROM wasmgate_schema", &[]).await?.get(0);
        let applied = applied.unwrap_or(0);
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            tracing::info!(version, "migrating the PostgreSQL schema (minutes on a large usage log)");
            let tx = client.transaction().await?;
            tx.batch_execute(sql).await.with_context(|| format!("schema migration {version}"))?;
            tx.execute("INSERT INTO wasmgate_schema (version) VALUES ($1)", &[version]).await?;
            tx.commit().await?;
            tracing::info!(version, "PostgreSQL schema migrated");
        }
        if let Some((latest, _)) = MIGRATIONS.last()
            && applied > *latest
        {
            anyhow::bail!("the database's schema (version {applied}) is newer than this gateway's ({latest})");
        }
        Ok(())
    }
    .await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK]).await?;
    result
}
