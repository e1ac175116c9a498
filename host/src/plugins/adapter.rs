//! A loaded provider adapter and the calls the relay makes on it, each on
//! an instance lent for that call (see `instance.rs`) and bounded by fuel,
//! memory and a wall-clock safety net.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{InstancePre, ResourceAny};

use super::bindings::{
    AdapterInfo, AdapterWorld, AdapterWorldIndices, AuthWorld, AuthWorldIndices, ChannelView, CodecWorld,
    CodecWorldIndices, Credential, Decoded, HttpRequest, HttpResponse, Operation, ParsedResponse, PassthroughContext,
    PassthroughWorld, PassthroughWorldIndices, Probe, RequestContext, StreamEvents, UpstreamError,
};
use super::engine::PluginEngine;
use super::error::PluginError;
use super::instance::{Instances, Lease, plugin_call};
use super::state::{CallInputs, PluginState};

/// The outcome of a plugin call that completed: the adapter's own answer,
/// which may be a classified error.
pub type AdapterResult<T> = Result<Result<T, UpstreamError>, PluginError>;

/// Largest decoder state the host keeps for one stream.
const MAX_STREAM_STATE: usize = 1 << 20;

/// The interfaces the host calls on one adapter instance.
pub(crate) struct AdapterBindings {
    adapter: AdapterWorld,
    auth: Option<AuthWorld>,
    codec: Option<CodecWorld>,
    passthrough: Option<PassthroughWorld>,
}

/// The tag of calls that concern no channel key (validation, checks).
pub const NO_KEY: u64 = u64::MAX;

/// A provider adapter ready to serve calls.
pub struct AdapterPlugin {
    /// Plugin name (file stem).
    pub name: Arc<str>,
    /// SHA-256 of the component file, hex.
    pub sha256: String,
    /// What `info()` returned at load time.
    pub info: AdapterInfo,
    has_auth: bool,
    has_codec: bool,
    /// The operations it relays (`passthrough`, WIT ≥ 0.1.6; none before).
    operations: Vec<Operation>,
    instances: Instances<AdapterBindings>,
    /// Streams decoded the legacy way (a `stream-decoder` resource pinning
    /// an instance) that may be open at once.
    pinned: Arc<Semaphore>,
}

impl AdapterPlugin {
    /// Calls made on this version and how many failed (trap, timeout,
    /// fuel, memory, instantiation), for `GET /api/plugins`.
    pub fn call_counts(&self) -> (u64, u64) {
        self.instances.call_counts()
    }

    /// Prepare the adapter compiled into `pre` and call `info()`.
    pub(crate) async fn new(
        name: Arc<str>,
        sha256: String,
        pre: InstancePre<PluginState>,
        engine: Arc<PluginEngine>,
    ) -> Result<Self, PluginError> {
        let invalid = |what: &str, e: wasmtime::Error| PluginError::Instantiate {
            plugin: name.to_string(),
            detail: format!("its `{what}` export does not match the contract: {e:#}"),
        };
        let adapter = AdapterWorldIndices::new(&pre).map_err(|e| invalid("adapter", e))?;
        let exports = |iface: &str| super::loader::exports_interface(&engine, pre.component(), iface);
        let auth =
            if exports("auth") { Some(AuthWorldIndices::new(&pre).map_err(|e| invalid("auth", e))?) } else { None };
        let codec = if exports("stream-codec") {
            Some(CodecWorldIndices::new(&pre).map_err(|e| invalid("stream-codec", e))?)
        } else {
            None
        };
        let passthrough = if exports("passthrough") {
            Some(PassthroughWorldIndices::new(&pre).map_err(|e| invalid("passthrough", e))?)
        } else {
            None
        };
        let (has_auth, has_codec, has_passthrough) = (auth.is_some(), codec.is_some(), passthrough.is_some());
        let load =
            Box::new(move |store: &mut wasmtime::Store<PluginState>, instance: &wasmtime::component::Instance| {
                Ok(AdapterBindings {
                    adapter: adapter.load(&mut *store, instance)?,
                    auth: auth.as_ref().map(|i| i.load(&mut *store, instance)).transpose()?,
                    codec: codec.as_ref().map(|i| i.load(&mut *store, instance)).transpose()?,
                    passthrough: passthrough.as_ref().map(|i| i.load(&mut *store, instance)).transpose()?,
                })
            });
        let pinned = Arc::new(Semaphore::new(engine.config.max_pinned_streams as usize));
        let instances = Instances::new(engine, name.clone(), pre, load);
        let mut this =
            Self { name, sha256, info: empty_info(), has_auth, has_codec, operations: Vec::new(), instances, pinned };
        this.info = this.call_info().await?;
        if has_passthrough {
            this.operations = this.call_operations().await?;
        }
        this.instances.set_version(&this.info.version);
        Ok(this)
    }

