//! Shared parsing of admin requests: paging parameters and JSON bodies whose
//! errors name the offending field.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::ApiError;

const DEFAULT_PER_PAGE: usize = 20;
const MAX_PER_PAGE: usize = 100;

/// A positive integer query parameter, `default` when absent.
pub fn number(query: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, ApiError> {
    match query.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| ApiError::bad_request(format!("`{name}` must be a positive integer")).param(name)),
    }
}

/// An optional non-negative integer query parameter.
pub fn optional_u64(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| ApiError::bad_request(format!("`{name}` must be an integer")).param(name))
        })
        .transpose()
}

/// `page` (from 1) and `per_page` (default 20, at most 100).
pub fn paging(query: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    Ok((number(query, "page", 1)?, number(query, "per_page", DEFAULT_PER_PAGE)?.min(MAX_PER_PAGE)))
}

/// The id in a `/{id}` path segment.
pub fn path_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request("`id` must be a positive integer").param("id"))
}

/// The list answer every admin listing gives.
pub fn list_json(data: Vec<Value>, total: usize, (page, per_page): (usize, usize)) -> Value {
    json!({"object": "list", "data": data, "total": total, "page": page, "per_page": per_page})
}

/// Page `(page, per_page)` of `items`, each shown by `view`.
pub fn paged<T>(items: &[T], paging: (usize, usize), view: impl Fn(&T) -> Value) -> Value {
    let (page, per_page) = paging;
    let data = items.iter().skip(page.saturating_sub(1).saturating_mul(per_page)).take(per_page).map(view).collect();
    list_json(data, items.len(), paging)
}

/// Parse a JSON body; a type error names its field (`weight`, `rules[0].policy`).
pub fn json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() { "body".to_string() } else { path };
        ApiError::bad_request(format!("`{field}`: {}", e.into_inner())).param(&field)
    })
}
