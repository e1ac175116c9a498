//! Requests- and tokens-per-minute limits held across nodes sharing a
//! PostgreSQL database: a limited token's minute window (the same sixty
//! one-second buckets as on one node, see `limits`) is one row of
//! `rate_windows`, read and updated under its row lock by one transaction
//! per admission, on the database's clock. Only tokens with an `rpm` or
//! `tpm` pay the round trips; requests in flight and open streams stay
//! limited per node.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::limits::{Limited, StoredWindow, Window};
use crate::store::postgres::Postgres;

/// The shared windows.
pub struct PgLimits {
    pg: Arc<Postgres>,
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
    let row = tx
        .query_one(
            "INSERT INTO rate_windows (token_id, state) VALUES ($1, '{}')
             ON CONFLICT (token_id) DO UPDATE SET token_id = EXCLUDED.token_id
             RETURNING state, floor(extract(epoch FROM clock_timestamp()))::bigint",
            &[&(token as i64)],
        )
        .await?;
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
    /// Limits kept in `pg`.
    pub fn new(pg: &Arc<Postgres>) -> Self {
        Self { pg: pg.clone() }
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
