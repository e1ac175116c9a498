//! Usage log rows (`logs` tree, key = row id, big-endian, increasing with
//! time), their query and statistics, and the retention sweep.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{log_index, rollup};

/// What a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// A served request, charged (possibly 0 for free models).
    #[default]
    Consume,
    /// A failed attempt or request that reached a channel; never charged.
    Error,
    /// An administrator's quota adjustment (`quota` is the amount added;
    /// negative when deducted), with their note.
    Topup,
}

/// One usage log row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogRow {
    /// Row id.
    pub id: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `consume` or `error`.
    pub kind: LogKind,
    /// The gateway's request id (shared by the rows of one request).
    pub request_id: String,
    /// User (`None` for tokens from the configuration file).
    pub user_id: Option<u64>,
    /// Token id (`None` for configuration tokens).
    pub token_id: Option<u64>,
    /// Token name.
    pub token_name: String,
    /// Caller group.
    pub group: String,
    /// Channel that served (or failed).
    pub channel_id: u64,
    /// Model the client asked for (prices use this name).
    pub model: String,
    /// Model sent upstream.
    pub upstream_model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Quota charged.
    pub quota: i64,
    /// Whether the charge spent the token's own balance too.
    pub token_limited: bool,
    /// Counted locally because the upstream reported no usage.
    pub estimated: bool,
    /// Wall time of the request (or failed attempt), ms.
    pub latency_ms: u64,
    /// Time to first token of a stream, ms.
    pub ttft_ms: Option<u64>,
    /// Streamed.
    pub stream: bool,
    /// HTTP status the client got (for error rows: the attempt's).
    pub status: u16,
    /// Classified error kind of error rows.
    pub error_kind: Option<String>,
    /// The stream ended early because the client went away.
    pub client_disconnected: bool,
    /// The gateway stopped (crashed) while this stream was reaching its
    /// client; billed on restart for its prompt.
    pub interrupted: bool,
    /// The upstream's stream ended or broke before its end marker; the
    /// client got an error event instead of `[DONE]`.
    pub upstream_cut: bool,
    /// The stream reached the gateway's length or duration limit and was
    /// ended by the gateway.
    pub limited: bool,
    /// Adapter plugin.
    pub plugin: String,
    /// Its SHA-256.
    pub plugin_sha256: String,
    /// The administrator's note of a top-up row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Filters of `GET /api/logs` and `/api/logs/stats`.
#[derive(Debug, Default, Clone)]
pub struct LogFilter {
    /// From (Unix ms, inclusive).
    pub start_ms: Option<u64>,
    /// To (Unix ms, exclusive).
    pub end_ms: Option<u64>,
    /// User.
    pub user_id: Option<u64>,
    /// Token name.
    pub token_name: Option<String>,
    /// Token id.
    pub token_id: Option<u64>,
    /// Channel.
    pub channel_id: Option<u64>,
    /// Requested model.
    pub model: Option<String>,
    /// Row kind.
    pub kind: Option<LogKind>,
    /// Request id.
    pub request_id: Option<String>,
    /// HTTP status the client (or, for error rows, the attempt) got.
    pub status: Option<u16>,
}

impl LogFilter {
    fn keeps(&self, r: &LogRow) -> bool {
        self.start_ms.is_none_or(|s| r.at_ms >= s)
            && self.end_ms.is_none_or(|e| r.at_ms < e)
            && self.user_id.is_none_or(|u| r.user_id == Some(u))
            && self.token_id.is_none_or(|t| r.token_id == Some(t))
            && self.token_name.as_deref().is_none_or(|t| r.token_name == t)
            && self.channel_id.is_none_or(|c| r.channel_id == c)
            && self.model.as_deref().is_none_or(|m| r.model == m)
            && self.kind.is_none_or(|k| r.kind == k)
            && self.request_id.as_deref().is_none_or(|id| r.request_id == id)
            && self.status.is_none_or(|s| r.status == s)
    }
}

fn rows(tree: &sled::Tree) -> impl DoubleEndedIterator<Item = LogRow> + '_ {
    tree.iter().filter_map(|item| item.ok().and_then(|(_, v)| serde_json::from_slice::<LogRow>(&v).ok()))
}

/// How far, in ms, a row's time may precede that of a row with a smaller
/// id: ids are given when a row is made, and rows are dated then too, but
/// a stream cut by a crash is billed at the restart, dated when it started
/// (streams last at most `max_stream_secs`, an hour by default). A walk
/// back in time stops this far past its `start_ms`.
const ORDER_SLACK_MS: u64 = 3_600_000;

