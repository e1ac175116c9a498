//! `/api/plugins`: list, inspect, upload (hot-swap) and remove plugins.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Value, json};

use super::body;
use crate::error::ApiError;
use crate::plugins::check::{Report, conformance};
use crate::plugins::{LoadedPlugin, PluginStatus, WIT_PACKAGE, WIT_VERSION};
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
/// validated before anything changes; on success it is saved and in
/// service, and the answer adds what the conformance suite of
/// `wasmgate plugin check` says of it (`check`).
pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let bytes = body::take(raw)?;
    let _change = state.shared_plugins.as_ref().map(|shared| shared.change(&name));
    let status = state.registry.install(&name, bytes.to_vec()).await.map_err(|message| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", Some("invalid_plugin"), message)
    })?;
    // Validated and serving here: the other nodes take it from the database.
    if let Some(shared) = &state.shared_plugins {
        shared.publish(&name, bytes.to_vec()).await.map_err(|error| {
            tracing::error!(plugin = %name, %error, "the plugin serves here but could not be shared");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("storage_unavailable"),
                "The plugin was installed on this node but could not be shared with the others; retry.",
            )
        })?;
    }
    // What `wasmgate plugin check` would say of the version now serving.
    let set = state.registry.snapshot();
    let loaded = match (set.adapters.get(&name), set.routers.get(&name), set.filters.get(&name)) {
        (Some(a), _, _) => Some(LoadedPlugin::Adapter(a.clone())),
        (None, Some(r), _) => Some(LoadedPlugin::Router(r.clone())),
        (None, None, Some(f)) => Some(LoadedPlugin::Filter(f.clone())),
        _ => None,
    };
    let mut view = json!(status);
    if let Some(plugin) = loaded {
        let report = Report {
            file: name.clone(),
            wit_version: status.wit_version.clone().unwrap_or_default(),
            ..Report::default()
        };
        let report = conformance(&plugin, None, report).await;
        view["check"] = json!({"passed": report.passed(), "cases": report.cases, "timings": report.timings});
    }
    Ok(Json(view))
}

/// `DELETE /api/plugins/{name}`
pub async fn remove(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if !crate::plugins::valid_plugin_name(&name) {
        return Err(not_found(&name));
    }
    let _change = state.shared_plugins.as_ref().map(|shared| shared.change(&name));
    let removed = state.registry.remove(&name).await;
    if let Some(shared) = &state.shared_plugins
        && let Err(error) = shared.unpublish(&name).await
    {
        tracing::error!(plugin = %name, %error, "the plugin was removed here but not from the shared table");
        return Err(ApiError::internal());
    }
    if removed { Ok(StatusCode::NO_CONTENT) } else { Err(not_found(&name)) }
}
