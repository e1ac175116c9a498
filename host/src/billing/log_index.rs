//! Secondary keys of the usage log, in the `log_index` tree, written in
//! the same transaction as the rows: `u`/`t`/`c` + user/token/channel id,
//! `m` + model, `r` + request id, `e` (error rows), each followed by the
//! row id, with an empty value. A filtered page walks the most selective
//! key backwards from its cursor instead of scanning the whole log.

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::logs::{LogFilter, LogKind, LogRow};

/// The prefixes of the secondary keys, in the order a filter prefers
/// them (most selective first).
const REQUEST: u8 = b'r';
const TOKEN: u8 = b't';
const USER: u8 = b'u';
const CHANNEL: u8 = b'c';
const MODEL: u8 = b'm';
const ERROR: u8 = b'e';

/// The key prefix of one filter value: the tag, then the value, then (for
/// variable-length values) its length, so `gpt-4` never matches `gpt-4o`.
fn prefix(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(value.len() + 11);
    key.push(tag);
    key.extend_from_slice(value);
    if matches!(tag, MODEL | REQUEST) {
        key.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
    }
    key
}

/// Every secondary key of `row`.
pub fn keys(row: &LogRow) -> Vec<Vec<u8>> {
    let mut prefixes = vec![
        prefix(CHANNEL, &row.channel_id.to_be_bytes()),
        prefix(MODEL, row.model.as_bytes()),
        prefix(REQUEST, row.request_id.as_bytes()),
    ];
    if let Some(u) = row.user_id {
        prefixes.push(prefix(USER, &u.to_be_bytes()));
    }
    if let Some(t) = row.token_id {
        prefixes.push(prefix(TOKEN, &t.to_be_bytes()));
    }
    if row.kind == LogKind::Error {
        prefixes.push(vec![ERROR]);
    }
    for p in &mut prefixes {
        p.extend_from_slice(&row.id.to_be_bytes());
    }
    prefixes
}

/// Add `row`'s keys inside the writer's transaction.
pub fn add(index: &TransactionalTree, row: &LogRow) -> Result<(), UnabortableTransactionError> {
    for key in keys(row) {
        index.insert(key, &[][..])?;
    }
    Ok(())
}

/// The key prefix a filter can walk instead of the whole log, if any.
pub fn walk_prefix(f: &LogFilter) -> Option<Vec<u8>> {
    if let Some(r) = &f.request_id {
        return Some(prefix(REQUEST, r.as_bytes()));
    }
    if let Some(t) = f.token_id {
        return Some(prefix(TOKEN, &t.to_be_bytes()));
    }
    if let Some(u) = f.user_id {
        return Some(prefix(USER, &u.to_be_bytes()));
    }
    if let Some(c) = f.channel_id {
        return Some(prefix(CHANNEL, &c.to_be_bytes()));
    }
    if let Some(m) = &f.model {
        return Some(prefix(MODEL, m.as_bytes()));
    }
    (f.kind == Some(LogKind::Error)).then(|| vec![ERROR])
}

/// Row ids under `prefix`, newest first, below `before` when given.
pub fn ids_under(index: &sled::Tree, prefix: Vec<u8>, before: Option<u64>) -> impl Iterator<Item = u64> + '_ {
    let mut end = prefix.clone();
    match before {
        Some(id) => end.extend_from_slice(&id.to_be_bytes()),
        None => end.extend_from_slice(&[0xff; 9]),
    }
    let len = prefix.len();
    index.range(prefix..end).rev().filter_map(move |item| {
        let (key, _) = item.ok()?;
        key.get(len..len + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_prefix_never_matches_a_longer_name() {
        let row = |model: &str| LogRow { id: 7, model: model.into(), ..LogRow::default() };
        let wanted = prefix(MODEL, b"gpt-4");
        assert!(keys(&row("gpt-4")).iter().any(|k| k.starts_with(&wanted)));
        assert!(!keys(&row("gpt-4o")).iter().any(|k| k.starts_with(&wanted)));
    }

    #[test]
    fn a_filter_walks_its_most_selective_key() {
        let f = LogFilter { user_id: Some(3), model: Some("m".into()), ..LogFilter::default() };
        assert_eq!(walk_prefix(&f), Some(prefix(USER, &3u64.to_be_bytes())));
        assert_eq!(walk_prefix(&LogFilter::default()), None);
    }
}
