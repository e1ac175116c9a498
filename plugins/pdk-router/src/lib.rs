//! # wasmgate-pdk-router — write a wasmgate routing policy
//!
//! A routing policy is a WebAssembly component implementing
//! `wasmgate:plugin/router@0.1.6` (see `wit/router.wit`, vendored in this
//! crate). Implement
//! [`Router`] and register it with [`export_router!`]. Policies are pure:
//! use [`SeededRng`] with the request's seed for any randomness, so the same
//! seed and candidates always give the same order.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "router-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_router_world",
        default_bindings_module: "wasmgate_pdk_router::bindings",
    });
}

pub use bindings::exports::wasmgate::plugin::router::{Candidate, RequestMeta, RouterInfo};
pub use bindings::wasmgate::plugin::types::{Endpoint, LogLevel};

/// The version of the WIT contract this kit implements.
pub const WIT_VERSION: &str = "0.1.6";

/// The contract this kit implements, as the host names it.
pub const CONTRACT: &str = "wasmgate:plugin@0.1.6";

/// A routing policy.
pub trait Router {
    /// Name and version; called at load time as validation.
    fn info() -> RouterInfo;
    /// Indices into `candidates`, best first.
    fn select(meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32>;
}

/// Log one line through the host.
pub fn log(level: LogLevel, message: &str) {
    bindings::wasmgate::plugin::log::log(level, message);
}

/// How many requests the host routed for this group and model before the
/// current one (0 outside `select`). Added in WIT 0.1.1.
pub fn sequence() -> u64 {
    bindings::wasmgate::plugin::routing_context::sequence()
}

/// EWMA time to first token of each candidate of the current `select` call,
/// in ms, index-aligned with `candidates` (0 when unknown). Added in WIT 0.1.1.
pub fn ttft_ms() -> Vec<f64> {
    bindings::wasmgate::plugin::routing_context::ttft_ms()
}

/// The calling user's id (absent for the gateway's configuration tokens,
/// and outside `select`). Added in WIT 0.1.4.
pub fn user_id() -> Option<u64> {
    bindings::wasmgate::plugin::routing_context::user_id()
}

/// The calling token's id (absent for configuration tokens, and outside
/// `select`). Added in WIT 0.1.4.
pub fn token_id() -> Option<u64> {
    bindings::wasmgate::plugin::routing_context::token_id()
}

/// A stable key (hex) for keeping one caller's session on one channel: the
/// client's session (`x-session-id`, `prompt_cache_key` or `user`) hashed
/// with its token, or the token alone. Added in WIT 0.1.4.
pub fn affinity_key() -> Option<String> {
    bindings::wasmgate::plugin::routing_context::affinity_key()
}

/// Each candidate's price ratio (the channel's `price_ratio` setting, 1.0
/// when unset), index-aligned with `candidates`. Added in WIT 0.1.4.
pub fn price_ratios() -> Vec<f64> {
    bindings::wasmgate::plugin::routing_context::price_ratios()
}

/// Each candidate's tags, index-aligned with `candidates`. Added in WIT 0.1.4.
pub fn tags() -> Vec<Vec<String>> {
    bindings::wasmgate::plugin::routing_context::tags()
}

/// A candidate with no statistics yet, for policy unit tests.
pub fn candidate(channel_id: u64, priority: i64, weight: u32) -> Candidate {
    Candidate { channel_id, priority, weight, latency_ms: 0.0, error_rate: 0.0, in_flight: 0, consecutive_failures: 0 }
}

/// Request metadata for a chat completion of model `m`, for policy unit tests.
pub fn request_meta(seed: u64, stream: bool) -> RequestMeta {
    RequestMeta { endpoint: Endpoint::ChatCompletions, model: "m".into(), group: "default".into(), stream, seed }
}

/// A small deterministic generator (SplitMix64) seeded from the request.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniformly distributed in the open interval (0, 1).
    pub fn next_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

/// Register `$ty` (a [`Router`]) as this component's router export.
#[macro_export]
macro_rules! export_router {
    ($ty:ty) => {
        #[doc(hidden)]
        pub struct __WasmgateRouter;

        impl $crate::bindings::exports::wasmgate::plugin::router::Guest for __WasmgateRouter {
            fn info() -> $crate::RouterInfo {
                <$ty as $crate::Router>::info()
            }
            fn select(
                meta: $crate::RequestMeta,
                candidates: ::std::vec::Vec<$crate::Candidate>,
            ) -> ::std::vec::Vec<u32> {
                <$ty as $crate::Router>::select(&meta, &candidates)
            }
        }

        $crate::bindings::__export_router_world!(__WasmgateRouter with_types_in $crate::bindings);
    };
}
