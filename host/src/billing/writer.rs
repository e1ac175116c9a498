//! The billing writer: log rows and balance changes are queued by requests
//! and written off the request path, in batches. Each batch is **one sled
//! transaction** over the `users`, `tokens` and `logs` trees, then one
//! flush: a charge is on disk exactly when its log row is. After `kill -9`
//! the last unflushed batch is gone as a whole — its rows and its charges —
//! so every user's `used_quota` always equals the sum of their logged
//! charges, and a row id is written once (re-running a transaction rewrites
//! the same keys). A clean stop flushes the queue first.

use std::collections::HashMap;
use std::time::Duration;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tokio::sync::{mpsc, oneshot};

use super::accounts::{TokenRecord, UserRecord};
use super::logs::{LogKind, LogRow};

/// One queued change.
pub enum Op {
    /// A log row; `consume` rows also move balances.
    Row(Box<LogRow>),
    /// An admin's change of a balance by `delta`.
    Adjust {
        /// User whose quota changes.
        user: Option<u64>,
        /// Token whose own quota changes.
        token: Option<u64>,
        /// Amount.
        delta: i64,
    },
    /// Acknowledge once everything queued before is on disk.
    Flush(oneshot::Sender<()>),
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most ops per transaction.
    pub max_ops: usize,
    /// Longest an op waits for companions.
    pub max_wait: Duration,
}

/// Handle for queueing.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Op>,
}

impl Writer {
    /// Start the writer task over the three trees.
    pub fn spawn(users: sled::Tree, tokens: sled::Tree, logs: sled::Tree, limits: BatchLimits) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, users, tokens, logs, limits));
        Self { tx }
    }

    /// Queue `op`.
    pub fn send(&self, op: Op) {
        if self.tx.send(op).is_err() {
            tracing::error!("billing writer stopped; a usage record was not queued");
        }
    }

    /// Wait until everything queued so far is on disk.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        self.send(Op::Flush(ack));
        let _ = done.await;
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Op>,
    users: sled::Tree,
    tokens: sled::Tree,
    logs: sled::Tree,
    limits: BatchLimits,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + limits.max_wait;
        while batch.len() < limits.max_ops && !matches!(batch.last(), Some(Op::Flush(_))) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(op)) => batch.push(op),
                Ok(None) | Err(_) => break,
            }
        }
        let (users, tokens, logs) = (users.clone(), tokens.clone(), logs.clone());
        let acks = tokio::task::spawn_blocking(move || write(&users, &tokens, &logs, batch)).await;
        for ack in acks.unwrap_or_default() {
            let _ = ack.send(());
        }
    }
}

#[derive(Default)]
struct Deltas {
    quota: i64,
    used: i64,
    requests: u64,
}

type TxResult<T> = Result<T, ConflictableTransactionError<String>>;

fn update<T: serde::de::DeserializeOwned + serde::Serialize>(
    tree: &TransactionalTree,
    id: u64,
    f: impl FnOnce(&mut T),
) -> TxResult<()> {
    let Some(raw) = tree.get(id.to_be_bytes())? else { return Ok(()) };
    let Ok(mut rec) = serde_json::from_slice::<T>(&raw) else { return Ok(()) };
    f(&mut rec);
    let bytes = serde_json::to_vec(&rec).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
    tree.insert(&id.to_be_bytes(), bytes)?;
    Ok(())
}

/// Write one batch; returns the flush acknowledgements to send.
fn write(users: &sled::Tree, tokens: &sled::Tree, logs: &sled::Tree, batch: Vec<Op>) -> Vec<oneshot::Sender<()>> {
    let mut rows = Vec::new();
    let mut user_deltas: HashMap<u64, Deltas> = HashMap::new();
    let mut token_deltas: HashMap<u64, Deltas> = HashMap::new();
    let mut acks = Vec::new();
    for op in batch {
        match op {
            Op::Row(row) => {
                if row.kind == LogKind::Consume {
                    if let Some(u) = row.user_id {
                        let d = user_deltas.entry(u).or_default();
                        d.quota -= row.quota;
                        d.used += row.quota;
                        d.requests += 1;
                    }
                    if let Some(t) = row.token_id {
                        let d = token_deltas.entry(t).or_default();
                        if row.token_limited {
                            d.quota -= row.quota;
                        }
                        d.used += row.quota;
                    }
                }
                rows.push(row);
            }
            Op::Adjust { user, token, delta } => {
                if let Some(u) = user {
                    user_deltas.entry(u).or_default().quota += delta;
                }
                if let Some(t) = token {
                    token_deltas.entry(t).or_default().quota += delta;
                }
            }
            Op::Flush(ack) => acks.push(ack),
        }
    }
    if rows.is_empty() && user_deltas.is_empty() && token_deltas.is_empty() {
        return acks;
    }
    let result = (users, tokens, logs).transaction(|(u, t, l)| {
        for row in &rows {
            let bytes =
                serde_json::to_vec(row.as_ref()).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            l.insert(&row.id.to_be_bytes(), bytes)?;
        }
        for (id, d) in &user_deltas {
            update::<UserRecord>(u, *id, |r| {
                r.quota += d.quota;
                r.used_quota += d.used;
                r.request_count += d.requests;
            })?;
        }
        for (id, d) in &token_deltas {
            update::<TokenRecord>(t, *id, |r| {
                r.remain_quota += d.quota;
                r.used_quota += d.used;
            })?;
        }
        Ok(())
    });
    match result.map_err(|e| format!("{e:?}")).and_then(|()| logs.flush().map(|_| ()).map_err(|e| e.to_string())) {
        Ok(()) => {}
        Err(error) => tracing::error!(%error, rows = rows.len(), "writing usage logs and charges failed"),
    }
    acks
}
