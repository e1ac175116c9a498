//! Filter rules: which filter runs for which requests, in what order, and
//! what happens when it fails.

use serde::{Deserialize, Serialize};

use crate::plugins::valid_plugin_name;

/// What a failed filter call (trap, timeout, fuel, invalid output, or the
/// filter not loaded) does to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail closed (the default): the request fails with a 502
    /// `plugin_error` — a filter that protects data must not be bypassed by
    /// its own failure.
    #[default]
    Refuse,
    /// Fail open: the filter is skipped for this request and the failure
    /// counted (`wasmgate_filter_actions_total{action="skipped"}`).
    Skip,
}

/// One filter in the chains of the requests it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterRule {
    /// The filter plugin's name (its file stem).
    pub plugin: String,
    /// Position in the chain: lower runs first on the request and on the
    /// answer alike; equal orders keep the table's order.
    #[serde(default)]
    pub order: i32,
    /// Routes the rule applies to (`chat_completions`, `completions`,
    /// `embeddings`, `responses`, `messages`, `gemini`); all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// Caller groups the rule applies to; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Requested models the rule applies to: exact names, or a prefix
    /// ending in `*` (`gpt-4*`); all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// What a failure of the filter does.
    #[serde(default)]
    pub on_error: OnError,
    /// Settings handed to the filter with every call (its own format).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// Routes a rule may name.
pub const ROUTES: [&str; 6] = ["chat_completions", "completions", "embeddings", "responses", "messages", "gemini"];

impl FilterRule {
    /// Whether the rule applies to a request on `route` by a caller of
    /// `group` for `model`.
    pub fn matches(&self, route: &str, group: &str, model: &str) -> bool {
        let any_or = |list: &[String], f: &dyn Fn(&str) -> bool| list.is_empty() || list.iter().any(|x| f(x));
        any_or(&self.routes, &|r| r == route)
            && any_or(&self.groups, &|g| g == group)
            && any_or(&self.models, &|m| match m.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => m == model,
            })
    }
}

/// Check a table of rules; the error names the field at fault.
pub fn validate(rules: &[FilterRule]) -> Result<(), (String, String)> {
    if rules.len() > 64 {
        return Err(("filters".into(), "at most 64 filter rules".into()));
    }
    for (i, rule) in rules.iter().enumerate() {
        let field = |f: &str| format!("filters[{i}].{f}");
        if !valid_plugin_name(&rule.plugin) {
            return Err((field("plugin"), format!("`{}` is not a plugin name", rule.plugin)));
        }
        if let Some(route) = rule.routes.iter().find(|r| !ROUTES.contains(&r.as_str())) {
            return Err((field("routes"), format!("unknown route `{route}` (one of {})", ROUTES.join(", "))));
        }
        if rule.models.iter().any(|m| m.is_empty() || m[..m.len() - 1].contains('*')) {
            return Err((field("models"), "a model is a name or a prefix ending in `*`".into()));
        }
        let settings = serde_json::to_vec(&rule.settings).map_or(0, |s| s.len());
        if settings > 64 * 1024 {
            return Err((field("settings"), "settings are limited to 64 KiB of JSON".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> FilterRule {
        serde_json::from_str(json).expect("rule")
    }

    #[test]
    fn rules_match_by_route_group_and_model_prefix() {
        let r = rule(r#"{"plugin": "pii-redact", "routes": ["chat_completions"], "models": ["gpt-4*", "o3"]}"#);
        assert!(r.matches("chat_completions", "any", "gpt-4o"));
        assert!(r.matches("chat_completions", "any", "o3"));
        assert!(!r.matches("chat_completions", "any", "o3-mini"));
        assert!(!r.matches("embeddings", "any", "gpt-4o"));
        assert!(rule(r#"{"plugin": "x"}"#).matches("gemini", "vip", "anything"));
        assert!(validate(&[rule(r#"{"plugin": "x", "routes": ["chat"]}"#)]).is_err());
        assert!(validate(&[rule(r#"{"plugin": "x", "models": ["a*b*"]}"#)]).is_err());
        assert!(validate(&[r]).is_ok());
    }
}
