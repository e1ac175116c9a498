//! Usage log rows (`logs` tree, in blocks of consecutive row ids, see
//! [`log_blocks`]; ids increase with time), their query and statistics,
//! and the retention sweep.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::log_filter::Needles;
use super::{log_blocks, log_segments, rollup};

/// What a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
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

impl LogKind {
    /// Its name in rows and the API: `consume`, `error` or `topup`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consume => "consume",
            Self::Error => "error",
            Self::Topup => "topup",
        }
    }
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

/// A new request id: `req_`, the Unix ms in 12 hex digits, 8 random hex
/// digits. Its time lets a lookup by id read only the rows around it.
pub fn new_request_id() -> String {
    String::from_utf8_lossy(&new_request_id_bytes()).into_owned()
}

/// [`new_request_id`] as ASCII bytes on the stack (written without
/// `format!`: every request makes one).
pub fn new_request_id_bytes() -> [u8; 24] {
    request_id(crate::store::unix_now_ms(), rand::random::<u32>())
}

/// The request id of Unix ms `time` and `random`.
fn request_id(time: u64, random: u32) -> [u8; 24] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"req_00000000000000000000";
    for (i, b) in id[4..16].iter_mut().enumerate() {
        *b = HEX[((time >> (4 * (11 - i))) & 0xf) as usize];
    }
    for (i, b) in id[16..].iter_mut().enumerate() {
        *b = HEX[((random >> (4 * (7 - i))) & 0xf) as usize];
    }
    id
}

/// The Unix ms a gateway-made request id was made at ([`new_request_id`];
/// `None` for a client's own id).
pub fn request_id_time(id: &str) -> Option<u64> {
    let hex = id.strip_prefix("req_").filter(|h| h.len() == 20 && h.bytes().all(|b| b.is_ascii_hexdigit()))?;
    u64::from_str_radix(&hex[..12], 16).ok()
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
    /// With a gateway-made `request_id` and no time range: the window its
    /// rows can be in (made at most `longest_ms` after the id).
    pub fn around_request(mut self, longest_ms: u64) -> Self {
        if let Some(at) = self.request_id.as_deref().and_then(request_id_time)
            && self.start_ms.is_none()
            && self.end_ms.is_none()
        {
            self.start_ms = Some(at.saturating_sub(60_000));
            self.end_ms = Some(at.saturating_add(longest_ms).saturating_add(60_000));
        }
        self
    }

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

/// Every row, oldest first.
fn rows(tree: &sled::Tree) -> impl Iterator<Item = LogRow> + '_ {
    log_blocks::oldest_first(tree).filter_map(|raw| serde_json::from_slice::<LogRow>(raw.ok()?.bytes()).ok())
}

/// The rows matching `filter`, newest first, below the row id `before`
/// when given: a walk back along the log between the ids the hourly id
/// ranges give for `end_ms` and `start_ms`, through only the segments
/// that may hold a match, decoding only the rows whose bytes hold every
/// filtered field ([`Needles`]).
fn candidates<'a>(
    logs: &'a sled::Tree,
    rollups: &'a sled::Tree,
    filter: &'a LogFilter,
    before: Option<u64>,
) -> impl Iterator<Item = LogRow> + 'a {
    let needles = Needles::of(filter);
    let lower = filter.start_ms.map_or(0, |s| rollup::lowest_id_from(rollups, s).unwrap_or(u64::MAX));
    let upper =
        filter.end_ms.map_or(u64::MAX, |e| rollup::highest_id_before(rollups, e).map_or(0, |id| id.saturating_add(1)));
    let upper = before.map_or(upper, |b| b.min(upper));
    let segments = if lower < upper { Some(log_segments::matching(rollups, filter, lower, upper)) } else { None };
    segments
        .into_iter()
        .flatten()
        .flat_map(move |seg| {
            let from = log_segments::first_id(seg).max(lower);
            let to = log_segments::first_id(seg.saturating_add(1)).min(upper);
            log_blocks::newest_first(logs, from..to)
        })
        .filter_map(move |raw| {
            let raw = raw.bytes();
            if !needles.may_match(raw) {
                return None;
            }
            serde_json::from_slice::<LogRow>(raw).ok()
        })
        .filter(|r| filter.keeps(r))
}

