//! Channel tests: send the adapter's own health probe (the adapter picks
//! endpoint, model and body, so an embeddings-only channel is probed with
//! an embeddings request) and time it.

use std::time::Instant;

use serde::Serialize;

use super::credentials::CredentialError;
use super::errors::client_error;
use crate::channels::{Channel, origin_of};
use crate::plugins::{Endpoint, ErrorKind, RequestContext};
use crate::state::AppState;

/// The result of one probe.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeOutcome {
    /// Whether the upstream answered the probe successfully.
    pub success: bool,
    /// Wall time of the probe, in ms.
    pub time_ms: u64,
    /// Endpoint probed (`chat_completions`, `embeddings`, ...).
    pub endpoint: &'static str,
    /// Model the probe asked for (as the client would name it).
    pub model: String,
    /// Classified error kind when it failed (`auth`, `transient`, ...).
    pub error_kind: Option<&'static str>,
    /// What went wrong, scrubbed of keys and addresses.
    pub message: Option<String>,
}

impl ProbeOutcome {
    /// A probe that did not finish within `limit`.
    pub fn timed_out(limit: std::time::Duration) -> Self {
        Self {
            success: false,
            time_ms: limit.as_millis() as u64,
            endpoint: "unknown",
            model: String::new(),
            error_kind: Some("transient"),
            message: Some(format!("the probe did not finish within {} s", limit.as_secs())),
        }
    }
}

/// Snake-case name of an endpoint.
pub fn endpoint_name(e: Endpoint) -> &'static str {
    match e {
        Endpoint::ChatCompletions => "chat_completions",
        Endpoint::Completions => "completions",
        Endpoint::Embeddings => "embeddings",
        Endpoint::Models => "models",
    }
}

/// Snake-case name of an error kind.
pub fn kind_name(k: &ErrorKind) -> &'static str {
    match k {
        ErrorKind::BadRequest => "bad_request",
        ErrorKind::Auth => "auth",
        ErrorKind::QuotaExhausted => "quota_exhausted",
        ErrorKind::RateLimited(_) => "rate_limited",
        ErrorKind::ModelNotFound => "model_not_found",
        ErrorKind::ContentFiltered => "content_filtered",
        ErrorKind::Transient => "transient",
        ErrorKind::Other => "other",
    }
}

/// Probe `channel` through its adapter.
pub async fn probe(state: &AppState, channel: &Channel) -> ProbeOutcome {
    let started = Instant::now();
    let mut out = ProbeOutcome {
        success: false,
        time_ms: 0,
        endpoint: "chat_completions",
        model: String::new(),
        error_kind: None,
        message: None,
    };
    let fail = |mut out: ProbeOutcome, kind: Option<&'static str>, message: String| {
        out.error_kind = kind;
        out.message = Some(channel.scrub(&message));
        out.time_ms = started.elapsed().as_millis() as u64;
        out
    };
    let plugins = state.registry.snapshot();
    let Some(adapter) = plugins.adapters.get(&channel.adapter) else {
        return fail(out, None, format!("adapter `{}` is not loaded", channel.adapter));
    };
    let (view, _) = channel.view();
    let credential = match state.credentials.get(adapter, &view, &channel.origin, &state.upstream).await {
        Ok(c) => c,
        Err(CredentialError::Plugin(e)) => return fail(out, None, format!("credential exchange failed: {e}")),
        Err(CredentialError::Upstream(e)) => return fail(out, Some(kind_name(&e.kind)), e.message),
    };
    let probe = match adapter.health_probe(&view, credential.as_deref()) {
        Ok(p) => p,
        Err(e) => return fail(out, None, format!("adapter failed to build a probe: {e}")),
    };
    out.endpoint = endpoint_name(probe.endpoint);
    out.model.clone_from(&probe.model);
    let ctx = RequestContext {
        endpoint: probe.endpoint,
        requested_model: probe.model.clone(),
        upstream_model: channel.upstream_model(&probe.model),
        stream: false,
        include_usage: false,
        request_id: format!("probe_{:016x}", rand::random::<u64>()),
    };
    let request = match adapter.build_request(&ctx, &view, &probe.body, credential.as_deref()) {
        Ok(Ok(r)) if origin_of(&r.url).as_deref() == Some(channel.origin.as_str()) => r,
        Ok(Ok(_)) => return fail(out, None, "adapter built a URL outside the channel's origin".into()),
        Ok(Err(e)) => return fail(out, Some(kind_name(&e.kind)), e.message),
        Err(e) => return fail(out, None, format!("adapter failed: {e}")),
    };
    let response = match state.upstream.send(request).await {
        Ok(r) => r,
        Err(e) => return fail(out, Some(kind_name(&e.kind)), e.message),
    };
    let ok_status = response.status().is_success();
    let body = match state.upstream.read(response).await {
        Ok(b) => b,
        Err(e) => return fail(out, Some(kind_name(&e.kind)), e.message),
    };
    let verdict = if ok_status {
        adapter.parse_response(&ctx, &body).map(|r| r.map(|_| ()))
    } else {
        adapter.classify_error(&ctx, &body).map(Err)
    };
    match verdict {
        Ok(Ok(())) => {
            out.success = true;
            out.time_ms = started.elapsed().as_millis() as u64;
            out
        }
        Ok(Err(e)) => {
            let message = client_error(&e, channel).message;
            let detail = channel.scrub(&e.message);
            let kind = kind_name(&e.kind);
            fail(out, Some(kind), if detail.is_empty() { message } else { detail })
        }
        Err(e) => fail(out, None, format!("adapter failed: {e}")),
    }
}
