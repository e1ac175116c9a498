//! Running the filters of one request: the request hook before routing,
//! the answer hook before the client sees the answer, the chunk hook on
//! every chunk of a stream (with each filter's state between chunks).

use std::sync::Arc;

use axum::http::StatusCode;

use super::CompiledRule;
use super::rules::OnError;
use crate::error::ApiError;
use crate::plugins::{
    ChunkAction, FilterContext, FilterPlugin, Header, Hook, PluginError, PluginSet, Refusal, RequestVerdict,
    ResponseVerdict,
};
use crate::state::AppState;

/// What the request is, as every filter of its chain sees it.
#[derive(Clone)]
pub struct RequestFacts {
    /// Endpoint served.
    pub endpoint: crate::plugins::Endpoint,
    /// Route the client called.
    pub route: &'static str,
    /// Requested model.
    pub model: String,
    /// Caller's group.
    pub group: String,
    /// Whether a stream was asked for.
    pub stream: bool,
    /// The gateway's request id.
    pub request_id: String,
    /// Calling user, when known.
    pub user_id: Option<u64>,
    /// Calling token, when known.
    pub token_id: Option<u64>,
}

/// One filter of the chain: its rule and, when loaded, the plugin.
struct Link {
    rule: Arc<CompiledRule>,
    plugin: Option<Arc<FilterPlugin>>,
}

/// The filters of one request, in order.
pub struct Chain {
    links: Vec<Link>,
    facts: RequestFacts,
    state: AppState,
}

/// What the request filters made of a request.
#[derive(Default)]
pub struct RequestOutcome {
    /// The new body, when a filter changed it.
    pub body: Option<Vec<u8>>,
    /// Headers to add to the upstream request.
    pub headers: Vec<Header>,
}

/// What the chunk filters made of one stream chunk.
pub enum ChunkOutcome {
    /// Send this chunk.
    Send(Vec<u8>),
    /// Send nothing for it.
    Drop,
    /// End the stream with this error.
    Stop(ApiError),
}

/// The result of one filter call, once its rule's failure mode applied.
enum Call<T> {
    Answer(T),
    Skipped,
}

impl Chain {
    /// The chain of the rules in `rules` (already in order) matching
    /// `facts`, with their plugins from `plugins`.
    pub(super) fn new(rules: &[Arc<CompiledRule>], plugins: &PluginSet, facts: RequestFacts, state: &AppState) -> Self {
        let links = rules
            .iter()
            .filter(|r| r.rule.matches(facts.route, &facts.group, &facts.model))
            .map(|rule| Link { rule: rule.clone(), plugin: plugins.filters.get(&rule.rule.plugin).cloned() })
            .collect();
        Self { links, facts, state: state.clone() }
    }

    /// Whether no filter applies.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Whether some filter looks at stream chunks.
    pub fn filters_chunks(&self) -> bool {
        self.links.iter().any(|l| l.plugin.as_ref().is_none_or(|p| p.wants(Hook::StreamChunk)))
    }

    fn context(&self, link: &Link) -> FilterContext {
        let f = &self.facts;
        FilterContext {
            endpoint: f.endpoint,
            route: f.route.into(),
            model: f.model.clone(),
            group: f.group.clone(),
            stream: f.stream,
            request_id: f.request_id.clone(),
            user_id: f.user_id,
            token_id: f.token_id,
            settings: link.rule.settings.clone(),
        }
    }

