//! What the admin API accepts for a channel, and its validation. Every
//! error names the field it is about.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::record::{ChannelKey, ChannelRecord, split_keys};
use crate::plugins::valid_plugin_name;

/// A validation failure of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as the client named it (`weight`, `keys[2]`).
    pub field: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl std::fmt::Display) -> Self {
        Self { field: field.to_string(), message: format!("`{field}` {message}") }
    }
}

/// A channel as sent to `POST`, `PUT` or `PATCH /api/channels`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelInput {
    name: Option<String>,
    adapter: Option<String>,
    base_url: Option<String>,
    /// One or more keys, one per line (one-api's format). Replaces all keys.
    key: Option<String>,
    /// Keys as a list. Replaces all keys.
    keys: Option<Vec<String>>,
    /// Indices of keys to disable; every other key is enabled.
    disabled_keys: Option<Vec<usize>>,
    models: Option<Vec<String>>,
    model_mapping: Option<BTreeMap<String, String>>,
    groups: Option<Vec<String>>,
    priority: Option<i64>,
    weight: Option<u32>,
    /// `enabled` / `disabled`: the same as the enable and disable actions.
    status: Option<ManualStatus>,
    settings: Option<Map<String, Value>>,
    tags: Option<Vec<String>>,
}

/// The states an admin can set directly.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ManualStatus {
    Enabled,
    Disabled,
}

/// How an input applies to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `POST`: a new channel; name, adapter and base_url required.
    Create,
    /// `PUT`: the whole channel; absent fields take their defaults, except
    /// keys, which are kept when absent (the API never shows them).
    Replace,
    /// `PATCH`: only the fields present change.
    Patch,
}

/// Parse a JSON body, naming the field of any type error.
pub fn parse(body: &[u8]) -> Result<ChannelInput, FieldError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." || path.is_empty() { "body".to_string() } else { path };
        FieldError { message: format!("`{field}`: {inner}"), field }
    })
}

const MAX_WEIGHT: u32 = 1_000_000;
const MAX_KEYS: usize = 1_000;

fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ChannelInput {
    /// Apply to `rec` (a default record for `Create`), validating each field.
    pub fn apply(self, rec: &mut ChannelRecord, mode: Mode) -> Result<(), FieldError> {
        if mode == Mode::Replace {
            let keep = (rec.id, std::mem::take(&mut rec.keys), rec.created_at, rec.source, rec.used_quota);
            let tested = (rec.test_time, rec.response_time_ms);
            let health = (std::mem::take(&mut rec.status), std::mem::take(&mut rec.history));
            *rec = ChannelRecord::default();
            (rec.id, rec.keys, rec.created_at, rec.source, rec.used_quota) = keep;
            (rec.test_time, rec.response_time_ms) = tested;
            (rec.status, rec.history) = health;
        }
        let required = mode != Mode::Patch;
        match self.name {
            Some(name) => {
                let name = name.trim();
                if name.is_empty() || name.chars().count() > 128 {
                    return Err(FieldError::new("name", "must be 1 to 128 characters"));
                }
                rec.name = name.to_string();
            }
            None if required => return Err(FieldError::new("name", "is required")),
            None => {}
        }
        match self.adapter {
            Some(adapter) if !valid_plugin_name(&adapter) => {
                return Err(FieldError::new("adapter", "must be a plugin name (letters, digits, `-`, `_`)"));
            }
            Some(adapter) => rec.adapter = adapter,
            None if required => return Err(FieldError::new("adapter", "is required")),
            None => {}
        }
        match self.base_url {
            Some(url) => rec.base_url = valid_base_url(&url)?,
            None if required => return Err(FieldError::new("base_url", "is required")),
            None => {}
        }
        if self.key.is_some() && self.keys.is_some() {
            return Err(FieldError::new("keys", "cannot be given together with `key`"));
        }
        let new_keys: Option<Vec<String>> = match (self.key, self.keys) {
            (Some(text), None) => Some(split_keys(&text).collect()),
            (None, Some(list)) => Some(list.into_iter().map(|k| k.trim().to_string()).collect()),
            _ => None,
        };
        if let Some(keys) = new_keys {
            if keys.len() > MAX_KEYS {
                return Err(FieldError::new("keys", format_args!("must hold at most {MAX_KEYS} keys")));
            }
            for (i, k) in keys.iter().enumerate() {
                if k.is_empty() || k.len() > 4096 || k.chars().any(char::is_whitespace) {
                    return Err(FieldError::new(&format!("keys[{i}]"), "must be a non-empty key without spaces"));
                }
            }
            rec.keys = keys.into_iter().map(ChannelKey::new).collect();
        }
        if let Some(disabled) = self.disabled_keys {
            if let Some(bad) = disabled.iter().find(|&&i| i >= rec.keys.len()) {
                return Err(FieldError::new("disabled_keys", format_args!("names key {bad}, which does not exist")));
            }
            for (i, k) in rec.keys.iter_mut().enumerate() {
                k.enabled = !disabled.contains(&i);
                k.auto = None;
            }
        }
        if let Some(models) = self.models {
            let mut out: Vec<String> = Vec::with_capacity(models.len());
            for (i, m) in models.into_iter().enumerate() {
                let m = m.trim().to_string();
                if m.is_empty() || m.len() > 256 {
                    return Err(FieldError::new(&format!("models[{i}]"), "must be 1 to 256 characters"));
                }
                if !out.contains(&m) {
                    out.push(m);
                }
            }
            rec.models = out;
        }
        if let Some(mapping) = self.model_mapping {
            if let Some((from, _)) = mapping.iter().find(|(k, v)| k.trim().is_empty() || v.trim().is_empty()) {
                return Err(FieldError::new("model_mapping", format_args!("maps `{from}` to or from an empty name")));
            }
            rec.model_mapping = mapping;
        }
        if let Some(groups) = self.groups {
            if groups.is_empty() {
                return Err(FieldError::new("groups", "must name at least one group"));
            }
            if let Some(g) = groups.iter().find(|g| !name_ok(g)) {
                return Err(FieldError::new("groups", format_args!("has an invalid group name `{g}`")));
            }
            rec.groups = groups;
        }
        if let Some(p) = self.priority {
            rec.priority = p;
        }
        if let Some(w) = self.weight {
            if w > MAX_WEIGHT {
                return Err(FieldError::new("weight", format_args!("must be at most {MAX_WEIGHT}")));
            }
            rec.weight = w;
        }
        let now = crate::store::unix_now_ms();
        match self.status {
            Some(ManualStatus::Disabled) => rec.disable_manually("admin", "", now),
            Some(ManualStatus::Enabled) => rec.enable_manually("", now),
            None => {}
        }
        if let Some(settings) = self.settings {
            rec.settings = settings;
        }
        if let Some(tags) = self.tags {
            if tags.iter().any(|t| t.trim().is_empty() || t.len() > 64) {
                return Err(FieldError::new("tags", "must be 1 to 64 characters each"));
            }
            rec.tags = tags;
        }
        Ok(())
    }
}

