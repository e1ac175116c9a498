//! Anthropic Messages: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, every error in Anthropic's shape.
//! The gateway token comes as `x-api-key` (Anthropic's SDKs) or as
//! `Authorization: Bearer`; `anthropic-version` and `anthropic-beta` are
//! accepted and need not be set.

use axum::Extension;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;
use bytes::Bytes;

use super::RequestId;
use super::auth::Authed;
use super::body;
use super::openai::SessionHeader;
use crate::error::ApiError;
use crate::ingress::anthropic::{self, AnthropicError, request};
use crate::plugins::{Endpoint, Operation};
use crate::relay::{ClientRequest, relay};
use crate::state::AppState;

/// The `anthropic-beta` headers, passed on to Anthropic channels (read
/// alone, without copying the whole header map).
pub struct AnthropicBeta(Vec<crate::plugins::Header>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AnthropicBeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let values = parts.headers.get_all("anthropic-beta").iter().filter_map(|v| v.to_str().ok());
        Ok(Self(
            values.map(|v| crate::plugins::Header { name: "anthropic-beta".into(), value: v.to_string() }).collect(),
        ))
    }
}

fn chat_request(chat: Vec<u8>) -> Result<ClientRequest, ApiError> {
    ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(chat))
}

/// `POST /v1/messages`
pub async fn create(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    auth: Result<Authed, ApiError>,
    (AnthropicBeta(headers), session): (AnthropicBeta, SessionHeader),
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let Authed(caller) = auth?;
    let raw = body::take(raw)?;
    let translated = request::to_chat(&raw, false)?;
    let stream = translated.stream;
    let mut req = chat_request(translated.chat)?;
    let model = req.model.clone();
    req.route = "messages";
    req.request_id = id.0;
    if session.0.is_some() {
        req.session = session.0;
    }
    // Anthropic channels get the request as the client wrote it.
    req.native = Some(crate::relayed::Native { operation: Operation::Messages, body: raw, stream, headers });
    let response = relay(&state, req, &caller).await?;
    Ok(anthropic::answer(response, model).await?)
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as the gateway
/// counts them for billing (the model's tokenizer where it knows it).
pub async fn count_tokens(
    State(_state): State<AppState>,
    auth: Result<Authed, ApiError>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    auth?;
    let translated = request::to_chat(&body::take(raw)?, true)?;
    let req = chat_request(translated.chat)?;
    let tokens = tokio::task::spawn_blocking(move || crate::billing::tokenize::prompt_tokens(&req.model, &req.body))
        .await
        .map_err(|_| ApiError::internal())?;
    Ok(anthropic::count_answer(tokens))
}
