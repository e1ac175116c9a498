//! Requests- and tokens-per-minute limits held across nodes sharing a
//! PostgreSQL database: a limited token's minute window (the same sixty
//! one-second buckets as on one node, see `limits`) is one row of
//! `rate_windows`, read and updated under its row lock by one transaction
//! per admission, on the database's clock. A token's own `concurrency`
//! holds across nodes too: each node counts its requests in flight in a
//! row of `in_flight (token_id, node, count)`, and an admission sums the
//! rows under the same row lock. Only tokens with an `rpm`, `tpm` or
//! `concurrency` of their own pay the round trips; the gateway-wide
//! defaults (`limits.*`) and open streams stay per node, as guards of one
//! process's resources.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::limits::{Limited, StoredWindow, Window};
use crate::store::postgres::Postgres;

/// The shared windows and in-flight counts.
pub struct PgLimits {
    pg: Arc<Postgres>,
    node: String,
}

/// One request in flight of a token whose `concurrency` is shared: its
/// node's count goes down when this is dropped.
pub struct SharedSlot {
    limits: Arc<PgLimits>,
    token: u64,
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        let (pg, node, token) = (self.limits.pg.clone(), self.limits.node.clone(), self.token as i64);
        self.limits.pg.spawn(async move {
            let released = async {
                let c = pg.pooled().await?;
                c.execute(
                    "UPDATE in_flight SET count = GREATEST(count - 1, 0) WHERE token_id = $1 AND node = $2",
                    &[&token, &node],
                )
                .await?;
                anyhow::Ok(())
            };
            if let Err(error) = released.await {
                tracing::warn!(error = format!("{error:#}"), token, "releasing a shared in-flight slot failed");
            }
        });
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
    /// zero (what an earlier life left is dropped).
    pub fn start(pg: &Arc<Postgres>, node: &str) -> Result<Arc<Self>> {
        let (db, me) = (pg.clone(), node.to_string());
        pg.block(async move {
            db.pooled().await?.execute("DELETE FROM in_flight WHERE node = $1", &[&me]).await?;
            Ok(())
        })?;
        Ok(Arc::new(Self { pg: pg.clone(), node: node.to_string() }))
    }

    /// Take one of `token`'s `max` requests in flight, counted over every
    /// node.
    pub async fn occupy(self: &Arc<Self>, token: u64, max: u32) -> Result<Result<SharedSlot, Limited>> {
        let (pg, node) = (self.pg.clone(), self.node.clone());
        let admitted = self
            .pg
            .call(async move {
                let mut c = pg.pooled().await?;
                let tx = c.transaction().await?;
                lock_token(&tx, token).await?;
                let t = token as i64;
                let used: i64 = tx
                    .query_one("SELECT COALESCE(sum(count), 0)::bigint FROM in_flight WHERE token_id = $1", &[&t])
                    .await?
                    .get(0);
                if used >= i64::from(max) {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO in_flight (token_id, node, count) VALUES ($1, $2, 1)
                     ON CONFLICT (token_id, node) DO UPDATE SET count = in_flight.count + 1",
                    &[&t, &node],
                )
                .await?;
                tx.commit().await?;
                Ok(true)
            })
            .await?;
        Ok(if admitted {
            Ok(SharedSlot { limits: self.clone(), token })
        } else {
            Err(Limited { limit: "concurrency", retry_after: 1 })
        })
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
            .call(async move {
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
