//! The dashboard's figures over the last hour, day or week, read from the
//! rollups (at most 168 records), never from the rows.

use serde::Serialize;

use super::logs::Sums;
use super::rollup::{self, Bucket};

/// A dashboard range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// 60 one-minute points.
    Hour,
    /// 24 one-hour points.
    Day,
    /// 168 one-hour points.
    Week,
}

impl Range {
    /// `hour`, `day` or `week`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            _ => None,
        }
    }

    /// (hourly buckets, number of points).
    fn shape(self) -> (bool, u64) {
        match self {
            Self::Hour => (false, 60),
            Self::Day => (true, 24),
            Self::Week => (true, 168),
        }
    }
}

/// One point of the charts.
#[derive(Debug, Default, Serialize)]
pub struct Point {
    /// Start of the interval, Unix ms.
    pub t: u64,
    /// Its sums.
    #[serde(flatten)]
    pub sums: Sums,
    /// Median latency of served requests (ms), when the point has any.
    pub p50_ms: Option<u64>,
    /// 99th percentile latency (ms).
    pub p99_ms: Option<u64>,
}

/// One entry of a top list.
#[derive(Debug, Serialize)]
pub struct Top {
    /// Model name, or channel / user id.
    pub key: String,
    /// Its sums.
    #[serde(flatten)]
    pub sums: Sums,
}

/// The dashboard's figures.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Seconds per point.
    pub step_secs: u64,
    /// The charts' points, oldest first (empty intervals included).
    pub series: Vec<Point>,
    /// Sums over the range.
    pub totals: Point,
    /// Models by requests (at most 10; admins only).
    pub top_models: Vec<Top>,
    /// Channels by requests.
    pub top_channels: Vec<Top>,
    /// Users by quota spent (`0`: configuration tokens).
    pub top_users: Vec<Top>,
}

fn top<K: ToString>(entries: impl Iterator<Item = (K, Sums)>, by_quota: bool) -> Vec<Top> {
    let mut all: Vec<Top> = entries.map(|(k, sums)| Top { key: k.to_string(), sums }).collect();
    if by_quota {
        all.sort_by_key(|t| std::cmp::Reverse(t.sums.quota));
    } else {
        all.sort_by_key(|t| std::cmp::Reverse(t.sums.requests.saturating_add(t.sums.errors)));
    }
    all.truncate(10);
    all
}

fn point(t: u64, b: &Bucket) -> Point {
    Point { t, sums: b.total.clone(), p50_ms: b.latency_quantile(0.5), p99_ms: b.latency_quantile(0.99) }
}

/// The figures of `range` ending at `now_ms`; with `user`, only that
/// user's counts (no top lists, no latency: rollups keep those for all).
pub fn figures(rollups: &sled::Tree, range: Range, now_ms: u64, user: Option<u64>) -> Figures {
    let (hourly, points) = range.shape();
    let unit = if hourly { 3_600_000 } else { 60_000 };
    let last = now_ms / unit * unit;
    let first = last.saturating_sub((points - 1) * unit);
    let mut buckets = rollup::read(rollups, hourly, first, last.saturating_add(unit)).into_iter().peekable();
    let mut all = Bucket::default();
    let mut series = Vec::with_capacity(points as usize);
    for i in 0..points {
        let t = first + i * unit;
        let mut b = Bucket::default();
        while let Some((_, found)) = buckets.next_if(|(at, _)| *at <= t) {
            b = found;
        }
        if let Some(u) = user {
            b = Bucket { total: b.users.get(&u).cloned().unwrap_or_default(), ..Bucket::default() };
        }
        all.merge(&b);
        series.push(point(t, &b));
    }
    let admin = user.is_none();
    let totals = point(first, &all);
    let Bucket { models, channels, users, .. } = all;
    Figures {
        step_secs: unit / 1000,
        totals,
        series,
        top_models: if admin { top(models.into_iter(), false) } else { Vec::new() },
        top_channels: if admin { top(channels.into_iter(), false) } else { Vec::new() },
        top_users: if admin { top(users.into_iter(), true) } else { Vec::new() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::logs::{LogKind, LogRow};

    #[test]
    fn an_hour_has_sixty_points_and_only_its_users_counts_for_a_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).temporary(true).open().expect("sled");
        let rollups = db.open_tree("log_rollup").expect("tree");
        let now = 10 * 3_600_000 + 30 * 60_000;
        let rows: Vec<LogRow> = (0..3)
            .map(|i| LogRow {
                kind: LogKind::Consume,
                at_ms: now - i * 60_000,
                user_id: Some(1 + i % 2),
                model: "m".into(),
                quota: 10,
                latency_ms: 5,
                ..LogRow::default()
            })
            .collect();
        let mut batch = sled::Batch::default();
        for (k, b) in rollup::deltas(rows.iter()) {
            batch.insert(&k[..], serde_json::to_vec(&b).expect("json"));
        }
        rollups.apply_batch(batch).expect("batch");
        let all = figures(&rollups, Range::Hour, now, None);
        assert_eq!(all.series.len(), 60);
        assert_eq!(all.totals.sums.requests, 3);
        assert_eq!(all.series.last().map(|p| p.sums.requests), Some(1));
        assert_eq!(all.top_models[0].key, "m");
        assert_eq!(all.top_users[0].key, "1");
        let one = figures(&rollups, Range::Hour, now, Some(2));
        assert_eq!(one.totals.sums.requests, 1);
        assert!(one.top_models.is_empty());
        let day = figures(&rollups, Range::Day, now, None);
        assert_eq!((day.series.len(), day.totals.sums.quota), (24, 30));
    }
}
