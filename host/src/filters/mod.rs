//! Traffic filters (WIT 0.1.5 `filter-plugin`): the table of rules saying
//! which filter runs for which requests and in what order — from the
//! configuration's `[[filters]]`, or, once an admin sets them through
//! `PUT /api/filters`, from the store, which then wins until
//! `DELETE /api/filters` returns to the file's table — and the chain each
//! request runs (`chain.rs`). See `docs/filters.md`.

mod chain;
mod rules;

use std::sync::Arc;

pub use chain::{Chain, ChunkOutcome, RequestFacts, RequestOutcome, hook_name, refused};
pub use rules::{FilterRule, OnError, ROUTES, validate};

use crate::plugins::PluginSet;
use crate::state::AppState;
use crate::store::overrides::{OptionStore, Override};

const OPTION: &str = "filters_override";

/// A rule with its settings serialized once (they go to every call).
pub(crate) struct CompiledRule {
    rule: FilterRule,
    settings: String,
}

/// The rules in chain order, compiled.
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

/// The filter rules in force.
pub struct Filters {
    table: Arc<Override<Vec<FilterRule>, Vec<Arc<CompiledRule>>>>,
}

impl Filters {
    /// The stored override if there is one, else the configuration's rules.
    pub fn load(config: &[FilterRule], options: Arc<dyn OptionStore>) -> anyhow::Result<Self> {
        Ok(Self { table: Override::load(OPTION, config.to_vec(), |rules: &Vec<FilterRule>| compile(rules), options)? })
    }

    /// The rules in force (in chain order) and whether they came from the
    /// admin API.
    pub fn rules(&self) -> (Vec<FilterRule>, bool) {
        let (_, overridden) = self.table.raw();
        (self.table.current().iter().map(|c| c.rule.clone()).collect(), overridden)
    }

    /// Replace the rules (validated), durably.
    pub fn set(&self, rules: Vec<FilterRule>) -> Result<(), (String, String)> {
        validate(&rules)?;
        self.table.set(rules).map_err(|e| ("body".to_string(), format!("storage failed: {e:#}")))
    }

    /// Drop the API's rules and return to the configuration's.
    pub fn reset(&self) -> anyhow::Result<()> {
        self.table.reset()
    }

    /// The chain of a request, or `None` when no rule applies (the common
    /// case costs one atomic load and a scan of the rules; `facts` is only
    /// built when some rule exists).
    pub fn chain(
        &self,
        plugins: &PluginSet,
        facts: impl FnOnce() -> RequestFacts,
        state: &AppState,
    ) -> Option<Arc<Chain>> {
        let rules = self.table.current();
        if rules.is_empty() {
            return None;
        }
        let chain = Chain::new(&rules, plugins, facts(), state);
        (!chain.is_empty()).then(|| Arc::new(chain))
    }
}
