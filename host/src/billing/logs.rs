//! Usage log rows (`logs` tree, key = row id, big-endian, increasing with
//! time), their query and statistics, and the retention sweep.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// A served request, charged (possibly 0 for free models).
    #[default]
    Consume,
    /// A failed attempt or request that reached a channel; never charged.
    Error,
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
    }
}

fn rows(tree: &sled::Tree) -> impl DoubleEndedIterator<Item = LogRow> + '_ {
    tree.iter().filter_map(|item| item.ok().and_then(|(_, v)| serde_json::from_slice::<LogRow>(&v).ok()))
}

/// A page of rows, newest first, and the number matching.
pub fn query(tree: &sled::Tree, filter: &LogFilter, page: usize, per_page: usize) -> (Vec<LogRow>, usize) {
    let mut total = 0usize;
    let mut out = Vec::new();
    let skip = page.saturating_sub(1).saturating_mul(per_page);
    for row in rows(tree).rev().filter(|r| filter.keeps(r)) {
        if total >= skip && out.len() < per_page {
            out.push(row);
        }
        total = total.saturating_add(1);
    }
    (out, total)
}

/// Sums of one group.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
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
    for r in rows(tree).filter(|r| filter.keeps(r)) {
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

/// Delete rows older than `cutoff_ms`; returns how many.
pub fn delete_before(tree: &sled::Tree, cutoff_ms: u64) -> anyhow::Result<usize> {
    let mut n = 0;
    for item in tree.iter() {
        let (key, value) = item?;
        let row: LogRow = serde_json::from_slice(&value).unwrap_or_default();
        if row.at_ms >= cutoff_ms {
            break;
        }
        tree.remove(key)?;
        n += 1;
    }
    if n > 0 {
        tree.flush()?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(1_795_305_600_000), "2026-11-22");
        assert_eq!(day(951_782_400_000), "2000-02-29");
    }
}