    /// Instantiate and call `info()` on a fresh instance: the fixed cost of
    /// a call (used by validation and benchmarks).
    pub async fn call_info(&self) -> Result<AdapterInfo, PluginError> {
        plugin_call!("info", self.instances, NO_KEY, 0, CallInputs::default(), |store, b| b
            .adapter
            .wasmgate_plugin_adapter()
            .call_info(store))
    }

    /// `build-request` for channel key `tag`, with the credential obtained
    /// for that key (see [`Self::exchange_request`]).
    pub async fn build_request(
        &self,
        tag: u64,
        ctx: &RequestContext,
        channel: &ChannelView,
        body: &[u8],
        credential: Option<Arc<str>>,
    ) -> AdapterResult<HttpRequest> {
        let inputs = CallInputs { credential, settings: Some(Arc::from(channel.settings.as_str())) };
        plugin_call!("build_request", self.instances, tag, body.len(), inputs, |store, b| b
            .adapter
            .wasmgate_plugin_adapter()
            .call_build_request(store, ctx, channel, body))
    }

    /// `passthrough.operations`, on a fresh instance (at load time).
    async fn call_operations(&self) -> Result<Vec<Operation>, PluginError> {
        plugin_call!("operations", self.instances, NO_KEY, 0, CallInputs::default(), |store, b| b
            .passthrough
            .as_ref()
            .expect("checked at load")
            .wasmgate_plugin_passthrough()
            .call_operations(store))
    }

    /// Whether this adapter relays `operation` (images, audio, moderations,
    /// rerank).
    pub fn relays(&self, operation: Operation) -> bool {
        self.operations.contains(&operation)
    }

    /// The operations this adapter relays.
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    /// `passthrough.build-passthrough` for channel key `tag`.
    pub async fn build_passthrough(
        &self,
        tag: u64,
        ctx: &PassthroughContext,
        channel: &ChannelView,
        body: &[u8],
        credential: Option<Arc<str>>,
    ) -> AdapterResult<HttpRequest> {
        let inputs = CallInputs { credential, settings: Some(Arc::from(channel.settings.as_str())) };
        plugin_call!("build_passthrough", self.instances, tag, body.len(), inputs, |store, b| b
            .passthrough
            .as_ref()
            .expect("relays() checked by the caller")
            .wasmgate_plugin_passthrough()
            .call_build_passthrough(store, ctx, channel, body))
    }

    /// Whether the component exports `auth` (may need a credential exchange).
    pub fn has_auth(&self) -> bool {
        self.has_auth
    }

    /// Whether streams are decoded resumably (`stream-codec`, WIT ≥ 0.1.3)
    /// rather than by a `stream-decoder` resource that pins an instance.
    pub fn resumable_streams(&self) -> bool {
        self.has_codec
    }

    /// `auth.exchange-request`: the request trading the channel's key for a
    /// credential, or `None` when none is needed (or the adapter has no
    /// `auth` export).
    pub async fn exchange_request(&self, tag: u64, channel: &ChannelView) -> Result<Option<HttpRequest>, PluginError> {
        if !self.has_auth {
            return Ok(None);
        }
        let inputs = CallInputs { credential: None, settings: Some(Arc::from(channel.settings.as_str())) };
        plugin_call!("exchange_request", self.instances, tag, channel.key.len(), inputs, |store, b| async move {
            match &b.auth {
                Some(auth) => auth.wasmgate_plugin_auth().call_exchange_request(store, channel).await,
                None => Ok(None),
            }
        })
    }

