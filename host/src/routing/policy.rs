//! Which routing policy serves a (group, model): a global policy and
//! rules, from the configuration file or — once an admin sets them through
//! `PUT /api/routing` — from the store, which then wins until
//! `DELETE /api/routing` returns to the file's table.

use std::sync::Arc;

use crate::config::RoutingConfig;
use crate::plugins::valid_plugin_name;
use crate::store::overrides::{OptionStore, Override};

const OPTION: &str = "routing_override";

/// The routing table in force.
pub struct Policies {
    table: Arc<Override<RoutingConfig>>,
}

impl Policies {
    /// The stored override if there is one, else the configuration's table.
    pub fn load(config: &RoutingConfig, options: Arc<dyn OptionStore>) -> anyhow::Result<Self> {
        Ok(Self { table: Override::load(OPTION, config.clone(), RoutingConfig::clone, options)? })
    }

    /// The table in force and whether it came from the admin API.
    pub fn table(&self) -> (Arc<RoutingConfig>, bool) {
        self.table.raw()
    }

    /// Replace the table (validated), durably.
    pub fn set(&self, table: RoutingConfig) -> Result<(), (String, String)> {
        validate(&table)?;
        self.table.set(table).map_err(|e| ("body".to_string(), format!("storage failed: {e:#}")))
    }

    /// Drop the API's table and return to the configuration's.
    pub fn reset(&self) -> anyhow::Result<()> {
        self.table.reset()
    }

    /// The policy for `group` and `model`: a rule naming both, then one
    /// naming the model, then one naming the group, then the global policy.
    pub fn policy_for(&self, group: &str, model: &str) -> String {
        let table = self.table.current();
        let find = |g: bool, m: bool| {
            table.rules.iter().find(|r| {
                r.group.as_deref().is_some() == g
                    && r.model.as_deref().is_some() == m
                    && r.group.as_deref().is_none_or(|x| x == group)
                    && r.model.as_deref().is_none_or(|x| x == model)
            })
        };
        find(true, true)
            .or_else(|| find(false, true))
            .or_else(|| find(true, false))
            .map_or_else(|| table.policy.clone(), |r| r.policy.clone())
    }
}

/// Policy names must be plugin names; rules must name a group or a model.
fn validate(table: &RoutingConfig) -> Result<(), (String, String)> {
    if !valid_plugin_name(&table.policy) {
        return Err(("policy".into(), "`policy` must be a routing plugin name".into()));
    }
    for (i, rule) in table.rules.iter().enumerate() {
        if !valid_plugin_name(&rule.policy) {
            return Err((format!("rules[{i}].policy"), format!("`rules[{i}].policy` must be a routing plugin name")));
        }
        if rule.group.is_none() && rule.model.is_none() {
            return Err((format!("rules[{i}]"), format!("`rules[{i}]` must name a group, a model or both")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutingRule;

    fn rule(group: Option<&str>, model: Option<&str>, policy: &str) -> RoutingRule {
        RoutingRule { group: group.map(Into::into), model: model.map(Into::into), policy: policy.into() }
    }

    #[test]
    fn most_specific_rule_wins_and_overrides_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn OptionStore> = Arc::new(crate::store::Store::open(dir.path()).expect("store"));
        let config = RoutingConfig {
            policy: "weighted".into(),
            rules: vec![rule(Some("vip"), None, "latency"), rule(None, Some("m"), "round-robin")],
        };
        let p = Policies::load(&config, store.clone()).expect("load");
        assert_eq!(p.policy_for("default", "x"), "weighted");
        assert_eq!(p.policy_for("vip", "x"), "latency");
        assert_eq!(p.policy_for("vip", "m"), "round-robin");
        let mut table = config.clone();
        table.rules.push(rule(Some("vip"), Some("m"), "pick"));
        p.set(table).expect("set");
        assert_eq!(p.policy_for("vip", "m"), "pick");
        let reloaded = Policies::load(&config, store.clone()).expect("reload");
        assert_eq!((reloaded.policy_for("vip", "m"), reloaded.table().1), ("pick".to_string(), true));
        reloaded.reset().expect("reset");
        assert_eq!(reloaded.policy_for("vip", "m"), "round-robin");
        assert!(p.set(RoutingConfig { policy: "../x".into(), rules: vec![] }).is_err());
    }
}
