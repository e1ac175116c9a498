//! The stored form of a channel, and how the admin API shows it (keys
//! masked).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::status::{ChannelState, EventSource, KeyAuto, StatusEvent};
use crate::config::{ChannelConfig, DEFAULT_GROUP};

/// Transitions kept per channel (oldest dropped first).
pub const HISTORY_LEN: usize = 50;

/// One upstream credential of a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelKey {
    /// The secret. Never shown by the API or written to the log.
    pub key: String,
    /// A disabled key is skipped by the rotation; the channel keeps serving
    /// with its other keys.
    pub enabled: bool,
    /// Set when the key was disabled automatically (bad key, exhausted
    /// quota); such keys are probed and re-enabled when they work again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<KeyAuto>,
}

impl ChannelKey {
    /// An enabled key.
    pub fn new(key: String) -> Self {
        Self { key, enabled: true, auto: None }
    }
}

/// Where a channel was first declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelSource {
    /// Created through the admin API.
    #[default]
    Api,
    /// Imported from the configuration file.
    Config,
}

/// A channel as stored (one sled value, JSON). Unknown fields of newer
/// versions are ignored and missing ones take their defaults, so records
/// survive upgrades; breaking changes go through `store::migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelRecord {
    /// Stable id, never reused.
    pub id: u64,
    /// Display name.
    pub name: String,
    /// Adapter plugin name.
    pub adapter: String,
    /// Upstream base URL, without a trailing slash.
    pub base_url: String,
    /// Credentials, rotated per request.
    pub keys: Vec<ChannelKey>,
    /// Models offered, as clients name them (empty: the adapter's defaults).
    pub models: Vec<String>,
    /// Requested model → upstream model name.
    pub model_mapping: BTreeMap<String, String>,
    /// Caller groups served.
    pub groups: Vec<String>,
    /// Priority tier; higher tiers are tried first.
    pub priority: i64,
    /// Weight inside the tier.
    pub weight: u32,
    /// Health state.
    pub status: ChannelState,
    /// Recent state transitions, oldest first (at most [`HISTORY_LEN`]).
    pub history: Vec<StatusEvent>,
    /// Adapter settings (e.g. Azure's `api-version`).
    pub settings: Map<String, Value>,
    /// Labels for search.
    pub tags: Vec<String>,
    /// Unix seconds of creation.
    pub created_at: u64,
    /// Unix seconds of the last change of any field above.
    pub updated_at: u64,
    /// Unix seconds of the last `POST /api/channels/{id}/test`.
    pub test_time: Option<u64>,
    /// Response time of that test, in ms.
    pub response_time_ms: Option<u64>,
    /// Quota consumed through this channel.
    pub used_quota: u64,
    /// Where the channel was first declared.
    pub source: ChannelSource,
}

impl Default for ChannelRecord {
    fn default() -> Self {
        Self {
            id: 0,
            name: String::new(),
            adapter: String::new(),
            base_url: String::new(),
            keys: Vec::new(),
            models: Vec::new(),
            model_mapping: BTreeMap::new(),
            groups: vec![DEFAULT_GROUP.to_string()],
            priority: 0,
            weight: 1,
            status: ChannelState::Enabled,
            history: Vec::new(),
            settings: Map::new(),
            tags: Vec::new(),
            created_at: 0,
            updated_at: 0,
            test_time: None,
            response_time_ms: None,
            used_quota: 0,
            source: ChannelSource::Api,
        }
    }
}

/// Split one-api style key text: one key per line, blanks ignored.
pub fn split_keys(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines().map(str::trim).filter(|k| !k.is_empty()).map(str::to_string)
}

impl ChannelRecord {
    /// The record a configuration declaration describes (id and times unset).
    pub fn from_config(c: &ChannelConfig) -> Self {
        let keys = split_keys(&c.key).chain(c.keys.iter().flat_map(|k| split_keys(k))).map(ChannelKey::new).collect();
        Self {
            name: c.name.clone(),
            adapter: c.adapter.clone(),
            base_url: c.base_url.trim_end_matches('/').to_string(),
            keys,
            models: c.models.clone(),
            model_mapping: c.model_mapping.clone(),
            groups: if c.groups.is_empty() { vec![DEFAULT_GROUP.to_string()] } else { c.groups.clone() },
            priority: c.priority,
            weight: c.weight,
            settings: c.settings.clone(),
            tags: c.tags.clone(),
            source: ChannelSource::Config,
            ..Self::default()
        }
    }

