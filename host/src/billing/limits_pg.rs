//! Requests- and tokens-per-minute limits held across nodes sharing a
//! PostgreSQL database: a limited token's minute window (the same sixty
//! one-second buckets as on one node, see `limits`) is one row of
//! `rate_windows`, read and updated under its row lock by one transaction
//! per admission, on the database's clock. A token's own `concurrency`
//! holds across nodes too, through **slot leases**: a node's row of
//! `in_flight (token_id, node, count)` is how many of the token's slots
//! it holds, and it takes more under the same row lock, only while the
//! sum over every node stays within the limit. A node admits locally while
//! it holds a free slot, so the database is asked about one admission in
//! many; it keeps a few spare slots (1/32 of the limit) after a request
//! ends and gives the rest back at once, and every spare slot after
//! [`IDLE`] without use. Only tokens with an `rpm`, `tpm` or `concurrency`
//! of their own pay database round trips; the gateway-wide defaults
//! (`limits.*`) and open streams stay per node, as guards of one process's
//! resources.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::limits::{Limited, StoredWindow, Window};
use crate::store::postgres::{Postgres, REQUEST_CALL_TIMEOUT};

/// Spare slots unused this long go back to the database.
pub const IDLE: Duration = Duration::from_secs(1);

/// The shared windows and in-flight counts.
pub struct PgLimits {
    pg: Arc<Postgres>,
    node: String,
    /// The slots this node holds, per token.
    slots: Mutex<HashMap<u64, Slots>>,
}

/// A token's slots on this node.
#[derive(Debug, Clone, Copy)]
struct Slots {
    /// Held: this node's `in_flight.count` once every grant and return
    /// has committed.
    held: i64,
    /// Taken by requests in flight here.
    in_use: i64,
    /// Admissions asking the database for a slot right now.
    asking: i64,
    /// The token's limit at its last admission.
    max: i64,
    /// The last admission or release.
    last: Instant,
}

impl Slots {
    fn new(max: i64) -> Self {
        Self { held: 0, in_use: 0, asking: 0, max, last: Instant::now() }
    }

    /// How many spare slots a node keeps for a token limited to `max`.
    fn kept(max: i64) -> i64 {
        max / 32
    }
}

/// One request in flight of a token whose `concurrency` is shared: it goes
/// back to its node's slots when this is dropped.
pub struct SharedSlot {
    limits: Arc<PgLimits>,
    token: u64,
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        let excess = {
            let mut slots = self.limits.slots();
            let Some(s) = slots.get_mut(&self.token) else { return };
            s.in_use = (s.in_use - 1).max(0);
            s.last = Instant::now();
            let excess = s.held - s.in_use - Slots::kept(s.max);
            if excess > 0 {
                s.held -= excess;
            }
            excess
        };
        if excess > 0 {
            self.limits.give_back(vec![(self.token, excess)]);
        }
    }
}

/// Lock `token`'s row of `rate_windows` (creating it): the one lock every
/// node takes before it counts anything of that token.
async fn lock_token(tx: &tokio_postgres::Transaction<'_>, token: u64) -> Result<tokio_postgres::Row> {
    Ok(tx
        .query_one(
            "INSERT INTO rate_windows (token_id, state) VALUES ($1, '{}')
             ON CONFLICT (token_id) DO UPDATE SET token_id = EXCLUDED.token_id
             RETURNING state, floor(extract(epoch FROM clock_timestamp()))::bigint",
            &[&(token as i64)],
        )
        .await?)
}

/// Lock `token`'s window (creating it), apply `f` at the database's second,
/// and store it again when `f` says so.
async fn with_window<T: Send + 'static>(
    pg: &Postgres,
    token: u64,
    f: impl FnOnce(&mut Window, u64) -> (bool, T) + Send + 'static,
) -> Result<T> {
    let mut c = pg.pooled().await?;
    let tx = c.transaction().await?;
    let row = lock_token(&tx, token).await?;
    let stored: StoredWindow = serde_json::from_value(row.get(0)).context("a stored rate window is not valid")?;
    let mut window = Window::from(stored);
    let now = row.get::<_, i64>(1).max(0) as u64;
    window.advance(now);
    let (changed, out) = f(&mut window, now);
    if changed {
        let state = serde_json::to_value(StoredWindow::from(&window))?;
        tx.execute("UPDATE rate_windows SET state = $2 WHERE token_id = $1", &[&(token as i64), &state]).await?;
    }
    tx.commit().await?;
    Ok(out)
}

impl PgLimits {
    /// Limits kept in `pg`; this `node`'s in-flight counts start from
    /// zero (what an earlier life left is dropped), and its spare slots go
    /// back after [`IDLE`].
    pub fn start(pg: &Arc<Postgres>, node: &str) -> Result<Arc<Self>> {
        let (db, me) = (pg.clone(), node.to_string());
        pg.block(async move {
            db.pooled().await?.execute("DELETE FROM in_flight WHERE node = $1", &[&me]).await?;
            Ok(())
        })?;
        let limits = Arc::new(Self { pg: pg.clone(), node: node.to_string(), slots: Mutex::default() });
        let weak = Arc::downgrade(&limits);
        pg.spawn(async move {
            loop {
                tokio::time::sleep(IDLE / 2).await;
                let Some(limits) = weak.upgrade() else { return };
                limits.return_idle();
            }
        });
        Ok(limits)
    }

