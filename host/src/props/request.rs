//! The request parser never panics, saturates what overflows, and its
//! prompt bound is never below the prompt's real token count.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::json;

use crate::billing::tokenize::prompt_tokens;
use crate::plugins::Endpoint;
use crate::request::ClientRequest;

const ENDPOINTS: [Endpoint; 3] = [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings];

proptest! {
    #![proptest_config(super::config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), e in 0usize..3) {
        let _ = ClientRequest::parse(ENDPOINTS[e], Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_json_never_panics(value in super::json_value(), e in 0usize..3) {
        let body = serde_json::to_vec(&value).unwrap_or_default();
        if let Ok(req) = ClientRequest::parse(ENDPOINTS[e], Bytes::from(body)) {
            prop_assert!(!req.model.is_empty());
            prop_assert!((1..=crate::request::MAX_N).contains(&req.n));
            let _ = req.prompt.token_bound();
        }
    }

    #[test]
    fn counts_saturate_instead_of_wrapping(max_tokens in any::<u64>(), n in 1u64..=128, frac in any::<bool>()) {
        let max = if frac { json!(max_tokens as f64) } else { json!(max_tokens) };
        let body = json!({"model": "m", "max_tokens": max, "n": n, "messages": [{"role": "user", "content": "x"}]});
        let parsed = ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(body.to_string()));
        match parsed {
            Ok(req) => {
                prop_assert!(req.max_tokens.is_some());
                prop_assert_eq!(req.n, n);
            }
            Err(e) => prop_assert_eq!(e.param.as_deref(), Some("max_tokens"), "only max_tokens 0 is refused: {}", e.message),
        }
    }

    #[test]
    fn the_prompt_bound_is_never_below_the_real_count(texts in prop::collection::vec(".{0,200}", 1..6)) {
        let messages: Vec<_> = texts.iter().map(|t| json!({"role": "user", "content": t})).collect();
        let body = json!({"model": "gpt-4o-mini", "messages": messages}).to_string();
        let req = ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(body.clone())).expect("valid");
        let exact = prompt_tokens("gpt-4o-mini", body.as_bytes());
        prop_assert!(req.prompt.token_bound() >= exact, "bound {} < exact {}", req.prompt.token_bound(), exact);
    }
}
