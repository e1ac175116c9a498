//! Channel tests: send the adapter's own health probe (the adapter picks
//! endpoint, model and body, so an embeddings-only channel is probed with
//! an embeddings request) and time it.

use std::time::Instant;

use serde::Serialize;

use super::credentials::CredentialError;
use super::errors::client_error;
use crate::channels::Channel;
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

/// Probe `channel` through its adapter, within `health.probe_timeout_secs`
/// (a dripping upstream cannot hold the recovery tester or an admin's
/// channel test).
pub async fn probe(state: &AppState, channel: &Channel) -> ProbeOutcome {
    let limit = std::time::Duration::from_secs(state.health.config().probe_timeout_secs.max(1));
    match tokio::time::timeout(limit, probe_unbounded(state, channel)).await {
        Ok(outcome) => outcome,
        Err(_) => ProbeOutcome::timed_out(limit),
    }
}

async fn probe_unbounded(state: &AppState, channel: &Channel) -> ProbeOutcome {
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
    let key_view = channel.view();
    let mut view = key_view.view.clone();
    let tag = super::key_tag(channel, key_view.index);
    // Unless the channel's settings name a probe model, probe with a model
    // the channel offers: an adapter's default probe model may be one this
    // upstream does not serve, and the channel would never recover.
    if let Some(model) = channel.models.first() {
        view.settings = with_probe_model(&view.settings, model);
    }
    let fingerprint = super::credentials::fingerprint(&view);
    let credential =
        match state.credentials.get(adapter, tag, &view, &fingerprint, &channel.origin, &state.upstream).await {
            Ok(c) => c,
            Err(CredentialError::Plugin(e)) => return fail(out, None, format!("credential exchange failed: {e}")),
            Err(CredentialError::Upstream(e)) => return fail(out, Some(kind_name(&e.kind)), e.message),
        };
    let probe = match adapter.health_probe(tag, &view, credential.clone()).await {
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
    let request = match adapter.build_request(tag, &ctx, &view, &probe.body, credential.clone()).await {
        Ok(Ok(r)) if channel.same_origin(&r.url) => r,
        Ok(Ok(_)) => return fail(out, None, "adapter built a URL outside the channel's origin".into()),
        Ok(Err(e)) => return fail(out, Some(kind_name(&e.kind)), e.message),
        Err(e) => return fail(out, None, format!("adapter failed: {e}")),
    };
    let response = match state.upstream.send(request, channel.http2).await {
        Ok(r) => r,
        Err(e) => return fail(out, Some(kind_name(&e.kind)), e.message),
    };
    let ok_status = response.status().is_success();
    let body = match state.upstream.read(response).await {
        Ok(b) => b,
        Err(e) => return fail(out, Some(kind_name(&e.kind)), e.message),
    };
    let verdict = if ok_status {
        adapter
            .parse_response(tag, &ctx, Some(std::sync::Arc::from(view.settings.as_str())), &body)
            .await
            .map(|r| r.map(|_| ()))
    } else {
        adapter.classify_error(tag, &ctx, Some(std::sync::Arc::from(view.settings.as_str())), &body).await.map(Err)
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

/// `settings` (a JSON object) with `probe_model` set to `model` unless it
/// names one already.
fn with_probe_model(settings: &str, model: &str) -> String {
    let mut map = match serde_json::from_str::<serde_json::Value>(settings) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    if map.get("probe_model").and_then(|m| m.as_str()).is_some_and(|m| !m.is_empty()) {
        return settings.to_string();
    }
    map.insert("probe_model".into(), serde_json::Value::String(model.to_string()));
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::with_probe_model;

    #[test]
    fn the_probe_model_defaults_to_one_the_channel_offers() {
        assert_eq!(with_probe_model("{}", "deepseek-chat"), r#"{"probe_model":"deepseek-chat"}"#);
        let own = r#"{"probe_model":"x"}"#;
        assert_eq!(with_probe_model(own, "deepseek-chat"), own);
        assert_eq!(with_probe_model(r#"{"a":1}"#, "m"), r#"{"a":1,"probe_model":"m"}"#);
    }
}
