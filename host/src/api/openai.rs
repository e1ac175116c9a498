//! The OpenAI-compatible endpoints.

use std::collections::BTreeMap;

use axum::Extension;
use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::RequestId;
use super::body;
use crate::error::ApiError;
use crate::plugins::Endpoint;
use crate::relay::{ClientRequest, relay};
use crate::state::AppState;

async fn serve(
    state: AppState,
    id: RequestId,
    endpoint: Endpoint,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = ClientRequest::parse(endpoint, body::take(raw)?)?;
    relay(&state, req, &id.0).await
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(s): State<AppState>,
    Extension(id): Extension<RequestId>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    serve(s, id, Endpoint::ChatCompletions, raw).await
}

/// `POST /v1/completions`
pub async fn completions(
    State(s): State<AppState>,
    Extension(id): Extension<RequestId>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    serve(s, id, Endpoint::Completions, raw).await
}

/// `POST /v1/embeddings`
pub async fn embeddings(
    State(s): State<AppState>,
    Extension(id): Extension<RequestId>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    serve(s, id, Endpoint::Embeddings, raw).await
}

/// Model name → adapter that owns it, over every channel.
fn models(state: &AppState) -> BTreeMap<String, String> {
    let plugins = state.registry.snapshot();
    let mut out = BTreeMap::new();
    for ch in state.channels.all() {
        let names = if ch.models.is_empty() {
            plugins.adapters.get(&ch.adapter).map(|a| a.info.default_models.clone()).unwrap_or_default()
        } else {
            ch.models.clone()
        };
        for m in names {
            out.entry(m).or_insert_with(|| ch.adapter.clone());
        }
    }
    out
}

fn model_object(state: &AppState, id: &str, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": state.started_at, "owned_by": owner})
}

/// `GET /v1/models`
pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = models(&state).iter().map(|(id, owner)| model_object(&state, id, owner)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{model}`
pub async fn get_model(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    let models = models(&state);
    let owner = models.get(&model).ok_or_else(|| ApiError::model_not_found(&model))?;
    Ok(Json(model_object(&state, &model, owner)))
}