    /// The API's view: every field, keys masked.
    pub fn masked(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| json!({"index": i, "key": mask(&k.key), "enabled": k.enabled, "auto": k.auto}))
            .collect();
        json!({
            "id": self.id, "object": "channel", "name": self.name, "adapter": self.adapter,
            "base_url": self.base_url, "keys": keys, "models": self.models,
            "model_mapping": self.model_mapping, "groups": self.groups, "priority": self.priority,
            "weight": self.weight, "status": self.status, "history": self.history,
            "settings": self.settings, "tags": self.tags,
            "created_at": self.created_at, "updated_at": self.updated_at, "test_time": self.test_time,
            "response_time_ms": self.response_time_ms, "used_quota": self.used_quota, "source": self.source,
        })
    }

    /// Move to `to`, recording the transition (no-op when already there).
    pub fn transition(&mut self, to: ChannelState, source: EventSource, reason: &str, now_ms: u64) {
        if self.status == to {
            return;
        }
        let event = StatusEvent {
            at_ms: now_ms,
            from: self.status.name().to_string(),
            to: to.name().to_string(),
            source,
            reason: reason.to_string(),
        };
        self.status = to;
        self.record_event(event);
    }

    /// An admin takes the channel out of service.
    pub fn disable_manually(&mut self, by: &str, note: &str, now_ms: u64) {
        let state = ChannelState::ManuallyDisabled { by: by.to_string(), at: now_ms / 1000, note: note.to_string() };
        if !matches!(self.status, ChannelState::ManuallyDisabled { .. }) {
            self.transition(
                state,
                EventSource::Manual,
                if note.is_empty() { "disabled by an admin" } else { note },
                now_ms,
            );
        }
    }

    /// An admin puts the channel back in service, with every key that was
    /// disabled automatically.
    pub fn enable_manually(&mut self, note: &str, now_ms: u64) {
        self.restore(EventSource::Manual, if note.is_empty() { "enabled by an admin" } else { note }, now_ms);
    }

    /// Back in service, with every key that was disabled automatically
    /// (keys an admin disabled stay disabled).
    pub fn restore(&mut self, source: EventSource, reason: &str, now_ms: u64) {
        for k in self.keys.iter_mut().filter(|k| k.auto.is_some()) {
            k.enabled = true;
            k.auto = None;
        }
        self.transition(ChannelState::Enabled, source, reason, now_ms);
    }

    /// Append `event` to the bounded history.
    pub fn record_event(&mut self, event: StatusEvent) {
        self.history.push(event);
        if self.history.len() > HISTORY_LEN {
            let excess = self.history.len() - HISTORY_LEN;
            self.history.drain(..excess);
        }
    }

    /// Whether the search text `q` appears in the name, adapter, a model,
    /// a tag or a group (case-insensitive).
    pub fn matches(&self, q: &str) -> bool {
        let q = q.to_lowercase();
        let hit = |s: &str| s.to_lowercase().contains(&q);
        hit(&self.name)
            || hit(&self.adapter)
            || self.models.iter().any(|m| hit(m))
            || self.tags.iter().any(|t| hit(t))
            || self.groups.iter().any(|g| hit(g))
    }
}

/// `sk-…wxyz`: enough to recognise a key, never enough to use it.
pub fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "****".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_never_reveal_more_than_seven_chars() {
        assert_eq!(mask("sk-abcdefghijklmnop1234"), "sk-…1234");
        assert_eq!(mask("short"), "****");
    }

    #[test]
    fn one_api_style_key_lines_split() {
        let keys: Vec<String> = split_keys("k1\n\n  k2 \r\nk3").collect();
        assert_eq!(keys, ["k1", "k2", "k3"]);
    }
}
