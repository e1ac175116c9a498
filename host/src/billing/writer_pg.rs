//! The usage writer's PostgreSQL side (nodes sharing a database): each
//! batch of log rows goes into `usage_logs` with one multi-row insert, and
//! in the same transaction the charges of the rows actually inserted move
//! the balances — `used_quota` and `request_count` up, this node's quota
//! leases down (see `leases`). Rows are keyed by `(node, id)`, so a batch
//! written again (a retry, or a replay of the journal after a crash) is
//! inserted and charged once. The writer commits a batch here before it
//! commits it to the node's sled store, so the journal is trimmed only once
//! both hold it.

use std::sync::Arc;

use anyhow::Result;

use super::journal::Change;
use super::leases::add_lease;
use super::writer::deltas;
use crate::store::postgres::Postgres;

/// Insert usage rows: `$1` the node, `$2` their ids, `$3` the rows as
/// JSON; returns the ids of the rows not there before.
pub const INSERT_ROWS: &str =
    "INSERT INTO usage_logs (node, id, at_ms, kind, request_id, user_id, token_id, model, quota, row)
     SELECT $1, r.id, (r.row->>'at_ms')::bigint, r.row->>'kind', r.row->>'request_id',
            (r.row->>'user_id')::bigint, (r.row->>'token_id')::bigint, r.row->>'model',
            (r.row->>'quota')::bigint, r.row
     FROM UNNEST($2::bigint[], $3::jsonb[]) AS r(id, row)
     ON CONFLICT (node, id) DO NOTHING RETURNING id";

/// Writes usage batches to the shared database.
pub struct PgSink {
    pg: Arc<Postgres>,
    node: String,
}

impl PgSink {
    /// A sink writing this `node`'s rows.
    pub fn new(pg: &Arc<Postgres>, node: &str) -> Self {
        Self { pg: pg.clone(), node: node.to_string() }
    }

    /// Write the rows of `changes` and their charges in one transaction
    /// (blocking: called from the writer thread).
    pub fn write(&self, changes: &[(u64, Change)]) -> Result<()> {
        let rows: Vec<(i64, serde_json::Value)> = changes
            .iter()
            .filter_map(|(_, c)| match c {
                Change::Row(row) => Some(serde_json::to_value(row.as_ref()).map(|v| (row.id as i64, v))),
                Change::Adjust { .. } | Change::Open(_) => None,
            })
            .collect::<Result<_, _>>()?;
        if rows.is_empty() {
            return Ok(());
        }
        let changes: Vec<(u64, Change)> = changes.to_vec();
        let (pg, node) = (self.pg.clone(), self.node.clone());
        self.pg.block(async move {
            let mut c = pg.pooled().await?;
            let tx = c.transaction().await?;
            let (ids, values): (Vec<i64>, Vec<serde_json::Value>) = rows.into_iter().unzip();
            let inserted = tx.query(INSERT_ROWS, &[&node, &ids, &values]).await?;
            let fresh: std::collections::HashSet<u64> = inserted.iter().map(|r| r.get::<_, i64>(0) as u64).collect();
            // Only rows inserted now charge: a replayed one was charged before.
            let charged: Vec<(u64, Change)> =
                changes.into_iter().filter(|(_, c)| matches!(c, Change::Row(row) if fresh.contains(&row.id))).collect();
            let (users, tokens) = deltas(&charged);
            // Accounts in id order, users before tokens: no deadlock with
            // another node's batch or a lease.
            let mut users: Vec<_> = users.into_iter().collect();
            users.sort_by_key(|(id, _)| *id);
            let mut tokens: Vec<_> = tokens.into_iter().collect();
            tokens.sort_by_key(|(id, _)| *id);
            for (id, d) in &users {
                tx.execute(
                    "UPDATE users SET used_quota = used_quota + $2, request_count = request_count + $3 WHERE id = $1",
                    &[&(*id as i64), &d.used, &(d.requests as i64)],
                )
                .await?;
            }
            for (id, d) in &tokens {
                tx.execute("UPDATE tokens SET used_quota = used_quota + $2 WHERE id = $1", &[&(*id as i64), &d.used])
                    .await?;
            }
            for (id, d) in users.iter().filter(|(_, d)| d.quota != 0) {
                add_lease(&tx, &node, 'u', *id, d.quota).await?;
            }
            for (id, d) in tokens.iter().filter(|(_, d)| d.quota != 0) {
                add_lease(&tx, &node, 't', *id, d.quota).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}
