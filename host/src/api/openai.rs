//! The OpenAI-compatible endpoints.

use axum::Extension;
use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::RequestId;
use super::auth::Authed;
use super::body;
use crate::billing::Caller;
use crate::channels::models_for_group;
use crate::error::ApiError;
use crate::plugins::Endpoint;
use crate::relay::{ClientRequest, relay};
use crate::state::AppState;

/// The client's `x-session-id` header (at most 256 bytes), which routing
/// policies can keep together on one channel (see `affinity-key`).
pub struct SessionHeader(pub Option<std::sync::Arc<str>>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SessionHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get("x-session-id").and_then(|v| v.to_str().ok());
        Ok(Self(value.filter(|v| !v.is_empty() && v.len() <= 256).map(std::sync::Arc::from)))
    }
}

async fn serve(
    state: AppState,
    id: RequestId,
    caller: Caller,
    endpoint: Endpoint,
    session: SessionHeader,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut req = ClientRequest::parse(endpoint, body::take(raw)?)?.with_id(id.0);
    if session.0.is_some() {
        req.session = session.0;
    }
    relay(&state, req, &caller).await
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(s): State<AppState>,
    Extension(id): Extension<RequestId>,
    Authed(caller): Authed,
    session: SessionHeader,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    serve(s, id, caller, Endpoint::ChatCompletions, session, raw).await
}

/// `POST /v1/completions`
pub async fn completions(
    State(s): State<AppState>,
    Extension(id): Extension<RequestId>,
    Authed(caller): Authed,
    session: SessionHeader,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    serve(s, id, caller, Endpoint::Completions, session, raw).await
}

/// `POST /v1/embeddings`
pub async fn embeddings(
    State(s): State<AppState>,
    Extension(id): Extension<RequestId>,
    Authed(caller): Authed,
    session: SessionHeader,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    serve(s, id, caller, Endpoint::Embeddings, session, raw).await
}

/// A relayed operation (images, audio, moderations, rerank; see
/// `crate::relayed`).
async fn relay_operation(
    state: AppState,
    id: RequestId,
    caller: Caller,
    operation: crate::plugins::Operation,
    headers: &axum::http::HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let req = crate::relayed::parse(operation, content_type, body::take(raw)?)?.with_id(id.0);
    relay(&state, req, &caller).await
}

/// The handler of one relayed operation.
macro_rules! relayed_handler {
    ($(#[$doc:meta])* $name:ident, $operation:ident) => {
        $(#[$doc])*
        pub async fn $name(
            State(s): State<AppState>,
            Extension(id): Extension<RequestId>,
            Authed(caller): Authed,
            headers: axum::http::HeaderMap,
            raw: Result<Bytes, BytesRejection>,
        ) -> Result<Response, ApiError> {
            relay_operation(s, id, caller, crate::plugins::Operation::$operation, &headers, raw).await
        }
    };
}

relayed_handler!(
    /// `POST /v1/images/generations`
    images_generations,
    ImagesGenerations
);
relayed_handler!(
    /// `POST /v1/audio/speech`: the audio is streamed back as it arrives.
    audio_speech,
    AudioSpeech
);
relayed_handler!(
    /// `POST /v1/audio/transcriptions` (multipart/form-data)
    audio_transcriptions,
    AudioTranscriptions
);
relayed_handler!(
    /// `POST /v1/audio/translations` (multipart/form-data)
    audio_translations,
    AudioTranslations
);
relayed_handler!(
    /// `POST /v1/moderations`
    moderations,
    Moderations
);
relayed_handler!(
    /// `POST /v1/rerank` (Cohere's and Jina's shape)
    rerank,
    Rerank
);

/// Model name → adapter of the first channel offering it, over the
/// channels in service for `group`.
fn models(state: &AppState, group: &str) -> std::collections::BTreeMap<String, String> {
    let plugins = state.registry.snapshot();
    let defaults =
        |adapter: &str| plugins.adapters.get(adapter).map(|a| a.info.default_models.clone()).unwrap_or_default();
    models_for_group(&state.channels.snapshot(), group, defaults)
}

fn model_object(state: &AppState, id: &str, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": state.started_at, "owned_by": owner})
}

/// `GET /v1/models`: what the caller's group can reach, de-duplicated.
pub async fn list_models(State(state): State<AppState>, Authed(caller): Authed) -> Json<Value> {
    let data: Vec<Value> =
        models(&state, &caller.group).iter().map(|(id, owner)| model_object(&state, id, owner)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{model}`
pub async fn get_model(
    State(state): State<AppState>,
    Authed(caller): Authed,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let models = models(&state, &caller.group);
    let owner = models.get(&model).ok_or_else(|| ApiError::model_not_found(&model))?;
    Ok(Json(model_object(&state, &model, owner)))
}
