//! The `round-robin` routing policy: priority tiers, highest first; inside a
//! tier the channels take turns, driven by the host's per-(group, model)
//! request counter (`routing-context.sequence`), so the policy itself stays
//! stateless. Channels of weight 0 come last in their tier. Each tier's
//! rotation continues as failover order.

use wasmgate_pdk_router::{Candidate, RequestMeta, Router, RouterInfo};

struct RoundRobin;

/// Tiers in descending priority; inside each, rotate by `sequence`.
fn order(sequence: u64, candidates: &[Candidate]) -> Vec<u32> {
    let mut tiers: Vec<i64> = candidates.iter().map(|c| c.priority).collect();
    tiers.sort_unstable_by(|a, b| b.cmp(a));
    tiers.dedup();
    let mut out = Vec::with_capacity(candidates.len());
    for tier in tiers {
        let (active, idle): (Vec<u32>, Vec<u32>) = (0..candidates.len() as u32)
            .filter(|&i| candidates[i as usize].priority == tier)
            .partition(|&i| candidates[i as usize].weight > 0);
        if !active.is_empty() {
            let start = (sequence % active.len() as u64) as usize;
            out.extend(active[start..].iter().chain(&active[..start]));
        }
        out.extend(idle);
    }
    out
}

impl Router for RoundRobin {
    fn info() -> RouterInfo {
        RouterInfo {
            name: "round-robin".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "priority tiers, channels take turns inside a tier".into(),
        }
    }

    fn select(_meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32> {
        order(wasmgate_pdk_router::sequence(), candidates)
    }
}

wasmgate_pdk_router::export_router!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_pdk_router::candidate;

    #[test]
    fn channels_take_turns_inside_the_top_tier() {
        let cands = [candidate(1, 5, 1), candidate(2, 5, 1), candidate(3, 0, 1), candidate(4, 5, 1)];
        let firsts: Vec<u32> = (0..6).map(|seq| order(seq, &cands)[0]).collect();
        assert_eq!(firsts, [0, 1, 3, 0, 1, 3]);
        for seq in 0..6 {
            let o = order(seq, &cands);
            assert_eq!(o.len(), 4);
            assert_eq!(o[3], 2, "the lower tier comes after the whole top tier");
        }
    }

    #[test]
    fn zero_weight_channels_come_last_in_their_tier() {
        let cands = [candidate(1, 0, 0), candidate(2, 0, 3)];
        for seq in 0..4 {
            assert_eq!(order(seq, &cands), [1, 0]);
        }
    }
}
