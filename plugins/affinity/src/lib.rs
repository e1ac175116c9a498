//! The `affinity` routing policy: requests of one session (the host's
//! `affinity-key`: the client's `x-session-id`, `prompt_cache_key` or
//! `user`, with its token) go to the same channel while it stays healthy,
//! so an upstream's prompt cache keeps hitting. The channel is chosen by
//! weighted rendezvous hashing inside the highest priority tier: when it
//! fails, the session moves to its next channel, and only the sessions of
//! that channel move; they return when it is healthy again. Without a key
//! the order is by priority, then weight.

use wasmgate_pdk_router::{Candidate, RequestMeta, Router, RouterInfo};

struct Affinity;

/// A channel is left for last after this many failures in a row or above
/// this error rate.
const MAX_CONSECUTIVE_FAILURES: u32 = 3;
const MAX_ERROR_RATE: f64 = 0.5;

fn healthy(c: &Candidate) -> bool {
    c.consecutive_failures < MAX_CONSECUTIVE_FAILURES && c.error_rate <= MAX_ERROR_RATE && c.weight > 0
}

/// FNV-1a, then SplitMix64's finalizer: a well-spread 64-bit hash.
fn hash(key: &str, channel: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain(channel.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Weighted rendezvous score: the highest wins; a channel of weight `w`
/// wins a share `w / Σw` of the keys.
fn score(key: &str, c: &Candidate) -> f64 {
    let u = ((hash(key, c.channel_id) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(c.weight.max(1)) / u.ln()
}

/// Healthy channels first, by priority tier (highest first), inside a tier
/// by the session's score (or by weight without a key); then the rest.
fn order(key: Option<&str>, candidates: &[Candidate]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..candidates.len() as u32).collect();
    let rank = |i: &u32| {
        let c = &candidates[*i as usize];
        let within = match key {
            Some(k) => score(k, c),
            None => f64::from(c.weight),
        };
        (!healthy(c), std::cmp::Reverse(c.priority), std::cmp::Reverse(OrdF64(within)), c.channel_id)
    };
    idx.sort_by_key(rank);
    idx
}

/// A total order on the scores (`f64::total_cmp`, also for equality).
struct OrdF64(f64);
impl PartialEq for OrdF64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Router for Affinity {
    fn info() -> RouterInfo {
        RouterInfo {
            name: "affinity".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "a session stays on one healthy channel (weighted rendezvous hashing)".into(),
        }
    }

    fn select(_meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32> {
        order(wasmgate_pdk_router::affinity_key().as_deref(), candidates)
    }
}

wasmgate_pdk_router::export_router!(Affinity);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_pdk_router::candidate;

    fn first(key: &str, cands: &[Candidate]) -> u64 {
        cands[order(Some(key), cands)[0] as usize].channel_id
    }

    #[test]
    fn a_session_keeps_its_channel_and_sessions_spread() {
        let cands = [candidate(1, 0, 1), candidate(2, 0, 1), candidate(3, 0, 1)];
        let mut seen = [0usize; 4];
        for s in 0..300 {
            let key = format!("session-{s}");
            let c = first(&key, &cands);
            assert_eq!(c, first(&key, &cands), "stable for one key");
            seen[c as usize] += 1;
        }
        assert!(seen[1..].iter().all(|n| (60..=140).contains(n)), "spread: {seen:?}");
    }

    #[test]
    fn only_the_failed_channels_sessions_move_and_they_come_back() {
        let mut cands = [candidate(1, 0, 1), candidate(2, 0, 1), candidate(3, 0, 1)];
        let before: Vec<u64> = (0..100).map(|s| first(&format!("k{s}"), &cands)).collect();
        cands[1].consecutive_failures = 5;
        let during: Vec<u64> = (0..100).map(|s| first(&format!("k{s}"), &cands)).collect();
        for (b, d) in before.iter().zip(&during) {
            if *b != 2 {
                assert_eq!(b, d, "a session on a healthy channel stays");
            } else {
                assert_ne!(*d, 2);
            }
        }
        cands[1].consecutive_failures = 0;
        let after: Vec<u64> = (0..100).map(|s| first(&format!("k{s}"), &cands)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn the_top_tier_comes_first_and_every_candidate_is_returned() {
        let cands = [candidate(1, 0, 1), candidate(2, 9, 1), candidate(3, 9, 0)];
        let o = order(Some("x"), &cands);
        assert_eq!(o.len(), 3);
        assert_eq!(o[0], 1, "the only healthy channel of the top tier");
        assert_eq!(o[2], 2, "weight 0 last");
        assert_eq!(order(None, &cands)[0], 1);
    }
}
