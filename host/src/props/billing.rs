//! Billing arithmetic never panics or wraps, whatever the counts.

use std::sync::Arc;

use proptest::prelude::*;

use crate::billing::ledger::Ledger;
use crate::billing::limits::{Limiter, Subject, TokenLimits};
use crate::billing::pricing::{MAX_QUOTA, Price};
use crate::billing::tokenize::{GeneratedText, generated_text};

fn ratio() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), 0.0f64..1e6, Just(f64::MAX), Just(1e-300)]
}

proptest! {
    #![proptest_config(super::config())]

    #[test]
    fn quotas_stay_in_range_and_grow_with_usage(
        prompt in any::<u64>(), completion in any::<u64>(), cached in any::<u64>(),
        r in ratio(), c in ratio(), k in ratio(), extra in any::<u32>(),
    ) {
        let p = Price::Tokens { ratio: r, completion_ratio: c, cached_ratio: k };
        let q = p.quota(prompt, completion, cached);
        prop_assert!((0..=MAX_QUOTA).contains(&q));
        prop_assert!(p.quota(prompt, completion.saturating_add(u64::from(extra)), cached) >= q);
        prop_assert!((0..=MAX_QUOTA).contains(&Price::PerRequest(prompt).quota(0, 0, 0)));
    }

    #[test]
    fn the_ledger_saturates_and_releases_every_hold(ops in prop::collection::vec((any::<i64>(), any::<i64>(), 0u8..4), 1..64)) {
        let ledger = Arc::new(Ledger::default());
        ledger.open_user(1, i64::MAX / 2);
        ledger.open_token(2, i64::MIN / 2);
        let mut held = Vec::new();
        for (amount, charge, op) in ops {
            match op {
                0 => held.extend(ledger.reserve(1, Some(2), charge > 0, amount).ok()),
                1 => if let Some(r) = held.pop() { r.settle(charge) },
                2 => ledger.adjust(Some(1), Some(2), amount),
                _ => drop(held.pop()),
            }
        }
        drop(held);
        prop_assert_eq!(ledger.user(1).reserved, 0);
    }

    #[test]
    fn the_limiter_never_panics_on_any_sequence(ops in prop::collection::vec((any::<u64>(), any::<i64>(), any::<bool>()), 1..64)) {
        let limiter = Arc::new(Limiter::default());
        let limits = TokenLimits { rpm: Some(5), tpm: Some(1000), concurrency: Some(3), streams: Some(2) };
        let mut guards = Vec::new();
        for (tokens, delta, stream) in ops {
            if let Ok(g) = limiter.admit(Subject::Token(7), limits, tokens, stream) {
                guards.push(g);
            }
            limiter.correct(Subject::Token(7), delta);
            if guards.len() > 2 {
                guards.remove(0);
            }
        }
    }

    #[test]
    fn stream_chunks_of_any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let mut text = GeneratedText::default();
        let _ = generated_text(&bytes, Some(&mut text));
        let _ = generated_text(&bytes, None);
        let _ = text.tokens("gpt-4o-mini");
    }
}
