//! Which values appear in each run of 4,096 consecutive row ids (a
//! segment, `S` + segment number in the `log_rollup` tree): users, tokens,
//! channels, models, row kinds and statuses. Written in the billing
//! writer's transaction with the rows (one small record per segment a
//! batch touches, never one key per row), so a filtered walk of the log
//! skips every segment that cannot hold a match: a rare user or model is
//! found without reading the rows in between.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::logs::{LogFilter, LogKind, LogRow};
use super::rollup::Records;

const TAG: u8 = b'S';
/// Row ids per segment (a power of two).
const SHIFT: u32 = 12;

/// What one segment's rows hold.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Presence {
    /// User ids (`0`: configuration tokens).
    pub users: BTreeSet<u64>,
    /// Token ids.
    pub tokens: BTreeSet<u64>,
    /// Channel ids.
    pub channels: BTreeSet<u64>,
    /// Requested models.
    pub models: BTreeSet<String>,
    /// Row kinds (`consume`, `error`, `topup`).
    pub kinds: BTreeSet<LogKind>,
    /// HTTP statuses.
    pub statuses: BTreeSet<u16>,
}

impl Presence {
    fn add(&mut self, row: &LogRow) {
        self.users.insert(row.user_id.unwrap_or(0));
        if let Some(t) = row.token_id {
            self.tokens.insert(t);
        }
        self.channels.insert(row.channel_id);
        if !self.models.contains(&row.model) {
            self.models.insert(row.model.clone());
        }
        self.kinds.insert(row.kind);
        self.statuses.insert(row.status);
    }

    fn merge(&mut self, other: Presence) {
        self.users.extend(other.users);
        self.tokens.extend(other.tokens);
        self.channels.extend(other.channels);
        self.models.extend(other.models);
        self.kinds.extend(other.kinds);
        self.statuses.extend(other.statuses);
    }

    /// Whether rows matching `f` may be in the segment.
    pub fn may_hold(&self, f: &LogFilter) -> bool {
        f.user_id.is_none_or(|u| self.users.contains(&u))
            && f.token_id.is_none_or(|t| self.tokens.contains(&t))
            && f.channel_id.is_none_or(|c| self.channels.contains(&c))
            && f.model.as_ref().is_none_or(|m| self.models.contains(m))
            && f.kind.is_none_or(|k| self.kinds.contains(&k))
            && f.status.is_none_or(|s| self.statuses.contains(&s))
    }
}

/// The segment of a row id.
pub fn segment(id: u64) -> u64 {
    id >> SHIFT
}

/// The first row id of a segment.
pub fn first_id(segment: u64) -> u64 {
    segment << SHIFT
}

fn key(segment: u64) -> [u8; 9] {
    let mut k = [TAG; 9];
    k[1..].copy_from_slice(&segment.to_be_bytes());
    k
}

fn decode(raw: &[u8]) -> Presence {
    serde_json::from_slice(raw).unwrap_or_default()
}

/// The segments `rows` touch, merged with what `get` reads of them.
pub fn changes<'a, E>(
    rows: impl Iterator<Item = &'a LogRow>,
    mut get: impl FnMut(&[u8]) -> Result<Option<sled::IVec>, E>,
) -> Result<Records, E> {
    let mut touched: BTreeMap<u64, Presence> = BTreeMap::new();
    for row in rows {
        touched.entry(segment(row.id)).or_default().add(row);
    }
    let mut out = Vec::with_capacity(touched.len());
    for (seg, delta) in touched {
        let k = key(seg);
        let mut presence = get(&k)?.map(|raw| decode(&raw)).unwrap_or_default();
        presence.merge(delta);
        out.push((k, serde_json::to_vec(&presence).unwrap_or_default()));
    }
    Ok(out)
}

/// The segments between the row ids `lower` (inclusive) and `upper`
/// (exclusive) that may hold rows matching `f`, newest first.
pub fn matching<'a>(
    rollups: &'a sled::Tree,
    f: &'a LogFilter,
    lower: u64,
    upper: u64,
) -> impl Iterator<Item = u64> + 'a {
    let last = segment(upper.saturating_sub(1));
    rollups.range(key(segment(lower))..=key(last)).rev().filter_map(move |item| {
        let (k, v) = item.ok()?;
        let seg = u64::from_be_bytes(k.get(1..9)?.try_into().ok()?);
        decode(&v).may_hold(f).then_some(seg)
    })
}

/// Drop the segments wholly below the row id `below`.
pub fn prune(rollups: &sled::Tree, below: u64) -> sled::Result<usize> {
    let mut n = 0;
    for item in rollups.range(key(0)..key(segment(below))) {
        rollups.remove(item?.0)?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_holds_what_its_rows_hold() {
        let rows = [
            LogRow { id: 1, user_id: Some(7), model: "a".into(), status: 200, ..LogRow::default() },
            LogRow { id: 2, user_id: Some(8), kind: LogKind::Error, status: 502, ..LogRow::default() },
        ];
        let out = changes::<()>(rows.iter(), |_| Ok(None)).expect("changes");
        assert_eq!(out.len(), 1);
        let p = decode(&out[0].1);
        assert!(p.may_hold(&LogFilter { user_id: Some(7), ..LogFilter::default() }));
        assert!(p.may_hold(&LogFilter { kind: Some(LogKind::Error), status: Some(502), ..LogFilter::default() }));
        assert!(!p.may_hold(&LogFilter { user_id: Some(9), ..LogFilter::default() }));
        assert!(!p.may_hold(&LogFilter { model: Some("b".into()), ..LogFilter::default() }));
        assert_eq!(segment(4095), 0);
        assert_eq!((segment(4096), first_id(1)), (1, 4096));
    }
}