    /// `auth.parse-exchange`.
    pub async fn parse_exchange(
        &self,
        tag: u64,
        channel: &ChannelView,
        response: &HttpResponse,
    ) -> AdapterResult<Credential> {
        if !self.has_auth {
            return Err(PluginError::malformed(&self.name, "parse-exchange called on an adapter without auth"));
        }
        let inputs = CallInputs { credential: None, settings: Some(Arc::from(channel.settings.as_str())) };
        plugin_call!("parse_exchange", self.instances, tag, response.body.len(), inputs, |store, b| async move {
            match &b.auth {
                Some(auth) => auth.wasmgate_plugin_auth().call_parse_exchange(store, channel, response).await,
                None => Err(wasmtime::format_err!("no auth export")),
            }
        })
    }

    /// `parse-response`; `settings` are the channel's (for
    /// `channel-context.settings`).
    pub async fn parse_response(
        &self,
        tag: u64,
        ctx: &RequestContext,
        settings: Option<Arc<str>>,
        response: &HttpResponse,
    ) -> AdapterResult<ParsedResponse> {
        let inputs = CallInputs { credential: None, settings };
        plugin_call!("parse_response", self.instances, tag, response.body.len(), inputs, |store, b| b
            .adapter
            .wasmgate_plugin_adapter()
            .call_parse_response(store, ctx, response))
    }

    /// `classify-error`; `settings` are the channel's.
    pub async fn classify_error(
        &self,
        tag: u64,
        ctx: &RequestContext,
        settings: Option<Arc<str>>,
        response: &HttpResponse,
    ) -> Result<UpstreamError, PluginError> {
        let inputs = CallInputs { credential: None, settings };
        plugin_call!("classify_error", self.instances, tag, response.body.len(), inputs, |store, b| b
            .adapter
            .wasmgate_plugin_adapter()
            .call_classify_error(store, ctx, response))
    }

    /// `health-probe`, with the channel key's credential if any.
    pub async fn health_probe(
        &self,
        tag: u64,
        channel: &ChannelView,
        credential: Option<Arc<str>>,
    ) -> Result<Probe, PluginError> {
        let inputs = CallInputs { credential, settings: Some(Arc::from(channel.settings.as_str())) };
        plugin_call!("health_probe", self.instances, tag, channel.settings.len(), inputs, |store, b| b
            .adapter
            .wasmgate_plugin_adapter()
            .call_health_probe(store, channel))
    }

    /// Start decoding a stream for channel key `tag`. A resumable decoder
    /// holds only its state between calls; a legacy one holds an instance
    /// (and one of the `max_pinned_streams` permits) until dropped.
    pub async fn stream_decoder(
        self: &Arc<Self>,
        tag: u64,
        ctx: &RequestContext,
        settings: Option<Arc<str>>,
    ) -> Result<AdapterStream, PluginError> {
        let mode = if self.has_codec {
            Mode::Resumable { state: Vec::new() }
        } else {
            let permit = self
                .pinned
                .clone()
                .try_acquire_owned()
                .map_err(|_| PluginError::Capacity { plugin: self.name.to_string() })?;
            let mut lease = self.instances.fresh(tag).await?;
            let budget =
                self.instances.prepare(&mut lease, 0, CallInputs { credential: None, settings: settings.clone() });
            let outcome = {
                let decoder = lease.bindings.adapter.wasmgate_plugin_adapter().stream_decoder();
                tokio::time::timeout(budget.wall, decoder.call_constructor(&mut lease.store, ctx)).await
            };
            let decoder = match outcome {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => return Err(self.instances.failure(lease, budget, Some(e))),
                Err(_) => return Err(self.instances.failure(lease, budget, None)),
            };
            Mode::Pinned { lease: Box::new(lease), decoder, _permit: permit }
        };
        Ok(AdapterStream { plugin: self.clone(), ctx: ctx.clone(), settings, tag, mode })
    }

    /// Take every idle instance out of service (the plugin is replaced).
    pub(crate) fn retire(&self) {
        let _ = self.instances.clear();
    }
}

