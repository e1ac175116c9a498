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
use serde_json::{Map, Value};

use super::RequestId;
use super::auth::Authed;
use super::body;
use crate::error::ApiError;
use crate::ingress::anthropic::{self, AnthropicError, request};
use crate::plugins::{Endpoint, Operation};
use crate::relay::{ClientRequest, relay};
use crate::state::AppState;

fn object(raw: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::bad_request("The request body must be a JSON object.")),
    }
}

fn chat_request(chat: &Map<String, Value>) -> Result<ClientRequest, ApiError> {
    let bytes = serde_json::to_vec(chat).map_err(|_| ApiError::internal())?;
    ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(bytes))
}

/// `POST /v1/messages`
pub async fn create(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    auth: Result<Authed, ApiError>,
    client_headers: axum::http::HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let Authed(caller) = auth?;
    let raw = body::take(raw)?;
    let message = object(&raw)?;
    let (chat, _) = request::to_chat(&message)?;
    let mut req = chat_request(&chat)?;
    let model = req.model.clone();
    req.route = "messages";
    req.request_id = id.0;
    // Anthropic channels get the request as the client wrote it.
    let stream = message.get("stream").and_then(Value::as_bool) == Some(true);
    let headers = client_headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| crate::plugins::Header { name: "anthropic-beta".into(), value: v.to_string() })
        .collect();
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
    let mut body = object(&body::take(raw)?)?;
    body.entry("max_tokens").or_insert(Value::from(1));
    let (chat, _) = request::to_chat(&body)?;
    let req = chat_request(&chat)?;
    let tokens = tokio::task::spawn_blocking(move || crate::billing::tokenize::prompt_tokens(&req.model, &req.body))
        .await
        .map_err(|_| ApiError::internal())?;
    Ok(anthropic::count_answer(tokens))
}
