//! Channels — upstream accounts. The relay reads an immutable in-memory
//! [`ChannelSet`] snapshot; the admin API writes through a [`ChannelStore`]
//! (sled now; a shared SQL backend would implement the same trait).

mod import;
mod input;
mod pg_store;
mod record;
mod sled_store;
mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use import::ImportReport;
pub use input::{ChannelInput, FieldError, Mode, parse as parse_input};
pub use pg_store::PgChannels;
pub use record::{ChannelKey, ChannelRecord, ChannelSource, HISTORY_LEN, mask};
pub use sled_store::SledChannels;
pub use status::{ChannelState, EventSource, KeyAuto, StatusEvent};

use crate::plugins::ChannelView;

/// One key of a channel as the adapter sees it, built once per snapshot.
#[derive(Debug)]
pub struct KeyView {
    /// What the adapter is given.
    pub view: ChannelView,
    /// The key's index in the record (`None` for keyless upstreams).
    pub index: Option<usize>,
    /// Identifies the credential this view exchanges for (see
    /// [`crate::relay::credentials`]).
    pub fingerprint: [u8; 32],
}

/// One channel in service, as the relay uses it.
#[derive(Debug)]
pub struct Channel {
    /// Stable id.
    pub id: u64,
    /// Display name.
    pub name: String,
    /// Adapter plugin name.
    pub adapter: String,
    /// Base URL.
    pub base_url: String,
    /// Origin (`scheme://host:port`) every upstream request must go to.
    pub origin: String,
    /// What the adapter sees for each enabled credential, with the key's
    /// index in the record, rotated per request (built once, not per call).
    views: Vec<KeyView>,
    /// Every credential, enabled or not, for scrubbing.
    all_keys: Vec<String>,
    next_key: AtomicUsize,
    /// Native protocols this channel's adapter said it does not speak here
    /// (by the adapter version that said so), so that later requests are
    /// translated without asking again.
    not_native: std::sync::Mutex<Vec<(crate::plugins::Operation, String)>>,
    /// Models offered (empty: the adapter's defaults).
    pub models: Vec<String>,
    /// Requested → upstream model name.
    pub model_mapping: BTreeMap<String, String>,
    /// Caller groups served.
    pub groups: Vec<String>,
    /// Priority tier.
    pub priority: i64,
    /// Weight inside the tier.
    pub weight: u32,
    /// Adapter settings as a JSON object string.
    pub settings: String,
    /// Speak HTTP/2 with prior knowledge to a plain-HTTP upstream (the
    /// `http2: true` setting; over TLS HTTP/2 is negotiated anyway).
    pub http2: bool,
    /// Unix ms until which the channel is cooling down (0: not cooling).
    pub cooling_until_ms: u64,
    /// Tags (routing policies see them).
    pub tags: Arc<[String]>,
    /// What the operator pays for this channel relative to list price (the
    /// `price_ratio` setting, 1.0 when unset or not a positive number).
    pub price_ratio: f64,
}

impl Channel {
    /// The runtime form of a stored record.
    pub fn from_record(rec: &ChannelRecord) -> Self {
        let mut ch = Self {
            id: rec.id,
            name: rec.name.clone(),
            adapter: rec.adapter.clone(),
            base_url: rec.base_url.clone(),
            origin: origin_of(&rec.base_url).unwrap_or_default(),
            views: Vec::new(),
            all_keys: rec.keys.iter().map(|k| k.key.clone()).collect(),
            next_key: AtomicUsize::new(0),
            not_native: std::sync::Mutex::default(),
            models: rec.models.clone(),
            model_mapping: rec.model_mapping.clone(),
            groups: rec.groups.clone(),
            priority: rec.priority,
            weight: rec.weight,
            settings: serde_json::Value::Object(rec.settings.clone()).to_string(),
            http2: rec.settings.get("http2") == Some(&serde_json::Value::Bool(true)),
            tags: rec.tags.clone().into(),
            price_ratio: rec
                .settings
                .get("price_ratio")
                .and_then(serde_json::Value::as_f64)
                .filter(|r| r.is_finite() && *r > 0.0)
                .unwrap_or(1.0),
            cooling_until_ms: match rec.status {
                ChannelState::CoolingDown { until_ms, .. } => until_ms,
                _ => 0,
            },
        };
        ch.views = if rec.keys.is_empty() {
            vec![ch.key_view(None, "")]
        } else {
            rec.keys.iter().enumerate().filter(|(_, k)| k.enabled).map(|(i, k)| ch.key_view(Some(i), &k.key)).collect()
        };
        ch
    }

