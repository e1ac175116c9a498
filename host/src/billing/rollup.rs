//! Usage pre-aggregated per minute and per hour (`log_rollup` tree, keys
//! `M`/`H` + the Unix minute/hour), and per hour the lowest and highest
//! row id dated in it (`I` + hour), written in the billing writer's
//! transaction with the rows: the dashboard reads at most a few hundred
//! small records, and a logs query by time starts and stops at the right
//! ids, whatever the size of the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::logs::{LogKind, LogRow, Sums};

const MINUTE: u8 = b'M';
const HOUR: u8 = b'H';
const IDS: u8 = b'I';
const HOUR_MS: u64 = 3_600_000;

/// Growth factor between latency histogram buckets (≈ 20 % resolution).
const LATENCY_STEP: f64 = 1.2;

/// One minute's or hour's usage.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bucket {
    /// Totals.
    pub total: Sums,
    /// Latency histogram of served requests: bucket index → count.
    pub latency: BTreeMap<u8, u64>,
    /// Per requested model.
    pub models: BTreeMap<String, Sums>,
    /// Per channel id.
    pub channels: BTreeMap<u64, Sums>,
    /// Per user id (`0`: tokens of the configuration file).
    pub users: BTreeMap<u64, Sums>,
}

fn latency_bucket(ms: u64) -> u8 {
    let i = ((ms as f64) + 1.0).ln() / LATENCY_STEP.ln();
    i.clamp(0.0, 200.0) as u8
}

/// The upper bound, in ms, of a latency bucket.
fn latency_upper(bucket: u8) -> u64 {
    (LATENCY_STEP.powi(i32::from(bucket) + 1) - 1.0).ceil() as u64
}

fn add(s: &mut Sums, row: &LogRow) {
    match row.kind {
        LogKind::Consume => s.requests = s.requests.saturating_add(1),
        LogKind::Error => s.errors = s.errors.saturating_add(1),
        LogKind::Topup => return,
    }
    s.prompt_tokens = s.prompt_tokens.saturating_add(row.prompt_tokens);
    s.completion_tokens = s.completion_tokens.saturating_add(row.completion_tokens);
    s.quota = s.quota.saturating_add(row.quota);
}

fn merge(into: &mut Sums, from: &Sums) {
    into.requests = into.requests.saturating_add(from.requests);
    into.errors = into.errors.saturating_add(from.errors);
    into.prompt_tokens = into.prompt_tokens.saturating_add(from.prompt_tokens);
    into.completion_tokens = into.completion_tokens.saturating_add(from.completion_tokens);
    into.quota = into.quota.saturating_add(from.quota);
}

impl Bucket {
    /// Count one row (top-ups are not usage: they are not counted).
    pub fn add(&mut self, row: &LogRow) {
        if row.kind == LogKind::Topup {
            return;
        }
        add(&mut self.total, row);
        if row.kind == LogKind::Consume {
            let n = self.latency.entry(latency_bucket(row.latency_ms)).or_default();
            *n = n.saturating_add(1);
        }
        match self.models.get_mut(&row.model) {
            Some(sums) => add(sums, row),
            None => add(self.models.entry(row.model.clone()).or_default(), row),
        }
        add(self.channels.entry(row.channel_id).or_default(), row);
        add(self.users.entry(row.user_id.unwrap_or(0)).or_default(), row);
    }

    /// Add another bucket's counts.
    pub fn merge(&mut self, other: &Bucket) {
        merge(&mut self.total, &other.total);
        for (k, n) in &other.latency {
            let count = self.latency.entry(*k).or_default();
            *count = count.saturating_add(*n);
        }
        for (k, s) in &other.models {
            merge(self.models.entry(k.clone()).or_default(), s);
        }
        for (k, s) in &other.channels {
            merge(self.channels.entry(*k).or_default(), s);
        }
        for (k, s) in &other.users {
            merge(self.users.entry(*k).or_default(), s);
        }
    }

    /// The latency (ms, bucket upper bound) at quantile `q` of served
    /// requests, if there were any.
    pub fn latency_quantile(&self, q: f64) -> Option<u64> {
        let n: u64 = self.latency.values().sum();
        let rank = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in &self.latency {
            seen += count;
            if seen >= rank {
                return Some(latency_upper(*bucket));
            }
        }
        None
    }
}

/// The key of the minute (`hourly` false) or hour holding `at_ms`.
pub fn key(hourly: bool, at_ms: u64) -> [u8; 9] {
    let (tag, unit) = if hourly { (HOUR, 3_600_000) } else { (MINUTE, 60_000) };
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&(at_ms / unit).to_be_bytes());
    k
}

/// The buckets `rows` add to, by key.
pub fn deltas<'a>(rows: impl Iterator<Item = &'a LogRow>) -> BTreeMap<[u8; 9], Bucket> {
    let mut out: BTreeMap<[u8; 9], Bucket> = BTreeMap::new();
    for row in rows {
        for hourly in [false, true] {
            out.entry(key(hourly, row.at_ms)).or_default().add(row);
        }
    }
    out
}

/// A stored bucket (an unreadable one counts as empty).
pub fn decode(raw: &[u8]) -> Bucket {
    serde_json::from_slice(raw).unwrap_or_default()
}

/// A bucket as stored.
pub fn encode(bucket: &Bucket) -> Vec<u8> {
    serde_json::to_vec(bucket).unwrap_or_default()
}

