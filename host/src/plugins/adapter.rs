//! A loaded provider adapter: the compiled component's `InstancePre` and the
//! calls the relay makes, each in a fresh `Store` bounded in time and memory.

use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::ResourceAny;

use super::bindings::{
    AdapterInfo, AdapterWorld, AdapterWorldPre, AuthWorld, AuthWorldPre, ChannelView, Credential, HttpRequest,
    HttpResponse, ParsedResponse, Probe, RequestContext, StreamEvents, UpstreamError,
};
use super::engine::PluginEngine;
use super::error::PluginError;
use super::state::PluginState;

/// The outcome of a plugin call that completed: the adapter's own answer,
/// which may be a classified error.
pub type AdapterResult<T> = Result<Result<T, UpstreamError>, PluginError>;

/// A provider adapter ready to serve calls.
pub struct AdapterPlugin {
    /// Plugin name (file stem).
    pub name: Arc<str>,
    /// SHA-256 of the component file, hex.
    pub sha256: String,
    /// What `info()` returned at load time.
    pub info: AdapterInfo,
    pre: AdapterWorldPre<PluginState>,
    /// Present when the component exports `auth` (a credential exchange).
    auth: Option<AuthWorldPre<PluginState>>,
    engine: Arc<PluginEngine>,
}

impl AdapterPlugin {
    pub(crate) fn new(
        name: Arc<str>,
        sha256: String,
        pre: AdapterWorldPre<PluginState>,
        auth: Option<AuthWorldPre<PluginState>>,
        engine: Arc<PluginEngine>,
    ) -> Result<Self, PluginError> {
        let mut this = Self { name, sha256, info: empty_info(), pre, auth, engine };
        this.info = this.call_info()?;
        Ok(this)
    }

    fn call<R>(
        &self,
        f: impl FnOnce(&mut Store<PluginState>, &AdapterWorld) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.call_with(None, f)
    }

    /// A call during which `credentials.current` answers `credential`.
    fn call_with<R>(
        &self,
        credential: Option<&str>,
        f: impl FnOnce(&mut Store<PluginState>, &AdapterWorld) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let mut store = self.engine.store(self.name.clone());
        store.data_mut().credential = credential.map(str::to_string);
        let world = self.pre.instantiate(&mut store).map_err(|e| PluginError::instantiate(&self.name, e))?;
        f(&mut store, &world).map_err(|e| PluginError::from_wasm(&self.name, e))
    }

    /// Instantiate and call `info()`: the fixed cost of any call (used by
    /// validation and benchmarks).
    pub fn call_info(&self) -> Result<AdapterInfo, PluginError> {
        self.call(|store, w| w.wasmgate_plugin_adapter().call_info(store))
    }

    /// `build-request`, with the credential obtained for the channel's key
    /// (see [`Self::exchange_request`]).
    pub fn build_request(
        &self,
        ctx: &RequestContext,
        channel: &ChannelView,
        body: &[u8],
        credential: Option<&str>,
    ) -> AdapterResult<HttpRequest> {
        self.call_with(credential, |store, w| w.wasmgate_plugin_adapter().call_build_request(store, ctx, channel, body))
    }

    /// Whether the component exports `auth` (may need a credential exchange).
    pub fn has_auth(&self) -> bool {
        self.auth.is_some()
    }

    /// `auth.exchange-request`: the request trading the channel's key for a
    /// credential, or `None` when none is needed (or the adapter has no
    /// `auth` export).
    pub fn exchange_request(&self, channel: &ChannelView) -> Result<Option<HttpRequest>, PluginError> {
        self.call_auth(|store, w| w.wasmgate_plugin_auth().call_exchange_request(store, channel)).map(Option::flatten)
    }

    /// `auth.parse-exchange`.
    pub fn parse_exchange(&self, channel: &ChannelView, response: &HttpResponse) -> AdapterResult<Credential> {
        match self.call_auth(|store, w| w.wasmgate_plugin_auth().call_parse_exchange(store, channel, response))? {
            Some(result) => Ok(result),
            None => Err(PluginError::malformed(&self.name, "parse-exchange called on an adapter without auth")),
        }
    }

