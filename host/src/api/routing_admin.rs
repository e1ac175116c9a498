//! `/api/routing`: the routing-policy table (global policy and per group /
//! model rules). `PUT` replaces it durably; `DELETE` returns to the
//! configuration file's table.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use bytes::Bytes;
use serde_json::{Value, json};

use super::body;
use super::params::json_body;
use crate::config::RoutingConfig;
use crate::error::ApiError;
use crate::state::AppState;

fn view(state: &AppState) -> Value {
    let (table, overridden) = state.routing.policies.table();
    let plugins = state.registry.snapshot();
    let mut named: Vec<&str> = table.rules.iter().map(|r| r.policy.as_str()).collect();
    named.push(&table.policy);
    let missing: Vec<&str> = named.into_iter().filter(|p| !plugins.routers.contains_key(*p)).collect();
    let loaded: Vec<&String> = plugins.routers.keys().collect();
    json!({
        "policy": table.policy, "rules": table.rules,
        "source": if overridden { "api" } else { "config" },
        "loaded_policies": loaded, "missing_policies": missing,
    })
}

/// `GET /api/routing`
pub async fn get(State(state): State<AppState>) -> Json<Value> {
    Json(view(&state))
}

/// `PUT /api/routing`: a policy not loaded yet is accepted (it may be
/// dropped in later) and listed under `missing_policies`.
pub async fn put(State(state): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let table: RoutingConfig = json_body(&body::take(raw)?)?;
    state.routing.policies.set(table).map_err(|(field, message)| ApiError::bad_request(message).param(&field))?;
    tracing::info!("routing table replaced through the API");
    Ok(Json(view(&state)))
}

/// `DELETE /api/routing`
pub async fn reset(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.routing.policies.reset().map_err(|error| {
        tracing::error!(%error, "resetting the routing table failed");
        ApiError::internal()
    })?;
    Ok(Json(view(&state)))
}
