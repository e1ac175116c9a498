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
use super::writer::{Charge, Sums, add_charge};
use crate::store::postgres::Postgres;
use tokio_postgres::types::Json;

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
        // Each row serialized once, straight to the JSON text the insert
        // sends, and only what the balances need kept beside it.
        let mut ids = Vec::new();
        let mut values = Vec::new();
        let mut charges = Vec::new();
        for (_, change) in changes {
            if let Change::Row(row) = change {
                ids.push(row.id as i64);
                values.push(Json(serde_json::value::to_raw_value(row.as_ref())?));
                charges.extend(Charge::of(row).map(|c| (row.id, c)));
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let (pg, node) = (self.pg.clone(), self.node.clone());
        self.pg.block(async move {
            let mut c = pg.pooled().await?;
            let tx = c.transaction().await?;
            let inserted = tx.query(INSERT_ROWS, &[&node, &ids, &values]).await?;
            let fresh: std::collections::HashSet<u64> = inserted.iter().map(|r| r.get::<_, i64>(0) as u64).collect();
            // Only rows inserted now charge: a replayed one was charged before.
            let mut sums = Sums::default();
            for (_, charge) in charges.into_iter().filter(|(id, _)| fresh.contains(id)) {
                add_charge(&mut sums, charge);
            }
            let (users, tokens) = sums;
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
