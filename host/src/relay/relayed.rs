//! One attempt of a relayed operation (images, audio, moderations, rerank;
//! see `crate::relayed`): the adapter's `build-passthrough` says where to
//! send the client's body; a JSON answer is read, billed by what it reports
//! and returned as it is; any other answer (speech audio) is billed by what
//! was asked and streamed to the client as it arrives.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::StreamExt;

use super::{
    Attempt, Failure, adapter_unavailable, client_error, credential, plugin_failure, refused, send, upstream_failure,
};
use crate::billing::{Ending, Meter, storage_unavailable};
use crate::channels::KeyView;
use crate::plugins::{Endpoint, PassthroughContext, RequestContext};
use crate::relayed::{Relayed, answered_units};
use crate::routing::InFlight;

pub(super) async fn attempt(
    a: &Attempt<'_>,
    relayed: &Relayed,
    key_view: &KeyView,
    in_flight: InFlight,
    meter: &mut Option<Meter>,
) -> Result<Response, Failure> {
    let started = Instant::now();
    let (state, channel, req) = (a.state, a.channel, a.req);
    let Some(adapter) = a.plugins.adapters.get(&channel.adapter).filter(|p| p.relays(relayed.operation)) else {
        tracing::warn!(channel = channel.id, adapter = %channel.adapter, "adapter not loaded or not relaying");
        return Err(Failure::Retry(adapter_unavailable(), None));
    };
    let upstream_model = channel.upstream_model(&req.model);
    let ctx = PassthroughContext {
        operation: relayed.operation,
        requested_model: req.model.clone(),
        upstream_model: upstream_model.clone(),
        content_type: relayed.content_type.clone(),
        request_id: req.request_id.clone(),
    };
    let credential = credential(a, adapter, key_view).await?;
    let upstream_req = match adapter.build_passthrough(a.tag, &ctx, &key_view.view, &req.body, credential.clone()).await
    {
        Err(e) => return Err(plugin_failure(state, &e)),
        Ok(Err(e)) => return Err(Failure::Final(client_error(&e, channel))),
        Ok(Ok(r)) => r,
    };
    let settings: Option<Arc<str>> = Some(Arc::from(key_view.view.settings.as_str()));
    let response = send(a, adapter, upstream_req, &upstream_model).await?;
    if !response.status().is_success() {
        // Classified as the adapter classifies any answer of its provider.
        let error_ctx = RequestContext {
            endpoint: Endpoint::ChatCompletions,
            requested_model: req.model.clone(),
            upstream_model,
            stream: false,
            include_usage: false,
            request_id: req.request_id.clone(),
        };
        return Err(refused(a, adapter, &error_ctx, settings, response, key_view, credential.is_some()).await);
    }
    let content_type = response.content_type().unwrap_or_else(|| "application/octet-stream".into());
    let json = content_type.to_ascii_lowercase().contains("json");
    let body = if json {
        let reading = Instant::now();
        let read = state.upstream.read(response).await;
        a.waited_since(reading);
        let read = read.map_err(|e| upstream_failure(&e, channel))?;
        let (usage, units) = answered_units(relayed.operation, &read.body);
        settle(a, meter, usage, units)?;
        Body::from(read.body)
    } else {
        // Audio: billed by what was asked, streamed as it comes.
        settle(a, meter, None, None)?;
        Body::from_stream(response.body_stream().map(|chunk| chunk.map_err(std::io::Error::other)))
    };
    a.stats.success(started.elapsed(), None);
    drop(in_flight);
    let mut out = Response::new(body);
    let value = HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    out.headers_mut().insert(header::CONTENT_TYPE, value);
    Ok(out)
}

/// Bill the attempt that served: by the upstream's usage when it reported
/// tokens, by the units it reported (or those asked) otherwise.
fn settle(
    a: &Attempt<'_>,
    meter: &mut Option<Meter>,
    usage: Option<crate::plugins::Usage>,
    units: Option<u64>,
) -> Result<(), Failure> {
    let Some(mut m) = meter.take() else { return Ok(()) };
    m.serving(a.info.clone());
    if let Some(units) = units {
        m.set_units(units);
    }
    let tokens = m.relayed_tokens(usage);
    m.settle(tokens, Ending::default()).map_err(|e| {
        tracing::error!(error = %e, "refusing an answer whose usage cannot be recorded");
        Failure::Final(storage_unavailable())
    })
}