fn ids_key(at_ms: u64) -> [u8; 9] {
    let mut k = key(true, at_ms);
    k[0] = IDS;
    k
}

fn decode_ids(raw: &[u8]) -> Option<(u64, u64)> {
    let lo = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    let hi = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
    Some((lo, hi))
}

fn encode_ids((lo, hi): (u64, u64)) -> Vec<u8> {
    [lo.to_be_bytes(), hi.to_be_bytes()].concat()
}

/// Stored records: key and encoded value.
pub type Records = Vec<([u8; 9], Vec<u8>)>;

/// The records `rows` change, merged with what `get` reads of them: the
/// minute and hour buckets (usage rows only) and the hourly id ranges
/// (every row). Keys and encoded values, ready to store.
pub fn changes<'a, E>(
    rows: impl Iterator<Item = &'a LogRow>,
    mut get: impl FnMut(&[u8]) -> Result<Option<sled::IVec>, E>,
) -> Result<Records, E> {
    let rows: Vec<&LogRow> = rows.collect();
    let mut ids: BTreeMap<[u8; 9], (u64, u64)> = BTreeMap::new();
    for row in &rows {
        let range = ids.entry(ids_key(row.at_ms)).or_insert((row.id, row.id));
        *range = (range.0.min(row.id), range.1.max(row.id));
    }
    let mut out = Vec::new();
    for (k, delta) in deltas(rows.into_iter()) {
        let mut bucket = get(&k)?.map(|raw| decode(&raw)).unwrap_or_default();
        bucket.merge(&delta);
        out.push((k, encode(&bucket)));
    }
    for (k, (lo, hi)) in ids {
        let (was_lo, was_hi) = get(&k)?.and_then(|raw| decode_ids(&raw)).unwrap_or((lo, hi));
        out.push((k, encode_ids((lo.min(was_lo), hi.max(was_hi)))));
    }
    Ok(out)
}

/// The lowest id of a row dated at or after `from_ms`, to the hour
/// (`None`: no such row).
pub fn lowest_id_from(rollups: &sled::Tree, from_ms: u64) -> Option<u64> {
    let end = ids_key(u64::MAX - HOUR_MS);
    rollups.range(ids_key(from_ms)..end).filter_map(|i| i.ok().and_then(|(_, v)| decode_ids(&v))).map(|r| r.0).min()
}

/// The highest id of a row dated before `to_ms`, to the hour (`None`: no
/// such row).
pub fn highest_id_before(rollups: &sled::Tree, to_ms: u64) -> Option<u64> {
    let end = ids_key(to_ms.saturating_add(HOUR_MS - 1));
    rollups.range(ids_key(0)..end).filter_map(|i| i.ok().and_then(|(_, v)| decode_ids(&v))).map(|r| r.1).max()
}

/// The buckets from `from_ms` (inclusive) to `to_ms` (exclusive), by
/// their start time in Unix ms.
pub fn read(rollups: &sled::Tree, hourly: bool, from_ms: u64, to_ms: u64) -> Vec<(u64, Bucket)> {
    let unit = if hourly { 3_600_000 } else { 60_000 };
    rollups
        .range(key(hourly, from_ms)..key(hourly, to_ms))
        .filter_map(|item| {
            let (k, v) = item.ok()?;
            let n = u64::from_be_bytes(k.get(1..9)?.try_into().ok()?);
            Some((n.saturating_mul(unit), decode(&v)))
        })
        .collect()
}

/// How long minute buckets are kept (the dashboard's finest view is the
/// last hour; hours serve the rest).
pub const MINUTES_KEPT_MS: u64 = 2 * 86_400_000;

/// Drop the minute buckets, or the hour buckets and id ranges
/// (`hourly`), before `before_ms`.
pub fn prune(rollups: &sled::Tree, hourly: bool, before_ms: u64) -> sled::Result<usize> {
    let ranges = if hourly {
        vec![key(true, 0)..key(true, before_ms), ids_key(0)..ids_key(before_ms)]
    } else {
        vec![key(false, 0)..key(false, before_ms)]
    };
    let mut n = 0;
    for range in ranges {
        for item in rollups.range(range) {
            rollups.remove(item?.0)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: LogKind, latency_ms: u64, at_ms: u64) -> LogRow {
        LogRow { kind, latency_ms, at_ms, model: "m".into(), quota: 5, ..LogRow::default() }
    }

    #[test]
    fn rows_add_to_their_minute_and_hour() {
        let rows =
            [row(LogKind::Consume, 10, 61_000), row(LogKind::Error, 0, 62_000), row(LogKind::Consume, 1, 3_700_000)];
        let d = deltas(rows.iter());
        assert_eq!(d[&key(false, 61_000)].total.requests, 1);
        assert_eq!(d[&key(false, 61_000)].total.errors, 1);
        assert_eq!(d[&key(true, 0)].total.quota, 10);
        assert_eq!(d[&key(true, 3_700_000)].models["m"].requests, 1);
    }

    #[test]
    fn latency_quantiles_are_within_a_bucket() {
        let mut b = Bucket::default();
        for ms in 1..=100 {
            b.add(&row(LogKind::Consume, ms, 0));
        }
        let p50 = b.latency_quantile(0.5).expect("p50");
        let p99 = b.latency_quantile(0.99).expect("p99");
        assert!((50..=62).contains(&p50), "{p50}");
        assert!((99..=122).contains(&p99), "{p99}");
        assert_eq!(Bucket::default().latency_quantile(0.5), None);
    }
}
