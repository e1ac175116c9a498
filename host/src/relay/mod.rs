//! The relay: route a validated request to a channel through its adapter
//! plugin, fail over on retryable errors, answer in OpenAI's shape.

mod coalesce;
pub(crate) mod credentials;
mod errors;
mod http1_pool;
mod probe;
mod relayed;
mod stream;
mod upstream;
mod upstream_body;
mod upstream_client;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

pub use crate::request::ClientRequest;
pub use credentials::{CredentialError, Credentials};
pub use errors::{client_error, retryable};
pub use probe::{ProbeOutcome, endpoint_name, kind_name, probe};
pub use stream::PendingStream;
pub use upstream::Upstream;

use crate::billing::{AttemptInfo, Caller, Ending, Meter, storage_unavailable};
use crate::channels::{Channel, KeyView};
use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::filters::{Chain, RequestFacts};
use crate::health::Fault;
use crate::plugins::{Affinity, AffinityCaller, ErrorKind, PluginError, PluginSet, RequestContext, UpstreamError};
use crate::routing::{ChannelStats, InFlight, RouteRequest, candidates, unavailable};
use crate::state::AppState;
use stream::LiveStream;

/// Why one attempt on one channel did not produce a response.
enum Failure {
    /// Try the next channel. `kind` is the classified upstream error when
    /// the channel is to blame (it feeds channel health).
    Retry(ApiError, Option<ErrorKind>),
    /// Answer the client with this now.
    Final(ApiError),
}

/// The failure for a classified upstream error `e` on `channel`.
fn upstream_failure(e: &UpstreamError, channel: &Channel) -> Failure {
    let client = client_error(e, channel);
    if retryable(&e.kind) { Failure::Retry(client, Some(e.kind)) } else { Failure::Final(client) }
}

/// The client's error for a failed plugin call; the failure is counted
/// against the plugin (never the channel), capacity aside.
fn plugin_failure(state: &AppState, e: &PluginError) -> Failure {
    tracing::warn!(error = %e, cause = e.cause(), "plugin call failed");
    Failure::Final(plugin_error(state, e))
}

/// [`plugin_failure`]'s error.
pub(crate) fn plugin_error(state: &AppState, e: &PluginError) -> ApiError {
    if !e.is_plugin_fault() {
        // Every instance slot is busy: the gateway's capacity.
        let mut err = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("capacity_exceeded"),
            "The gateway is at capacity; retry shortly.",
        );
        err.retry_after = Some(1);
        return err;
    }
    if let PluginError::Timeout { plugin, .. }
    | PluginError::OutOfFuel { plugin, .. }
    | PluginError::MemoryLimit { plugin, .. }
    | PluginError::Trap { plugin, .. }
    | PluginError::Malformed { plugin, .. }
    | PluginError::Instantiate { plugin, .. } = e
    {
        state.registry.report_call_failure(plugin, &e.to_string());
    }
    ApiError::plugin()
}

/// The tag of a channel key: plugin instances are reused only between
/// calls with the same tag.
pub(crate) fn key_tag(channel: &Channel, key: Option<usize>) -> u64 {
    (channel.id << 20) | key.map_or(0xF_FFFF, |k| k as u64 & 0xF_FFFF)
}

/// Serve `req` (already authenticated and validated) for `caller`:
/// admitted and pre-charged by billing, candidates in the policy's order,
/// retried and failed over on the adapter's classified errors within the
/// attempt and time budget; only the attempt that served is charged.
pub async fn relay(state: &AppState, req: ClientRequest, caller: &Caller) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (route, model) = (req.route, req.model.clone());
    if crate::telemetry::traces_on() {
        crate::telemetry::attribute("gen_ai.operation.name", operation_name(&req));
        crate::telemetry::attribute("gen_ai.request.model", model.clone());
    }
    let waited = AtomicU64::new(0);
    let result = relay_attempts(state, req, caller, &waited).await;
    let (total, waited) = (started.elapsed(), Duration::from_nanos(waited.load(Ordering::Relaxed)));
    let metrics = crate::metrics::get();
    match &result {
        Ok(response) => {
            metrics.request(route, &model, response.status().as_u16(), "", total, waited);
            if crate::ingress::is_stream(response) {
                metrics.first_token(route, total);
            }
        }
        Err(e) => {
            let code = e.code.unwrap_or(e.kind);
            // Unknown models are whatever clients send: never a label.
            let model = if code == "model_not_found" { "unknown" } else { &model };
            metrics.request(route, model, e.status.as_u16(), code, total, waited);
        }
    }
    result
}

