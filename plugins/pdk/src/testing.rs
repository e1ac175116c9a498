//! Helpers for an adapter's own unit tests (natively, `cargo test`).

use crate::{Endpoint, RequestContext};

/// The context of a streamed chat completion for `model`, asking for usage.
pub fn stream_context(model: &str) -> RequestContext {
    RequestContext {
        endpoint: Endpoint::ChatCompletions,
        requested_model: model.into(),
        upstream_model: model.into(),
        stream: true,
        include_usage: true,
        request_id: "req_test".into(),
    }
}
