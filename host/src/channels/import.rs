//! Importing the configuration file's channels into the store without
//! clobbering edits made through the admin API.
//!
//! Each imported channel has a marker in the `options` tree,
//! `config_channel/<name>` → `{id, declared}`, where `declared` is the hash
//! of the channel's declared fields as last imported. On start, for each
//! channel in the file:
//! - no marker: create it;
//! - marker, but the channel was deleted through the API: leave it deleted;
//! - stored fields still hash to `declared` (nobody edited them): apply the
//!   file's current declaration (a no-op when unchanged);
//! - otherwise an admin edited it: keep the edit and say so in the log.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ChannelRecord, ChannelStore, PgChannels, SledChannels};
use crate::config::ChannelConfig;
use crate::store::unix_now;

#[derive(Serialize, Deserialize)]
struct Marker {
    id: u64,
    declared: String,
}

/// Hash of the fields a configuration file declares.
fn declared_hash(r: &ChannelRecord) -> String {
    let declared = (
        &r.name,
        &r.adapter,
        &r.base_url,
        &r.keys,
        &r.models,
        &r.model_mapping,
        &r.groups,
        r.priority,
        r.weight,
        &r.settings,
        &r.tags,
    );
    hex::encode(Sha256::digest(serde_json::to_vec(&declared).unwrap_or_default()))
}

fn copy_declared(from: &ChannelRecord, to: &mut ChannelRecord) {
    to.name.clone_from(&from.name);
    to.adapter.clone_from(&from.adapter);
    to.base_url.clone_from(&from.base_url);
    to.keys.clone_from(&from.keys);
    to.models.clone_from(&from.models);
    to.model_mapping.clone_from(&from.model_mapping);
    to.groups.clone_from(&from.groups);
    to.priority = from.priority;
    to.weight = from.weight;
    to.settings.clone_from(&from.settings);
    to.tags.clone_from(&from.tags);
}

/// What the import did, for the start-up log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Channels created from the file.
    pub created: usize,
    /// Channels updated from a changed declaration.
    pub updated: usize,
    /// Declarations ignored because an admin edited or deleted the channel.
    pub kept_api_version: usize,
}

/// Where imported channels and their markers go.
pub(super) trait ImportTarget: ChannelStore {
    /// A marker option.
    fn marker(&self, key: &str) -> anyhow::Result<Option<String>>;
    /// Set a marker option.
    fn set_marker(&self, key: &str, value: &str) -> anyhow::Result<()>;
    /// Store a new channel with a fresh id; returns the id.
    fn insert(&self, rec: ChannelRecord) -> anyhow::Result<u64>;
}

impl ImportTarget for SledChannels {
    fn marker(&self, key: &str) -> anyhow::Result<Option<String>> {
        self.store().option(key)
    }
    fn set_marker(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.store().set_option(key, value)
    }
    fn insert(&self, mut rec: ChannelRecord) -> anyhow::Result<u64> {
        rec.id = self.allocate_id()?;
        let id = rec.id;
        self.put_raw(rec)?;
        Ok(id)
    }
}

impl ImportTarget for PgChannels {
    fn marker(&self, key: &str) -> anyhow::Result<Option<String>> {
        self.option(key)
    }
    fn set_marker(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.set_option(key, value)
    }
    fn insert(&self, rec: ChannelRecord) -> anyhow::Result<u64> {
        Ok(self.insert_new(rec)?.id)
    }
}

impl SledChannels {
    /// Import `configs` (see the module doc).
    pub fn import_config(&self, configs: &[ChannelConfig]) -> anyhow::Result<ImportReport> {
        import(self, configs)
    }
}

impl PgChannels {
    /// Import `configs` (see the module doc), once for all the nodes
    /// starting together (under the database's advisory lock).
    pub fn import_config(&self, configs: &[ChannelConfig]) -> anyhow::Result<ImportReport> {
        self.exclusively(|| import(self, configs))
    }
}

fn import(target: &dyn ImportTarget, configs: &[ChannelConfig]) -> anyhow::Result<ImportReport> {
    let mut report = ImportReport::default();
    for c in configs {
        let wanted = ChannelRecord::from_config(c);
        let wanted_hash = declared_hash(&wanted);
        let marker_key = format!("config_channel/{}", c.name);
        let marker: Option<Marker> = target.marker(&marker_key)?.and_then(|raw| serde_json::from_str(&raw).ok());
        let Some(marker) = marker else {
            let mut rec = wanted;
            rec.created_at = unix_now();
            rec.updated_at = rec.created_at;
            let id = target.insert(rec)?;
            target.set_marker(&marker_key, &serde_json::to_string(&Marker { id, declared: wanted_hash })?)?;
            report.created += 1;
            continue;
        };
        let Some(current) = target.snapshot().records.get(&marker.id).cloned() else {
            tracing::info!(channel = %c.name, "config channel was deleted through the API; not re-imported");
            report.kept_api_version += 1;
            continue;
        };
        let current_hash = declared_hash(&current);
        if current_hash == wanted_hash {
            continue;
        }
        if current_hash != marker.declared {
            tracing::warn!(channel = %c.name, id = marker.id,
                "config declaration changed, but the channel was edited through the API; keeping the API's version");
            report.kept_api_version += 1;
            continue;
        }
        target.update(marker.id, &mut |rec| {
            copy_declared(&wanted, rec);
            Ok(())
        })?;
        let id = marker.id;
        target.set_marker(&marker_key, &serde_json::to_string(&Marker { id, declared: wanted_hash.clone() })?)?;
        report.updated += 1;
    }
    Ok(report)
}