    /// The plugin of `link` if it takes `hook`; a rule whose filter is not
    /// loaded fails closed (or is skipped, if its rule says so).
    fn plugin<'a>(&self, link: &'a Link, hook: Hook) -> Result<Option<&'a Arc<FilterPlugin>>, ApiError> {
        match &link.plugin {
            Some(p) => Ok(p.wants(hook).then_some(p)),
            None if link.rule.rule.on_error == OnError::Skip => {
                crate::metrics::get().filter_action(&link.rule.rule.plugin, hook_name(hook), "skipped");
                Ok(None)
            }
            None => {
                tracing::error!(filter = %link.rule.rule.plugin, "a filter rule names a filter that is not loaded");
                Err(unavailable())
            }
        }
    }

    /// A filter call's result under its rule's failure mode.
    fn settle<T>(&self, link: &Link, hook: Hook, result: Result<T, PluginError>) -> Result<Call<T>, ApiError> {
        let name = &link.rule.rule.plugin;
        match result {
            Ok(answer) => Ok(Call::Answer(answer)),
            Err(e) => {
                tracing::warn!(filter = %name, error = %e, cause = e.cause(), "filter call failed");
                let skip = link.rule.rule.on_error == OnError::Skip && e.is_plugin_fault();
                let action = if skip { "skipped" } else { "failed" };
                crate::metrics::get().filter_action(name, hook_name(hook), action);
                let error = crate::relay::plugin_error(&self.state, &e);
                if skip {
                    return Ok(Call::Skipped);
                }
                Err(if e.is_plugin_fault() { filter_failed() } else { error })
            }
        }
    }

    /// Run the request hooks on `body`, in order, each on the previous
    /// one's output.
    pub async fn on_request(&self, body: &[u8]) -> Result<RequestOutcome, ApiError> {
        let mut out = RequestOutcome::default();
        for link in &self.links {
            let Some(plugin) = self.plugin(link, Hook::Request)? else { continue };
            let current = out.body.as_deref().unwrap_or(body);
            let result = plugin.on_request(&self.context(link), current).await;
            let Call::Answer(verdict) = self.settle(link, Hook::Request, result)? else { continue };
            let action = match verdict {
                RequestVerdict::Pass => "pass",
                RequestVerdict::Edit(edit) => {
                    if let Some(body) = edit.body {
                        out.body = Some(body);
                    }
                    out.headers.extend(edit.headers);
                    "edit"
                }
                RequestVerdict::Refuse(refusal) => {
                    crate::metrics::get().filter_action(&plugin.name, "request", "refuse");
                    tracing::info!(filter = %plugin.name, code = %refusal.code, "request refused by a filter");
                    return Err(refused(&refusal));
                }
            };
            crate::metrics::get().filter_action(&plugin.name, "request", action);
        }
        Ok(out)
    }

    /// Run the answer hooks on a non-streamed answer.
    pub async fn on_response(&self, mut body: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        for link in &self.links {
            let Some(plugin) = self.plugin(link, Hook::Response)? else { continue };
            let result = plugin.on_response(&self.context(link), &body).await;
            let Call::Answer(verdict) = self.settle(link, Hook::Response, result)? else { continue };
            let action = match verdict {
                ResponseVerdict::Pass => "pass",
                ResponseVerdict::Rewrite(new) if serde_json::from_slice::<serde::de::IgnoredAny>(&new).is_err() => {
                    let e = PluginError::malformed(&plugin.name, "a rewritten answer that is not JSON");
                    self.settle::<()>(link, Hook::Response, Err(e))?;
                    continue;
                }
                ResponseVerdict::Rewrite(new) => {
                    body = new;
                    "rewrite"
                }
                ResponseVerdict::Refuse(refusal) => {
                    crate::metrics::get().filter_action(&plugin.name, "response", "refuse");
                    tracing::info!(filter = %plugin.name, code = %refusal.code, "answer refused by a filter");
                    return Err(refused(&refusal));
                }
            };
            crate::metrics::get().filter_action(&plugin.name, "response", action);
        }
        Ok(body)
    }

    /// Run the chunk hooks on one stream chunk; `states` holds each link's
    /// state (one per link, kept by the stream).
    pub async fn on_chunk(&self, chunk: Vec<u8>, states: &mut [Vec<u8>]) -> Result<ChunkOutcome, ApiError> {
        let mut chunk = chunk;
        for (link, state) in self.links.iter().zip(states.iter_mut()) {
            let Some(plugin) = self.plugin(link, Hook::StreamChunk)? else { continue };
            let result = plugin.on_stream_chunk(&self.context(link), &chunk, state).await;
            let Call::Answer(verdict) = self.settle(link, Hook::StreamChunk, result)? else { continue };
            *state = verdict.state;
            let action = match verdict.action {
                ChunkAction::Pass => "pass",
                ChunkAction::Rewrite(new) => {
                    chunk = new;
                    "rewrite"
                }
                ChunkAction::Drop => {
                    crate::metrics::get().filter_action(&plugin.name, "stream_chunk", "drop");
                    return Ok(ChunkOutcome::Drop);
                }
                ChunkAction::Stop(refusal) => {
                    crate::metrics::get().filter_action(&plugin.name, "stream_chunk", "stop");
                    tracing::info!(filter = %plugin.name, code = %refusal.code, "stream stopped by a filter");
                    return Ok(ChunkOutcome::Stop(refused(&refusal)));
                }
            };
            crate::metrics::get().filter_action(&plugin.name, "stream_chunk", action);
        }
        Ok(ChunkOutcome::Send(chunk))
    }

    /// Fresh per-stream state: one empty entry per link.
    pub fn stream_states(&self) -> Vec<Vec<u8>> {
        vec![Vec::new(); self.links.len()]
    }
}

/// A hook's name in metrics and the API.
pub fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Request => "request",
        Hook::Response => "response",
        Hook::StreamChunk => "stream_chunk",
    }
}

/// The client's error for a refusal: its status if 4xx, else 400; its code
/// if well-formed, else `content_blocked`.
pub fn refused(refusal: &Refusal) -> ApiError {
    let status = StatusCode::from_u16(refusal.status).ok().filter(StatusCode::is_client_error);
    let code = intern_code(&refusal.code);
    let message: String = refusal.message.chars().take(1000).collect();
    let message =
        if message.trim().is_empty() { "The request was blocked by a gateway filter.".into() } else { message };
    ApiError::new(status.unwrap_or(StatusCode::BAD_REQUEST), "invalid_request_error", Some(code), message)
}

fn filter_failed() -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "plugin_error",
        Some("plugin_error"),
        "A filter of the gateway failed on this request.",
    )
}

fn unavailable() -> ApiError {
    let mut err = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("filter_unavailable"),
        "A filter this request must pass is not loaded; retry shortly.",
    );
    err.retry_after = Some(1);
    err
}

/// Error codes of refusals as `&'static str` (the type of error codes): a
/// well-formed code is leaked once, at most 256 distinct ones; anything
/// else is `content_blocked`.
fn intern_code(code: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static CODES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let well_formed = !code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !well_formed {
        return "content_blocked";
    }
    let mut codes = CODES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let codes = codes.get_or_insert_with(HashSet::new);
    if let Some(known) = codes.get(code) {
        return known;
    }
    if codes.len() >= 256 {
        return "content_blocked";
    }
    let leaked: &'static str = Box::leak(code.into());
    codes.insert(leaked);
    leaked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_4xx_statuses_and_clean_codes_only() {
        let r = |status, code: &str| refused(&Refusal { status, code: code.into(), message: "no".into() });
        assert_eq!((r(403, "pii_found").status.as_u16(), r(403, "pii_found").code), (403, Some("pii_found")));
        assert_eq!(r(500, "x").status.as_u16(), 400);
        assert_eq!(r(200, "Bad Code!").code, Some("content_blocked"));
        assert!(refused(&Refusal { status: 400, code: "c".into(), message: " ".into() }).message.len() > 5);
    }
}
