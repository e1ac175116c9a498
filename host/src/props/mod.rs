//! Property-based fuzzing (proptest) of what hostile input reaches first:
//! the request parser and the prompt bound, the billing arithmetic, and the
//! host's stream-chunk reader. Each property runs a bounded number of
//! cases in the test suite (`PROPTEST_CASES` raises it for a longer run);
//! `tests/fuzz-corpus/` holds inputs found worth keeping, replayed every
//! run. The plugin-side SSE/NDJSON decoders have their own properties in
//! the PDK.

mod billing;
mod corpus;
mod request;

use proptest::prelude::*;

/// Cases per property in the regular suite.
pub(crate) fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Arbitrary JSON, biased toward what stresses a parser: huge and
/// fractional numbers, deep nesting, long and non-ASCII strings.
pub(crate) fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("model".to_string()),
                        Just("messages".to_string()),
                        Just("content".to_string()),
                        Just("max_tokens".to_string()),
                        Just("n".to_string()),
                        Just("stream".to_string()),
                        Just("image_url".to_string()),
                        Just("text".to_string()),
                        "[a-z_]{1,10}",
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}
