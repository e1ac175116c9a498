//! Prices, in one-api's scheme. Quota is the gateway's money:
//! `quota_per_dollar` (500,000) quota = $1, and a model ratio of 1 means
//! $0.002 per 1K tokens, i.e. 1 quota per token. For a request:
//!
//! ```text
//! quota = ceil(( (prompt - cached) + cached × cached_ratio + completion × completion_ratio )
//!              × model_ratio × group_ratio)
//! ```
//!
//! A model priced per call costs `price × quota_per_dollar × group_ratio`.
//! A model with no price is refused, or free when `unpriced = "free"` —
//! an explicit choice, never a silent default of zero.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::overrides::{OptionStore, Override};

/// How a model is priced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Model ratio: 1 = $0.002 / 1K prompt tokens; 0 = free.
    #[serde(default)]
    pub ratio: f64,
    /// Completion tokens cost `completion_ratio` × a prompt token.
    #[serde(default = "one")]
    pub completion_ratio: f64,
    /// Cached prompt tokens cost `cached_ratio` × a prompt token.
    #[serde(default = "one")]
    pub cached_ratio: f64,
    /// Dollars per request; when set, tokens are not counted for the price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    /// Most completion tokens one request may ask for (`max_tokens`); a
    /// larger value is refused like OpenAI refuses it. Default: the table's
    /// `max_completion_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
}

fn one() -> f64 {
    1.0
}

/// What to do with a model that has no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unpriced {
    /// Refuse the request (403 `model_not_priced`).
    #[default]
    Refuse,
    /// Serve it for free (logged with quota 0).
    Free,
}

/// The price table (`[billing]` in the configuration, or `PUT /api/pricing`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Quota units per dollar.
    pub quota_per_dollar: f64,
    /// Completion tokens pre-charged when a request sets no `max_tokens`.
    pub default_completion_tokens: u32,
    /// Most completion tokens a request may ask for, for models without
    /// their own `max_output_tokens`.
    pub max_completion_tokens: u64,
    /// Models without a price.
    pub unpriced: Unpriced,
    /// Per-group multipliers (default 1).
    pub group_ratios: BTreeMap<String, f64>,
    /// Per-model prices.
    pub models: BTreeMap<String, ModelPrice>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        Self {
            quota_per_dollar: 500_000.0,
            default_completion_tokens: 256,
            max_completion_tokens: 1 << 20,
            unpriced: Unpriced::Refuse,
            group_ratios: BTreeMap::new(),
            models: BTreeMap::new(),
        }
    }
}

/// The price of one request, resolved at admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Price {
    /// Per token.
    Tokens {
        /// Model ratio × group ratio.
        ratio: f64,
        /// Completion ratio.
        completion_ratio: f64,
        /// Cached-prompt ratio.
        cached_ratio: f64,
    },
    /// A fixed quota per request.
    PerRequest(u64),
}

/// The largest charge the gateway computes ($2 billion at the default
/// 500,000 quota per dollar): a request estimated above it cannot be
/// priced and is refused; charges are clamped to it.
pub const MAX_QUOTA: i64 = 1_000_000_000_000_000;

impl Price {
    /// Quota for the given token counts, clamped to `0..=MAX_QUOTA` (no
    /// wrap-around, whatever the counts).
    pub fn quota(&self, prompt: u64, completion: u64, cached: u64) -> i64 {
        match *self {
            Price::PerRequest(q) => i64::try_from(q).unwrap_or(MAX_QUOTA).min(MAX_QUOTA),
            Price::Tokens { ratio, completion_ratio, cached_ratio } => {
                let cached = cached.min(prompt);
                let weighted =
                    (prompt - cached) as f64 + cached as f64 * cached_ratio + completion as f64 * completion_ratio;
                let q = (weighted * ratio).ceil();
                if q.is_nan() || q <= 0.0 {
                    0
                } else if q >= MAX_QUOTA as f64 {
                    MAX_QUOTA
                } else {
                    q as i64
                }
            }
        }
    }

    /// Whether any usage costs something.
    pub fn is_free(&self) -> bool {
        match *self {
            Price::PerRequest(q) => q == 0,
            Price::Tokens { ratio, .. } => ratio == 0.0,
        }
    }
}

impl PricingConfig {
    /// The price of `model` for `group`; `None` when the model is unpriced
    /// and unpriced models are refused.
    pub fn price(&self, model: &str, group: &str) -> Option<Price> {
        let group_ratio = self.group_ratios.get(group).copied().unwrap_or(1.0).max(0.0);
        match self.models.get(model) {
            Some(ModelPrice { price: Some(dollars), .. }) => {
                // A float-to-int cast saturates; MAX_QUOTA clamps later.
                Some(Price::PerRequest((dollars * self.quota_per_dollar * group_ratio).ceil().max(0.0) as u64))
            }
            Some(p) => Some(Price::Tokens {
                ratio: p.ratio.max(0.0) * group_ratio,
                completion_ratio: p.completion_ratio.max(0.0),
                cached_ratio: p.cached_ratio.max(0.0),
            }),
            None => match self.unpriced {
                Unpriced::Refuse => None,
                Unpriced::Free => Some(Price::PerRequest(0)),
            },
        }
    }

