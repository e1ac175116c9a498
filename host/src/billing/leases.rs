//! Quota leases, for nodes sharing a PostgreSQL database.
//!
//! A user's (and a limited token's) balance lives in the database; a node
//! serves requests from a **lease** carved out of it by one conditional
//! transaction (`SELECT … FOR UPDATE`, then `quota = quota - lease`, only
//! when the balance covers what is needed) and recorded in
//! `quota_leases (node, kind, id, amount)`. The node's in-memory
//! [`Ledger`] then reserves and settles exactly as on one node, against the
//! lease. So the sum of every node's admissions never exceeds the balance,
//! however many nodes and concurrent requests there are: the database
//! balance never goes below zero by admission.
//!
//! The usage writer charges a lease in the same transaction as the usage
//! rows (see `writer_pg`), so at every commit
//! `users.quota + Σ leases = the user's true balance`. What an idle node
//! holds unreserved is returned after [`IDLE`]; a node starting (after its
//! journal is written) and a node stopping return everything they hold.
//! A node killed holding a lease keeps it out of the others' reach until
//! it restarts (bounded: a lease is at most the need plus 1/16 of what was
//! left, see [`lease_size`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::ledger::Ledger;
use crate::store::postgres::Postgres;

/// An account untouched this long gives its unreserved lease back.
pub const IDLE: Duration = Duration::from_secs(1);

/// How much to lease when `need` is missing and the database holds
/// `available`: the need plus a share of the rest (1/16, at most 63 more
/// needs), so a busy account rarely waits for the database and a small
/// balance is not hoarded by one node.
pub fn lease_size(need: i64, available: i64) -> i64 {
    if need <= 0 {
        return 0;
    }
    let extra = (available.saturating_sub(need) / 16).min(need.saturating_mul(63)).max(0);
    need.saturating_add(extra).min(available)
}

/// What [`Leases::acquire`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leased {
    /// The node now holds enough.
    Granted,
    /// The database's balance does not cover the need; it holds `available`.
    Refused {
        /// What the database had left (of the account that fell short).
        available: i64,
    },
}

/// This node's leases.
pub struct Leases {
    pg: Arc<Postgres>,
    node: String,
    ledger: Arc<Ledger>,
    /// When each account (`(is_user, id)`) last leased or reserved.
    touched: Mutex<HashMap<(bool, u64), Instant>>,
}

impl Leases {
    /// Return what an earlier life of this node still holds (call after its
    /// journal is written to the database), then keep returning idle leases.
    pub fn start(pg: &Arc<Postgres>, node: &str, ledger: &Arc<Ledger>) -> Result<Arc<Self>> {
        let leases = Arc::new(Self {
            pg: pg.clone(),
            node: node.to_string(),
            ledger: ledger.clone(),
            touched: Mutex::default(),
        });
        let (db, node) = (pg.clone(), node.to_string());
        pg.block(async move { return_stored(&db, &node).await })?;
        let weak = Arc::downgrade(&leases);
        pg.spawn(async move {
            loop {
                tokio::time::sleep(IDLE / 2).await;
                let Some(leases) = weak.upgrade() else { return };
                leases.return_idle().await;
            }
        });
        Ok(leases)
    }

    fn touch(&self, user: u64, token: Option<u64>) {
        let mut t = self.touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        t.insert((true, user), now);
        if let Some(token) = token {
            t.insert((false, token), now);
        }
    }

    /// A request of `user` (through `token`) is being admitted: keep their
    /// leases a while longer.
    pub fn used(&self, user: u64, token: Option<u64>) {
        self.touch(user, token);
    }

    /// Lease enough for a reservation of `need` more than the node holds:
    /// `need_user` from the user, `need_token` from the token (0: none).
    pub async fn acquire(&self, user: u64, need_user: i64, token: Option<u64>, need_token: i64) -> Result<Leased> {
        self.touch(user, token);
        let (pg, node) = (self.pg.clone(), self.node.clone());
        let token = token.filter(|_| need_token > 0);
        let granted = self
            .pg
            .call(async move {
                let mut c = pg.pooled().await?;
                let tx = c.transaction().await?;
                let mut grants = (0, 0);
                if need_user > 0 {
                    let Some(row) =
                        tx.query_opt("SELECT quota FROM users WHERE id = $1 FOR UPDATE", &[&(user as i64)]).await?
                    else {
                        return Ok(Err(0));
                    };
                    let available: i64 = row.get(0);
                    if available < need_user {
                        return Ok(Err(available));
                    }
                    grants.0 = lease_size(need_user, available);
                }
                if let Some(t) = token {
                    let Some(row) = tx
                        .query_opt("SELECT remain_quota FROM tokens WHERE id = $1 FOR UPDATE", &[&(t as i64)])
                        .await?
                    else {
                        return Ok(Err(0));
                    };
                    let available: i64 = row.get(0);
                    if available < need_token {
                        return Ok(Err(available));
                    }
                    grants.1 = lease_size(need_token, available);
                }
                if grants.0 > 0 {
                    tx.execute("UPDATE users SET quota = quota - $2 WHERE id = $1", &[&(user as i64), &grants.0])
                        .await?;
                    add_lease(&tx, &node, 'u', user, grants.0).await?;
                }
                if let Some(t) = token {
                    tx.execute(
                        "UPDATE tokens SET remain_quota = remain_quota - $2 WHERE id = $1",
                        &[&(t as i64), &grants.1],
                    )
                    .await?;
                    add_lease(&tx, &node, 't', t, grants.1).await?;
                }
                tx.commit().await?;
                Ok(Ok(grants))
            })
            .await?;
        match granted {
            Ok((u, t)) => {
                self.ledger.grant(Some((user, u)), token.map(|id| (id, t)));
                crate::metrics::get().quota_lease("acquired");
                Ok(Leased::Granted)
            }
            Err(available) => Ok(Leased::Refused { available }),
        }
    }

