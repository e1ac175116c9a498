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
//!
//! A busy account's lease is sized to its recent spend on this node: each
//! lease aims at [`HORIZON`] of it, and a lease that falls below half of
//! that is topped up in the background, off the request path. So a node
//! keeps admitting an account's requests through a database outage for
//! about half a horizon or more of its usual traffic (see
//! `docs/deployment.md`), and the database is asked rarely.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::ledger::Ledger;
use crate::store::postgres::{Postgres, REQUEST_CALL_TIMEOUT};

/// An account untouched this long gives its unreserved lease back.
pub const IDLE: Duration = Duration::from_secs(1);

/// How much of an account's recent spend on this node a lease aims to hold.
pub const HORIZON: Duration = Duration::from_secs(60);

/// The span over which an account's spend is summed to estimate its rate.
const WINDOW: Duration = Duration::from_secs(5);

/// After a background top-up failed, the next waits this long.
const RETRY: Duration = Duration::from_secs(1);

/// How much to lease when `need` is missing, the database holds
/// `available` and the account spent `recent` here over the last
/// [`HORIZON`] (estimated): the need plus a share of the rest — the larger
/// of 63 more needs and `recent`, but never more than 1/16 of what is left
/// — so a busy account rarely waits for the database and a small balance is
/// not hoarded by one node.
pub fn lease_size(need: i64, available: i64, recent: i64) -> i64 {
    if need <= 0 {
        return 0;
    }
    let wanted = need.saturating_mul(63).max(recent);
    let extra = (available.saturating_sub(need) / 16).min(wanted).max(0);
    need.saturating_add(extra).min(available)
}

