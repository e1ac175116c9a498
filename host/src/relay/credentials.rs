//! Credential exchanges on behalf of adapters (`wasmgate:plugin/auth`):
//! trade a channel key for a short-lived credential once, share it between
//! all requests on that key until shortly before it expires.
//!
//! A known credential is read without a lock: the key's slot is an
//! `ArcSwap` found by the key's fingerprint, computed once per channel
//! snapshot. When it must be (re)exchanged, one async mutex per key makes
//! the exchange single-flight: concurrent requests wait for the one exchange
//! in progress and then read its result, so under load the upstream sees one
//! exchange per expiry window, not one per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};

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

/// What is known about one key's credential.
enum Known {
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

/// One key's credential under one adapter version.
struct Slot {
    /// The adapter version (`sha256`) that produced `known`.
    adapter: String,
    known: Known,
}

/// A key's slot: read without a lock; `exchange` makes the exchange
/// single-flight.
#[derive(Default)]
struct Entry {
    slot: ArcSwapOption<Slot>,
    exchange: tokio::sync::Mutex<()>,
}

/// Entries kept before the map is started afresh (a dropped entry only
/// costs one more exchange).
const MAX_ENTRIES: usize = 4096;

/// The credentials of every channel key whose adapter exchanges its key.
#[derive(Default)]
pub struct Credentials {
    entries: ArcSwap<HashMap<[u8; 32], Arc<Entry>>>,
    /// Serialises additions to `entries` (copy on write, rare).
    adding: Mutex<()>,
}

/// What identifies a key's credential: its base URL, key and settings. The
/// channel computes it once per snapshot (see `channels::KeyView`).
pub fn fingerprint(view: &ChannelView) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [&view.base_url, &view.key, &view.settings] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// The answer `known` gives at `now`, if it is still good.
fn answer(known: &Known, now: Instant) -> Option<Result<Option<Arc<str>>, CredentialError>> {
    match known {
        Known::NotNeeded => Some(Ok(None)),
        Known::Ready { token, refresh_at } if *refresh_at > now => Some(Ok(Some(token.clone()))),
        Known::Failed { error, until } if *until > now => Some(Err(CredentialError::Upstream(error.clone()))),
        _ => None,
    }
}

impl Credentials {
    /// The credential for `view`'s key (identified by `fingerprint`),
    /// exchanging it first when there is none or it is about to expire.
    /// `None`: the adapter needs none. A known credential is read without
    /// a lock or a hash of the key.
    pub async fn get(
        &self,
        adapter: &AdapterPlugin,
        tag: u64,
        view: &ChannelView,
        fingerprint: &[u8; 32],
        origin: &str,
        upstream: &Upstream,
    ) -> Result<Option<Arc<str>>, CredentialError> {
        if !adapter.has_auth() {
            return Ok(None);
        }
        let entry = self.entry(fingerprint);
        let current = |entry: &Entry| {
            let slot = entry.slot.load();
            slot.as_ref().filter(|s| s.adapter == adapter.sha256).and_then(|s| answer(&s.known, Instant::now()))
        };
        if let Some(answer) = current(&entry) {
            return answer;
        }
        let _exchanging = entry.exchange.lock().await;
        if let Some(answer) = current(&entry) {
            return answer;
        }
        let now = Instant::now();
        let limit = upstream.exchange_timeout;
        // Boxed: a rare path whose future would otherwise make every
        // request's larger.
        let exchanging = Box::pin(exchange(adapter, tag, view, origin, upstream));
        let exchanged = match tokio::time::timeout(limit, exchanging).await {
            Ok(result) => result,
            Err(_) => Err(CredentialError::Upstream(UpstreamError {
                kind: ErrorKind::Transient,
                message: format!("the credential exchange did not finish within {} s", limit.as_secs()),
                status: None,
            })),
        };
        let known = match &exchanged {
            Ok(None) => Known::NotNeeded,
            Ok(Some((token, lifetime))) => {
                let early = (*lifetime / 10).min(MAX_EARLY_REFRESH);
                tracing::info!(adapter = %adapter.name, expires_in_secs = lifetime.as_secs(), "credential exchanged");
                Known::Ready { token: token.clone(), refresh_at: now + lifetime.saturating_sub(early) }
            }
            Err(CredentialError::Upstream(error)) => {
                Known::Failed { error: error.clone(), until: now + FAILURE_MEMORY }
            }
            Err(CredentialError::Plugin(_)) => return exchanged.map(|c| c.map(|(token, _)| token)),
        };
        entry.slot.store(Some(Arc::new(Slot { adapter: adapter.sha256.clone(), known })));
        exchanged.map(|c| c.map(|(token, _)| token))
    }

    /// Forget the credential of the key `fingerprint` names (the upstream
    /// refused it), so that the next request exchanges again.
    pub fn invalidate(&self, fingerprint: &[u8; 32]) {
        if let Some(entry) = self.entries.load().get(fingerprint) {
            entry.slot.store(None);
        }
    }

    fn entry(&self, fingerprint: &[u8; 32]) -> Arc<Entry> {
        if let Some(entry) = self.entries.load().get(fingerprint) {
            return entry.clone();
        }
        let _adding = self.adding.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entries = self.entries.load();
        if let Some(entry) = entries.get(fingerprint) {
            return entry.clone();
        }
        let mut next = if entries.len() >= MAX_ENTRIES { HashMap::new() } else { HashMap::clone(&entries) };
        let entry = Arc::new(Entry::default());
        next.insert(*fingerprint, entry.clone());
        self.entries.store(Arc::new(next));
        entry
    }
}

/// One exchange: ask the adapter for the request, send it, let the adapter
/// read the answer.
async fn exchange(
    adapter: &AdapterPlugin,
    tag: u64,
    view: &ChannelView,
    origin: &str,
    upstream: &Upstream,
) -> Result<Option<(Arc<str>, Duration)>, CredentialError> {
    let Some(request) = adapter.exchange_request(tag, view).await.map_err(CredentialError::Plugin)? else {
        return Ok(None);
    };
    if origin_of(&request.url).as_deref() != Some(origin) {
        let e = PluginError::malformed(&adapter.name, "credential exchange URL outside the channel's origin");
        return Err(CredentialError::Plugin(e));
    }
    let response = upstream.send(request, false).await.map_err(CredentialError::Upstream)?;
    let response = upstream.read(response).await.map_err(CredentialError::Upstream)?;
    match adapter.parse_exchange(tag, view, &response).await.map_err(CredentialError::Plugin)? {
        Ok(credential) if credential.token.is_empty() => Err(CredentialError::Upstream(UpstreamError {
            kind: ErrorKind::Auth,
            message: "the credential exchange returned no token".into(),
            status: Some(response.status),
        })),
        Ok(credential) => {
            Ok(Some((Arc::from(credential.token), Duration::from_secs(credential.expires_in_secs.max(1)))))
        }
        Err(e) => Err(CredentialError::Upstream(e)),
    }
}
