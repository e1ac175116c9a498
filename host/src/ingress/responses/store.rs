//! Stored responses (`store: true`): the `response` object and the
//! conversation a `previous_response_id` continues, kept in the sled tree
//! `responses` for `responses.retention_secs`, readable only by the token
//! that created them. Every call here is blocking (run it off the workers).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::billing::Caller;
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

/// Keep `record` under `id`.
pub fn put(store: &Store, id: &str, record: &Stored) -> Result<()> {
    store.tree(TREE)?.insert(id.as_bytes(), serde_json::to_vec(record)?)?;
    Ok(())
}

/// The response `id` if `owner` created it and it has not expired.
pub fn get(store: &Store, id: &str, owner: &str) -> Result<Option<Stored>> {
    let Some(bytes) = store.tree(TREE)?.get(id.as_bytes())? else { return Ok(None) };
    let record: Stored = serde_json::from_slice(&bytes)?;
    Ok((record.owner == owner && record.expires_at > unix_now()).then_some(record))
}

/// Delete the response `id` if `owner` created it; whether it existed.
pub fn delete(store: &Store, id: &str, owner: &str) -> Result<bool> {
    if get(store, id, owner)?.is_none() {
        return Ok(false);
    }
    Ok(store.tree(TREE)?.remove(id.as_bytes())?.is_some())
}

/// Remove expired responses; how many.
pub fn sweep(store: &Store) -> Result<usize> {
    let tree = store.tree(TREE)?;
    let now = unix_now();
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