    /// Give back every slot this node holds (at a clean stop: nothing is in
    /// flight any more).
    pub async fn return_all(&self) -> Result<()> {
        self.slots().clear();
        let (pg, node) = (self.pg.clone(), self.node.clone());
        self.pg
            .call(async move {
                pg.pooled().await?.execute("DELETE FROM in_flight WHERE node = $1", &[&node]).await?;
                Ok(())
            })
            .await
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slots>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take one of `token`'s `max` requests in flight, counted over every
    /// node: from a slot this node holds, else from the database.
    pub async fn occupy(self: &Arc<Self>, token: u64, max: u32) -> Result<Result<SharedSlot, Limited>> {
        let max = i64::from(max);
        // The first admission to miss asks for spare slots too; those that
        // miss while it waits ask for one each, so a burst does not lease
        // a spare per request.
        let want = {
            let mut slots = self.slots();
            let s = slots.entry(token).or_insert(Slots::new(max));
            s.max = max;
            s.last = Instant::now();
            if s.in_use < s.held.min(max) {
                s.in_use += 1;
                return Ok(Ok(SharedSlot { limits: self.clone(), token }));
            }
            s.asking += 1;
            if s.asking == 1 { 1 + Slots::kept(max) } else { 1 }
        };
        let (pg, node) = (self.pg.clone(), self.node.clone());
        let granted = self
            .pg
            .call_within(REQUEST_CALL_TIMEOUT, async move {
                let mut c = pg.pooled().await?;
                let tx = c.transaction().await?;
                lock_token(&tx, token).await?;
                let t = token as i64;
                let used: i64 = tx
                    .query_one("SELECT COALESCE(sum(count), 0)::bigint FROM in_flight WHERE token_id = $1", &[&t])
                    .await?
                    .get(0);
                let free = max - used;
                if free <= 0 {
                    return Ok(0);
                }
                let grant = want.min(free);
                tx.execute(
                    "INSERT INTO in_flight (token_id, node, count) VALUES ($1, $2, $3)
                     ON CONFLICT (token_id, node) DO UPDATE SET count = in_flight.count + EXCLUDED.count",
                    &[&t, &node, &grant],
                )
                .await?;
                tx.commit().await?;
                Ok(grant)
            })
            .await;
        let mut slots = self.slots();
        let s = slots.entry(token).or_insert(Slots::new(max));
        s.asking -= 1;
        let granted = granted?;
        if granted == 0 {
            return Ok(Err(Limited { limit: "concurrency", retry_after: 1 }));
        }
        s.held += granted;
        s.in_use += 1;
        s.last = Instant::now();
        Ok(Ok(SharedSlot { limits: self.clone(), token }))
    }

    /// Give the spare slots of every token idle for [`IDLE`] back.
    fn return_idle(self: &Arc<Self>) {
        let now = Instant::now();
        let mut back = Vec::new();
        self.slots().retain(|token, s| {
            let spare = s.held - s.in_use;
            if spare > 0 && now.duration_since(s.last) >= IDLE {
                s.held -= spare;
                back.push((*token, spare));
            }
            s.held > 0 || s.asking > 0
        });
        if !back.is_empty() {
            self.give_back(back);
        }
    }

    /// Take `(token, n)` slots off this node's rows, in the background (on
    /// a failure they are counted as held again, and retried when idle).
    fn give_back(self: &Arc<Self>, mut back: Vec<(u64, i64)>) {
        back.sort_unstable();
        let (pg, node) = (self.pg.clone(), self.node.clone());
        let weak = Arc::downgrade(self);
        self.pg.spawn(async move {
            let returned = async {
                let mut c = pg.pooled().await?;
                let tx = c.transaction().await?;
                for (token, n) in &back {
                    tx.execute(
                        "UPDATE in_flight SET count = GREATEST(count - $3, 0) WHERE token_id = $1 AND node = $2",
                        &[&(*token as i64), &node, n],
                    )
                    .await?;
                }
                tx.commit().await?;
                anyhow::Ok(())
            };
            if let Err(error) = returned.await {
                tracing::warn!(error = format!("{error:#}"), "returning shared in-flight slots failed; retrying");
                if let Some(limits) = weak.upgrade() {
                    let mut slots = limits.slots();
                    for (token, n) in back {
                        let s = slots.entry(token).or_insert(Slots::new(0));
                        s.held += n;
                    }
                }
            }
        });
    }

    /// Admit one request of about `tokens` tokens for `token` under its
    /// `rpm` and `tpm`: counted on every node's behalf, or refused.
    pub async fn admit(
        &self,
        token: u64,
        rpm: Option<u32>,
        tpm: Option<u64>,
        tokens: u64,
    ) -> Result<Result<(), Limited>> {
        let pg = self.pg.clone();
        self.pg
            .call_within(REQUEST_CALL_TIMEOUT, async move {
                with_window(&pg, token, move |w, now| match w.check_rates(rpm, tpm, tokens) {
                    Ok(()) => {
                        w.add(now, 1, i64::try_from(tokens).unwrap_or(i64::MAX));
                        (true, Ok(()))
                    }
                    Err(limited) => (false, Err(limited)),
                })
                .await
            })
            .await
    }

    /// Correct the token count of an admitted request by `delta` (in the
    /// background; a failure only loosens the limit for this minute).
    pub fn correct(&self, token: u64, delta: i64) {
        if delta == 0 {
            return;
        }
        let pg = self.pg.clone();
        self.pg.spawn(async move {
            let corrected = with_window(&pg, token, move |w, now| {
                w.add(now, 0, delta);
                (true, ())
            })
            .await;
            if let Err(error) = corrected {
                tracing::warn!(
                    error = format!("{error:#}"),
                    token,
                    "correcting a shared tokens-per-minute window failed"
                );
            }
        });
    }
}
