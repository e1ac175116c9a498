//! Cheap matching of stored log rows against a filter: before a row is
//! decoded, its JSON bytes must contain the exact `"field":value,` text of
//! every field the filter names (rows are written by `serde_json` in field
//! order, with no spaces). A filtered page thus walks the log backwards
//! at the speed of a substring search, decoding only rows that are
//! probably matches; the decoded row is then checked in full.

use memchr::memmem::Finder;

use super::logs::{LogFilter, LogKind};

/// The byte patterns a stored row must contain to match a filter.
pub struct Needles(Vec<Finder<'static>>);

fn json(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl Needles {
    /// The patterns of `f` (none for a filter on time only).
    pub fn of(f: &LogFilter) -> Self {
        let mut texts = Vec::new();
        if let Some(u) = f.user_id {
            texts.push(format!("\"user_id\":{u},"));
        }
        if let Some(t) = f.token_id {
            texts.push(format!("\"token_id\":{t},"));
        }
        if let Some(t) = &f.token_name {
            texts.push(format!("\"token_name\":{},", json(t)));
        }
        if let Some(c) = f.channel_id {
            texts.push(format!("\"channel_id\":{c},"));
        }
        if let Some(m) = &f.model {
            texts.push(format!("\"model\":{},", json(m)));
        }
        if let Some(r) = &f.request_id {
            texts.push(format!("\"request_id\":{},", json(r)));
        }
        if let Some(s) = f.status {
            texts.push(format!("\"status\":{s},"));
        }
        match f.kind {
            Some(LogKind::Consume) => texts.push("\"kind\":\"consume\",".into()),
            Some(LogKind::Error) => texts.push("\"kind\":\"error\",".into()),
            Some(LogKind::Topup) => texts.push("\"kind\":\"topup\",".into()),
            None => {}
        }
        Self(texts.into_iter().map(|t| Finder::new(t.as_bytes()).into_owned()).collect())
    }

    /// Whether `raw` may be a matching row.
    pub fn may_match(&self, raw: &[u8]) -> bool {
        self.0.iter().all(|n| n.find(raw).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::logs::LogRow;

    fn stored(row: &LogRow) -> Vec<u8> {
        serde_json::to_vec(row).expect("json")
    }

    #[test]
    fn every_filtered_field_is_found_in_the_stored_row_and_only_there() {
        let row = LogRow {
            id: 9,
            kind: LogKind::Error,
            user_id: Some(7),
            token_id: Some(70),
            token_name: "k \"1\"".into(),
            channel_id: 3,
            model: "gpt-4".into(),
            upstream_model: "gpt-4o".into(),
            request_id: "req_a".into(),
            status: 502,
            ..LogRow::default()
        };
        let raw = stored(&row);
        let all = LogFilter {
            user_id: Some(7),
            token_id: Some(70),
            token_name: Some("k \"1\"".into()),
            channel_id: Some(3),
            model: Some("gpt-4".into()),
            request_id: Some("req_a".into()),
            status: Some(502),
            kind: Some(LogKind::Error),
            ..LogFilter::default()
        };
        assert!(Needles::of(&all).may_match(&raw));
        for other in [
            LogFilter { user_id: Some(70), ..LogFilter::default() },
            LogFilter { model: Some("gpt-4o".into()), ..LogFilter::default() },
            LogFilter { model: Some("gpt".into()), ..LogFilter::default() },
            LogFilter { channel_id: Some(30), ..LogFilter::default() },
            LogFilter { kind: Some(LogKind::Consume), ..LogFilter::default() },
        ] {
            assert!(!Needles::of(&other).may_match(&raw), "{other:?}");
        }
        assert!(Needles::of(&LogFilter::default()).may_match(&raw));
    }
}
