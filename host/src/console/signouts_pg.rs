//! Console sign-outs shared through PostgreSQL (with `database_url`): a
//! session signed out on one node is refused on every node. Table
//! `console_signouts` (id, when the session would have expired) and
//! `NOTIFY wasmgate_signouts, 'id:expiry'`; each node loads the live rows at
//! start and follows the notifications.

use std::sync::{Arc, Weak};

use super::sessions::{Sessions, SignOuts};
use crate::store::postgres::Postgres;

/// The notification channel of sign-outs (payload `id:expiry-ms`).
pub const SIGNOUTS_NOTIFY: &str = "wasmgate_signouts";

/// Sign-outs written to the shared database.
pub struct PgSignOuts {
    pg: Arc<Postgres>,
}

impl PgSignOuts {
    /// Share `sessions`' sign-outs through `pg`: load the live ones, follow
    /// new ones, publish ours.
    pub fn start(pg: &Arc<Postgres>, sessions: &Arc<Sessions>) {
        let weak = Arc::downgrade(sessions);
        pg.spawn(follow(pg.clone(), weak));
        sessions.share_sign_outs(Arc::new(Self { pg: pg.clone() }));
    }
}

impl SignOuts for PgSignOuts {
    fn publish(&self, id: &str, expires_at_ms: u64) {
        let (pg, id) = (self.pg.clone(), id.to_string());
        self.pg.spawn(async move {
            let write = async {
                let mut c = pg.connect().await?;
                let tx = c.transaction().await?;
                let now = crate::store::unix_now_ms() as i64;
                tx.execute("DELETE FROM console_signouts WHERE expires < $1", &[&now]).await?;
                tx.execute(
                    "INSERT INTO console_signouts (id, expires) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    &[&id, &(expires_at_ms as i64)],
                )
                .await?;
                tx.execute("SELECT pg_notify($1, $2)", &[&SIGNOUTS_NOTIFY, &format!("{id}:{expires_at_ms}")]).await?;
                tx.commit().await?;
                anyhow::Ok(())
            };
            if let Err(error) = write.await {
                tracing::warn!(%error, "a console sign-out could not be shared; it holds on this node only");
            }
        });
    }
}

/// Load the live sign-outs, then apply every announced one, reconnecting
/// after failures, until the sessions are gone.
async fn follow(pg: Arc<Postgres>, sessions: Weak<Sessions>) {
    loop {
        let (client, mut rx) = pg.listen(SIGNOUTS_NOTIFY).await;
        let now = crate::store::unix_now_ms() as i64;
        if let Ok(rows) = client.query("SELECT id, expires FROM console_signouts WHERE expires >= $1", &[&now]).await {
            let Some(s) = sessions.upgrade() else { return };
            for row in rows {
                s.forget(row.get::<_, &str>(0), row.get::<_, i64>(1) as u64);
            }
        }
        while let Some(n) = rx.recv().await {
            let Some(s) = sessions.upgrade() else { return };
            if let Some((id, exp)) = n.payload().split_once(':') {
                s.forget(id, exp.parse().unwrap_or(0));
            }
        }
    }
}