/// An http(s) URL with a host, without its trailing slash.
pub fn valid_base_url(url: &str) -> Result<String, FieldError> {
    let trimmed = url.trim().trim_end_matches('/');
    match reqwest::Url::parse(trimmed) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(trimmed.to_string()),
        _ => Err(FieldError::new("base_url", "must be an http(s) URL with a host")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(body: &str) -> Result<ChannelRecord, FieldError> {
        let mut rec = ChannelRecord::default();
        parse(body.as_bytes())?.apply(&mut rec, Mode::Create)?;
        Ok(rec)
    }

    #[test]
    fn errors_name_their_field() {
        let e = create(r#"{"name":"a","adapter":"openai","base_url":"ftp://x"}"#).expect_err("must fail");
        assert_eq!(e.field, "base_url");
        let e =
            create(r#"{"name":"a","adapter":"openai","base_url":"http://x","weight":"heavy"}"#).expect_err("must fail");
        assert_eq!(e.field, "weight");
        assert!(e.message.contains("`weight`"), "{}", e.message);
        let e = create(r#"{"adapter":"openai","base_url":"http://x"}"#).expect_err("must fail");
        assert_eq!(e.field, "name");
        let e = create(r#"{"name":"a","adapter":"openai","base_url":"http://x","colour":1}"#).expect_err("must fail");
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = create(r#"{"name":"a","adapter":"openai","base_url":"http://x","keys":["k1","k 2"]}"#)
            .expect_err("must fail");
        assert_eq!(e.field, "keys[1]");
    }

    #[test]
    fn replace_keeps_keys_patch_changes_only_what_is_given() {
        let mut rec = create(r#"{"name":"a","adapter":"openai","base_url":"http://x/v1/","key":"k1\nk2","weight":5}"#)
            .expect("valid");
        assert_eq!(rec.base_url, "http://x/v1");
        assert_eq!(rec.keys.len(), 2);
        parse(br#"{"disabled_keys":[1]}"#).expect("valid").apply(&mut rec, Mode::Patch).expect("valid");
        assert_eq!((rec.keys[0].enabled, rec.keys[1].enabled, rec.weight), (true, false, 5));
        parse(br#"{"name":"b","adapter":"openai","base_url":"http://y"}"#)
            .expect("valid")
            .apply(&mut rec, Mode::Replace)
            .expect("valid");
        assert_eq!((rec.name.as_str(), rec.weight, rec.keys.len()), ("b", 1, 2));
    }
}
