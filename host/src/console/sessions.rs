//! Console sign-in sessions: the session itself — who signed in, its CSRF
//! token and expiry — sealed (AES-256-GCM, the store's secrets key) into
//! an `HttpOnly` cookie, so any node sharing the key (`secrets_key`) opens
//! it, and a restart signs no one out; a sign-out is remembered until the
//! session would have expired (in memory, and with `database_url` in the
//! shared database, so it holds on every node); and the per-address count
//! of failed sign-ins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::store::SecretBox;
use crate::store::unix_now_ms;

/// The session cookie's name.
pub const COOKIE: &str = "wasmgate_session";

/// Most addresses (and sign-outs) remembered at once; the oldest go first.
const MAX_SESSIONS: usize = 10_000;

/// The window over which failed sign-ins are counted.
const FAILURE_WINDOW_MS: u64 = 5 * 60 * 1000;

/// What a sealed cookie holds is marked as such, so no other value sealed
/// with the same key (a channel's upstream key) can pass for a session.
const KIND: &str = "wasmgate-console-session";

/// Who a session signed in as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "as", rename_all = "lowercase")]
pub enum Role {
    /// The admin token: the whole console.
    Admin,
    /// A user's own gateway token (its SHA-256): the self-service view.
    User {
        /// SHA-256 of the token the user signed in with.
        #[serde(with = "hex_bytes")]
        key_hash: [u8; 32],
    },
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| serde::de::Error::custom("bad hash"))
    }
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

/// The sealed form.
#[derive(Serialize, Deserialize)]
struct Sealed {
    kind: String,
    id: String,
    role: Role,
    csrf: String,
    exp: u64,
    /// For an admin session, the admin token's hash it was opened with: a
    /// new admin token ends every admin session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    admin: Option<String>,
}

/// Where sign-outs are shared with the other nodes (the database).
pub trait SignOuts: Send + Sync {
    /// Remember that session `id` signed out (until `expires_at_ms`).
    fn publish(&self, id: &str, expires_at_ms: u64);
}

/// Sessions' key, sign-outs and the failed sign-ins per address.
pub struct Sessions {
    ttl_ms: u64,
    max_failures: u32,
    key: Arc<SecretBox>,
    /// Hex SHA-256 of the admin token in force.
    admin: String,
    /// Session id → when it would have expired.
    signed_out: Mutex<HashMap<String, u64>>,
    shared: Mutex<Option<Arc<dyn SignOuts>>>,
    failures: Mutex<HashMap<IpAddr, (u64, u32)>>,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// Sessions sealed with `key`, admin ones bound to the admin token
    /// whose hash is `admin_hash`, lasting `ttl_secs`; `max_failures`
    /// failed sign-ins per address in five minutes.
    pub fn new(key: Arc<SecretBox>, admin_hash: &[u8; 32], ttl_secs: u64, max_failures: u32) -> Self {
        Self {
            ttl_ms: ttl_secs.saturating_mul(1000).max(1000),
            max_failures: max_failures.max(1),
            key,
            admin: hex::encode(admin_hash),
            signed_out: Mutex::default(),
            shared: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Share sign-outs through `store` from now on.
    pub fn share_sign_outs(&self, store: Arc<dyn SignOuts>) {
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(store);
    }

    /// How long a session lasts, in seconds (the cookie's `Max-Age`).
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_ms / 1000
    }

    /// Open a session; returns the cookie value and the session.
    pub fn open(&self, role: Role) -> (String, Session) {
        let session = Session { role, csrf: random_hex(), expires_at_ms: unix_now_ms().saturating_add(self.ttl_ms) };
        let sealed = Sealed {
            kind: KIND.into(),
            id: random_hex(),
            role: session.role.clone(),
            csrf: session.csrf.clone(),
            exp: session.expires_at_ms,
            admin: (session.role == Role::Admin).then(|| self.admin.clone()),
        };
        let value = self.key.seal(&serde_json::to_string(&sealed).unwrap_or_default());
        (value, session)
    }

    /// The sealed session of a cookie value, expired or not.
    fn unseal(&self, value: &str) -> Option<Sealed> {
        // Only a sealed value: `open_value` passes unsealed text through.
        if !SecretBox::is_sealed(value) || value.len() > 4096 {
            return None;
        }
        let plain = self.key.open_value(value).ok()?;
        serde_json::from_str::<Sealed>(&plain).ok().filter(|s| s.kind == KIND)
    }

    /// The live session of a cookie value: sealed with our key, not
    /// expired, not signed out.
    pub fn get(&self, value: &str) -> Option<Session> {
        let s = self.unseal(value)?;
        if s.exp <= unix_now_ms() || self.signed_out.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&s.id) {
            return None;
        }
        if s.role == Role::Admin && s.admin.as_deref() != Some(self.admin.as_str()) {
            return None;
        }
        Some(Session { role: s.role, csrf: s.csrf, expires_at_ms: s.exp })
    }

