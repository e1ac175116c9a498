//! The OpenAI Responses API (`/v1/responses`) over chat completions.

pub mod reply;
pub mod request;
pub mod store;
pub mod stream;

use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::billing::Caller;
use crate::error::ApiError;
use crate::ingress::answer::ChatAnswer;
use crate::ingress::{chat_stream, is_stream, json_response, sse_response};
use crate::plugins::Endpoint;
use crate::relay::{ClientRequest, relay};
use crate::state::AppState;
use crate::store::unix_now;
use reply::{Frame, Status};

fn storage_failed(error: &anyhow::Error) -> ApiError {
    tracing::error!(%error, "stored responses unavailable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("storage_unavailable"),
        "Stored responses are unavailable right now.",
    )
}

async fn blocking<T: Send + 'static>(job: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(job).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(storage_failed(&e)),
        Err(_) => Err(ApiError::internal()),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("response_not_found"),
        format!("Response with id '{id}' not found."),
    )
}

/// `POST /v1/responses`.
/// `session` is the client's `x-session-id`, when it sent one.
pub async fn create(
    state: &AppState,
    caller: &Caller,
    request_id: &str,
    session: Option<std::sync::Arc<str>>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let body = request::ResponsesRequest::parse(&raw)?;
    let owner = store::owner(caller);
    let history = match body.previous_response_id()? {
        None => Vec::new(),
        Some(id) => {
            let (st, key, o) = (state.clone(), id.to_string(), owner.clone());
            let found = blocking(move || st.responses.get(&key, &o)).await?;
            found.ok_or_else(|| not_found(&id).param("previous_response_id"))?.conversation
        }
    };
    let translated = request::to_chat(&body, history)?;
    let mut req =
        ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(translated.chat))?.with_id(request_id.to_string());
    req.route = "responses";
    if session.is_some() {
        req.session = session;
    }
    // A request that keeps no state here may go, as written, to a channel
    // whose upstream serves the Responses API itself.
    if body.stateless() {
        let operation = crate::plugins::Operation::Responses;
        let stream = translated.stream;
        req.native = Some(crate::relayed::Native { operation, body: raw.clone(), stream, headers: Vec::new() });
    }
    let frame = Frame::new(&body, &req.model, unix_now());
    let response = relay(state, req, caller).await?;
    if response.extensions().get::<crate::relayed::NativeAnswer>().is_some() {
        return Ok(response);
    }
    let keep = translated.store.then(|| Keeper {
        state: state.clone(),
        owner,
        conversation: translated.conversation,
        id: frame.id.clone(),
    });
    if is_stream(&response) {
        let on_complete: Option<stream::OnComplete> =
            keep.map(|k| Box::new(move |r, a| k.keep(r, a, false)) as stream::OnComplete);
        let events = chat_stream::translated(&response, stream::ResponsesStream::new(frame, on_complete))?;
        return Ok(sse_response(events));
    }
    let body = crate::ingress::answer::body(response).await?;
    let chat = ChatAnswer::parse(&body)?;
    let mut ids = Vec::new();
    let output = reply::output_items(&chat, &mut ids);
    let (text, _, calls, finish) = chat.message();
    let object = frame.response(Status::of_finish(finish), &output, chat.usage);
    let answer = json_response(&object);
    if let Some(k) = keep {
        let calls: Vec<(&str, &str, &str)> = calls.iter().map(|c| c.parts()).collect();
        let assistant = reply::assistant_message(text, &calls);
        let object = serde_json::to_value(&object).map_err(|_| ApiError::internal())?;
        let _ = tokio::task::spawn_blocking(move || k.keep(object, assistant, true)).await;
    }
    Ok(answer)
}

/// What is needed to store a response once it is complete.
struct Keeper {
    state: AppState,
    owner: String,
    conversation: Vec<Value>,
    id: String,
}

impl Keeper {
    /// Store `response`, the conversation and the `assistant` answer;
    /// with `wait`, blocking until it is stored (a shared database's write
    /// is otherwise sent without waiting). A failure is logged: the answer
    /// was served.
    fn keep(mut self, response: Value, assistant: Value, wait: bool) {
        self.conversation.push(assistant);
        let expires_at = unix_now().saturating_add(self.state.config.responses.retention_secs);
        let record = store::Stored { owner: self.owner, expires_at, conversation: self.conversation, response };
        if !wait {
            return self.state.responses.put_later(self.id, record);
        }
        if let Err(error) = self.state.responses.put(&self.id, &record) {
            tracing::error!(%error, id = %self.id, "a response could not be stored");
        }
    }
}

/// `GET /v1/responses/{id}`.
pub async fn retrieve(state: &AppState, caller: &Caller, id: String) -> Result<Response, ApiError> {
    let (st, owner, key) = (state.clone(), store::owner(caller), id.clone());
    let found = blocking(move || st.responses.get(&key, &owner)).await?;
    Ok(json_response(&found.ok_or_else(|| not_found(&id))?.response))
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(state: &AppState, caller: &Caller, id: String) -> Result<Response, ApiError> {
    let (st, owner, key) = (state.clone(), store::owner(caller), id.clone());
    if !blocking(move || st.responses.delete(&key, &owner)).await? {
        return Err(not_found(&id));
    }
    Ok(json_response(&json!({"id": id, "object": "response", "deleted": true})))
}
