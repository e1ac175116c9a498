//! HTTP routes: the OpenAI API under `/v1`, administration under `/api`.

mod auth;
mod body;
mod channels_admin;
mod openai;
mod plugins_admin;
mod routing_admin;
mod status;

pub use auth::Caller;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

use crate::error::ApiError;
use crate::state::AppState;

/// Largest plugin upload accepted by `PUT /api/plugins/{name}`.
const MAX_PLUGIN_UPLOAD: usize = 64 * 1024 * 1024;

/// The request id of the current request (also sent as `x-request-id`).
#[derive(Clone)]
pub struct RequestId(pub String);

/// The complete router; tests can serve it directly.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(openai::chat_completions))
        .route("/completions", post(openai::completions))
        .route("/embeddings", post(openai::embeddings))
        .route("/models", get(openai::list_models))
        .route("/models/{model}", get(openai::get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_token));
    let admin = Router::new()
        .route("/plugins", get(plugins_admin::list))
        .route(
            "/plugins/{name}",
            get(plugins_admin::get)
                .put(plugins_admin::upload)
                .delete(plugins_admin::remove)
                .layer(DefaultBodyLimit::max(MAX_PLUGIN_UPLOAD)),
        )
        .route("/channels", get(channels_admin::list).post(channels_admin::create))
        .route(
            "/channels/{id}",
            get(channels_admin::get)
                .put(channels_admin::replace)
                .patch(channels_admin::patch)
                .delete(channels_admin::delete),
        )
        .route("/channels/test", post(channels_admin::test_all))
        .route("/channels/{id}/test", post(channels_admin::test))
        .route("/channels/{id}/enable", post(channels_admin::enable))
        .route("/channels/{id}/disable", post(channels_admin::disable))
        .route("/status", get(status::status))
        .route("/routing", get(routing_admin::get).put(routing_admin::put).delete(routing_admin::reset))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin));
    Router::new()
        .nest("/v1", v1)
        .nest("/api", admin)
        .route("/health", get(|| async { "ok" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("unknown_url"), "Unknown request URL.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        Some("method_not_allowed"),
        "This method is not supported on this URL.",
    )
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = format!("req_{:016x}", rand::random::<u64>());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}