    /// The channel as a probe of key `index` sees it, whatever the key's or
    /// the channel's state (the recovery tester probes disabled keys).
    pub fn with_only_key(rec: &ChannelRecord, index: usize) -> Self {
        let mut ch = Self::from_record(rec);
        ch.views = rec.keys.get(index).map(|k| vec![ch.key_view(Some(index), &k.key)]).unwrap_or_default();
        ch
    }

    fn key_view(&self, index: Option<usize>, key: &str) -> KeyView {
        let view = ChannelView {
            id: self.id,
            name: self.name.clone(),
            base_url: self.base_url.clone(),
            key: key.to_string(),
            settings: self.settings.clone(),
        };
        KeyView { fingerprint: crate::relay::credentials::fingerprint(&view), view, index }
    }

    /// Whether `url` is on this channel's origin. The common case — the
    /// adapter joined a path to the base URL — is a prefix check; anything
    /// else is parsed.
    pub fn same_origin(&self, url: &str) -> bool {
        // The base URL was checked to be an http(s) URL with a host; what
        // follows it starts its path or query, so the authority is its own.
        if let Some(rest) = url.strip_prefix(self.base_url.as_str())
            && (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
            && !self.origin.is_empty()
        {
            return true;
        }
        origin_of(url).as_deref() == Some(self.origin.as_str())
    }

    /// Whether this channel offers `model` (`defaults` when it lists none).
    pub fn offers(&self, model: &str, defaults: &[String]) -> bool {
        offers(&self.models, model, defaults)
    }

    /// Whether callers of `group` may use this channel.
    pub fn serves(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The upstream name of `model` on this channel.
    pub fn upstream_model(&self, model: &str) -> String {
        self.model_mapping.get(model).cloned().unwrap_or_else(|| model.to_string())
    }

    /// What the adapter sees with the next key of the rotation.
    pub fn view(&self) -> &KeyView {
        &self.views[self.next_key.fetch_add(1, Ordering::Relaxed) % self.views.len()]
    }

    /// What the adapter sees with the key a session keeps (key-level
    /// affinity, for providers' prompt caches): rendezvous hashing of
    /// `session` over the keys in rotation, so when a key leaves, only its
    /// sessions move.
    pub fn view_for(&self, session: u64) -> &KeyView {
        let score = |v: &KeyView| {
            let mut z = session ^ (v.index.unwrap_or(0) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        self.views.iter().max_by_key(|v| score(v)).unwrap_or_else(|| self.view())
    }

    /// Whether adapter version `plugin_sha256` said it does not speak
    /// `operation` natively on this channel (see [`Self::set_not_native`]).
    pub fn not_native(&self, operation: crate::plugins::Operation, plugin_sha256: &str) -> bool {
        self.not_native
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|(op, sha)| *op == operation && sha == plugin_sha256)
    }

    /// Remember that the adapter version `plugin_sha256` does not speak
    /// `operation` natively on this channel.
    pub fn set_not_native(&self, operation: crate::plugins::Operation, plugin_sha256: &str) {
        let mut known = self.not_native.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !known.iter().any(|(op, sha)| *op == operation && sha == plugin_sha256) {
            known.push((operation, plugin_sha256.to_string()));
        }
    }

    /// Whether the channel has more than one key in rotation.
    pub fn multi_key(&self) -> bool {
        self.views.len() > 1
    }

    /// Remove this channel's secrets and address from `text` before it can
    /// reach a client or a log: every key, in any case, also cut short (any
    /// run of at least its first 8 characters), and the base URL, origin,
    /// `host:port` and host.
    pub fn scrub(&self, text: &str) -> String {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let lower = text.to_ascii_lowercase();
        for key in &self.all_keys {
            let key = key.to_ascii_lowercase();
            let probe_len = key.len().min(8);
            if key.len() < 4 {
                continue;
            }
            let probe = &key[..probe_len];
            let mut from = 0;
            while let Some(at) = lower[from..].find(probe).map(|i| i + from) {
                let run = lower[at..].bytes().zip(key.bytes()).take_while(|(a, b)| a == b).count();
                spans.push((at, at + run));
                from = at + run.max(1);
            }
        }
        for needle in self.addresses() {
            let needle = needle.to_ascii_lowercase();
            let mut from = 0;
            while let Some(at) = lower[from..].find(&needle).map(|i| i + from) {
                spans.push((at, at + needle.len()));
                from = at + needle.len();
            }
        }
        redact(text, spans)
    }

    /// The channel's addresses, longest first: base URL, origin,
    /// `host:port`, host.
    fn addresses(&self) -> Vec<String> {
        let mut out = vec![self.base_url.clone(), self.origin.clone()];
        if let Ok(url) = reqwest::Url::parse(&self.base_url)
            && let Some(host) = url.host_str()
        {
            if let Some(port) = url.port_or_known_default() {
                out.push(format!("{host}:{port}"));
            }
            out.push(host.to_string());
        }
        out.retain(|a| a.len() >= 4);
        out
    }
}

/// `text` with the byte `spans` (which may overlap) replaced by `[redacted]`.
fn redact(text: &str, mut spans: Vec<(usize, usize)>) -> String {
    if spans.is_empty() {
        return text.to_string();
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    for (start, end) in spans {
        if end <= pos {
            continue;
        }
        let start = start.max(pos);
        // Spans come from ASCII matches, so they fall on character boundaries.
        out.push_str(text.get(pos..start).unwrap_or_default());
        if !out.ends_with("[redacted]") {
            out.push_str("[redacted]");
        }
        pos = end;
    }
    out.push_str(text.get(pos..).unwrap_or_default());
    out
}

/// Whether a channel listing `models` offers `model`; a channel that lists
/// none offers its adapter's `defaults`.
pub fn offers(models: &[String], model: &str, defaults: &[String]) -> bool {
    let names = if models.is_empty() { defaults } else { models };
    names.iter().any(|m| m == model)
}

/// `scheme://host[:port]` of a URL.
pub fn origin_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    Some(url.origin().ascii_serialization())
}

/// An immutable view of every channel, swapped atomically on each change.
#[derive(Default)]
pub struct ChannelSet {
    /// Every record, by id.
    pub records: BTreeMap<u64, Arc<ChannelRecord>>,
    /// Channels in service or cooling down, by ascending id.
    pub live: Vec<Arc<Channel>>,
}

impl ChannelSet {
    /// Build from records.
    pub fn new(records: impl IntoIterator<Item = ChannelRecord>) -> Self {
        let records: BTreeMap<u64, Arc<ChannelRecord>> = records.into_iter().map(|r| (r.id, Arc::new(r))).collect();
        let live = records
            .values()
            .filter(|r| matches!(r.status, ChannelState::Enabled | ChannelState::CoolingDown { .. }))
            .filter(|r| r.keys.is_empty() || r.keys.iter().any(|k| k.enabled))
            .map(|r| Arc::new(Channel::from_record(r)))
            .collect();
        Self { records, live }
    }

    /// Channels in service for callers of `group` now (a cool-down that
    /// has run out counts as in service).
    pub fn for_group<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a Arc<Channel>> + 'a {
        let now = crate::store::unix_now_ms();
        self.live.iter().filter(move |c| c.cooling_until_ms <= now && c.serves(group))
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No channel has this id.
    #[error("no channel with id {0}")]
    NotFound(u64),
    /// The change is invalid.
    #[error("{}", .0.message)]
    Invalid(FieldError),
    /// The storage backend failed.
    #[error("storage failed: {0:#}")]
    Backend(#[from] anyhow::Error),
}

/// Where channels are kept. Reads come from the snapshot; writes are
/// durable when they return and visible to the next request.
pub trait ChannelStore: Send + Sync {
    /// The current channels (cheap: an `Arc` clone).
    fn snapshot(&self) -> Arc<ChannelSet>;
    /// Store a new channel; assigns its id and times.
    fn create(&self, rec: ChannelRecord) -> Result<ChannelRecord, StoreError>;
    /// Change channel `id` with `f` (under the store's write lock).
    fn update(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError>;
    /// Like [`Self::update`], for changes made on the request path (health
    /// transitions): visible to the next request at once, written to disk
    /// soon after by the store's own thread, never by the caller's.
    fn update_soon(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut ChannelRecord) -> Result<(), FieldError>,
    ) -> Result<ChannelRecord, StoreError> {
        self.update(id, f)
    }
    /// Delete channel `id`, returning what it was.
    fn delete(&self, id: u64) -> Result<ChannelRecord, StoreError>;
    /// Health transitions published but not yet written (`update_soon`).
    fn pending_writes(&self) -> usize {
        0
    }
    /// Of `ids`, the channels this node may probe for the next `lease`:
    /// with several nodes on one database only one probes a channel at a
    /// time (the holder keeps it while alive). Blocking: call it off the
    /// async workers. One node alone probes everything.
    fn claim_probes(&self, ids: &[u64], _lease: std::time::Duration) -> Vec<u64> {
        ids.to_vec()
    }
}

/// Models that channels in `set` offer to `group`, de-duplicated and sorted,
/// each with the adapter of the first channel offering it.
pub fn models_for_group(
    set: &ChannelSet,
    group: &str,
    defaults: impl Fn(&str) -> Vec<String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for ch in set.for_group(group) {
        let names = if ch.models.is_empty() { defaults(&ch.adapter) } else { ch.models.clone() };
        for m in names {
            out.entry(m).or_insert_with(|| ch.adapter.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_fast_path_never_admits_another_authority() {
        let ch =
            |base: &str| Channel::from_record(&ChannelRecord { base_url: base.into(), ..ChannelRecord::default() });
        let with_path = ch("http://10.0.0.1:8080/v1");
        assert!(with_path.same_origin("http://10.0.0.1:8080/v1/chat/completions"));
        assert!(with_path.same_origin("http://10.0.0.1:8080/other"));
        assert!(!with_path.same_origin("http://10.0.0.1:8081/v1/chat"));
        let bare = ch("http://10.0.0.1:8080");
        assert!(bare.same_origin("http://10.0.0.1:8080/chat"));
        assert!(!bare.same_origin("http://10.0.0.1:8080@evil.example/chat"));
        assert!(!bare.same_origin("http://10.0.0.1:80800/chat"));
        assert!(!bare.same_origin("http://10.0.0.1:8080.evil.example/chat"));
    }

    #[test]
    fn scrubbing_catches_any_case_cut_keys_and_bare_addresses() {
        let rec = ChannelRecord {
            base_url: "http://10.1.2.3:8443/v1".into(),
            keys: vec![ChannelKey::new("sk-upstream-SECRET-0123456789".into())],
            ..ChannelRecord::default()
        };
        let ch = Channel::from_record(&rec);
        for (text, gone) in [
            ("bad key sk-upstream-SECRET-0123456789 given", "SECRET"),
            ("BAD KEY SK-UPSTREAM-SECRET-0123456789", "SECRET"),
            ("key sk-upstream-SEC… is invalid", "sk-upstream"),
            ("Host: 10.1.2.3:8443 refused", "10.1.2.3"),
            ("connect to http://10.1.2.3:8443/v1/chat failed", "10.1.2.3"),
        ] {
            let out = ch.scrub(text);
            assert!(!out.to_ascii_lowercase().contains(&gone.to_ascii_lowercase()), "{text} -> {out}");
            assert!(out.contains("[redacted]"), "{out}");
        }
        assert_eq!(ch.scrub("nothing to hide"), "nothing to hide");
    }
}