/// The rows matching `filter`, newest first, below the row id `before`
/// when given: through the most selective secondary key when the filter
/// has one, else along the log itself; it stops past `start_ms`.
fn candidates<'a>(
    logs: &'a sled::Tree,
    index: &'a sled::Tree,
    filter: &'a LogFilter,
    before: Option<u64>,
) -> impl Iterator<Item = LogRow> + 'a {
    let decode = |v: &[u8]| serde_json::from_slice::<LogRow>(v).ok();
    let walk: Box<dyn Iterator<Item = LogRow> + 'a> = match log_index::walk_prefix(filter) {
        Some(prefix) => Box::new(
            log_index::ids_under(index, prefix, before)
                .filter_map(move |id| logs.get(id.to_be_bytes()).ok().flatten().and_then(|v| decode(&v))),
        ),
        None => {
            let end = before.unwrap_or(u64::MAX).to_be_bytes();
            Box::new(logs.range(..end).rev().filter_map(move |item| item.ok().and_then(|(_, v)| decode(&v))))
        }
    };
    let floor = filter.start_ms.map(|s| s.saturating_sub(ORDER_SLACK_MS));
    walk.take_while(move |r| floor.is_none_or(|f| r.at_ms >= f)).filter(|r| filter.keeps(r))
}

/// A page of rows, newest first, and the number matching (which walks
/// every matching row: the cursor form, [`page_before`], does not).
pub fn query(
    logs: &sled::Tree,
    index: &sled::Tree,
    filter: &LogFilter,
    page: usize,
    per_page: usize,
) -> (Vec<LogRow>, usize) {
    let mut total = 0usize;
    let mut out = Vec::new();
    let skip = page.saturating_sub(1).saturating_mul(per_page);
    for row in candidates(logs, index, filter, None) {
        if total >= skip && out.len() < per_page {
            out.push(row);
        }
        total = total.saturating_add(1);
    }
    (out, total)
}

/// Up to `limit` rows, newest first, below the row id `before`, and
/// whether more follow: as fast on the thousandth page as on the first.
pub fn page_before(
    logs: &sled::Tree,
    index: &sled::Tree,
    filter: &LogFilter,
    before: Option<u64>,
    limit: usize,
) -> (Vec<LogRow>, bool) {
    let mut rows: Vec<LogRow> = candidates(logs, index, filter, before).take(limit.saturating_add(1)).collect();
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

/// Build the secondary keys and rollups of a log that has none (a store
/// from before they existed, or whose build was cut short): from scratch,
/// once, before the writer starts.
pub fn ensure_index(logs: &sled::Tree, index: &sled::Tree) -> anyhow::Result<()> {
    const BUILT: &[u8] = b"built-v1";
    if index.contains_key(BUILT)? {
        return Ok(());
    }
    index.clear()?;
    let started = std::time::Instant::now();
    let mut n = 0usize;
    let mut chunk: Vec<LogRow> = Vec::with_capacity(10_000);
    let flush = |chunk: &mut Vec<LogRow>| -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        for row in chunk.iter() {
            for key in log_index::keys(row) {
                batch.insert(key, &[][..]);
            }
        }
        for (key, delta) in rollup::deltas(chunk.iter()) {
            let mut bucket: rollup::Bucket =
                index.get(key)?.and_then(|raw| serde_json::from_slice(&raw).ok()).unwrap_or_default();
            bucket.merge(&delta);
            batch.insert(&key[..], serde_json::to_vec(&bucket)?);
        }
        index.apply_batch(batch)?;
        chunk.clear();
        Ok(())
    };
    for row in rows(logs) {
        chunk.push(row);
        n += 1;
        if chunk.len() == chunk.capacity() {
            flush(&mut chunk)?;
        }
    }
    flush(&mut chunk)?;
    index.insert(BUILT, &[][..])?;
    index.flush()?;
    if n > 0 {
        tracing::info!(rows = n, ms = started.elapsed().as_millis() as u64, "usage log index built");
    }
    Ok(())
}

/// Sums of one group.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sums {
    /// Rows.
    pub requests: u64,
    /// Error rows.
    pub errors: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Quota charged.
    pub quota: i64,
}

/// Sums per `by` (`day`, `model`, `channel`, `user`, `token`).
pub fn stats(tree: &sled::Tree, filter: &LogFilter, by: &str) -> BTreeMap<String, Sums> {
    let mut out: BTreeMap<String, Sums> = BTreeMap::new();
    let usage = |r: &LogRow| r.kind != LogKind::Topup || filter.kind == Some(LogKind::Topup);
    for r in rows(tree).filter(|r| filter.keeps(r) && usage(r)) {
        let key = match by {
            "model" => r.model.clone(),
            "channel" => r.channel_id.to_string(),
            "user" => r.user_id.map_or_else(|| "config".to_string(), |u| u.to_string()),
            "token" => r.token_name.clone(),
            _ => day(r.at_ms),
        };
        let s = out.entry(key).or_default();
        s.requests = s.requests.saturating_add(1);
        s.errors = s.errors.saturating_add(u64::from(r.kind == LogKind::Error));
        s.prompt_tokens = s.prompt_tokens.saturating_add(r.prompt_tokens);
        s.completion_tokens = s.completion_tokens.saturating_add(r.completion_tokens);
        s.quota = s.quota.saturating_add(r.quota);
    }
    out
}

