//! A loaded traffic filter (`filter-plugin` world, WIT 0.1.5).

use std::sync::Arc;

use wasmtime::component::InstancePre;

use super::adapter::NO_KEY;
use super::bindings::{
    ChunkAction, ChunkVerdict, FilterContext, FilterInfo, FilterWorld, FilterWorldIndices, Hook, RequestVerdict,
    ResponseVerdict,
};
use super::engine::PluginEngine;
use super::error::PluginError;
use super::instance::{Instances, plugin_call};
use super::state::{CallInputs, PluginState};

/// Most bytes of state a filter may carry between two chunks of a stream.
pub const MAX_FILTER_STATE: usize = 4096;

/// Upstream headers a filter may not set: credentials and framing.
const RESERVED_HEADERS: [&str; 9] = [
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
];

/// A traffic filter ready to serve calls.
pub struct FilterPlugin {
    /// Plugin name (file stem).
    pub name: Arc<str>,
    /// SHA-256 of the component file, hex.
    pub sha256: String,
    /// What `info()` returned at load time.
    pub info: FilterInfo,
    instances: Instances<FilterWorld>,
}

impl FilterPlugin {
    /// Prepare the filter compiled into `pre` and call `info()`.
    pub(crate) async fn new(
        name: Arc<str>,
        sha256: String,
        pre: InstancePre<PluginState>,
        engine: Arc<PluginEngine>,
    ) -> Result<Self, PluginError> {
        let indices = FilterWorldIndices::new(&pre);
        let instances = Instances::of_world(engine, name.clone(), pre, "filter-plugin", indices, |i, store, inst| {
            i.load(store, inst)
        })?;
        let info = plugin_call!("info", instances, NO_KEY, 0, CallInputs::default(), |store, b| b
            .wasmgate_plugin_filter()
            .call_info(store))?;
        instances.set_version(&info.version);
        Ok(Self { name, sha256, info, instances })
    }

    /// Whether the filter asked for `hook`.
    pub fn wants(&self, hook: Hook) -> bool {
        self.info.hooks.contains(&hook)
    }

    /// Calls made on this version and how many failed.
    pub fn call_counts(&self) -> (u64, u64) {
        self.instances.call_counts()
    }

    /// `on-request`; a verdict adding a reserved header is a plugin error.
    pub async fn on_request(&self, ctx: &FilterContext, body: &[u8]) -> Result<RequestVerdict, PluginError> {
        let input = body.len() + ctx.settings.len();
        let verdict = plugin_call!("on_request", self.instances, NO_KEY, input, CallInputs::default(), |store, b| b
            .wasmgate_plugin_filter()
            .call_on_request(store, ctx, body))?;
        if let RequestVerdict::Edit(edit) = &verdict
            && let Some(h) = edit.headers.iter().find(|h| reserved(&h.name) || !valid_header(&h.name, &h.value))
        {
            return Err(PluginError::malformed(&self.name, format!("may not set the header `{}`", h.name)));
        }
        Ok(verdict)
    }

    /// `on-response`.
    pub async fn on_response(&self, ctx: &FilterContext, body: &[u8]) -> Result<ResponseVerdict, PluginError> {
        let input = body.len() + ctx.settings.len();
        plugin_call!("on_response", self.instances, NO_KEY, input, CallInputs::default(), |store, b| b
            .wasmgate_plugin_filter()
            .call_on_response(store, ctx, body))
    }

    /// `on-stream-chunk`; state over [`MAX_FILTER_STATE`] is a plugin error.
    pub async fn on_stream_chunk(
        &self,
        ctx: &FilterContext,
        chunk: &[u8],
        state: &[u8],
    ) -> Result<ChunkVerdict, PluginError> {
        let input = chunk.len() + state.len() + ctx.settings.len();
        let verdict =
            plugin_call!("on_stream_chunk", self.instances, NO_KEY, input, CallInputs::default(), |store, b| b
                .wasmgate_plugin_filter()
                .call_on_stream_chunk(store, ctx, chunk, state))?;
        if verdict.state.len() > MAX_FILTER_STATE {
            let detail = format!("stream state of {} bytes (at most {MAX_FILTER_STATE})", verdict.state.len());
            return Err(PluginError::malformed(&self.name, detail));
        }
        if let ChunkAction::Rewrite(chunk) = &verdict.action
            && serde_json::from_slice::<serde::de::IgnoredAny>(chunk).is_err()
        {
            return Err(PluginError::malformed(&self.name, "a rewritten stream chunk that is not JSON"));
        }
        Ok(verdict)
    }

    /// Take every idle instance out of service (the plugin is replaced).
    pub(crate) fn retire(&self) {
        let _ = self.instances.clear();
    }
}

fn reserved(name: &str) -> bool {
    RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(name))
}

fn valid_header(name: &str, value: &str) -> bool {
    axum::http::HeaderName::from_bytes(name.as_bytes()).is_ok() && axum::http::HeaderValue::from_str(value).is_ok()
}