/// A page of rows, newest first, and the number matching (which walks
/// every matching row: the cursor form, [`page_before`], does not).
pub fn query(
    logs: &sled::Tree,
    rollups: &sled::Tree,
    filter: &LogFilter,
    page: usize,
    per_page: usize,
) -> (Vec<LogRow>, usize) {
    let mut total = 0usize;
    let mut out = Vec::new();
    let skip = page.saturating_sub(1).saturating_mul(per_page);
    for row in candidates(logs, rollups, filter, None) {
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
    rollups: &sled::Tree,
    filter: &LogFilter,
    before: Option<u64>,
    limit: usize,
) -> (Vec<LogRow>, bool) {
    let mut rows: Vec<LogRow> = candidates(logs, rollups, filter, before).take(limit.saturating_add(1)).collect();
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

/// Everything the `log_rollup` tree derives from `rows` (minute and hour
/// buckets, hourly id ranges, segments), merged with what `get` reads of
/// those records: what the writer stores with each batch, and a rebuild
/// with each chunk.
pub fn derived<'a, E>(
    rows: impl Iterator<Item = &'a LogRow> + Clone,
    mut get: impl FnMut(&[u8]) -> Result<Option<sled::IVec>, E>,
) -> Result<rollup::Records, E> {
    let mut out = rollup::changes(rows.clone(), &mut get)?;
    out.extend(log_segments::changes(rows, get)?);
    Ok(out)
}

/// Before the writer starts, build the rollups and segments of a log that
/// has none (a store from before they existed, or whose build was cut
/// short): once, from the rows. After that the writer keeps them in its
/// transactions.
pub fn ensure_rollups(logs: &sled::Tree, rollups: &sled::Tree) -> anyhow::Result<()> {
    const BUILT: &[u8] = b"built-v2";
    if rollups.contains_key(BUILT)? {
        return Ok(());
    }
    rollups.clear()?;
    let started = std::time::Instant::now();
    let mut n = 0usize;
    let mut chunk: Vec<LogRow> = Vec::with_capacity(10_000);
    let flush = |chunk: &mut Vec<LogRow>| -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        for (key, value) in derived(chunk.iter(), |k| rollups.get(k))? {
            batch.insert(&key[..], value);
        }
        rollups.apply_batch(batch)?;
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
    rollups.insert(BUILT, &[][..])?;
    rollups.flush()?;
    if n > 0 {
        tracing::info!(rows = n, ms = started.elapsed().as_millis() as u64, "usage rollups built");
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

/// Delete rows older than `cutoff_ms` and the hourly rollups before it;
/// returns how many rows.
pub fn delete_before(logs: &sled::Tree, rollups: &sled::Tree, cutoff_ms: u64) -> anyhow::Result<usize> {
    let old = |raw: &[u8]| serde_json::from_slice::<LogRow>(raw).unwrap_or_default().at_ms < cutoff_ms;
    let n = log_blocks::remove_while(logs, old)?;
    rollup::prune(rollups, true, cutoff_ms)?;
    if let Some(first) = log_blocks::first_id(logs)? {
        log_segments::prune(rollups, first)?;
    }
    if n > 0 {
        logs.flush()?;
        rollups.flush()?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, sled::Tree, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        (dir, db.open_tree("logs").expect("logs"), db.open_tree("log_rollup").expect("rollups"))
    }

    fn row(id: u64, user: u64, kind: LogKind) -> LogRow {
        LogRow { id, at_ms: 1_000 * id, user_id: Some(user), kind, model: format!("m{}", id % 2), ..LogRow::default() }
    }

    #[test]
    fn rollups_are_built_once_and_pages_walk_back_by_cursor_and_time() {
        let (_dir, logs, rollups) = store();
        for id in 1..=9u64 {
            let r = row(id, 1 + id % 3, if id == 5 { LogKind::Error } else { LogKind::Consume });
            logs.insert(id.to_be_bytes(), serde_json::to_vec(&r).expect("json")).expect("insert");
        }
        ensure_rollups(&logs, &rollups).expect("rollups");
        ensure_rollups(&logs, &rollups).expect("a second start changes nothing");
        let hour = rollup::read(&rollups, true, 0, 3_600_000);
        assert_eq!((hour[0].1.total.requests, hour[0].1.total.errors), (8, 1), "counted once");

        let everyone = LogFilter::default();
        let (first, more) = page_before(&logs, &rollups, &everyone, None, 4);
        assert_eq!((first.iter().map(|r| r.id).collect::<Vec<_>>(), more), (vec![9, 8, 7, 6], true));
        let (next, _) = page_before(&logs, &rollups, &everyone, Some(6), 4);
        assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), vec![5, 4, 3, 2]);

        let user = LogFilter { user_id: Some(1), ..LogFilter::default() };
        let (rows, more) = page_before(&logs, &rollups, &user, None, 10);
        assert_eq!((rows.iter().map(|r| r.id).collect::<Vec<_>>(), more), (vec![9, 6, 3], false));
        let errors = LogFilter { kind: Some(LogKind::Error), ..LogFilter::default() };
        assert_eq!(page_before(&logs, &rollups, &errors, None, 10).0.len(), 1);
        let both = LogFilter { user_id: Some(2), model: Some("m0".into()), ..LogFilter::default() };
        assert_eq!(page_before(&logs, &rollups, &both, None, 10).0.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4]);
        let (_, total) = query(&logs, &rollups, &user, 1, 2);
        assert_eq!(total, 3);
        let window = LogFilter { start_ms: Some(3_000), end_ms: Some(6_000), ..LogFilter::default() };
        let ids: Vec<u64> = page_before(&logs, &rollups, &window, None, 10).0.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![5, 4, 3]);
        let later = LogFilter { start_ms: Some(3_600_000), ..LogFilter::default() };
        assert!(page_before(&logs, &rollups, &later, None, 10).0.is_empty());
    }

    #[test]
    fn deleting_old_rows_leaves_the_rest_findable() {
        let (_dir, logs, rollups) = store();
        for id in 1..=4u64 {
            logs.insert(id.to_be_bytes(), serde_json::to_vec(&row(id, 1, LogKind::Consume)).expect("json"))
                .expect("insert");
        }
        ensure_rollups(&logs, &rollups).expect("rollups");
        assert_eq!(delete_before(&logs, &rollups, 3_000).expect("delete"), 2);
        let user = LogFilter { user_id: Some(1), ..LogFilter::default() };
        assert_eq!(
            page_before(&logs, &rollups, &user, None, 10).0.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![4, 3]
        );
    }

    #[test]
    fn a_gateway_request_id_carries_its_time() {
        let id = new_request_id();
        assert!(id.len() == 24 && id.starts_with("req_"), "{id}");
        let (time, random) = (0x0123_4567_89ab_u64, 0xfedc_ba98_u32);
        assert_eq!(request_id(time, random), format!("req_{time:012x}{random:08x}").as_bytes());
        let at = request_id_time(&id).expect("time");
        assert!(at.abs_diff(crate::store::unix_now_ms()) < 60_000, "{id}");
        assert_eq!(request_id_time("req_0123456789abcdef"), None, "an older or client id");
        let f = LogFilter { request_id: Some(id), ..LogFilter::default() }.around_request(1000);
        assert_eq!((f.start_ms, f.end_ms), (Some(at - 60_000), Some(at + 61_000)));
    }

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(1_795_305_600_000), "2026-11-22");
        assert_eq!(day(951_782_400_000), "2000-02-29");
    }
}
