//! The OpenAI Responses API: `POST /v1/responses`,
//! `GET` and `DELETE /v1/responses/{id}`.

use axum::Extension;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;

use super::RequestId;
use super::auth::Authed;
use super::body;
use super::openai::SessionHeader;
use crate::error::ApiError;
use crate::ingress::responses;
use crate::state::AppState;

/// `POST /v1/responses`
pub async fn create(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    Authed(caller): Authed,
    session: SessionHeader,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    responses::create(&state, &caller, &id.0, session.0, body::take(raw)?).await
}

/// `GET /v1/responses/{id}`
pub async fn retrieve(
    State(state): State<AppState>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    responses::retrieve(&state, &caller, id).await
}

/// `DELETE /v1/responses/{id}`
pub async fn delete(
    State(state): State<AppState>,
    Authed(caller): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    responses::delete(&state, &caller, id).await
}