/// The GenAI semantic conventions' `gen_ai.operation.name`.
fn operation_name(req: &ClientRequest) -> &'static str {
    if let Some(r) = &req.relayed {
        return crate::relayed::route(r.operation);
    }
    let endpoint = req.endpoint;
    match endpoint {
        crate::plugins::Endpoint::Completions => "text_completion",
        crate::plugins::Endpoint::Embeddings => "embeddings",
        _ => "chat",
    }
}

/// [`relay`] without the request metrics; `waited` sums the time spent
/// waiting for upstreams.
async fn relay_attempts(
    state: &AppState,
    req: ClientRequest,
    caller: &Caller,
    waited: &AtomicU64,
) -> Result<Response, ApiError> {
    let group: &str = &caller.group;
    let plugins = state.registry.snapshot();
    // Filters read chat requests; relayed operations (audio, images…) pass.
    let filters = match req.relayed {
        None => state.filters.chain(&plugins, || filter_facts(&req, caller), state),
        Some(_) => None,
    };
    let (req, filter_headers) = match &filters {
        Some(chain) => filtered_request(chain, req).await?,
        None => (req, Vec::new()),
    };
    let channels = state.channels.snapshot();
    let mut candidates = candidates(&channels, &plugins, group, &req.model);
    if let Some(relayed) = &req.relayed {
        // Only channels whose adapter relays this operation.
        let relays = |c: &Arc<Channel>| plugins.adapters.get(&c.adapter).is_some_and(|a| a.relays(relayed.operation));
        if !candidates.is_empty() && !candidates.iter().any(relays) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("unsupported_operation"),
                format!("No channel serving the model `{}` supports this endpoint.", req.model),
            )
            .param("model"));
        }
        candidates.retain(relays);
    }
    if candidates.is_empty() {
        return Err(match unavailable(&channels, &plugins, group, &req.model) {
            Some(wait) => no_channel_available(wait),
            None => ApiError::model_not_found(&req.model),
        });
    }
    let mut meter = Some(state.billing.admit(caller, &req).await?);
    let affinity_caller = match (&caller.account, caller.config_token) {
        (Some(a), _) => AffinityCaller::Token(a.token.id),
        (None, Some(i)) => AffinityCaller::Config(i),
        (None, None) => AffinityCaller::Unknown,
    };
    let route = RouteRequest {
        endpoint: req.endpoint,
        model: &req.model,
        group,
        stream: req.stream,
        user_id: caller.account.as_ref().map(|a| a.user_id),
        token_id: caller.account.as_ref().map(|a| a.token.id),
        affinity: Affinity { caller: affinity_caller, session: req.session.clone() },
    };
    let ordered = state.routing.order(&plugins, &state.registry, &route, candidates).await;
    let cfg = &state.config.upstream;
    let deadline = Instant::now() + Duration::from_secs(cfg.total_timeout_secs);
    let mut last: Option<ApiError> = None;
    // Channels not worth another try in this request (their key was refused,
    // their adapter is missing).
    let mut spent = vec![false; ordered.len()];
    // A session keeps its key on a channel's first attempt; a retry on the
    // same channel rotates (the kept key may be the one that failed).
    let session = route.affinity.session_hash();
    let mut attempted = if session.is_some() { vec![false; ordered.len()] } else { Vec::new() };
    let mut next = 0usize;
    for n in 0..cfg.max_attempts as usize {
        let Some(offset) = (0..ordered.len()).find(|k| !spent[(next + k) % ordered.len()]) else { break };
        let index = (next + offset) % ordered.len();
        next = index + 1;
        let channel = &ordered[index];
        if n >= ordered.len() {
            // Every candidate has been tried: wait before trying this one again.
            let round = (n / ordered.len()) as u32;
            let Some(wait) = retry_wait(cfg, round, last.as_ref(), deadline) else { break };
            tracing::info!(channel = channel.id, wait_ms = wait.as_millis() as u64, "retrying after backoff");
            tokio::time::sleep(wait).await;
        }
        let limit =
            Duration::from_secs(cfg.attempt_timeout_secs).min(deadline.saturating_duration_since(Instant::now()));
        if limit.is_zero() {
            break;
        }
        let stats = state.routing.stats.of(channel.id);
        let in_flight = stats.start();
        let key_view = match session {
            Some(h) if channel.multi_key() && !std::mem::replace(&mut attempted[index], true) => channel.view_for(h),
            _ => channel.view(),
        };
        let info = attempt_info(&plugins, channel, &req.model);
        let ctx = Attempt {
            state,
            plugins: &plugins,
            channel,
            req: &req,
            stats: &stats,
            info: info.clone(),
            tag: key_tag(channel, key_view.index),
            waited,
            filters: filters.as_ref(),
            filter_headers: &filter_headers,
        };
        let metrics = crate::metrics::get();
        let span = tracing::debug_span!(target: "wasmgate::attempt", "attempt", otel.name = "attempt",
            channel.id = channel.id, gen_ai.provider.name = %channel.adapter, attempt = n + 1);
        let outcome =
            tokio::time::timeout(limit, attempt(ctx, key_view, in_flight, &mut meter)).instrument(span.clone()).await;
        let error_type = match &outcome {
            Ok(Ok(_)) => None,
            Ok(Err(Failure::Retry(_, Some(kind)))) => Some(kind_name(kind)),
            Ok(Err(Failure::Final(e) | Failure::Retry(e, None))) => Some(e.code.unwrap_or(e.kind)),
            Err(_) => Some("timeout"),
        };
        if let Some(error_type) = error_type {
            crate::telemetry::span_attribute(&span, "error.type", error_type);
        }
        let (err, kind) = match outcome {
            Ok(Ok(response)) => {
                state.health.on_success(channel);
                metrics.attempt(channel.id, "success");
                if n > 0 {
                    metrics.failover();
                }
                return Ok(response);
            }
            Ok(Err(Failure::Final(err))) => {
                metrics.attempt(channel.id, err.code.unwrap_or(err.kind));
                if let Some(m) = &meter {
                    m.attempt_failed(&info, err.status.as_u16(), err.code.unwrap_or(err.kind));
                }
                return Err(err);
            }
            Ok(Err(Failure::Retry(err, kind))) => {
                metrics.attempt(channel.id, kind.as_ref().map_or("adapter_unavailable", kind_name));
                (err, kind)
            }
            Err(_) => {
                metrics.attempt(channel.id, "timeout");
                (timeout_error(), Some(ErrorKind::Transient))
            }
        };
        if let Some(m) = &meter {
            let what = kind.as_ref().map_or("adapter_unavailable", kind_name);
            m.attempt_failed(&info, err.status.as_u16(), what);
        }
        stats.failure();
        tracing::info!(channel = channel.id, status = %err.status, code = ?err.code, "attempt failed");
        spent[index] = match &kind {
            None => true,
            Some(ErrorKind::Auth | ErrorKind::QuotaExhausted) => !channel.multi_key(),
            Some(_) => false,
        };
        if let Some(kind) = &kind {
            let consecutive_failures = stats.view().consecutive_failures;
            state.health.on_failure(channel, &Fault { kind, key: key_view.index, consecutive_failures });
        }
        last = Some(err);
    }
    Err(last.unwrap_or_else(timeout_error))
}

