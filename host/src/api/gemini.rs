//! Gemini's API: `POST /v1beta/models/{model}:generateContent`,
//! `:streamGenerateContent` and `:countTokens`, errors in Google's shape.
//! The gateway token comes as `x-goog-api-key`, `?key=` or a bearer token.

use axum::Extension;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;

use super::RequestId;
use super::auth::GeminiAuthed;
use super::body;
use crate::error::ApiError;
use crate::ingress::gemini::{self, GeminiError, Method, reply::Framing, request};
use crate::plugins::Endpoint;
use crate::relay::{ClientRequest, relay};
use crate::state::AppState;

/// `POST /v1beta/models/{model}:{method}`
pub async fn call(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    auth: Result<GeminiAuthed, ApiError>,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, GeminiError> {
    let GeminiAuthed(caller) = auth?;
    let (model, method) = gemini::parse_target(&target)?;
    let body = match serde_json::from_slice::<Value>(&body::take(raw)?) {
        Ok(Value::Object(map)) => map,
        _ => return Err(ApiError::bad_request("The request body must be a JSON object.").into()),
    };
    let stream = matches!(method, Method::Stream);
    let body = if matches!(method, Method::Count) { gemini::count_body(&body) } else { body };
    let chat = request::to_chat(&body, model, stream)?;
    let bytes = serde_json::to_vec(&chat).map_err(|_| ApiError::internal())?;
    let mut req = ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(bytes))?;
    req.route = "gemini";
    if matches!(method, Method::Count) {
        let tokens =
            tokio::task::spawn_blocking(move || crate::billing::tokenize::prompt_tokens(&req.model, &req.body))
                .await
                .map_err(|_| ApiError::internal())?;
        return Ok(gemini::count_answer(tokens));
    }
    let sse = query.as_deref().is_some_and(|q| q.split('&').any(|p| p == "alt=sse"));
    let framing = if sse { Framing::Sse } else { Framing::Array };
    let model = req.model.clone();
    req.request_id = id.0;
    let response = relay(&state, req, &caller).await?;
    Ok(gemini::answer(response, model, framing).await?)
}
