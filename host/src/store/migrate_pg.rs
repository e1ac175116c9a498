//! `wasmgate migrate --from DATA_DIR --to postgres://…`: copy what several
//! nodes share today (see `docs/deployment.md`) from a single node's sled
//! store into PostgreSQL — channels with their health (keys re-sealed with
//! the nodes' `secrets_key`), the configuration import's markers, the
//! tables set through the API (routing, filters, pricing), users and tokens
//! with their balances, the usage log, stored responses and, with
//! `--plugins DIR`, the plugin files. Idempotent (rows are upserted by id,
//! key and name), in one transaction, and verified: every source row is
//! counted in the database afterwards. Stop the gateway first; what a
//! gateway killed mid-flight left in its usage journal is applied first.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::postgres::{CHANNELS_NOTIFY, Postgres};
use super::{SecretBox, Store, StoreOptions};
use crate::channels::{ChannelStore, SledChannels};

/// Options copied as they are.
const OPTION_KEYS: [&str; 3] = ["routing_override", "filters_override", "pricing_override"];
/// Option prefixes copied as they are.
const OPTION_PREFIXES: [&str; 1] = ["config_channel/"];

/// What was copied, each count verified in the database.
#[derive(Debug, Default)]
pub struct MigrateReport {
    /// Channels.
    pub channels: usize,
    /// Options (markers and API tables).
    pub options: usize,
    /// Plugin files.
    pub plugins: usize,
    /// Users.
    pub users: usize,
    /// Tokens.
    pub tokens: usize,
    /// Usage log rows.
    pub log_rows: usize,
    /// Stored responses.
    pub responses: usize,
}

/// Usage rows per insert.
const LOG_CHUNK: usize = 1000;

