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
