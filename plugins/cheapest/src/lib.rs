//! The `cheapest` routing policy: the channel the operator pays least for
//! first — by the host's `price-ratios` (each channel's `price_ratio`
//! setting) — then higher priority, lower error rate and lower latency.
//! Channels failing in a row, or of weight 0, come last, so a cheap channel
//! that breaks does not take every request down with it.

use wasmgate_pdk_router::{Candidate, RequestMeta, Router, RouterInfo};

struct Cheapest;

/// Failures in a row after which a channel is tried last.
const MAX_CONSECUTIVE_FAILURES: u32 = 3;

fn key(a: f64) -> i64 {
    // Ratios compare to a millionth; NaN (never sent) sorts last.
    if a.is_finite() {
        (a * 1e6).round() as i64
    } else {
        i64::MAX
    }
}

fn order(prices: &[f64], candidates: &[Candidate]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..candidates.len() as u32).collect();
    idx.sort_by_key(|i| {
        let c = &candidates[*i as usize];
        let price = prices.get(*i as usize).copied().unwrap_or(1.0);
        let broken = c.consecutive_failures >= MAX_CONSECUTIVE_FAILURES || c.weight == 0;
        (broken, key(price), std::cmp::Reverse(c.priority), key(c.error_rate), key(c.latency_ms), c.channel_id)
    });
    idx
}

impl Router for Cheapest {
    fn info() -> RouterInfo {
        RouterInfo {
            name: "cheapest".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "cheapest channel first (price ratio), then priority, errors and latency".into(),
        }
    }

    fn select(_meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32> {
        order(&wasmgate_pdk_router::price_ratios(), candidates)
    }
}

wasmgate_pdk_router::export_router!(Cheapest);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_pdk_router::candidate;

    #[test]
    fn the_cheapest_healthy_channel_comes_first() {
        let mut cands = [candidate(1, 0, 1), candidate(2, 0, 1), candidate(3, 5, 1)];
        assert_eq!(order(&[1.0, 0.4, 0.7], &cands), vec![1, 2, 0]);
        cands[1].consecutive_failures = 4;
        assert_eq!(order(&[1.0, 0.4, 0.7], &cands), vec![2, 0, 1]);
    }

    #[test]
    fn equal_prices_fall_back_to_priority_then_latency() {
        let mut cands = [candidate(1, 0, 1), candidate(2, 3, 1), candidate(3, 3, 1)];
        cands[1].latency_ms = 900.0;
        cands[2].latency_ms = 100.0;
        assert_eq!(order(&[1.0, 1.0, 1.0], &cands), vec![2, 1, 0]);
        assert_eq!(order(&[], &cands), vec![2, 1, 0], "no prices: all at 1.0");
    }
}