/// How long to wait before retry round `round` (1 = second pass), or `None`
/// when the wait would not fit: exponential backoff with full jitter, at
/// least the upstream's `Retry-After` when it asked for one.
fn retry_wait(cfg: &UpstreamConfig, round: u32, last: Option<&ApiError>, deadline: Instant) -> Option<Duration> {
    let ceiling = cfg.backoff_base_ms.saturating_mul(1u64 << (round - 1).min(20)).min(cfg.backoff_max_ms);
    let mut wait = Duration::from_millis(rand::random_range(0..=ceiling));
    if let Some(secs) = last.and_then(|e| e.retry_after) {
        if u64::from(secs) > cfg.max_retry_after_secs {
            return None;
        }
        wait = wait.max(Duration::from_secs(secs.into()));
    }
    (Instant::now() + wait < deadline).then_some(wait)
}

/// Every channel that offers the model is disabled or cooling down.
fn no_channel_available(retry_after_secs: u64) -> ApiError {
    let mut err = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_error",
        Some("channel_unavailable"),
        "No upstream channel is currently able to serve this request.",
    );
    if retry_after_secs > 0 {
        err.retry_after = Some(retry_after_secs.min(u64::from(u32::MAX)) as u32);
    }
    err
}

fn timeout_error() -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_error",
        Some("upstream_timeout"),
        "The upstream did not answer in time.",
    )
}