    /// Give back the unreserved part of every lease untouched for [`IDLE`].
    async fn return_idle(&self) {
        let now = Instant::now();
        let idle = {
            let touched = self.touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            touched.clone()
        };
        let is_idle = |is_user: bool, id: u64| idle.get(&(is_user, id)).is_none_or(|t| now.duration_since(*t) >= IDLE);
        let (mut users, mut tokens) = self.ledger.take_unreserved(is_idle);
        // In id order, as every writer of these rows locks them.
        users.sort_unstable();
        tokens.sort_unstable();
        if users.is_empty() && tokens.is_empty() {
            return;
        }
        let (pg, node) = (self.pg.clone(), self.node.clone());
        let (u2, t2) = (users.clone(), tokens.clone());
        let returned = async move {
            let mut c = pg.pooled().await?;
            let tx = c.transaction().await?;
            for (id, amount) in &u2 {
                tx.execute("UPDATE users SET quota = quota + $2 WHERE id = $1", &[&(*id as i64), amount]).await?;
            }
            for (id, amount) in &t2 {
                tx.execute(
                    "UPDATE tokens SET remain_quota = remain_quota + $2 WHERE id = $1",
                    &[&(*id as i64), amount],
                )
                .await?;
            }
            for (id, amount) in &u2 {
                add_lease(&tx, &node, 'u', *id, -amount).await?;
            }
            for (id, amount) in &t2 {
                add_lease(&tx, &node, 't', *id, -amount).await?;
            }
            tx.commit().await?;
            anyhow::Ok(())
        }
        .await;
        match returned {
            Ok(()) => {
                crate::metrics::get().quota_lease("returned");
                let mut touched = self.touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                touched.retain(|_, t| now.duration_since(*t) < IDLE);
            }
            Err(error) => {
                // Not returned: the node keeps holding it, and tries again.
                tracing::warn!(error = format!("{error:#}"), "returning idle quota leases failed; retrying");
                for (id, amount) in users {
                    self.ledger.grant(Some((id, amount)), None);
                }
                for (id, amount) in tokens {
                    self.ledger.grant(None, Some((id, amount)));
                }
            }
        }
    }

    /// Return everything this node holds (at a clean stop, once its usage is
    /// written).
    pub async fn return_all(&self) -> Result<()> {
        let (pg, node) = (self.pg.clone(), self.node.clone());
        self.pg.call(async move { return_stored(&pg, &node).await }).await
    }
}

/// Add `amount` to this node's lease on an account (creating it).
pub(super) async fn add_lease(
    tx: &tokio_postgres::Transaction<'_>,
    node: &str,
    kind: char,
    id: u64,
    amount: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO quota_leases (node, kind, id, amount) VALUES ($1, $2, $3, $4)
         ON CONFLICT (node, kind, id) DO UPDATE SET amount = quota_leases.amount + EXCLUDED.amount",
        &[&node, &kind.to_string(), &(id as i64), &amount],
    )
    .await?;
    Ok(())
}

/// Put every lease row of `node` back into the balances it came from.
async fn return_stored(pg: &Postgres, node: &str) -> Result<()> {
    let mut c = pg.pooled().await?;
    let tx = c.transaction().await?;
    tx.execute(
        "UPDATE users u SET quota = u.quota + l.amount FROM quota_leases l
         WHERE l.node = $1 AND l.kind = 'u' AND l.id = u.id",
        &[&node],
    )
    .await?;
    tx.execute(
        "UPDATE tokens t SET remain_quota = t.remain_quota + l.amount FROM quota_leases l
         WHERE l.node = $1 AND l.kind = 't' AND l.id = t.id",
        &[&node],
    )
    .await?;
    tx.execute("DELETE FROM quota_leases WHERE node = $1", &[&node]).await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::lease_size;

    #[test]
    fn a_lease_covers_the_need_and_a_bounded_share() {
        assert_eq!(lease_size(0, 1000), 0);
        assert_eq!(lease_size(10, 10), 10, "exactly what is left");
        assert_eq!(lease_size(10, 170), 20, "need + (170 - 10) / 16");
        assert_eq!(lease_size(10, 1_000_000), 640, "at most 64 needs");
        assert_eq!(lease_size(10, 5), 5, "never more than available (the caller checks the need)");
    }
}
