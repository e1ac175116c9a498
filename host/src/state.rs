//! Shared application state: `AppState(Arc<Inner>)`, cheap to clone into
//! every handler.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::billing::Billing;
use crate::channels::ChannelStore;
use crate::config::Config;
use crate::health::Health;
use crate::plugins::Registry;
use crate::relay::{Credentials, Upstream};
use crate::routing::Routing;
use crate::store::Store;

/// Everything a request handler needs.
pub struct Inner {
    /// Validated configuration.
    pub config: Config,
    /// Plugins in service.
    pub registry: Arc<Registry>,
    /// Channels.
    pub channels: Arc<dyn ChannelStore>,
    /// Routing policies and live channel statistics.
    pub routing: Routing,
    /// Traffic filter rules.
    pub filters: crate::filters::Filters,
    /// Channel health transitions.
    pub health: Health,
    /// Users, tokens, prices, quota and usage logs.
    pub billing: Arc<Billing>,
    /// Upstream HTTP client.
    pub upstream: Upstream,
    /// Credentials exchanged for adapters that need them (Baidu...).
    pub credentials: Credentials,
    /// SHA-256 of every gateway token of the configuration file (and the
    /// generated one) → its caller's group and its position (for limits).
    pub token_groups: HashMap<[u8; 32], (Arc<str>, usize)>,
    /// SHA-256 of the admin token.
    pub admin_hash: [u8; 32],
    /// Plugins shared with the other nodes through PostgreSQL, when
    /// `database_url` is set.
    pub shared_plugins: Option<Arc<crate::plugins::SharedPlugins>>,
    /// Stored responses (`/v1/responses` with `store`): sled, or the
    /// shared database.
    pub responses: crate::ingress::responses::store::ResponseStore,
    /// Embedded store.
    pub store: Store,
    /// Console sign-in sessions.
    pub sessions: Arc<crate::console::sessions::Sessions>,
    /// Unix time the gateway started (the `created` of listed models).
    pub started_at: u64,
}

/// Cloneable handle on [`Inner`].
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// SHA-256 of a secret; secrets are only ever compared by hash.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compare two hashes in constant time.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
