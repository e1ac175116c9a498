//! Small constructors shared by adapters.

use crate::{ErrorKind, Header, UpstreamError};

/// Build an [`UpstreamError`].
pub fn error(kind: ErrorKind, message: impl Into<String>, status: Option<u16>) -> UpstreamError {
    UpstreamError { kind, message: message.into(), status }
}

/// Build a [`Header`].
pub fn header(name: &str, value: impl Into<String>) -> Header {
    Header { name: name.to_string(), value: value.into() }
}

/// Serialize `value` to JSON bytes (serialization of our own types cannot fail).
pub fn json_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

/// Join a channel's base URL and an API path (`/chat/completions`),
/// tolerating a trailing slash on the base.
pub fn origin_url(base_url: &str, path: &str) -> String {
    let base = base_url.trim_end_matches('/');
    format!("{base}{path}")
}