enum Mode {
    /// `stream-codec`: the state between calls.
    Resumable { state: Vec<u8> },
    /// A `stream-decoder` resource in its own instance.
    Pinned { lease: Box<Lease<AdapterBindings>>, decoder: ResourceAny, _permit: OwnedSemaphorePermit },
    /// A call failed: the stream cannot continue.
    Failed,
}

/// One stream being decoded.
pub struct AdapterStream {
    plugin: Arc<AdapterPlugin>,
    ctx: RequestContext,
    /// The channel's settings, for every decoding step.
    settings: Option<Arc<str>>,
    tag: u64,
    mode: Mode,
}

fn events(d: Decoded) -> StreamEvents {
    StreamEvents { chunks: d.chunks, usage: d.usage, error: d.error, done: d.done }
}

impl AdapterStream {
    /// Feed upstream bytes.
    pub async fn feed(&mut self, bytes: &[u8]) -> AdapterResult<StreamEvents> {
        self.step(Some(bytes)).await
    }

    /// The upstream body ended.
    pub async fn finish(&mut self) -> AdapterResult<StreamEvents> {
        self.step(None).await
    }

    async fn step(&mut self, bytes: Option<&[u8]>) -> AdapterResult<StreamEvents> {
        let plugin = self.plugin.clone();
        match std::mem::replace(&mut self.mode, Mode::Failed) {
            Mode::Failed => Err(PluginError::malformed(&plugin.name, "stream decoder used after a failure")),
            Mode::Resumable { state } => {
                let input = state.len() + bytes.map_or(0, <[u8]>::len);
                let (ctx, tag) = (&self.ctx, self.tag);
                let inputs = CallInputs { credential: None, settings: self.settings.clone() };
                let decoded: Result<Result<Decoded, UpstreamError>, PluginError> =
                    plugin_call!("decode_stream", plugin.instances, tag, input, inputs, |store, b| async move {
                        let Some(codec) = &b.codec else { return Err(wasmtime::format_err!("no stream-codec export")) };
                        let codec = codec.wasmgate_plugin_stream_codec();
                        match bytes {
                            Some(bytes) => codec.call_decode(store, ctx, &state, bytes).await,
                            None => codec.call_finish(store, ctx, &state).await,
                        }
                    });
                match decoded {
                    Ok(Ok(d)) if d.state.len() > MAX_STREAM_STATE => Err(PluginError::malformed(
                        &plugin.name,
                        format!("stream decoder state of {} bytes (at most {MAX_STREAM_STATE})", d.state.len()),
                    )),
                    Ok(Ok(mut d)) => {
                        self.mode = Mode::Resumable { state: std::mem::take(&mut d.state) };
                        Ok(Ok(events(d)))
                    }
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(e) => Err(e),
                }
            }
            Mode::Pinned { mut lease, decoder, _permit } => {
                let input = bytes.map_or(0, <[u8]>::len);
                let inputs = CallInputs { credential: None, settings: self.settings.clone() };
                let budget = plugin.instances.prepare(&mut lease, input, inputs);
                let outcome = {
                    let d = lease.bindings.adapter.wasmgate_plugin_adapter().stream_decoder();
                    let store = &mut lease.store;
                    match bytes {
                        Some(bytes) => tokio::time::timeout(budget.wall, d.call_feed(store, decoder, bytes)).await,
                        None => tokio::time::timeout(budget.wall, d.call_finish(store, decoder)).await,
                    }
                };
                match outcome {
                    Ok(Ok(result)) => {
                        self.mode = Mode::Pinned { lease, decoder, _permit };
                        Ok(result)
                    }
                    Ok(Err(e)) => Err(plugin.instances.failure(*lease, budget, Some(e))),
                    Err(_) => Err(plugin.instances.failure(*lease, budget, None)),
                }
            }
        }
    }

    /// Name of the plugin serving this stream.
    pub fn plugin_name(&self) -> &str {
        &self.plugin.name
    }
}

impl Drop for AdapterStream {
    fn drop(&mut self) {
        // A pinned decoder's instance is dropped with its store; it is not
        // reused (its memory holds the stream's state).
        self.mode = Mode::Failed;
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