fn adapter_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_error",
        Some("adapter_unavailable"),
        "The provider adapter for this model is not loaded.",
    )
}

/// Which channel and plugin an attempt uses, for the usage log.
fn attempt_info(plugins: &PluginSet, channel: &Channel, model: &str) -> AttemptInfo {
    let adapter = plugins.adapters.get(&channel.adapter);
    AttemptInfo {
        channel_id: channel.id,
        upstream_model: channel.upstream_model(model),
        plugin: channel.adapter.clone(),
        plugin_sha256: adapter.map(|a| a.sha256.clone()).unwrap_or_default(),
    }
}

/// One attempt's fixed inputs.
struct Attempt<'a> {
    state: &'a AppState,
    plugins: &'a PluginSet,
    channel: &'a Arc<Channel>,
    req: &'a ClientRequest,
    stats: &'a Arc<ChannelStats>,
    info: AttemptInfo,
    /// The channel key's tag (plugin instance reuse).
    tag: u64,
    /// Nanoseconds spent waiting for upstreams, summed over attempts.
    waited: &'a AtomicU64,
    /// The request's filters, when any apply.
    filters: Option<&'a Arc<Chain>>,
    /// Headers the request filters add to the upstream request.
    filter_headers: &'a [crate::plugins::Header],
}

/// What the filters of `req`'s chain know about it.
fn filter_facts(req: &ClientRequest, caller: &Caller) -> RequestFacts {
    RequestFacts {
        endpoint: req.endpoint,
        route: req.route,
        model: req.model.clone(),
        group: caller.group.to_string(),
        stream: req.stream,
        request_id: req.request_id.clone(),
        user_id: caller.account.as_ref().map(|a| a.user_id),
        token_id: caller.account.as_ref().map(|a| a.token.id),
    }
}

/// `req` after the request filters of `chain`, and the headers they add
/// upstream. A changed body is validated again like the client's; it may
/// name another model but not turn a stream into an answer or back.
async fn filtered_request(
    chain: &Chain,
    req: ClientRequest,
) -> Result<(ClientRequest, Vec<crate::plugins::Header>), ApiError> {
    let outcome = chain.on_request(&req.body).await?;
    let Some(body) = outcome.body else { return Ok((req, outcome.headers)) };
    let parsed = ClientRequest::parse(req.endpoint, bytes::Bytes::from(body)).map_err(|e| {
        tracing::warn!(error = %e.message, "a request filter produced an invalid request");
        ApiError::plugin()
    })?;
    if parsed.stream != req.stream {
        tracing::warn!("a request filter changed the request's stream flag");
        return Err(ApiError::plugin());
    }
    let session = req.session.clone().or(parsed.session.clone());
    let filtered = ClientRequest { route: req.route, session, ..parsed.with_id(req.request_id) };
    Ok((filtered, outcome.headers))
}

/// Try `a.channel`. On success the meter is settled (non-streamed) or moved
/// into the stream, which settles it when it ends.
/// The credential for `key_view`'s key, when `adapter` trades keys for one.
async fn credential(
    a: &Attempt<'_>,
    adapter: &crate::plugins::AdapterPlugin,
    key_view: &KeyView,
) -> Result<Option<Arc<str>>, Failure> {
    let KeyView { view, fingerprint, .. } = key_view;
    let (state, channel) = (a.state, a.channel);
    match state.credentials.get(adapter, a.tag, view, fingerprint, &channel.origin, &state.upstream).await {
        Ok(c) => Ok(c),
        Err(CredentialError::Plugin(e)) => Err(plugin_failure(state, &e)),
        Err(CredentialError::Upstream(e)) => Err(upstream_failure(&e, channel)),
    }
}