/// `YYYY-MM-DD` (UTC) of a Unix-ms time.
fn day(at_ms: u64) -> String {
    let days = (at_ms / 86_400_000) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Delete rows older than `cutoff_ms` with their secondary keys and
/// hourly rollups; returns how many rows.
pub fn delete_before(logs: &sled::Tree, index: &sled::Tree, cutoff_ms: u64) -> anyhow::Result<usize> {
    let mut n = 0;
    for item in logs.iter() {
        let (key, value) = item?;
        let row: LogRow = serde_json::from_slice(&value).unwrap_or_default();
        if row.at_ms >= cutoff_ms {
            break;
        }
        let mut batch = sled::Batch::default();
        for k in log_index::keys(&LogRow { id: u64::from_be_bytes(key.as_ref().try_into()?), ..row }) {
            batch.remove(k);
        }
        index.apply_batch(batch)?;
        logs.remove(key)?;
        n += 1;
    }
    rollup::prune(index, true, cutoff_ms)?;
    if n > 0 {
        logs.flush()?;
        index.flush()?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, sled::Tree, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        (dir, db.open_tree("logs").expect("logs"), db.open_tree("log_index").expect("index"))
    }

    fn row(id: u64, user: u64, kind: LogKind) -> LogRow {
        LogRow { id, at_ms: 1_000 * id, user_id: Some(user), kind, model: format!("m{}", id % 2), ..LogRow::default() }
    }

    #[test]
    fn an_unindexed_log_is_indexed_once_and_pages_by_cursor() {
        let (_dir, logs, index) = store();
        for id in 1..=9u64 {
            let r = row(id, 1 + id % 3, if id == 5 { LogKind::Error } else { LogKind::Consume });
            logs.insert(id.to_be_bytes(), serde_json::to_vec(&r).expect("json")).expect("insert");
        }
        ensure_index(&logs, &index).expect("index");
        ensure_index(&logs, &index).expect("a second start changes nothing");
        let hour = rollup::read(&index, true, 0, 3_600_000);
        assert_eq!((hour[0].1.total.requests, hour[0].1.total.errors), (8, 1), "counted once");

        let everyone = LogFilter::default();
        let (first, more) = page_before(&logs, &index, &everyone, None, 4);
        assert_eq!((first.iter().map(|r| r.id).collect::<Vec<_>>(), more), (vec![9, 8, 7, 6], true));
        let (next, _) = page_before(&logs, &index, &everyone, Some(6), 4);
        assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), vec![5, 4, 3, 2]);

        let user = LogFilter { user_id: Some(1), ..LogFilter::default() };
        let (rows, more) = page_before(&logs, &index, &user, None, 10);
        assert_eq!((rows.iter().map(|r| r.id).collect::<Vec<_>>(), more), (vec![9, 6, 3], false));
        let errors = LogFilter { kind: Some(LogKind::Error), ..LogFilter::default() };
        assert_eq!(page_before(&logs, &index, &errors, None, 10).0.len(), 1);
        let both = LogFilter { user_id: Some(2), model: Some("m0".into()), ..LogFilter::default() };
        assert_eq!(page_before(&logs, &index, &both, None, 10).0.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4]);
        let (_, total) = query(&logs, &index, &user, 1, 2);
        assert_eq!(total, 3);
    }

    #[test]
    fn deleting_old_rows_takes_their_keys_with_them() {
        let (_dir, logs, index) = store();
        for id in 1..=4u64 {
            logs.insert(id.to_be_bytes(), serde_json::to_vec(&row(id, 1, LogKind::Consume)).expect("json"))
                .expect("insert");
        }
        ensure_index(&logs, &index).expect("index");
        assert_eq!(delete_before(&logs, &index, 3_000).expect("delete"), 2);
        let user = LogFilter { user_id: Some(1), ..LogFilter::default() };
        assert_eq!(page_before(&logs, &index, &user, None, 10).0.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4, 3]);
        let keys = index.iter().keys().filter(|k| k.as_ref().is_ok_and(|k| k[0] == b'u')).count();
        assert_eq!(keys, 2);
    }

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(1_795_305_600_000), "2026-11-22");
        assert_eq!(day(951_782_400_000), "2000-02-29");
    }
}