    fn call_auth<R>(
        &self,
        f: impl FnOnce(&mut Store<PluginState>, &AuthWorld) -> wasmtime::Result<R>,
    ) -> Result<Option<R>, PluginError> {
        let Some(pre) = &self.auth else { return Ok(None) };
        let mut store = self.engine.store(self.name.clone());
        let world = pre.instantiate(&mut store).map_err(|e| PluginError::instantiate(&self.name, e))?;
        f(&mut store, &world).map(Some).map_err(|e| PluginError::from_wasm(&self.name, e))
    }

    /// `parse-response`.
    pub fn parse_response(&self, ctx: &RequestContext, response: &HttpResponse) -> AdapterResult<ParsedResponse> {
        self.call(|store, w| w.wasmgate_plugin_adapter().call_parse_response(store, ctx, response))
    }

    /// `classify-error`.
    pub fn classify_error(&self, ctx: &RequestContext, response: &HttpResponse) -> Result<UpstreamError, PluginError> {
        self.call(|store, w| w.wasmgate_plugin_adapter().call_classify_error(store, ctx, response))
    }

    /// `health-probe`, with the channel key's credential if any.
    pub fn health_probe(&self, channel: &ChannelView, credential: Option<&str>) -> Result<Probe, PluginError> {
        self.call_with(credential, |store, w| w.wasmgate_plugin_adapter().call_health_probe(store, channel))
    }

    /// Start a stream decoder; it keeps its own store (and this plugin
    /// version) until dropped.
    pub fn stream_decoder(self: &Arc<Self>, ctx: &RequestContext) -> Result<AdapterStream, PluginError> {
        let mut store = self.engine.store(self.name.clone());
        let world = self.pre.instantiate(&mut store).map_err(|e| PluginError::instantiate(&self.name, e))?;
        let decoder = world
            .wasmgate_plugin_adapter()
            .stream_decoder()
            .call_constructor(&mut store, ctx)
            .map_err(|e| PluginError::from_wasm(&self.name, e))?;
        Ok(AdapterStream { plugin: self.clone(), store, world, decoder: Some(decoder) })
    }
}

/// One live `stream-decoder` resource and the store it lives in.
pub struct AdapterStream {
    plugin: Arc<AdapterPlugin>,
    store: Store<PluginState>,
    world: AdapterWorld,
    decoder: Option<ResourceAny>,
}

impl AdapterStream {
    fn call(
        &mut self,
        f: impl FnOnce(
            &AdapterWorld,
            &mut Store<PluginState>,
            ResourceAny,
        ) -> wasmtime::Result<Result<StreamEvents, UpstreamError>>,
    ) -> AdapterResult<StreamEvents> {
        let Some(decoder) = self.decoder else {
            return Err(PluginError::malformed(&self.plugin.name, "stream decoder used after a failure"));
        };
        self.plugin.engine.arm(&mut self.store);
        let result = f(&self.world, &mut self.store, decoder);
        if result.is_err() {
            // A trapped instance must not be entered again.
            self.decoder = None;
        }
        result.map_err(|e| PluginError::from_wasm(&self.plugin.name, e))
    }

    /// Feed upstream bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> AdapterResult<StreamEvents> {
        self.call(|w, store, d| w.wasmgate_plugin_adapter().stream_decoder().call_feed(store, d, bytes))
    }

    /// The upstream body ended.
    pub fn finish(&mut self) -> AdapterResult<StreamEvents> {
        self.call(|w, store, d| w.wasmgate_plugin_adapter().stream_decoder().call_finish(store, d))
    }

    /// Name of the plugin serving this stream.
    pub fn plugin_name(&self) -> &str {
        &self.plugin.name
    }
}

impl Drop for AdapterStream {
    fn drop(&mut self) {
        if let Some(decoder) = self.decoder.take() {
            self.plugin.engine.arm(&mut self.store);
            let _ = decoder.resource_drop(&mut self.store);
        }
    }
}

fn empty_info() -> AdapterInfo {
    AdapterInfo {
        name: String::new(),
        version: String::new(),
        description: String::new(),
        endpoints: Vec::new(),
        default_models: Vec::new(),
    }
}
