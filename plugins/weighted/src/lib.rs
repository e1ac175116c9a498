//! The `weighted` routing policy (the default): candidates are grouped by
//! priority, highest tier first; inside a tier the order is a weighted random
//! permutation, so the first pick of a tier goes to each channel in
//! proportion to its weight and the rest follow as failover order.
//! Channels of weight 0 come last in their tier.

use wasmgate_pdk_router::{Candidate, RequestMeta, Router, RouterInfo, SeededRng};

struct Weighted;

/// Weighted random permutation (Efraimidis–Spirakis): each item draws the key
/// `u^(1/w)`, and sorting by key, descending, gives a sample without
/// replacement where P(first = i) = w_i / Σw.
fn order(meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32> {
    let mut rng = SeededRng::new(meta.seed);
    let mut keyed: Vec<(i64, f64, u32)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let u = rng.next_f64();
            let key = if c.weight == 0 { -1.0 + u * 1e-3 } else { u.powf(1.0 / f64::from(c.weight)) };
            (c.priority, key, i as u32)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)));
    keyed.into_iter().map(|(_, _, i)| i).collect()
}

impl Router for Weighted {
    fn info() -> RouterInfo {
        RouterInfo {
            name: "weighted".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "priority tiers, weighted random order inside a tier".into(),
        }
    }

    fn select(meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32> {
        order(meta, candidates)
    }
}

wasmgate_pdk_router::export_router!(Weighted);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_pdk_router::{candidate, request_meta};

    fn meta(seed: u64) -> RequestMeta {
        request_meta(seed, false)
    }

    #[test]
    fn first_pick_follows_weights_and_tiers_come_in_order() {
        let cands = [candidate(1, 0, 1), candidate(2, 0, 2), candidate(3, 0, 7), candidate(4, -1, 100)];
        let mut firsts = [0u32; 4];
        for seed in 0..20_000u64 {
            let order = order(&meta(seed), &cands);
            assert_eq!(order.len(), 4);
            assert_eq!(order[3], 3, "the lower tier is always last");
            firsts[order[0] as usize] += 1;
        }
        let share = |i: usize| f64::from(firsts[i]) / 20_000.0;
        assert!((share(0) - 0.1).abs() < 0.02, "{firsts:?}");
        assert!((share(1) - 0.2).abs() < 0.02, "{firsts:?}");
        assert!((share(2) - 0.7).abs() < 0.02, "{firsts:?}");
    }

    #[test]
    fn same_seed_same_order_and_zero_weight_last() {
        let cands = [candidate(1, 0, 0), candidate(2, 0, 5), candidate(3, 0, 5)];
        assert_eq!(order(&meta(7), &cands), order(&meta(7), &cands));
        for seed in 0..100 {
            assert_eq!(order(&meta(seed), &cands)[2], 0);
        }
    }
}
