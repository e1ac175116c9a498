//! Users and tokens in PostgreSQL (with `database_url`), shared by every
//! node: tables `users` and `tokens` hold each record's descriptive fields
//! as JSON and its balances in columns that only billing moves (quota
//! leases, the usage writer, top-ups), so an admin's edit never races a
//! charge. Ids come from sequences. Every write commits, then
//! `NOTIFY wasmgate_accounts`; each node re-reads the accounts when told
//! (and every [`RECONCILE`]) into its in-memory snapshot, which the auth
//! path reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{Context, Result};

use super::accounts::{TokenRecord, UserRecord};
use crate::store::postgres::Postgres;

/// The notification channel announcing a changed user or token.
pub const ACCOUNTS_NOTIFY: &str = "wasmgate_accounts";

/// A full re-read catches anything a dropped listener missed.
const RECONCILE: Duration = Duration::from_secs(5);

/// Every user and token, by id.
pub type Records = (BTreeMap<u64, UserRecord>, BTreeMap<u64, TokenRecord>);

/// Told when the stored accounts changed (re-read them).
pub trait Follower: Send + Sync {
    /// Called before a re-read: a stamp of this node's own writes (see
    /// `store::local_writes`).
    fn before_read(&self) -> Option<u64>;
    /// Replace the in-memory accounts with `records`, read after
    /// [`Follower::before_read`] gave `stamp`; false when a write of this
    /// node started or ended meanwhile (the read may predate what it
    /// published: read again).
    fn replace(&self, records: Records, stamp: Option<u64>) -> bool;
}

/// The accounts tables.
pub struct PgAccounts {
    pg: Arc<Postgres>,
}

/// Read every user and token, balances from their columns.
async fn load_all(pg: &Postgres) -> Result<Records> {
    let c = pg.pooled().await?;
    let mut users = BTreeMap::new();
    for row in c.query("SELECT record, quota, used_quota, request_count FROM users", &[]).await? {
        let mut u: UserRecord = serde_json::from_value(row.get(0)).context("a stored user is not valid")?;
        (u.quota, u.used_quota, u.request_count) = (row.get(1), row.get(2), row.get::<_, i64>(3) as u64);
        users.insert(u.id, u);
    }
    let mut tokens = BTreeMap::new();
    for row in c.query("SELECT record, remain_quota, used_quota FROM tokens", &[]).await? {
        let mut t: TokenRecord = serde_json::from_value(row.get(0)).context("a stored token is not valid")?;
        (t.remain_quota, t.used_quota) = (row.get(1), row.get(2));
        tokens.insert(t.id, t);
    }
    Ok((users, tokens))
}

impl PgAccounts {
    /// Load the accounts; `follower` then gets every change made on any
    /// node.
    pub fn open(pg: &Arc<Postgres>) -> Result<(Arc<Self>, Records)> {
        let me = pg.clone();
        let records = pg.block(async move { load_all(&me).await }).context("loading users and tokens")?;
        Ok((Arc::new(Self { pg: pg.clone() }), records))
    }

    /// Keep `follower` current: re-read on every notification and every
    /// [`RECONCILE`], until it is dropped.
    pub fn follow(&self, follower: Weak<dyn Follower>) {
        let pg = self.pg.clone();
        self.pg.spawn(async move {
            loop {
                let (_client, mut rx) = pg.listen(ACCOUNTS_NOTIFY).await;
                loop {
                    let Some(stamp) = follower.upgrade().map(|f| f.before_read()) else { return };
                    match load_all(&pg).await {
                        Ok(records) => match follower.upgrade() {
                            Some(f) if f.replace(records, stamp) => {}
                            Some(_) => {
                                tokio::time::sleep(crate::store::local_writes::REREAD_AFTER).await;
                                continue;
                            }
                            None => return,
                        },
                        Err(error) => tracing::warn!(error = format!("{error:#}"), "re-reading accounts failed"),
                    }
                    match tokio::time::timeout(RECONCILE, rx.recv()).await {
                        Ok(Some(_)) => while rx.try_recv().is_ok() {},
                        Ok(None) => break, // the listener dropped: reconnect
                        Err(_) => {}       // reconcile
                    }
                }
            }
        });
    }

