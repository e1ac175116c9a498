//! Candidate channels for a request and their order, decided by the
//! routing-policy plugin.

use std::sync::Arc;

use crate::channels::Channel;
use crate::plugins::{Candidate, PluginSet, RequestMeta};

use super::request::ClientRequest;

/// Channels that offer the requested model. A channel whose adapter is not
/// loaded still counts when it lists the model explicitly, so the client
/// learns the adapter is missing instead of "unknown model".
pub fn candidates(channels: &[Arc<Channel>], plugins: &PluginSet, model: &str) -> Vec<Arc<Channel>> {
    channels
        .iter()
        .filter(|ch| match plugins.adapters.get(&ch.adapter) {
            Some(adapter) => ch.offers(model, &adapter.info.default_models),
            None => ch.models.iter().any(|m| m == model),
        })
        .cloned()
        .collect()
}

/// The host's own order, used when the policy is missing or misbehaves:
/// priority tiers, highest first, in declaration order.
fn fallback_order(mut channels: Vec<Arc<Channel>>) -> Vec<Arc<Channel>> {
    channels.sort_by_key(|c| std::cmp::Reverse(c.priority));
    channels
}

/// Order `channels` with the policy `policy`.
pub fn order(plugins: &PluginSet, policy: &str, req: &ClientRequest, channels: Vec<Arc<Channel>>) -> Vec<Arc<Channel>> {
    if channels.len() < 2 {
        return channels;
    }
    let Some(router) = plugins.routers.get(policy) else {
        tracing::warn!(policy, "routing policy not loaded; using priority order");
        return fallback_order(channels);
    };
    let meta = RequestMeta {
        endpoint: req.endpoint,
        model: req.model.clone(),
        group: "default".into(),
        stream: req.stream,
        seed: rand::random(),
    };
    let candidates: Vec<Candidate> = channels
        .iter()
        .map(|ch| Candidate {
            channel_id: ch.id,
            priority: ch.priority,
            weight: ch.weight,
            latency_ms: 0.0,
            error_rate: 0.0,
            in_flight: 0,
            consecutive_failures: 0,
        })
        .collect();
    match router.select(&meta, &candidates) {
        Ok(indices) if !indices.is_empty() => indices.into_iter().map(|i| channels[i].clone()).collect(),
        Ok(_) => {
            tracing::warn!(policy, "routing policy returned no candidate; using priority order");
            fallback_order(channels)
        }
        Err(error) => {
            tracing::warn!(policy, %error, "routing policy failed; using priority order");
            fallback_order(channels)
        }
    }
}
