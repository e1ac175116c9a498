//! Credential exchanges on behalf of adapters (`wasmgate:plugin/auth`):
//! trade a channel key for a short-lived credential once, share it between
//! all requests on that key until shortly before it expires.
//!
//! One async mutex per (plugin version, channel key) makes the exchange
//! single-flight: concurrent requests wait for the one exchange in progress
//! and then read its result, so under load the upstream sees one exchange
//! per expiry window, not one per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::upstream::Upstream;
use crate::channels::origin_of;
use crate::plugins::{AdapterPlugin, ChannelView, ErrorKind, PluginError, UpstreamError};

/// How long a failed exchange is remembered before the next try, so that a
/// burst of requests on a broken key does not become a burst of exchanges.
const FAILURE_MEMORY: Duration = Duration::from_secs(2);
/// Refresh this long before expiry at most.
const MAX_EARLY_REFRESH: Duration = Duration::from_secs(300);

/// Why no credential could be had.
#[derive(Debug)]
pub enum CredentialError {
    /// The adapter misbehaved (trap, timeout, URL outside the origin).
    Plugin(PluginError),
    /// The exchange failed upstream, classified by the adapter.
    Upstream(UpstreamError),
}

#[derive(Default)]
enum Slot {
    #[default]
    Unknown,
    /// The adapter needs no exchange for this key.
    NotNeeded,
    Ready {
        token: Arc<str>,
        refresh_at: Instant,
    },
    Failed {
        error: UpstreamError,
        until: Instant,
    },
}

/// The credentials of every channel key whose adapter exchanges its key.
#[derive(Default)]
pub struct Credentials {
    slots: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<Slot>>>>,
}

fn slot_key(adapter: &AdapterPlugin, view: &ChannelView) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [adapter.sha256.as_str(), &view.base_url, &view.key, &view.settings] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

impl Credentials {
    /// The credential for `view`'s key, exchanging it first when there is
    /// none or it is about to expire. `None`: the adapter needs none.
    pub async fn get(
        &self,
        adapter: &AdapterPlugin,
        tag: u64,
        view: &ChannelView,
        origin: &str,
        upstream: &Upstream,
    ) -> Result<Option<Arc<str>>, CredentialError> {
        if !adapter.has_auth() {
            return Ok(None);
        }
        let slot = self.slot(slot_key(adapter, view));
        let mut slot = slot.lock().await;
        let now = Instant::now();
        match &*slot {
            Slot::NotNeeded => return Ok(None),
            Slot::Ready { token, refresh_at } if *refresh_at > now => return Ok(Some(token.clone())),
            Slot::Failed { error, until } if *until > now => return Err(CredentialError::Upstream(error.clone())),
            _ => {}
        }
        let limit = upstream.exchange_timeout;
        let exchanged = match tokio::time::timeout(limit, exchange(adapter, tag, view, origin, upstream)).await {
            Ok(result) => result,
            Err(_) => Err(CredentialError::Upstream(UpstreamError {
                kind: ErrorKind::Transient,
                message: format!("the credential exchange did not finish within {} s", limit.as_secs()),
                status: None,
            })),
        };
        match exchanged {
            Ok(None) => {
                *slot = Slot::NotNeeded;
                Ok(None)
            }
            Ok(Some((token, lifetime))) => {
                let early = (lifetime / 10).min(MAX_EARLY_REFRESH);
                let token: Arc<str> = Arc::from(token);
                *slot = Slot::Ready { token: token.clone(), refresh_at: now + lifetime.saturating_sub(early) };
                tracing::info!(adapter = %adapter.name, expires_in_secs = lifetime.as_secs(), "credential exchanged");
                Ok(Some(token))
            }
            Err(CredentialError::Upstream(error)) => {
                *slot = Slot::Failed { error: error.clone(), until: now + FAILURE_MEMORY };
                Err(CredentialError::Upstream(error))
            }
            Err(e) => Err(e),
        }
    }

    /// Forget the credential of `view`'s key (the upstream refused it), so
    /// that the next request exchanges again.
    pub fn invalidate(&self, adapter: &AdapterPlugin, view: &ChannelView) {
        if adapter.has_auth() {
            lock(&self.slots).remove(&slot_key(adapter, view));
        }
    }

    fn slot(&self, key: [u8; 32]) -> Arc<tokio::sync::Mutex<Slot>> {
        lock(&self.slots).entry(key).or_default().clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One exchange: ask the adapter for the request, send it, let the adapter
/// read the answer.
async fn exchange(
    adapter: &AdapterPlugin,
    tag: u64,
    view: &ChannelView,
    origin: &str,
    upstream: &Upstream,
) -> Result<Option<(String, Duration)>, CredentialError> {
    let Some(request) = adapter.exchange_request(tag, view).await.map_err(CredentialError::Plugin)? else {
        return Ok(None);
    };
    if origin_of(&request.url).as_deref() != Some(origin) {
        let e = PluginError::malformed(&adapter.name, "credential exchange URL outside the channel's origin");
        return Err(CredentialError::Plugin(e));
    }
    let response = upstream.send(request).await.map_err(CredentialError::Upstream)?;
    let response = upstream.read(response).await.map_err(CredentialError::Upstream)?;
    match adapter.parse_exchange(tag, view, &response).await.map_err(CredentialError::Plugin)? {
        Ok(credential) if credential.token.is_empty() => Err(CredentialError::Upstream(UpstreamError {
            kind: ErrorKind::Auth,
            message: "the credential exchange returned no token".into(),
            status: Some(response.status),
        })),
        Ok(credential) => Ok(Some((credential.token, Duration::from_secs(credential.expires_in_secs.max(1))))),
        Err(e) => Err(CredentialError::Upstream(e)),
    }
}
