//! Console sign-in sessions: a random id in an `HttpOnly` cookie, kept in
//! memory (a restart signs everyone out), each with its CSRF token and
//! expiry; and the per-address count of failed sign-ins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::state::secret_hash;
use crate::store::unix_now_ms;

/// The session cookie's name.
pub const COOKIE: &str = "wasmgate_session";

/// Most sessions kept at once; the oldest go first beyond it.
const MAX_SESSIONS: usize = 10_000;

/// The window over which failed sign-ins are counted.
const FAILURE_WINDOW_MS: u64 = 5 * 60 * 1000;

/// Who a session signed in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The admin token: the whole console.
    Admin,
    /// A user's own gateway token (its SHA-256): the self-service view.
    User {
        /// SHA-256 of the token the user signed in with.
        key_hash: [u8; 32],
    },
}

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who it is.
    pub role: Role,
    /// The token state-changing calls must echo in `x-csrf-token`.
    pub csrf: String,
    /// Unix ms after which it is gone.
    pub expires_at_ms: u64,
}

/// Every live session and the failed sign-ins per address.
pub struct Sessions {
    ttl_ms: u64,
    max_failures: u32,
    live: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<HashMap<IpAddr, (u64, u32)>>,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// Sessions lasting `ttl_secs`; `max_failures` failed sign-ins per
    /// address in five minutes.
    pub fn new(ttl_secs: u64, max_failures: u32) -> Self {
        Self {
            ttl_ms: ttl_secs.saturating_mul(1000).max(1000),
            max_failures: max_failures.max(1),
            live: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// How long a session lasts, in seconds (the cookie's `Max-Age`).
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_ms / 1000
    }

    /// Open a session; returns the cookie value and the session. Only the
    /// value's hash is kept.
    pub fn open(&self, role: Role) -> (String, Session) {
        let id = random_hex();
        let session = Session { role, csrf: random_hex(), expires_at_ms: unix_now_ms().saturating_add(self.ttl_ms) };
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.len() >= MAX_SESSIONS {
            let now = unix_now_ms();
            live.retain(|_, s| s.expires_at_ms > now);
            if live.len() >= MAX_SESSIONS
                && let Some(oldest) = live.iter().min_by_key(|(_, s)| s.expires_at_ms).map(|(k, _)| *k)
            {
                live.remove(&oldest);
            }
        }
        live.insert(secret_hash(&id), session.clone());
        (id, session)
    }

    /// The live session of a cookie value (an expired one is dropped).
    pub fn get(&self, id: &str) -> Option<Session> {
        let key = secret_hash(id);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        match live.get(&key) {
            Some(s) if s.expires_at_ms > unix_now_ms() => Some(s.clone()),
            Some(_) => {
                live.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Sign out.
    pub fn close(&self, id: &str) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&secret_hash(id));
    }

    /// Seconds until `ip` may try again, when it has used up its failures.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (since, count) = *failures.get(&ip)?;
        let until = since.saturating_add(FAILURE_WINDOW_MS);
        let now = unix_now_ms();
        (count >= self.max_failures && until > now).then(|| (until - now).div_ceil(1000))
    }

    /// Count a failed sign-in from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = unix_now_ms();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_SESSIONS && !failures.contains_key(&ip) {
            failures.retain(|_, (since, _)| since.saturating_add(FAILURE_WINDOW_MS) > now);
            // Still full of recent failures: the oldest address is forgotten,
            // so the table stays bounded whatever the number of addresses.
            if failures.len() >= MAX_SESSIONS
                && let Some(oldest) = failures.iter().min_by_key(|(_, (since, _))| *since).map(|(ip, _)| *ip)
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(ip).or_insert((now, 0));
        if entry.0.saturating_add(FAILURE_WINDOW_MS) <= now {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// The session cookie's value in a `Cookie` header, if any.
pub fn cookie_value(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_until_closed() {
        let sessions = Sessions::new(60, 3);
        let (id, s) = sessions.open(Role::Admin);
        assert_eq!(sessions.get(&id).map(|g| g.csrf), Some(s.csrf));
        assert!(sessions.get("other").is_none());
        sessions.close(&id);
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn failures_block_an_address_after_the_limit() {
        let sessions = Sessions::new(60, 2);
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        sessions.failed(ip);
        assert_eq!(sessions.blocked(ip), None);
        sessions.failed(ip);
        assert!(sessions.blocked(ip).is_some_and(|s| s > 0 && s <= 300));
        assert_eq!(sessions.blocked("127.0.0.2".parse().expect("ip")), None);
    }

    #[test]
    fn the_failure_table_stays_bounded() {
        let sessions = Sessions::new(60, 3);
        for i in 0..(MAX_SESSIONS as u32 + 50) {
            sessions.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(sessions.failures.lock().expect("lock").len(), MAX_SESSIONS);
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("cookie", "a=1; wasmgate_session=abc; b=2".parse().expect("header"));
        assert_eq!(cookie_value(&h), Some("abc"));
        h.insert("cookie", "wasmgate_session_x=1".parse().expect("header"));
        assert_eq!(cookie_value(&h), None);
    }
}
