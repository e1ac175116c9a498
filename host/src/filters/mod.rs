//! Traffic filters (WIT 0.1.5 `filter-plugin`): the table of rules saying
//! which filter runs for which requests and in what order — from the
//! configuration's `[[filters]]`, or, once an admin sets them through
//! `PUT /api/filters`, from the store, which then wins until
//! `DELETE /api/filters` returns to the file's table — and the chain each
//! request runs (`chain.rs`). See `docs/filters.md`.

mod chain;
mod rules;

use std::sync::Arc;

use arc_swap::ArcSwap;

pub use chain::{Chain, ChunkOutcome, RequestFacts, RequestOutcome, hook_name, refused};
pub use rules::{FilterRule, OnError, ROUTES, validate};

use crate::plugins::PluginSet;
use crate::state::AppState;
use crate::store::Store;

const OPTION: &str = "filters_override";

/// A rule with its settings serialized once (they go to every call).
pub(crate) struct CompiledRule {
    rule: FilterRule,
    settings: String,
}

/// The filter rules in force.
pub struct Filters {
    from_config: Vec<FilterRule>,
    /// The rules in chain order.
    current: ArcSwap<Vec<Arc<CompiledRule>>>,
    overridden: std::sync::atomic::AtomicBool,
    store: Store,
}

fn compile(rules: &[FilterRule]) -> Vec<Arc<CompiledRule>> {
    let mut compiled: Vec<Arc<CompiledRule>> = rules
        .iter()
        .map(|rule| {
            let settings = serde_json::to_string(&rule.settings).unwrap_or_else(|_| "{}".into());
            Arc::new(CompiledRule { rule: rule.clone(), settings })
        })
        .collect();
    compiled.sort_by_key(|c| c.rule.order);
    compiled
}

impl Filters {
    /// The stored override if there is one, else the configuration's rules.
    pub fn load(config: &[FilterRule], store: &Store) -> anyhow::Result<Self> {
        let stored: Option<Vec<FilterRule>> = match store.option(OPTION)? {
            Some(raw) => match serde_json::from_str(&raw) {
                Ok(rules) => Some(rules),
                Err(error) => {
                    tracing::warn!(%error, "stored filter rules unreadable; using the configuration's");
                    None
                }
            },
            None => None,
        };
        let overridden = stored.is_some();
        let rules = stored.unwrap_or_else(|| config.to_vec());
        Ok(Self {
            from_config: config.to_vec(),
            current: ArcSwap::from_pointee(compile(&rules)),
            overridden: overridden.into(),
            store: store.clone(),
        })
    }

    /// The rules in force (in the order given) and whether they came from
    /// the admin API.
    pub fn rules(&self) -> (Vec<FilterRule>, bool) {
        let mut rules: Vec<FilterRule> = self.current.load().iter().map(|c| c.rule.clone()).collect();
        rules.sort_by_key(|r| r.order);
        (rules, self.overridden.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Replace the rules (validated), durably.
    pub fn set(&self, rules: Vec<FilterRule>) -> Result<(), (String, String)> {
        validate(&rules)?;
        let raw = serde_json::to_string(&rules).map_err(|e| ("body".to_string(), e.to_string()))?;
        self.store.set_option(OPTION, &raw).map_err(|e| ("body".to_string(), format!("storage failed: {e:#}")))?;
        self.current.store(Arc::new(compile(&rules)));
        self.overridden.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Drop the API's rules and return to the configuration's.
    pub fn reset(&self) -> anyhow::Result<()> {
        self.store.remove_option(OPTION)?;
        self.current.store(Arc::new(compile(&self.from_config)));
        self.overridden.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The chain of a request, or `None` when no rule applies (the common
    /// case costs one atomic load and a scan of the rules).
    pub fn chain(&self, plugins: &PluginSet, facts: RequestFacts, state: &AppState) -> Option<Arc<Chain>> {
        let rules = self.current.load();
        if rules.is_empty() {
            return None;
        }
        let chain = Chain::new(&rules, plugins, facts, state);
        (!chain.is_empty()).then(|| Arc::new(chain))
    }
}
