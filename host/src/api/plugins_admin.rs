//! `/api/plugins`: list, inspect, upload (hot-swap) and remove plugins.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Value, json};

use super::body;
use crate::error::ApiError;
use crate::plugins::{PluginStatus, WIT_PACKAGE, WIT_VERSION};
use crate::state::AppState;

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("plugin_not_found"),
        format!("No plugin named `{name}`."),
    )
}

/// `GET /api/plugins`
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "wit": format!("{WIT_PACKAGE}@{WIT_VERSION}"),
        "data": state.registry.list(),
    }))
}

/// `GET /api/plugins/{name}`
pub async fn get(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<PluginStatus>, ApiError> {
    state.registry.list().into_iter().find(|p| p.name == name).map(Json).ok_or_else(|| not_found(&name))
}

/// `PUT /api/plugins/{name}`: the body is the component's bytes. It is
/// validated before anything changes; on success it is saved and in service.
pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<PluginStatus>, ApiError> {
    let bytes = body::take(raw)?;
    state.registry.install(&name, bytes.to_vec()).await.map(Json).map_err(|message| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", Some("invalid_plugin"), message)
    })
}

/// `DELETE /api/plugins/{name}`
pub async fn remove(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if !crate::plugins::valid_plugin_name(&name) {
        return Err(not_found(&name));
    }
    if state.registry.remove(&name).await { Ok(StatusCode::NO_CONTENT) } else { Err(not_found(&name)) }
}
