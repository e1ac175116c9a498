//! `/api/filters`: the filter rules (which filter runs for which requests,
//! in what order). `PUT` replaces them durably (a JSON array of rules, or
//! `{"filters": [...]}`); `DELETE` returns to the configuration file's.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::body;
use super::params::json_body;
use crate::error::ApiError;
use crate::filters::FilterRule;
use crate::state::AppState;

/// The body of `PUT /api/filters`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Table {
    Rules(Vec<FilterRule>),
    Wrapped { filters: Vec<FilterRule> },
}

fn view(state: &AppState) -> Value {
    let (rules, overridden) = state.filters.rules();
    let plugins = state.registry.snapshot();
    let missing: Vec<&str> =
        rules.iter().map(|r| r.plugin.as_str()).filter(|p| !plugins.filters.contains_key(*p)).collect();
    let mut loaded: Vec<Value> = plugins
        .filters
        .values()
        .map(|f| {
            json!({"name": &*f.name, "version": f.info.version, "description": f.info.description,
            "hooks": f.info.hooks.iter().map(|h| crate::filters::hook_name(*h)).collect::<Vec<_>>()})
        })
        .collect();
    loaded.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "filters": rules,
        "source": if overridden { "api" } else { "config" },
        "loaded_filters": loaded, "missing_filters": missing,
    })
}

/// `GET /api/filters`
pub async fn get(State(state): State<AppState>) -> Json<Value> {
    Json(view(&state))
}

/// `PUT /api/filters`: a filter not loaded yet is accepted (it may be
/// dropped in later) and listed under `missing_filters`; until it loads,
/// requests its rules match fail closed (or skip it, per `on_error`).
pub async fn put(State(state): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let rules = match json_body::<Table>(&body::take(raw)?)? {
        Table::Rules(rules) | Table::Wrapped { filters: rules } => rules,
    };
    state.filters.set(rules).map_err(|(field, message)| ApiError::bad_request(message).param(&field))?;
    tracing::info!("filter rules replaced through the API");
    Ok(Json(view(&state)))
}

/// `DELETE /api/filters`
pub async fn reset(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.filters.reset().map_err(|error| {
        tracing::error!(%error, "resetting the filter rules failed");
        ApiError::internal()
    })?;
    Ok(Json(view(&state)))
}
