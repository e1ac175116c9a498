//! Channels — upstream accounts — and the store that serves them to the
//! relay. Only the config-file store exists now; the sled-backed store with
//! the admin API implements the same trait.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::config::ChannelConfig;
use crate::plugins::ChannelView;

/// One upstream account, as the relay uses it.
#[derive(Debug, Clone)]
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
    /// Upstream credential.
    pub key: String,
    /// Models offered (empty: the adapter's defaults).
    pub models: Vec<String>,
    /// Requested → upstream model name.
    pub model_mapping: BTreeMap<String, String>,
    /// Priority tier.
    pub priority: i64,
    /// Weight inside the tier.
    pub weight: u32,
    /// Adapter settings as a JSON object string.
    pub settings: String,
}

impl Channel {
    /// Build from the config file's declaration.
    pub fn from_config(id: u64, c: &ChannelConfig) -> Self {
        let base_url = c.base_url.trim_end_matches('/').to_string();
        Self {
            id,
            name: c.name.clone(),
            adapter: c.adapter.clone(),
            origin: origin_of(&base_url).unwrap_or_default(),
            base_url,
            key: c.key.clone(),
            models: c.models.clone(),
            model_mapping: c.model_mapping.clone(),
            priority: c.priority,
            weight: c.weight,
            settings: serde_json::Value::Object(c.settings.clone()).to_string(),
        }
    }

    /// Whether this channel offers `model` (`defaults` when it lists none).
    pub fn offers(&self, model: &str, defaults: &[String]) -> bool {
        if self.models.is_empty() {
            defaults.iter().any(|m| m == model)
        } else {
            self.models.iter().any(|m| m == model)
        }
    }

    /// The upstream name of `model` on this channel.
    pub fn upstream_model(&self, model: &str) -> String {
        self.model_mapping.get(model).cloned().unwrap_or_else(|| model.to_string())
    }

    /// What the adapter sees.
    pub fn view(&self) -> ChannelView {
        ChannelView {
            id: self.id,
            name: self.name.clone(),
            base_url: self.base_url.clone(),
            key: self.key.clone(),
            settings: self.settings.clone(),
        }
    }

    /// Remove this channel's secrets and address from `text` before it can
    /// reach a client or a log.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in [self.key.as_str(), self.base_url.as_str(), self.origin.as_str()] {
            if secret.len() >= 4 {
                out = out.replace(secret, "[redacted]");
            }
        }
        out
    }
}

/// `scheme://host[:port]` of a URL.
pub fn origin_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    Some(url.origin().ascii_serialization())
}

/// Where the relay finds channels.
pub trait ChannelStore: Send + Sync {
    /// All channels in service.
    fn all(&self) -> Vec<Arc<Channel>>;
}

/// Channels declared in the configuration file.
pub struct ConfigChannels {
    channels: Vec<Arc<Channel>>,
}

impl ConfigChannels {
    /// Number the configured channels from 1.
    pub fn new(configs: &[ChannelConfig]) -> Self {
        let channels =
            configs.iter().enumerate().map(|(i, c)| Arc::new(Channel::from_config(i as u64 + 1, c))).collect();
        Self { channels }
    }
}

impl ChannelStore for ConfigChannels {
    fn all(&self) -> Vec<Arc<Channel>> {
        self.channels.clone()
    }
}

/// Models offered by `channels`, de-duplicated and sorted.
pub fn model_names(channels: &[Arc<Channel>], defaults: impl Fn(&str) -> Vec<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ch in channels {
        if ch.models.is_empty() {
            out.extend(defaults(&ch.adapter));
        } else {
            out.extend(ch.models.iter().cloned());
        }
    }
    out
}