    /// Sign out: the session is refused from now on, here and (shared) on
    /// every node.
    pub fn close(&self, value: &str) {
        let Some(s) = self.unseal(value) else { return };
        self.forget(&s.id, s.exp);
        if let Some(shared) = self.shared.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            shared.publish(&s.id, s.exp);
        }
    }

    /// Remember a sign-out (made here or on another node) until `exp`.
    pub fn forget(&self, id: &str, exp: u64) {
        let now = unix_now_ms();
        let mut out = self.signed_out.lock().unwrap_or_else(|p| p.into_inner());
        if out.len() >= MAX_SESSIONS {
            out.retain(|_, e| *e > now);
            if out.len() >= MAX_SESSIONS
                && let Some(oldest) = out.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone())
            {
                out.remove(&oldest);
            }
        }
        out.insert(id.to_string(), exp);
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

    fn key(passphrase: &str) -> Arc<SecretBox> {
        Arc::new(SecretBox::from_passphrase(passphrase).expect("key"))
    }

    fn sessions(ttl: u64, failures: u32) -> Sessions {
        Sessions::new(key("0123456789abcdef-console"), &[1; 32], ttl, failures)
    }

    #[test]
    fn a_session_is_found_by_its_cookie_until_closed() {
        let sessions = sessions(60, 3);
        let (id, s) = sessions.open(Role::User { key_hash: [7; 32] });
        assert_eq!(sessions.get(&id).map(|g| (g.csrf, g.role)), Some((s.csrf, s.role)));
        assert!(sessions.get("other").is_none());
        // Another node with the same key opens it; one with another key does not.
        let twin = Sessions::new(key("0123456789abcdef-console"), &[1; 32], 60, 3);
        assert!(twin.get(&id).is_some());
        assert!(Sessions::new(key("0123456789abcdef-other!"), &[1; 32], 60, 3).get(&id).is_none());
        sessions.close(&id);
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn nothing_but_a_sealed_session_passes() {
        let sessions = sessions(60, 3);
        let k = key("0123456789abcdef-console");
        let hash = "07".repeat(32);
        let plain = format!(
            r#"{{"kind":"wasmgate-console-session","id":"x","role":{{"as":"user","key_hash":"{hash}"}},"csrf":"c","exp":99999999999999}}"#
        );
        let plain = plain.as_str();
        assert!(sessions.get(plain).is_none(), "unsealed JSON");
        assert!(sessions.get(&k.seal("sk-upstream-key")).is_none(), "another sealed value");
        let other_kind = plain.replace("wasmgate-console-session", "channel-key");
        assert!(sessions.get(&k.seal(&other_kind)).is_none(), "a sealed value of another kind");
        let expired = plain.replace("99999999999999", "1");
        assert!(sessions.get(&k.seal(&expired)).is_none(), "expired");
        assert!(sessions.get(&k.seal(plain)).is_some(), "the real shape passes");
    }

    #[test]
    fn a_new_admin_token_ends_admin_sessions() {
        let sessions = sessions(60, 3);
        let (id, _) = sessions.open(Role::Admin);
        assert!(sessions.get(&id).is_some());
        let rotated = Sessions::new(key("0123456789abcdef-console"), &[2; 32], 60, 3);
        assert!(rotated.get(&id).is_none(), "an admin session outlived its admin token");
        let (user, _) = sessions.open(Role::User { key_hash: [7; 32] });
        assert!(rotated.get(&user).is_some(), "user sessions are checked against their own key");
    }

    #[test]
    fn failures_block_an_address_after_the_limit() {
        let sessions = sessions(60, 2);
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        sessions.failed(ip);
        assert_eq!(sessions.blocked(ip), None);
        sessions.failed(ip);
        assert!(sessions.blocked(ip).is_some_and(|s| s > 0 && s <= 300));
        assert_eq!(sessions.blocked("127.0.0.2".parse().expect("ip")), None);
    }

    #[test]
    fn the_failure_table_stays_bounded() {
        let sessions = sessions(60, 3);
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
