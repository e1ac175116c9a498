//! The relay: route a validated request to a channel through its adapter
//! plugin, fail over on retryable errors, answer in OpenAI's shape.

mod errors;
mod request;
mod route;
mod stream;
mod upstream;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use errors::{client_error, retryable};
pub use request::ClientRequest;
pub use upstream::Upstream;

use crate::channels::{Channel, origin_of};
use crate::error::ApiError;
use crate::plugins::{AdapterPlugin, PluginError, PluginSet, RequestContext};
use crate::state::AppState;
use stream::LiveStream;

/// Why one attempt on one channel did not produce a response.
enum Failure {
    /// Try the next channel.
    Retry(ApiError),
    /// Answer the client with this now.
    Final(ApiError),
}

fn plugin_failure(e: &PluginError, request_id: &str) -> Failure {
    tracing::warn!(request_id, error = %e, "plugin call failed");
    if matches!(e, PluginError::Instantiate { .. }) {
        // Every pooled instance is busy (open streams hold one each): a
        // capacity problem, not the plugin's fault.
        let mut err = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("capacity_exceeded"),
            "The gateway is at capacity; retry shortly.",
        );
        err.retry_after = Some(1);
        return Failure::Final(err);
    }
    Failure::Final(ApiError::plugin())
}

/// Serve `req` (already authenticated and validated).
pub async fn relay(state: &AppState, req: ClientRequest, request_id: &str) -> Result<Response, ApiError> {
    let plugins = state.registry.snapshot();
    let channels = state.channels.all();
    let candidates = route::candidates(&channels, &plugins, &req.model);
    if candidates.is_empty() {
        return Err(ApiError::model_not_found(&req.model));
    }
    let ordered = route::order(&plugins, &state.config.routing.policy, &req, candidates);
    let mut last = None;
    for channel in ordered.into_iter().take(state.config.upstream.max_attempts as usize) {
        match attempt(state, &plugins, &channel, &req, request_id).await {
            Ok(response) => return Ok(response),
            Err(Failure::Final(err)) => return Err(err),
            Err(Failure::Retry(err)) => {
                tracing::info!(request_id, channel = channel.id, status = %err.status, "attempt failed; trying next channel");
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(ApiError::internal))
}

fn adapter_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_error",
        Some("adapter_unavailable"),
        "The provider adapter for this model is not loaded.",
    )
}

async fn attempt(
    state: &AppState,
    plugins: &PluginSet,
    channel: &Arc<Channel>,
    req: &ClientRequest,
    request_id: &str,
) -> Result<Response, Failure> {
    let Some(adapter) = plugins.adapters.get(&channel.adapter) else {
        tracing::warn!(request_id, channel = channel.id, adapter = %channel.adapter, "adapter not loaded");
        return Err(Failure::Retry(adapter_unavailable()));
    };
    let ctx = RequestContext {
        endpoint: req.endpoint,
        requested_model: req.model.clone(),
        upstream_model: channel.upstream_model(&req.model),
        stream: req.stream,
        include_usage: req.include_usage,
        request_id: request_id.to_string(),
    };
    let upstream_req = match adapter.build_request(&ctx, &channel.view(), &req.body) {
        Err(e) => return Err(plugin_failure(&e, request_id)),
        Ok(Err(e)) => return Err(Failure::Final(client_error(&e, channel))),
        Ok(Ok(r)) => r,
    };
    if origin_of(&upstream_req.url).as_deref() != Some(channel.origin.as_str()) {
        let e = PluginError::malformed(&adapter.name, "upstream URL outside the channel's origin");
        return Err(plugin_failure(&e, request_id));
    }
    let upstream = &state.upstream;
    let response = upstream.send(upstream_req).await.map_err(|e| Failure::Retry(client_error(&e, channel)))?;

    if !response.status().is_success() {
        let body = upstream.read(response).await.map_err(|e| Failure::Retry(client_error(&e, channel)))?;
        let err = adapter.classify_error(&ctx, &body).map_err(|e| plugin_failure(&e, request_id))?;
        tracing::info!(request_id, channel = channel.id, status = body.status, kind = ?err.kind, "upstream error");
        let client = client_error(&err, channel);
        return Err(if retryable(&err.kind) { Failure::Retry(client) } else { Failure::Final(client) });
    }
    if req.stream {
        return stream_response(adapter, ctx, response, channel, state, request_id).await;
    }
    let body = upstream.read(response).await.map_err(|e| Failure::Retry(client_error(&e, channel)))?;
    match adapter.parse_response(&ctx, &body) {
        Err(e) => Err(plugin_failure(&e, request_id)),
        Ok(Err(e)) => {
            let client = client_error(&e, channel);
            Err(if retryable(&e.kind) { Failure::Retry(client) } else { Failure::Final(client) })
        }
        Ok(Ok(parsed)) => {
            if serde_json::from_slice::<serde::de::IgnoredAny>(&parsed.body).is_err() {
                let e = PluginError::malformed(&adapter.name, "response body is not JSON");
                return Err(plugin_failure(&e, request_id));
            }
            tracing::debug!(request_id, channel = channel.id, usage = ?parsed.usage, "request served");
            let mut response = Response::new(Body::from(parsed.body));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        }
    }
}

async fn stream_response(
    adapter: &Arc<AdapterPlugin>,
    ctx: RequestContext,
    response: reqwest::Response,
    channel: &Arc<Channel>,
    state: &AppState,
    request_id: &str,
) -> Result<Response, Failure> {
    let decoder = adapter.stream_decoder(&ctx).map_err(|e| plugin_failure(&e, request_id))?;
    let mut live = LiveStream {
        upstream: Box::pin(response.bytes_stream()),
        decoder,
        channel: channel.clone(),
        idle: state.upstream.idle_timeout,
        usage: None,
        request_id: request_id.to_string(),
    };
    // Nothing has reached the client yet: a failure here may fail over.
    let first = stream::first_frames(&mut live)
        .await
        .map_err(|err| if err.kind == "plugin_error" { Failure::Final(err) } else { Failure::Retry(err) })?;
    let body = Body::from_stream(stream::body(first, live));
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::HeaderName::from_static("x-accel-buffering"), "no"),
    ];
    Ok((headers, body).into_response())
}
