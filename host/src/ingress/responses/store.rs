//! Stored responses (`store: true`): the `response` object and the
//! conversation a `previous_response_id` continues, kept for
//! `responses.retention_secs`, readable only by the token that created
//! them — in the sled tree `responses`, or, when nodes share a database,
//! in its table `responses` (so a conversation continues on any node).
//! Every call here is blocking (run it off the workers), except
//! [`ResponseStore::put_later`].

use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::billing::Caller;
use crate::store::postgres::Postgres;
use crate::store::{Store, unix_now};

const TREE: &str = "responses";

/// One stored response.
#[derive(Serialize, Deserialize)]
pub struct Stored {
    /// Who may read it ([`owner`]).
    pub owner: String,
    /// Unix seconds after which it is gone.
    pub expires_at: u64,
    /// The conversation up to and including this response's answer.
    pub conversation: Vec<Value>,
    /// The `response` object.
    pub response: Value,
}

/// The owner key of `caller`'s token.
pub fn owner(caller: &Caller) -> String {
    match (&caller.account, caller.config_token) {
        (Some(account), _) => format!("token:{}", account.token.id),
        (None, Some(index)) => format!("config:{index}"),
        (None, None) => "anonymous".into(),
    }
}

/// Where stored responses are kept.
#[derive(Clone)]
pub enum ResponseStore {
    /// This node's sled store.
    Sled(Store),
    /// The database the nodes share.
    Pg(Arc<Postgres>),
}

impl ResponseStore {
    /// Keep `record` under `id`.
    pub fn put(&self, id: &str, record: &Stored) -> Result<()> {
        match self {
            // On disk before the client is answered: a crash must not lose
            // a response the client was told is stored.
            Self::Sled(store) => Ok(sled_insert(store, id, record)?.flush().map(|_| ())?),
            Self::Pg(pg) => {
                let write = pg_put(pg.clone(), id.to_string(), record)?;
                pg.block(write)
            }
        }
    }

    /// [`Self::put`] without waiting for the disk or the database (from a
    /// stream's end, on a request worker): readable at once on this node,
    /// flushed on a blocking thread; a failure is logged.
    pub fn put_later(&self, id: String, record: Stored) {
        let failed = |error: anyhow::Error, id: &str| {
            tracing::error!(error = format!("{error:#}"), %id, "a response could not be stored");
        };
        match self {
            Self::Sled(store) => match sled_insert(store, &id, &record) {
                Ok(tree) => {
                    tokio::task::spawn_blocking(move || tree.flush().map_err(|e| failed(e.into(), &id)));
                }
                Err(error) => failed(error, &id),
            },
            Self::Pg(pg) => match pg_put(pg.clone(), id.clone(), &record) {
                Ok(write) => pg.spawn(async move { write.await.unwrap_or_else(|e| failed(e, &id)) }),
                Err(error) => failed(error, &id),
            },
        }
    }

    /// The response `id` if `owner` created it and it has not expired.
    pub fn get(&self, id: &str, owner: &str) -> Result<Option<Stored>> {
        let record: Option<Stored> = match self {
            Self::Sled(store) => match store.tree(TREE)?.get(id.as_bytes())? {
                Some(bytes) => Some(serde_json::from_slice(&bytes)?),
                None => None,
            },
            Self::Pg(pg) => {
                let (db, id) = (pg.clone(), id.to_string());
                let value: Option<Value> = pg.block(async move {
                    let row =
                        db.pooled().await?.query_opt("SELECT record FROM responses WHERE id = $1", &[&id]).await?;
                    Ok(row.map(|r| r.get(0)))
                })?;
                value.map(serde_json::from_value).transpose()?
            }
        };
        Ok(record.filter(|r| r.owner == owner && r.expires_at > unix_now()))
    }

    /// Delete the response `id` if `owner` created it; whether it existed.
    pub fn delete(&self, id: &str, owner: &str) -> Result<bool> {
        if self.get(id, owner)?.is_none() {
            return Ok(false);
        }
        match self {
            Self::Sled(store) => Ok(store.tree(TREE)?.remove(id.as_bytes())?.is_some()),
            Self::Pg(pg) => {
                let (db, id) = (pg.clone(), id.to_string());
                pg.block(async move {
                    Ok(db.pooled().await?.execute("DELETE FROM responses WHERE id = $1", &[&id]).await? == 1)
                })
            }
        }
    }

    /// Remove expired responses; how many.
    pub fn sweep(&self) -> Result<usize> {
        let now = unix_now();
        match self {
            Self::Sled(store) => {
                let tree = store.tree(TREE)?;
                let mut removed = 0;
                for entry in tree.iter() {
                    let (key, bytes) = entry?;
                    let expired = serde_json::from_slice::<Stored>(&bytes).map_or(true, |r| r.expires_at <= now);
                    if expired && tree.remove(key)?.is_some() {
                        removed += 1;
                    }
                }
                Ok(removed)
            }
            Self::Pg(pg) => {
                let db = pg.clone();
                pg.block(async move {
                    let n = db
                        .pooled()
                        .await?
                        .execute("DELETE FROM responses WHERE expires_at <= $1", &[&(now as i64)])
                        .await?;
                    Ok(n as usize)
                })
            }
        }
    }
}

/// Insert `record` under `id` in sled's tree (in memory until flushed);
/// returns the tree.
fn sled_insert(store: &Store, id: &str, record: &Stored) -> Result<sled::Tree> {
    let tree = store.tree(TREE)?;
    tree.insert(id.as_bytes(), serde_json::to_vec(record)?)?;
    Ok(tree)
}

/// The write of `record` as response `id`, to run on the database thread.
fn pg_put(
    pg: Arc<Postgres>,
    id: String,
    record: &Stored,
) -> Result<impl std::future::Future<Output = Result<()>> + Send + 'static> {
    let (owner, expires_at, value) = (record.owner.clone(), record.expires_at as i64, serde_json::to_value(record)?);
    Ok(async move {
        pg.pooled()
            .await?
            .execute(
                "INSERT INTO responses (id, owner, expires_at, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET owner = $2, expires_at = $3, record = $4",
                &[&id, &owner, &expires_at, &value],
            )
            .await?;
        Ok(())
    })
}