    /// Run one write transaction and announce it.
    fn write<T: Send + 'static>(
        &self,
        f: impl for<'t> FnOnce(
            &'t tokio_postgres::Transaction<'t>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 't>>
        + Send
        + 'static,
    ) -> Result<T> {
        let pg = self.pg.clone();
        self.pg.block(async move {
            let mut c = pg.pooled().await?;
            let tx = c.transaction().await?;
            let out = f(&tx).await?;
            tx.execute("SELECT pg_notify($1, '')", &[&ACCOUNTS_NOTIFY]).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    /// Store a new user (its opening balance in `quota`); sets its id.
    pub fn insert_user(&self, user: &UserRecord) -> Result<u64> {
        let mut user = user.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let id: i64 = tx.query_one("SELECT nextval('user_ids')", &[]).await?.get(0);
                user.id = id as u64;
                tx.execute(
                    "INSERT INTO users (id, record, quota) VALUES ($1, $2, $3)",
                    &[&id, &serde_json::to_value(&user)?, &user.quota],
                )
                .await?;
                Ok(user.id)
            })
        })
    }

    /// Store a new token (its own quota in `remain_quota`); sets its id.
    pub fn insert_token(&self, token: &TokenRecord) -> Result<u64> {
        let mut token = token.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let id: i64 = tx.query_one("SELECT nextval('token_ids')", &[]).await?.get(0);
                token.id = id as u64;
                tx.execute(
                    "INSERT INTO tokens (id, user_id, record, remain_quota) VALUES ($1, $2, $3, $4)",
                    &[&id, &(token.user_id as i64), &serde_json::to_value(&token)?, &token.remain_quota],
                )
                .await?;
                Ok(token.id)
            })
        })
    }

    /// Replace a user's descriptive fields; `false` when it does not exist.
    pub fn update_user(&self, user: &UserRecord) -> Result<bool> {
        let (id, value) = (user.id as i64, serde_json::to_value(user)?);
        self.write(move |tx| {
            Box::pin(
                async move { Ok(tx.execute("UPDATE users SET record = $2 WHERE id = $1", &[&id, &value]).await? == 1) },
            )
        })
    }

    /// Replace a token's descriptive fields; `false` when it does not exist.
    pub fn update_token(&self, token: &TokenRecord) -> Result<bool> {
        let (id, value) = (token.id as i64, serde_json::to_value(token)?);
        self.write(move |tx| {
            Box::pin(async move {
                Ok(tx.execute("UPDATE tokens SET record = $2 WHERE id = $1", &[&id, &value]).await? == 1)
            })
        })
    }

    /// Delete a token (and the leases of its quota); `false` when it did not
    /// exist.
    pub fn delete_token(&self, id: u64) -> Result<bool> {
        let id = id as i64;
        self.write(move |tx| {
            Box::pin(async move {
                // Rows in the order every writer locks them (users, tokens,
                // then leases — see `leases.rs`), or a lease return running
                // at the same moment deadlocks with this.
                tx.execute("SELECT id FROM tokens WHERE id = $1 FOR UPDATE", &[&id]).await?;
                tx.execute("DELETE FROM quota_leases WHERE kind = 't' AND id = $1", &[&id]).await?;
                Ok(tx.execute("DELETE FROM tokens WHERE id = $1", &[&id]).await? == 1)
            })
        })
    }

    /// Delete a user, their tokens and their leases; `false` when the user
    /// did not exist.
    pub fn delete_user(&self, id: u64) -> Result<bool> {
        let id = id as i64;
        self.write(move |tx| {
            Box::pin(async move {
                // Users, then tokens, then leases: as in `delete_token`.
                tx.execute("SELECT id FROM users WHERE id = $1 FOR UPDATE", &[&id]).await?;
                tx.execute("SELECT id FROM tokens WHERE user_id = $1 ORDER BY id FOR UPDATE", &[&id]).await?;
                tx.execute(
                    "DELETE FROM quota_leases WHERE (kind = 'u' AND id = $1)
                        OR (kind = 't' AND id IN (SELECT id FROM tokens WHERE user_id = $1))",
                    &[&id],
                )
                .await?;
                tx.execute("DELETE FROM tokens WHERE user_id = $1", &[&id]).await?;
                Ok(tx.execute("DELETE FROM users WHERE id = $1", &[&id]).await? == 1)
            })
        })
    }
}
