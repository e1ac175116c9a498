//! The usage writer's PostgreSQL side (nodes sharing a database): each
//! batch of log rows goes into `usage_logs` with one `COPY`, and
//! in the same transaction the charges of the rows actually inserted move
//! the balances — `used_quota` and `request_count` up, this node's quota
//! leases down (see `leases`). Rows are keyed by `(node, id)`, so a batch
//! written again (a retry, or a replay of the journal after a crash) is
//! inserted and charged once. The writer commits a batch here before it
//! commits it to the node's sled store, so the journal is trimmed only once
//! both hold it.
//!
//! A row's fields are the table's columns, streamed in PostgreSQL's binary
//! copy format (a retried batch: one binary array per column, see
//! [`LogColumns`]): the database parses no JSON and walks no document per
//! row (as JSONB it spent about three times the CPU per row).

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Result;

use super::journal::Change;
use super::leases::add_lease;
use super::logs::LogRow;
use super::writer::{Charge, Sums, add_charge};
use crate::store::postgres::Postgres;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

/// The `usage_logs` columns a row fills, in [`LogColumns`]' order after
/// the node.
macro_rules! columns {
    () => {
        "node, id, at_ms, kind, request_id, user_id, token_id, token_name, \"group\", channel_id, model,
         upstream_model, prompt_tokens, completion_tokens, cached_tokens, quota, token_limited, estimated,
         latency_ms, ttft_ms, stream, status, error_kind, client_disconnected, interrupted, upstream_cut, limited,
         plugin, plugin_sha256, note"
    };
}

/// Their types, in that order.
const COLUMN_TYPES: [Type; 30] = [
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::BOOL,
    Type::BOOL,
    Type::INT8,
    Type::INT8,
    Type::BOOL,
    Type::INT4,
    Type::TEXT,
    Type::BOOL,
    Type::BOOL,
    Type::BOOL,
    Type::BOOL,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

/// Rows none of which is there yet, streamed in PostgreSQL's binary copy
/// format: about half the database's CPU per row of a multi-row insert
/// from one array per column (which unnests the arrays into a tuple store
/// first); fails with a unique violation if one of the rows is there.
const COPY_NEW: &str = concat!("COPY usage_logs (", columns!(), ") FROM STDIN (FORMAT binary)");

/// Insert the rows not there yet (`$1` the node, then one array per
/// column in [`LogColumns`]' order); returns their ids. A speculative
/// insertion per row, so only for a batch that may have been written
/// before (a retry, a journal replay).
const INSERT_MISSING: &str = concat!(
    "INSERT INTO usage_logs (",
    columns!(),
    ")
     SELECT $1, * FROM UNNEST($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
         $8::text[], $9::text[], $10::bigint[], $11::text[], $12::text[], $13::bigint[], $14::bigint[],
         $15::bigint[], $16::bigint[], $17::bool[], $18::bool[], $19::bigint[], $20::bigint[], $21::bool[],
         $22::int[], $23::text[], $24::bool[], $25::bool[], $26::bool[], $27::bool[], $28::text[], $29::text[],
         $30::text[])
     ON CONFLICT (node, id) DO NOTHING RETURNING id"
);

/// `node`, then each of `columns`' vectors (or, with `[i]`, their `i`-th
/// values), in the order of [`COLUMN_TYPES`].
macro_rules! values {
    ($columns:ident, $node:expr $(, [$i:expr])?) => {
        [
            $node,
            &$columns.id$([$i])?,
            &$columns.at_ms$([$i])?,
            &$columns.kind$([$i])?,
            &$columns.request_id$([$i])?,
            &$columns.user_id$([$i])?,
            &$columns.token_id$([$i])?,
            &$columns.token_name$([$i])?,
            &$columns.group$([$i])?,
            &$columns.channel_id$([$i])?,
            &$columns.model$([$i])?,
            &$columns.upstream_model$([$i])?,
            &$columns.prompt_tokens$([$i])?,
            &$columns.completion_tokens$([$i])?,
            &$columns.cached_tokens$([$i])?,
            &$columns.quota$([$i])?,
            &$columns.token_limited$([$i])?,
            &$columns.estimated$([$i])?,
            &$columns.latency_ms$([$i])?,
            &$columns.ttft_ms$([$i])?,
            &$columns.stream$([$i])?,
            &$columns.status$([$i])?,
            &$columns.error_kind$([$i])?,
            &$columns.client_disconnected$([$i])?,
            &$columns.interrupted$([$i])?,
            &$columns.upstream_cut$([$i])?,
            &$columns.limited$([$i])?,
            &$columns.plugin$([$i])?,
            &$columns.plugin_sha256$([$i])?,
            &$columns.note$([$i])?,
        ]
    };
}

/// A batch of usage rows as one array per `usage_logs` column.
#[derive(Default)]
pub struct LogColumns<'a> {
    id: Vec<i64>,
    at_ms: Vec<i64>,
    kind: Vec<&'static str>,
    request_id: Vec<&'a str>,
    user_id: Vec<Option<i64>>,
    token_id: Vec<Option<i64>>,
    token_name: Vec<&'a str>,
    group: Vec<&'a str>,
    channel_id: Vec<i64>,
    model: Vec<&'a str>,
    upstream_model: Vec<&'a str>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cached_tokens: Vec<i64>,
    quota: Vec<i64>,
    token_limited: Vec<bool>,
    estimated: Vec<bool>,
    latency_ms: Vec<i64>,
    ttft_ms: Vec<Option<i64>>,
    stream: Vec<bool>,
    status: Vec<i32>,
    error_kind: Vec<Option<&'a str>>,
    client_disconnected: Vec<bool>,
    interrupted: Vec<bool>,
    upstream_cut: Vec<bool>,
    limited: Vec<bool>,
    plugin: Vec<&'a str>,
    plugin_sha256: Vec<&'a str>,
    note: Vec<Option<&'a str>>,
}

