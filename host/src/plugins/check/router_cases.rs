//! The routing-policy conformance suite: valid indices for every candidate
//! set, the same order for the same seed, and the time a call takes.

use std::time::Instant;

use super::{Report, percentiles};
use crate::plugins::{Candidate, Endpoint, RequestMeta, RouterPlugin, RoutingFacts};

/// Candidate sets of different shapes: one channel, priority tiers, equal
/// weights, zero weights, slow and failing channels, many channels.
fn candidate_sets() -> Vec<Vec<Candidate>> {
    let c = |id: u64, priority: i64, weight: u32, latency_ms: f64, error_rate: f64| Candidate {
        channel_id: id,
        priority,
        weight,
        latency_ms,
        error_rate,
        in_flight: (id % 3) as u32,
        consecutive_failures: if error_rate > 0.5 { 3 } else { 0 },
    };
    vec![
        vec![c(1, 0, 1, 0.0, 0.0)],
        vec![c(1, 0, 1, 120.0, 0.0), c(2, 0, 1, 80.0, 0.0)],
        vec![c(1, 10, 5, 200.0, 0.0), c(2, 10, 1, 50.0, 0.1), c(3, 0, 100, 20.0, 0.0)],
        vec![c(1, 0, 0, 0.0, 0.0), c(2, 0, 0, 0.0, 0.0), c(3, 0, 0, 0.0, 0.0)],
        vec![c(1, 0, 3, 900.0, 0.9), c(2, 0, 3, 40.0, 0.0), c(3, 0, 3, 45.0, 0.02), c(4, -5, 1, 10.0, 0.0)],
        (0..32)
            .map(|i| c(i, (i % 4) as i64, (i % 7 + 1) as u32, (i * 13 % 300) as f64, (i % 5) as f64 / 10.0))
            .collect(),
    ]
}

fn meta(seed: u64) -> RequestMeta {
    RequestMeta {
        endpoint: Endpoint::ChatCompletions,
        model: "conformance-model".into(),
        group: "default".into(),
        stream: seed.is_multiple_of(2),
        seed,
    }
}

fn facts(seed: u64, n: usize) -> RoutingFacts {
    RoutingFacts {
        sequence: seed,
        ttft_ms: (0..n).map(|i| (i * 17 % 200) as f64).collect(),
        user_id: Some(seed % 7),
        token_id: Some(seed % 11),
        affinity: Some(crate::plugins::Affinity {
            caller: crate::plugins::AffinityCaller::Token(seed % 11),
            session: None,
        }),
        price_ratios: (0..n).map(|i| 0.5 + (i * 7 % 5) as f64 / 4.0).collect(),
        tags: (0..n).map(|i| if i % 2 == 0 { vec!["even".to_string()].into() } else { Vec::new().into() }).collect(),
    }
}

pub(super) async fn run(router: &RouterPlugin, report: &mut Report) {
    let sets = candidate_sets();
    let mut valid = Ok(());
    let mut deterministic = Ok(());
    'sets: for (i, set) in sets.iter().enumerate() {
        for seed in 0..25u64 {
            let first = router.select(&meta(seed), set, facts(seed, set.len())).await;
            let order = match first {
                Ok(order) if order.is_empty() => {
                    valid = Err(format!("set {i} ({} candidates), seed {seed}: returned no candidate", set.len()));
                    break 'sets;
                }
                Ok(order) => order,
                Err(e) => {
                    valid = Err(format!("set {i} ({} candidates), seed {seed}: {e}", set.len()));
                    break 'sets;
                }
            };
            match router.select(&meta(seed), set, facts(seed, set.len())).await {
                Ok(again) if again == order => {}
                Ok(again) => {
                    deterministic = Err(format!("set {i}, seed {seed}: {order:?} then {again:?}"));
                }
                Err(e) => deterministic = Err(format!("set {i}, seed {seed}: second call failed: {e}")),
            }
        }
    }
    report
        .case(format!("select: valid, unique, non-empty indices over {} candidate sets × 25 seeds", sets.len()), valid);
    report.case("select: the same seed and candidates give the same order", deterministic);

    let set = &sets[4];
    let mut samples = Vec::with_capacity(500);
    for seed in 0..500u64 {
        let t = Instant::now();
        let _ = router.select(&meta(seed), set, facts(seed, set.len())).await;
        samples.push(t.elapsed());
    }
    let (p50, p99) = percentiles(samples);
    report.timings.push(format!("select (4 candidates) p50 {p50:?}, p99 {p99:?}"));
}