    /// Most completion tokens a request for `model` may ask for.
    pub fn max_output_tokens(&self, model: &str) -> u64 {
        self.models.get(model).and_then(|p| p.max_output_tokens).unwrap_or(self.max_completion_tokens)
    }

    /// Check the table; the error names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_completion_tokens == 0 {
            return Err(("max_completion_tokens".into(), "`max_completion_tokens` must be positive".into()));
        }
        if !self.quota_per_dollar.is_finite() || self.quota_per_dollar <= 0.0 {
            return Err(("quota_per_dollar".into(), "`quota_per_dollar` must be positive".into()));
        }
        for (model, p) in &self.models {
            let bad = [p.ratio, p.completion_ratio, p.cached_ratio, p.price.unwrap_or(0.0)]
                .iter()
                .any(|v| !v.is_finite() || *v < 0.0);
            if bad {
                let field = format!("models.{model}");
                return Err((field.clone(), format!("`{field}`: ratios and prices must be finite and ≥ 0")));
            }
        }
        if let Some((g, _)) = self.group_ratios.iter().find(|(_, r)| !r.is_finite() || **r < 0.0) {
            let field = format!("group_ratios.{g}");
            return Err((field.clone(), format!("`{field}` must be finite and ≥ 0")));
        }
        Ok(())
    }
}

const OPTION: &str = "pricing_override";

/// The price table in force: the configuration's, or the admin API's once set.
pub struct Pricing {
    table: Arc<Override<PricingConfig>>,
}

impl Pricing {
    /// Load the stored override, else the configuration's table.
    pub fn load(config: &PricingConfig, options: Arc<dyn OptionStore>) -> anyhow::Result<Self> {
        Ok(Self { table: Override::load(OPTION, config.clone(), PricingConfig::clone, options)? })
    }

    /// The table in force.
    pub fn table(&self) -> Arc<PricingConfig> {
        self.table.current()
    }

    /// Replace the table durably.
    pub fn set(&self, table: PricingConfig) -> Result<(), (String, String)> {
        table.validate()?;
        self.table.set(table).map_err(|e| ("body".to_string(), format!("storage failed: {e:#}")))
    }

    /// Return to the configuration's table.
    pub fn reset(&self) -> anyhow::Result<()> {
        self.table.reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_api_formula_with_cache_group_and_per_call_prices() {
        let mut t = PricingConfig::default();
        t.models.insert(
            "gpt-4o-mini".into(),
            ModelPrice { ratio: 0.075, completion_ratio: 4.0, cached_ratio: 0.5, price: None, max_output_tokens: None },
        );
        t.models.insert(
            "img".into(),
            ModelPrice {
                ratio: 0.0,
                completion_ratio: 1.0,
                cached_ratio: 1.0,
                price: Some(0.04),
                max_output_tokens: None,
            },
        );
        t.group_ratios.insert("vip".into(), 0.5);
        let p = t.price("gpt-4o-mini", "default").expect("priced");
        // (9 - 3) + 3 × 0.5 + 12 × 4 = 55.5; × 0.075 = 4.1625 → 5
        assert_eq!(p.quota(9, 12, 3), 5);
        // 1000 prompt + 1000 completion: (1000 + 4000) × 0.075 = 375; vip halves it.
        assert_eq!(p.quota(1000, 1000, 0), 375);
        assert_eq!(t.price("gpt-4o-mini", "vip").expect("priced").quota(1000, 1000, 0), 188);
        assert_eq!(t.price("img", "default"), Some(Price::PerRequest(20_000)));
        assert_eq!(t.price("unknown", "default"), None);
        t.unpriced = Unpriced::Free;
        assert_eq!(t.price("unknown", "default").expect("free").quota(100, 100, 0), 0);
    }

    #[test]
    fn quotas_never_wrap() {
        let p = Price::Tokens { ratio: 1.0, completion_ratio: 1.0, cached_ratio: 1.0 };
        assert_eq!(p.quota(u64::MAX, u64::MAX, 0), MAX_QUOTA);
        assert_eq!(p.quota(0, u64::MAX, u64::MAX), MAX_QUOTA);
        assert_eq!(Price::PerRequest(u64::MAX).quota(0, 0, 0), MAX_QUOTA);
        let free = Price::Tokens { ratio: 0.0, completion_ratio: 4.0, cached_ratio: 1.0 };
        assert!(free.is_free());
        assert_eq!(free.quota(u64::MAX, u64::MAX, 0), 0);
    }
}