/// A counter as a `BIGINT` (saturating: none comes near 2^63).
fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl<'a> LogColumns<'a> {
    /// Add `row`.
    pub fn push(&mut self, row: &'a LogRow) {
        // Destructured so that a field added to `LogRow` does not compile
        // until it has a column here (and in the migrations).
        let LogRow {
            id,
            at_ms,
            kind,
            request_id,
            user_id,
            token_id,
            token_name,
            group,
            channel_id,
            model,
            upstream_model,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            quota,
            token_limited,
            estimated,
            latency_ms,
            ttft_ms,
            stream,
            status,
            error_kind,
            client_disconnected,
            interrupted,
            upstream_cut,
            limited,
            plugin,
            plugin_sha256,
            note,
        } = row;
        self.id.push(big(*id));
        self.at_ms.push(big(*at_ms));
        self.kind.push(kind.as_str());
        self.request_id.push(request_id);
        self.user_id.push(user_id.map(big));
        self.token_id.push(token_id.map(big));
        self.token_name.push(token_name);
        self.group.push(group);
        self.channel_id.push(big(*channel_id));
        self.model.push(model);
        self.upstream_model.push(upstream_model);
        self.prompt_tokens.push(big(*prompt_tokens));
        self.completion_tokens.push(big(*completion_tokens));
        self.cached_tokens.push(big(*cached_tokens));
        self.quota.push(*quota);
        self.token_limited.push(*token_limited);
        self.estimated.push(*estimated);
        self.latency_ms.push(big(*latency_ms));
        self.ttft_ms.push(ttft_ms.map(big));
        self.stream.push(*stream);
        self.status.push(i32::from(*status));
        self.error_kind.push(error_kind.as_deref());
        self.client_disconnected.push(*client_disconnected);
        self.interrupted.push(*interrupted);
        self.upstream_cut.push(*upstream_cut);
        self.limited.push(*limited);
        self.plugin.push(plugin);
        self.plugin_sha256.push(plugin_sha256);
        self.note.push(note.as_deref());
    }

    /// The insert's parameters for `node`'s rows (one array per column).
    fn params<'p>(&'p self, node: &'p &'p str) -> [&'p (dyn ToSql + Sync); 30] {
        values!(self, node)
    }

    /// Row `i`'s values for `node`, in [`COLUMN_TYPES`]' order.
    fn row<'p>(&'p self, node: &'p &'p str, i: usize) -> [&'p (dyn ToSql + Sync); 30] {
        values!(self, node, [i])
    }

    /// Insert the rows as `node`'s, none of them there yet ([`COPY_NEW`]):
    /// fails (with `unique_violation`) if one is.
    pub async fn insert_new(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        node: &str,
    ) -> Result<(), tokio_postgres::Error> {
        let sink = tx.copy_in(COPY_NEW).await?;
        let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &COLUMN_TYPES));
        for i in 0..self.id.len() {
            writer.as_mut().write(&self.row(&node, i)).await?;
        }
        writer.finish().await.map(|_| ())
    }

    /// Insert the rows as `node`'s (those already there are left as they
    /// are); returns the ids of the rows inserted now.
    pub async fn insert_missing(&self, tx: &deadpool_postgres::Transaction<'_>, node: &str) -> Result<Vec<u64>> {
        let statement = tx.prepare_cached(INSERT_MISSING).await?;
        let rows = tx.query(&statement, &self.params(&node)).await?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }
}

impl<'a> FromIterator<&'a LogRow> for LogColumns<'a> {
    fn from_iter<I: IntoIterator<Item = &'a LogRow>>(rows: I) -> Self {
        let mut columns = Self::default();
        for row in rows {
            columns.push(row);
        }
        columns
    }
}

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
        // Copies of the rows: the insert runs on the database thread.
        let rows: Vec<Box<LogRow>> = changes
            .iter()
            .filter_map(|(_, change)| if let Change::Row(row) = change { Some(row.clone()) } else { None })
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let charges: Vec<(u64, Charge)> = rows.iter().filter_map(|row| Charge::of(row).map(|c| (row.id, c))).collect();
        let (pg, node) = (self.pg.clone(), self.node.clone());
        self.pg.block(async move {
            let columns: LogColumns<'_> = rows.iter().map(|row| &**row).collect();
            let mut c = pg.pooled().await?;
            // A batch is new but for a retry or a replay after a crash:
            // inserted as new, and only when that finds one of its rows,
            // again keeping the rows already there.
            let mut tx = c.transaction().await?;
            let fresh: HashSet<u64> = match columns.insert_new(&tx, &node).await {
                Ok(()) => rows.iter().map(|row| row.id).collect(),
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    tx.rollback().await?;
                    tx = c.transaction().await?;
                    columns.insert_missing(&tx, &node).await?.into_iter().collect()
                }
                Err(e) => return Err(e.into()),
            };
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
            let charge_user = tx
                .prepare_cached(
                    "UPDATE users SET used_quota = used_quota + $2, request_count = request_count + $3 WHERE id = $1",
                )
                .await?;
            for (id, d) in &users {
                tx.execute(&charge_user, &[&(*id as i64), &d.used, &(d.requests as i64)]).await?;
            }
            let charge_token =
                tx.prepare_cached("UPDATE tokens SET used_quota = used_quota + $2 WHERE id = $1").await?;
            for (id, d) in &tokens {
                tx.execute(&charge_token, &[&(*id as i64), &d.used]).await?;
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