/// Send the adapter's `upstream_req` (after checking its origin, with the
/// filters' headers and the trace context); the time waited is counted.
async fn send(
    a: &Attempt<'_>,
    adapter: &crate::plugins::AdapterPlugin,
    mut upstream_req: crate::plugins::HttpRequest,
    upstream_model: &str,
) -> Result<upstream::UpstreamResponse, Failure> {
    let (state, channel) = (a.state, a.channel);
    if !channel.same_origin(&upstream_req.url) {
        let e = PluginError::malformed(&adapter.name, "upstream URL outside the channel's origin");
        return Err(plugin_failure(state, &e));
    }
    upstream_req.headers.extend_from_slice(a.filter_headers);
    if crate::telemetry::traces_on() {
        crate::telemetry::attribute("gen_ai.response.model", upstream_model.to_string());
    }
    let span =
        tracing::debug_span!(target: "wasmgate::upstream", "upstream", otel.name = "upstream", otel.kind = "client");
    if let Some(traceparent) = span.in_scope(crate::telemetry::traceparent) {
        upstream_req.headers.push(crate::plugins::Header { name: "traceparent".into(), value: traceparent });
    }
    let sent = Instant::now();
    let response = state.upstream.send(upstream_req, channel.http2).instrument(span.clone()).await;
    a.waited_since(sent);
    if let Ok(r) = &response {
        crate::telemetry::span_attribute(&span, "http.response.status_code", i64::from(r.status().as_u16()));
    }
    response.map_err(|e| upstream_failure(&e, channel))
}

/// A non-2xx answer, classified by the adapter (a refused credential is
/// forgotten).
async fn refused(
    a: &Attempt<'_>,
    adapter: &crate::plugins::AdapterPlugin,
    ctx: &RequestContext,
    settings: Option<Arc<str>>,
    response: upstream::UpstreamResponse,
    key_view: &KeyView,
    had_credential: bool,
) -> Failure {
    let (state, channel) = (a.state, a.channel);
    let reading = Instant::now();
    let body = state.upstream.read(response).await;
    a.waited_since(reading);
    let body = match body {
        Ok(b) => b,
        Err(e) => return upstream_failure(&e, channel),
    };
    let err = match adapter.classify_error(a.tag, ctx, settings, &body).await {
        Ok(err) => err,
        Err(e) => return plugin_failure(state, &e),
    };
    tracing::info!(channel = channel.id, status = body.status, kind = ?err.kind, "upstream error");
    if matches!(err.kind, ErrorKind::Auth) && had_credential {
        state.credentials.invalidate(&key_view.fingerprint);
    }
    upstream_failure(&err, channel)
}