/// What this node saw of one account lately.
#[derive(Clone, Copy)]
struct Activity {
    /// The last admission or lease.
    last: Instant,
    /// Start of the current spend window.
    window_start: Instant,
    /// Reserved in the current window.
    spent: i64,
    /// Reserved in the window before it (0 if that was not the last one).
    previous: i64,
    /// A background top-up is running.
    topping_up: bool,
    /// No background top-up before this.
    not_before: Instant,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self { last: now, window_start: now, spent: 0, previous: 0, topping_up: false, not_before: now }
    }

    /// Count `amount` spent at `now`.
    fn spend(&mut self, now: Instant, amount: i64) {
        self.last = now;
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= WINDOW {
            self.previous = if elapsed < WINDOW * 2 { self.spent } else { 0 };
            self.spent = 0;
            self.window_start = now;
        }
        self.spent = self.spent.saturating_add(amount.max(0));
    }

    /// The spend over [`HORIZON`] at the recent rate: the larger of the
    /// last full window's and the current one's (over at least a second).
    fn recent(&self, now: Instant) -> i64 {
        let scale = |amount: i64, over: Duration| {
            (amount as i128 * HORIZON.as_millis() as i128 / over.as_millis().max(1) as i128) as i64
        };
        let current = now.duration_since(self.window_start).max(Duration::from_secs(1));
        scale(self.spent, current).max(scale(self.previous, WINDOW))
    }
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
    /// What each account (`(is_user, id)`) did lately on this node.
    touched: Mutex<HashMap<(bool, u64), Activity>>,
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

    fn activity(&self) -> std::sync::MutexGuard<'_, HashMap<(bool, u64), Activity>> {
        self.touched.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request of `user` (through `token`) reserving `amount` is being
    /// admitted (or a lease taken, `amount` 0): keep their leases a while
    /// longer, and count the spend.
    pub fn used(&self, user: u64, token: Option<u64>, amount: i64) {
        let mut t = self.activity();
        let now = Instant::now();
        t.entry((true, user)).or_insert_with(|| Activity::new(now)).spend(now, amount);
        if let Some(token) = token {
            t.entry((false, token)).or_insert_with(|| Activity::new(now)).spend(now, amount);
        }
    }

    /// After a reservation of `amount` passed: when what the node still
    /// holds for the user (or the limited token) is below half of what its
    /// recent spend asks for, lease more in the background (one top-up per
    /// account at a time; after a failure, not again for [`RETRY`]).
    pub fn top_up_if_low(self: &Arc<Self>, user: u64, token: Option<u64>, token_limited: bool, amount: i64) {
        if amount <= 0 {
            return;
        }
        let now = Instant::now();
        let low = |is_user: bool, id: u64, held: i64| {
            let mut t = self.activity();
            let Some(a) = t.get_mut(&(is_user, id)) else { return false };
            let due = !a.topping_up && now >= a.not_before && held < a.recent(now) / 2;
            a.topping_up |= due;
            due
        };
        let user_low = low(true, user, self.ledger.user(user).unreserved());
        let token = token.filter(|_| token_limited);
        let token_low = token.is_some_and(|t| low(false, t, self.ledger.token(t).unreserved()));
        if !user_low && !token_low {
            return;
        }
        let me = self.clone();
        self.pg.spawn(async move {
            let need = |low: bool| if low { amount } else { 0 };
            let result = me.acquire(user, need(user_low), token, need(token_low)).await;
            let failed = result.is_err();
            if let Err(error) = result {
                tracing::debug!(error = format!("{error:#}"), "topping up a quota lease failed");
            }
            let now = Instant::now();
            let mut t = me.activity();
            for (low, key) in [(user_low, Some((true, user))), (token_low, token.map(|t| (false, t)))] {
                if let (true, Some(a)) = (low, key.and_then(|k| t.get_mut(&k))) {
                    a.topping_up = false;
                    if failed {
                        a.not_before = now + RETRY;
                    }
                }
            }
        });
    }

    /// Lease enough for a reservation of `need` more than the node holds:
    /// `need_user` from the user, `need_token` from the token (0: none).
    pub async fn acquire(&self, user: u64, need_user: i64, token: Option<u64>, need_token: i64) -> Result<Leased> {
        self.used(user, token, 0);
        let (pg, node) = (self.pg.clone(), self.node.clone());
        let token = token.filter(|_| need_token > 0);
        let (recent_user, recent_token) = {
            let (t, now) = (self.activity(), Instant::now());
            let recent = |key| t.get(&key).map_or(0, |a: &Activity| a.recent(now));
            (recent((true, user)), token.map_or(0, |id| recent((false, id))))
        };
        let granted = self
            .pg
            .call_within(REQUEST_CALL_TIMEOUT, async move {
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
                    grants.0 = lease_size(need_user, available, recent_user);
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
                    grants.1 = lease_size(need_token, available, recent_token);
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
        let idle = { self.activity().clone() };
        let is_idle =
            |is_user: bool, id: u64| idle.get(&(is_user, id)).is_none_or(|a| now.duration_since(a.last) >= IDLE);
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
                self.activity().retain(|_, a| now.duration_since(a.last) < IDLE);
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
    use super::{Activity, lease_size};
    use std::time::{Duration, Instant};

    #[test]
    fn a_lease_covers_the_need_and_a_bounded_share() {
        assert_eq!(lease_size(0, 1000, 0), 0);
        assert_eq!(lease_size(10, 10, 0), 10, "exactly what is left");
        assert_eq!(lease_size(10, 170, 0), 20, "need + (170 - 10) / 16");
        assert_eq!(lease_size(10, 1_000_000, 0), 640, "at least 64 needs");
        assert_eq!(lease_size(10, 5, 0), 5, "never more than available (the caller checks the need)");
        assert_eq!(lease_size(10, 1_000_000, 30_000), 30_010, "the recent spend when it is larger");
        assert_eq!(lease_size(10, 160_010, 1_000_000), 10_010, "but never more than 1/16 of the rest");
    }

    #[test]
    fn recent_spend_is_the_rate_over_a_horizon() {
        let start = Instant::now();
        let mut a = Activity::new(start);
        a.spend(start, 100);
        assert_eq!(a.recent(start), 100 * 60, "under a second: counted as a second");
        a.spend(start + Duration::from_secs(2), 100);
        assert_eq!(a.recent(start + Duration::from_secs(2)), 200 * 30, "200 in 2 s");
        a.spend(start + Duration::from_secs(6), 50);
        let now = start + Duration::from_secs(10);
        assert_eq!(a.recent(now), 200 * 12, "the last full window's rate when higher");
        let later = start + Duration::from_secs(20);
        a.spend(later, 10);
        assert_eq!(a.recent(later), 10 * 60, "an old window does not count");
    }
}