/// Copy `from` (a data directory; its keys opened with `from_key`, else its
/// key file) into the database at `to`, sealing keys with `secrets_key`.
pub fn migrate(
    from: &Path,
    from_key: Option<&str>,
    to: &str,
    secrets_key: &str,
    plugins: Option<&Path>,
) -> Result<MigrateReport> {
    if !from.is_dir() {
        bail!("{} is not a data directory", from.display());
    }
    let store =
        Store::open_with(from, &StoreOptions { secrets_key: from_key.map(str::to_string), ..Default::default() })
            .with_context(|| format!("opening the store in {}", from.display()))?;
    // A node that was killed left usage in its journal: written first, as
    // its next start would.
    crate::billing::recover_journal(&store).context("applying the usage journal")?;
    let channels = SledChannels::open(&store).context("reading channels")?.snapshot();
    let target = SecretBox::from_passphrase(secrets_key)?;
    let mut rows = Vec::new();
    for rec in channels.records.values() {
        let mut sealed = crate::channels::ChannelRecord::clone(rec);
        for k in &mut sealed.keys {
            k.key = target.seal(&k.key);
        }
        rows.push((rec.id as i64, serde_json::to_value(&sealed)?));
    }
    let mut options = Vec::new();
    for key in OPTION_KEYS {
        if let Some(value) = store.option(key)? {
            options.push((key.to_string(), value));
        }
    }
    let tree = store.tree("options")?;
    for prefix in OPTION_PREFIXES {
        for item in tree.scan_prefix(prefix) {
            let (k, v) = item?;
            options.push((String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()));
        }
    }
    let mut files = Vec::new();
    if let Some(dir) = plugins {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if let Some(name) = crate::plugins::Registry::name_for(&path) {
                let bytes = std::fs::read(&path)?;
                files.push((name, crate::plugins::sha256_hex(&bytes), bytes));
            }
        }
    }
    let accounts = crate::billing::accounts::Accounts::open(&store).context("reading users and tokens")?.snapshot();
    let users: Vec<(i64, serde_json::Value, i64, i64, i64)> = accounts
        .users
        .values()
        .map(|u| Ok((u.id as i64, serde_json::to_value(u.as_ref())?, u.quota, u.used_quota, u.request_count as i64)))
        .collect::<Result<_>>()?;
    let tokens: Vec<(i64, i64, serde_json::Value, i64, i64)> = accounts
        .tokens
        .values()
        .map(|t| Ok((t.id as i64, t.user_id as i64, serde_json::to_value(t.as_ref())?, t.remain_quota, t.used_quota)))
        .collect::<Result<_>>()?;
    let node = store.node_id()?;
    let mut log_rows: Vec<crate::billing::logs::LogRow> = Vec::new();
    for raw in crate::billing::log_blocks::oldest_first(&store.tree("logs")?) {
        log_rows.push(serde_json::from_slice(raw?.bytes()).context("a usage row is not valid")?);
    }
    let mut responses: Vec<(String, String, i64, serde_json::Value)> = Vec::new();
    for item in store.tree("responses")?.iter() {
        let (id, raw) = item?;
        let stored: crate::ingress::responses::store::Stored =
            serde_json::from_slice(&raw).context("a stored response is not valid")?;
        let (owner, expires) = (stored.owner.clone(), stored.expires_at as i64);
        responses.push((String::from_utf8_lossy(&id).into_owned(), owner, expires, serde_json::to_value(&stored)?));
    }
    let report = MigrateReport {
        channels: rows.len(),
        options: options.len(),
        plugins: files.len(),
        users: users.len(),
        tokens: tokens.len(),
        log_rows: log_rows.len(),
        responses: responses.len(),
    };
    let pg = Postgres::start(to)?;
    let inner = pg.clone();
    pg.block_within(crate::store::postgres::MIGRATION_TIMEOUT, async move {
        let mut c = inner.pooled().await?;
        let tx = c.transaction().await?;
        for (id, record) in &rows {
            tx.execute(
                "INSERT INTO channels (id, record) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET record = $2, version = channels.version + 1",
                &[id, record],
            )
            .await?;
        }
        tx.execute("SELECT setval('channel_ids', GREATEST((SELECT max(id) FROM channels), 1))", &[]).await?;
        for (key, value) in &options {
            tx.execute(
                "INSERT INTO options (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
                &[key, value],
            )
            .await?;
        }
        let now = super::unix_now() as i64;
        for (name, sha, bytes) in &files {
            tx.execute(
                "INSERT INTO plugins (name, sha256, bytes, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET sha256 = $2, bytes = $3, updated_at = $4, deleted = false",
                &[name, sha, bytes, &now],
            )
            .await?;
        }
        // Balances as the data directory holds them (a clean stop wrote
        // them all): run this before nodes serve from the database.
        for (id, record, quota, used, requests) in &users {
            tx.execute(
                "INSERT INTO users (id, record, quota, used_quota, request_count) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET record = $2, quota = $3, used_quota = $4, request_count = $5",
                &[id, record, quota, used, requests],
            )
            .await?;
        }
        for (id, user, record, remain, used) in &tokens {
            tx.execute(
                "INSERT INTO tokens (id, user_id, record, remain_quota, used_quota) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET user_id = $2, record = $3, remain_quota = $4, used_quota = $5",
                &[id, user, record, remain, used],
            )
            .await?;
        }
        tx.execute("SELECT setval('user_ids', GREATEST((SELECT max(id) FROM users), 1))", &[]).await?;
        tx.execute("SELECT setval('token_ids', GREATEST((SELECT max(id) FROM tokens), 1))", &[]).await?;
        for chunk in log_rows.chunks(LOG_CHUNK) {
            let columns: crate::billing::writer_pg::LogColumns<'_> = chunk.iter().collect();
            columns.insert_missing(&tx, &node).await?;
        }
        for (id, owner, expires, record) in &responses {
            tx.execute(
                "INSERT INTO responses (id, owner, expires_at, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET owner = $2, expires_at = $3, record = $4",
                &[id, owner, expires, record],
            )
            .await?;
        }
        // Nodes already running re-read everything.
        for channel in [
            CHANNELS_NOTIFY,
            super::overrides::OPTIONS_NOTIFY,
            crate::plugins::PLUGINS_NOTIFY,
            crate::billing::accounts_pg::ACCOUNTS_NOTIFY,
        ] {
            tx.execute("SELECT pg_notify($1, '')", &[&channel]).await?;
        }
        tx.commit().await?;
        // Verify: every source row is there.
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let keys: Vec<String> = options.iter().map(|(k, _)| k.clone()).collect();
        let names: Vec<String> = files.iter().map(|(n, _, _)| n.clone()).collect();
        let count = |n: i64, want: usize, what: &str| {
            if n as usize == want {
                Ok(())
            } else {
                Err(anyhow::anyhow!("verification failed: {want} {what} copied, {n} found in the database"))
            }
        };
        let n: i64 = c.query_one("SELECT count(*) FROM channels WHERE id = ANY($1)", &[&ids]).await?.get(0);
        count(n, ids.len(), "channels")?;
        let n: i64 = c.query_one("SELECT count(*) FROM options WHERE key = ANY($1)", &[&keys]).await?.get(0);
        count(n, keys.len(), "options")?;
        let n: i64 =
            c.query_one("SELECT count(*) FROM plugins WHERE name = ANY($1) AND NOT deleted", &[&names]).await?.get(0);
        count(n, names.len(), "plugins")?;
        let ids: Vec<i64> = users.iter().map(|u| u.0).collect();
        let n: i64 = c.query_one("SELECT count(*) FROM users WHERE id = ANY($1)", &[&ids]).await?.get(0);
        count(n, ids.len(), "users")?;
        let ids: Vec<i64> = tokens.iter().map(|t| t.0).collect();
        let n: i64 = c.query_one("SELECT count(*) FROM tokens WHERE id = ANY($1)", &[&ids]).await?.get(0);
        count(n, ids.len(), "tokens")?;
        let ids: Vec<i64> = log_rows.iter().map(|r| r.id as i64).collect();
        let n: i64 = c
            .query_one("SELECT count(*) FROM usage_logs WHERE node = $1 AND id = ANY($2)", &[&node, &ids])
            .await?
            .get(0);
        count(n, ids.len(), "usage rows")?;
        let ids: Vec<String> = responses.iter().map(|r| r.0.clone()).collect();
        let n: i64 = c.query_one("SELECT count(*) FROM responses WHERE id = ANY($1)", &[&ids]).await?.get(0);
        count(n, ids.len(), "stored responses")
    })?;
    Ok(report)
}