impl Attempt<'_> {
    /// Count the time since `since` as spent waiting for upstreams.
    fn waited_since(&self, since: Instant) {
        self.waited.fetch_add(u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

async fn attempt(
    a: Attempt<'_>,
    key_view: &KeyView,
    in_flight: InFlight,
    meter: &mut Option<Meter>,
) -> Result<Response, Failure> {
    if let Some(relayed) = &a.req.relayed {
        let body = relayed::Passed {
            operation: relayed.operation,
            content_type: &relayed.content_type,
            body: &a.req.body,
            stream: false,
            headers: &[],
        };
        if let Some(built) = relayed::build(&a, &body, key_view).await? {
            return relayed::serve(&a, body, built, key_view, in_flight, meter).await;
        }
        return Err(Failure::Retry(adapter_unavailable(), None));
    }
    if let Some(native) = &a.req.native
        && let Some(adapter) = a.plugins.adapters.get(&a.channel.adapter)
        && adapter.relays(native.operation)
        && !a.channel.not_native(native.operation, &adapter.sha256)
    {
        let body = relayed::Passed {
            operation: native.operation,
            content_type: "application/json",
            body: &native.body,
            stream: native.stream,
            headers: &native.headers,
        };
        // A channel that does not speak it natively translates (and is not
        // asked again while this adapter version serves it).
        match relayed::build(&a, &body, key_view).await? {
            Some(built) => return relayed::serve(&a, body, built, key_view, in_flight, meter).await,
            None => a.channel.set_not_native(native.operation, &adapter.sha256),
        }
    }
    let started = Instant::now();
    let Some(adapter) = a.plugins.adapters.get(&a.channel.adapter) else {
        tracing::warn!(channel = a.channel.id, adapter = %a.channel.adapter, "adapter not loaded");
        return Err(Failure::Retry(adapter_unavailable(), None));
    };
    let (state, channel, req, tag) = (a.state, a.channel, a.req, a.tag);
    let ctx = RequestContext {
        endpoint: req.endpoint,
        requested_model: req.model.clone(),
        upstream_model: channel.upstream_model(&req.model),
        stream: req.stream,
        include_usage: req.include_usage,
        request_id: req.request_id.clone(),
    };
    let credential = credential(&a, adapter, key_view).await?;
    let upstream_req = match adapter.build_request(tag, &ctx, &key_view.view, &req.body, credential.clone()).await {
        Err(e) => return Err(plugin_failure(state, &e)),
        Ok(Err(e)) => return Err(Failure::Final(client_error(&e, channel))),
        Ok(Ok(r)) => r,
    };
    // What `channel-context.settings` answers during the calls below.
    let settings: Option<Arc<str>> = Some(Arc::from(key_view.view.settings.as_str()));
    let response = send(&a, adapter, upstream_req, &ctx.upstream_model).await?;
    if !response.status().is_success() {
        return Err(refused(&a, adapter, &ctx, settings, response, key_view, credential.is_some()).await);
    }
    let upstream = &state.upstream;
    if req.stream {
        let decoder = adapter.stream_decoder(tag, &ctx, settings).await.map_err(|e| plugin_failure(state, &e))?;
        let mut live = stream::LiveStream::new(state, response, decoder, channel.clone(), a.stats.clone(), in_flight);
        live.filter_chunks(a.filters.filter(|c| c.filters_chunks()).cloned());
        if req.translated() {
            live.hold_for_translator();
        }
        // Boxed: it holds the stream until its first chunk, and inline it
        // would make every request's future larger.
        return Box::pin(stream_response(live, started, meter, a.info.clone())).await;
    }
    let reading = Instant::now();
    let body = upstream.read(response).await;
    a.waited_since(reading);
    let body = body.map_err(|e| upstream_failure(&e, channel))?;
    match adapter.parse_response(tag, &ctx, settings, &body).await {
        Err(e) => Err(plugin_failure(state, &e)),
        Ok(Err(e)) => Err(upstream_failure(&e, channel)),
        Ok(Ok(parsed)) => {
            // One pass validates the body and, when the upstream reported
            // no usage, collects the generated text to count.
            let mut generated = crate::billing::tokenize::GeneratedText::default();
            let needs_text = parsed.usage.is_none() && meter.as_ref().is_some_and(Meter::needs_tokens);
            if !crate::billing::tokenize::generated_text(&parsed.body, needs_text.then_some(&mut generated)) {
                let e = PluginError::malformed(&adapter.name, "response body is not JSON");
                return Err(plugin_failure(state, &e));
            }
            a.stats.success(started.elapsed(), None);
            drop(in_flight);
            tracing::debug!(channel = channel.id, usage = ?parsed.usage, "request served");
            if let Some(mut m) = meter.take() {
                m.serving(a.info.clone());
                let tokens = m.tokens(parsed.usage, generated).await;
                if let Err(e) = m.settle(tokens, Ending::default()) {
                    // Fail closed: an answer whose usage cannot be recorded
                    // is not served.
                    tracing::error!(error = %e, "refusing an answer whose usage cannot be recorded");
                    return Err(Failure::Final(storage_unavailable()));
                }
            }
            let body = match a.filters {
                Some(chain) => chain.on_response(parsed.body).await.map_err(Failure::Final)?,
                None => parsed.body,
            };
            let mut response = Response::new(Body::from(body));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        }
    }
}

/// The stream's response once its first chunks are in; a translated
/// route's (its chunks held) has an empty body and the stream in a
/// [`PendingStream`] extension.
async fn stream_response(
    mut live: LiveStream,
    started: Instant,
    meter: &mut Option<Meter>,
    info: AttemptInfo,
) -> Result<Response, Failure> {
    // Nothing has reached the client yet: a failure here may fail over.
    let first = stream::first_frames(&mut live).await.map_err(|(err, kind)| match kind {
        Some(kind) if retryable(&kind) => Failure::Retry(err, Some(kind)),
        _ => Failure::Final(err),
    })?;
    let ttft = started.elapsed();
    live.stats.success(ttft, Some(ttft));
    live.ttft = Some(ttft);
    if let Some(mut m) = meter.take() {
        if let Err(e) = m.stream_started(info, ttft) {
            tracing::error!(error = %e, "refusing a stream whose usage cannot be recorded");
            return Err(Failure::Final(storage_unavailable()));
        }
        live.meter = Some(m);
    }
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::HeaderName::from_static("x-accel-buffering"), "no"),
    ];
    if live.held() {
        let mut response = (headers, Body::empty()).into_response();
        response.extensions_mut().insert(PendingStream::new(first, live));
        return Ok(response);
    }
    Ok((headers, Body::from_stream(stream::body(first, live))).into_response())
}
