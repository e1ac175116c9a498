//! Routing: which channels may serve a request, in which order. Candidates
//! are the channels in service for the caller's group that offer the model;
//! the routing-policy plugin chosen for (group, model) orders them with the
//! channels' live statistics. A policy that is missing, traps or returns
//! bad indices is reported and replaced for that request by `weighted`,
//! then by the host's own priority order.

mod policy;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub use policy::Policies;
pub use stats::{ChannelStats, InFlight, StatsBook, StatsView};

use crate::channels::{Channel, ChannelSet};
use crate::plugins::{Affinity, Candidate, Endpoint, PluginSet, Registry, RequestMeta, RoutingFacts};

/// The default policy, also the fallback of a failing one.
pub const FALLBACK_POLICY: &str = "weighted";

/// Routing state shared by all requests.
pub struct Routing {
    /// Which policy serves which (group, model).
    pub policies: Policies,
    /// Live statistics per channel.
    pub stats: StatsBook,
    /// Requests routed per (group, model), keyed by a hash of the pair.
    sequences: RwLock<HashMap<u64, Arc<AtomicU64>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// What routing needs to know about a request.
pub struct RouteRequest<'a> {
    /// Endpoint called.
    pub endpoint: Endpoint,
    /// Requested model.
    pub model: &'a str,
    /// Caller's group.
    pub group: &'a str,
    /// Streamed or not.
    pub stream: bool,
    /// The calling user's id.
    pub user_id: Option<u64>,
    /// The calling token's id.
    pub token_id: Option<u64>,
    /// Who is calling and in which session.
    pub affinity: Affinity,
}

/// Channels in `set` that may serve `model` for `group`. A channel whose
/// adapter is not loaded still counts when it lists the model explicitly,
/// so the client learns the adapter is missing instead of "unknown model".
pub fn candidates(set: &ChannelSet, plugins: &PluginSet, group: &str, model: &str) -> Vec<Arc<Channel>> {
    set.for_group(group).filter(|ch| ch.offers(model, default_models(plugins, &ch.adapter))).cloned().collect()
}

/// The default models of `adapter` (none when it is not loaded).
fn default_models<'a>(plugins: &'a PluginSet, adapter: &str) -> &'a [String] {
    plugins.adapters.get(adapter).map_or(&[][..], |a| &a.info.default_models[..])
}

/// When no channel in service offers `model` to `group`, whether some
/// channel would, were it not disabled or cooling down. `Some(secs)` then
/// carries the shortest remaining cool-down (0 when none is cooling).
pub fn unavailable(set: &ChannelSet, plugins: &PluginSet, group: &str, model: &str) -> Option<u64> {
    let now = crate::store::unix_now_ms();
    let mut found = None;
    for rec in set.records.values().filter(|r| r.groups.iter().any(|g| g == group)) {
        if !crate::channels::offers(&rec.models, model, default_models(plugins, &rec.adapter)) {
            continue;
        }
        let wait = match rec.status {
            crate::channels::ChannelState::CoolingDown { until_ms, .. } => until_ms.saturating_sub(now).div_ceil(1000),
            _ => u64::MAX,
        };
        found = Some(found.map_or(wait, |w: u64| w.min(wait)));
    }
    found.map(|w| if w == u64::MAX { 0 } else { w })
}

/// Priority tiers, highest first, by id inside a tier.
fn priority_order(mut channels: Vec<Arc<Channel>>) -> Vec<Arc<Channel>> {
    channels.sort_by_key(|c| (std::cmp::Reverse(c.priority), c.id));
    channels
}

impl Routing {
    /// Routing with `policies` and empty statistics.
    pub fn new(policies: Policies) -> Self {
        Self { policies, stats: StatsBook::default(), sequences: RwLock::default(), hasher: Default::default() }
    }

    fn next_sequence(&self, group: &str, model: &str) -> u64 {
        use std::hash::BuildHasher;
        let key = self.hasher.hash_one((group, model));
        if let Some(c) = self.sequences.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key) {
            return c.fetch_add(1, Ordering::Relaxed);
        }
        let mut map = self.sequences.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(key).or_default().fetch_add(1, Ordering::Relaxed)
    }

    /// Order `channels` (ascending id) for `req`.
    pub async fn order(
        &self,
        plugins: &PluginSet,
        registry: &Registry,
        req: &RouteRequest<'_>,
        channels: Vec<Arc<Channel>>,
    ) -> Vec<Arc<Channel>> {
        if channels.len() < 2 {
            return channels;
        }
        let views: Vec<StatsView> = channels.iter().map(|c| self.stats.view(c.id)).collect();
        let candidates: Vec<Candidate> = channels
            .iter()
            .zip(&views)
            .map(|(ch, s)| Candidate {
                channel_id: ch.id,
                priority: ch.priority,
                weight: ch.weight,
                latency_ms: s.latency_ms,
                error_rate: s.error_rate,
                in_flight: s.in_flight,
                consecutive_failures: s.consecutive_failures,
            })
            .collect();
        let meta = RequestMeta {
            endpoint: req.endpoint,
            model: req.model.to_string(),
            group: req.group.to_string(),
            stream: req.stream,
            seed: rand::random(),
        };
        let facts = RoutingFacts {
            sequence: self.next_sequence(req.group, req.model),
            ttft_ms: views.iter().map(|s| s.ttft_ms).collect(),
            user_id: req.user_id,
            token_id: req.token_id,
            affinity: Some(req.affinity.clone()),
            price_ratios: channels.iter().map(|c| c.price_ratio).collect(),
            tags: channels.iter().map(|c| c.tags.clone()).collect(),
        };
        let policy = self.policies.policy_for(req.group, req.model);
        let mut tried = vec![policy.as_str()];
        if policy != FALLBACK_POLICY {
            tried.push(FALLBACK_POLICY);
        }
        for name in tried {
            let Some(router) = plugins.routers.get(name) else {
                tracing::warn!(policy = name, "routing policy not loaded");
                continue;
            };
            match router.select(&meta, &candidates, facts.clone()).await {
                Ok(indices) if !indices.is_empty() => {
                    return indices.into_iter().map(|i| channels[i].clone()).collect();
                }
                Ok(_) => {
                    tracing::warn!(policy = name, "routing policy returned no candidate");
                    registry.report_call_failure(name, "select returned no candidate");
                }
                Err(error) => {
                    tracing::warn!(policy = name, %error, "routing policy failed; falling back");
                    registry.report_call_failure(name, &error.to_string());
                }
            }
        }
        priority_order(channels)
    }
}
