//! The `latency` routing policy: power of two choices on a latency score.
//! Inside the highest priority tier two channels are drawn at random (from
//! the request's seed) and the one with the lower score goes first; every
//! other channel follows by ascending score, lower tiers after. Sampling two
//! instead of always taking the minimum keeps a fast channel from being
//! stampeded while its statistics catch up.
//!
//! The score is the EWMA latency (time to first token for streams, when
//! known) scaled up by the recent error rate, consecutive failures and
//! requests in flight. A channel with no latency yet scores 0, so new
//! channels are tried and measured.

use wasmgate_pdk_router::{Candidate, RequestMeta, Router, RouterInfo, SeededRng};

struct Latency;

/// Lower is better.
fn score(c: &Candidate, ttft_ms: f64, stream: bool) -> f64 {
    let latency = if stream && ttft_ms > 0.0 { ttft_ms } else { c.latency_ms.max(0.0) };
    let errors = 1.0 + 10.0 * c.error_rate.clamp(0.0, 1.0) + f64::from(c.consecutive_failures.min(100));
    let load = 1.0 + 0.25 * f64::from(c.in_flight);
    latency * errors * load
}

fn order(meta: &RequestMeta, candidates: &[Candidate], ttft: &[f64]) -> Vec<u32> {
    let scores: Vec<f64> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| score(c, ttft.get(i).copied().unwrap_or(0.0), meta.stream))
        .collect();
    let mut out: Vec<u32> = (0..candidates.len() as u32).collect();
    out.sort_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        candidates[b].priority.cmp(&candidates[a].priority).then(scores[a].total_cmp(&scores[b]))
    });
    let top = candidates.iter().map(|c| c.priority).max().unwrap_or(0);
    let tier_len = out.iter().take_while(|&&i| candidates[i as usize].priority == top).count();
    if tier_len >= 2 {
        let mut rng = SeededRng::new(meta.seed);
        let a = (rng.next_u64() % tier_len as u64) as usize;
        let mut b = (rng.next_u64() % (tier_len as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let pick = if scores[out[a] as usize] <= scores[out[b] as usize] { a } else { b };
        let chosen = out.remove(pick);
        out.insert(0, chosen);
    }
    out
}

impl Router for Latency {
    fn info() -> RouterInfo {
        RouterInfo {
            name: "latency".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "power of two choices on EWMA latency with an error penalty".into(),
        }
    }

    fn select(meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32> {
        let ttft = if meta.stream { wasmgate_pdk_router::ttft_ms() } else { Vec::new() };
        order(meta, candidates, &ttft)
    }
}

wasmgate_pdk_router::export_router!(Latency);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_pdk_router::request_meta as meta;

    fn candidate(id: u64, priority: i64, latency_ms: f64, error_rate: f64) -> Candidate {
        Candidate { latency_ms, error_rate, ..wasmgate_pdk_router::candidate(id, priority, 1) }
    }

    #[test]
    fn faster_channel_wins_most_and_slowest_never_first() {
        let cands = [candidate(1, 0, 50.0, 0.0), candidate(2, 0, 100.0, 0.0), candidate(3, 0, 400.0, 0.0)];
        let mut firsts = [0u32; 3];
        for seed in 0..3000 {
            firsts[order(&meta(seed, false), &cands, &[])[0] as usize] += 1;
        }
        // P2C: the fastest wins every pair it is in (2 of 3 pairs).
        assert!(firsts[0] > 1800 && firsts[0] < 2200, "{firsts:?}");
        assert_eq!(firsts[2], 0, "{firsts:?}");
    }

    #[test]
    fn errors_outweigh_speed_and_tiers_hold() {
        let cands = [candidate(1, 0, 10.0, 0.9), candidate(2, 0, 30.0, 0.0), candidate(3, -1, 1.0, 0.0)];
        for seed in 0..200 {
            let o = order(&meta(seed, false), &cands, &[]);
            assert_eq!(o, [1, 0, 2]);
        }
    }

    #[test]
    fn streams_use_time_to_first_token_when_known() {
        let cands = [candidate(1, 0, 100.0, 0.0), candidate(2, 0, 200.0, 0.0)];
        let ttft = [900.0, 20.0];
        assert_eq!(order(&meta(1, true), &cands, &ttft)[0], 1);
        assert_eq!(order(&meta(1, false), &cands, &ttft)[0], 0);
    }
}
