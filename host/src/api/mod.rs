//! HTTP routes: the OpenAI API under `/v1`, administration under `/api`.

mod accounts_admin;
mod auth;
mod body;
mod channels_admin;
mod dashboard;
mod filters_admin;
mod gemini;
mod limits;
mod logs_admin;
mod messages;
mod metrics;
mod openai;
mod params;
mod plugins_admin;
mod responses;
mod routing_admin;
mod self_tokens;
mod session;
mod status;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

use crate::error::ApiError;
use crate::state::AppState;

/// Largest plugin upload accepted by `PUT /api/plugins/{name}`.
const MAX_PLUGIN_UPLOAD: usize = 64 * 1024 * 1024;

/// The request id of the current request (also sent as `x-request-id`).
#[derive(Clone)]
pub struct RequestId(pub String);

const X_REQUEST_ID: axum::http::HeaderName = axum::http::HeaderName::from_static("x-request-id");

/// The complete router; tests can serve it directly.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/images/generations", post(openai::images_generations))
        .route("/v1/audio/speech", post(openai::audio_speech))
        .route(
            "/v1/audio/transcriptions",
            post(openai::audio_transcriptions).layer(DefaultBodyLimit::max(crate::relayed::MAX_RELAYED_BODY)),
        )
        .route(
            "/v1/audio/translations",
            post(openai::audio_translations).layer(DefaultBodyLimit::max(crate::relayed::MAX_RELAYED_BODY)),
        )
        .route("/v1/moderations", post(openai::moderations))
        .route("/v1/rerank", post(openai::rerank))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model}", get(openai::get_model))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::retrieve).delete(responses::delete))
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens));
    let admin = Router::new()
        .route("/api/plugins", get(plugins_admin::list))
        .route(
            "/api/plugins/{name}",
            get(plugins_admin::get)
                .put(plugins_admin::upload)
                .delete(plugins_admin::remove)
                .layer(DefaultBodyLimit::max(MAX_PLUGIN_UPLOAD)),
        )
        .route("/api/channels", get(channels_admin::list).post(channels_admin::create))
        .route(
            "/api/channels/{id}",
            get(channels_admin::get)
                .put(channels_admin::replace)
                .patch(channels_admin::patch)
                .delete(channels_admin::delete),
        )
        .route("/api/channels/test", post(channels_admin::test_all))
        .route("/api/channels/{id}/test", post(channels_admin::test))
        .route("/api/channels/{id}/enable", post(channels_admin::enable))
        .route("/api/channels/{id}/disable", post(channels_admin::disable))
        .route("/api/status", get(status::status))
        .route("/api/users", get(accounts_admin::list_users).post(accounts_admin::create_user))
        .route(
            "/api/users/{id}",
            get(accounts_admin::get_user)
                .put(accounts_admin::replace_user)
                .patch(accounts_admin::patch_user)
                .delete(accounts_admin::delete_user),
        )
        .route("/api/users/{id}/topup", post(accounts_admin::top_up))
        .route("/api/tokens", get(accounts_admin::list_tokens).post(accounts_admin::create_token))
        .route(
            "/api/tokens/{id}",
            get(accounts_admin::get_token)
                .put(accounts_admin::replace_token)
                .patch(accounts_admin::patch_token)
                .delete(accounts_admin::delete_token),
        )
        .route("/api/logs", get(logs_admin::list))
        .route("/api/logs/stats", get(logs_admin::summary))
        .route("/api/logs/export", get(logs_admin::export))
        .route("/api/dashboard", get(dashboard::admin))
        .route(
            "/api/pricing",
            get(logs_admin::get_pricing).put(logs_admin::put_pricing).delete(logs_admin::reset_pricing),
        )
        .route("/api/routing", get(routing_admin::get).put(routing_admin::put).delete(routing_admin::reset))
        .route("/api/filters", get(filters_admin::get).put(filters_admin::put).delete(filters_admin::reset))
        .route_layer(middleware::from_fn(on_admin_thread))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin));
    let own = Router::new()
        .route("/api/self", get(logs_admin::me))
        .route("/api/self/logs", get(logs_admin::my_logs))
        .route("/api/self/dashboard", get(dashboard::own))
        .route("/api/session", get(session::current).post(session::sign_in).delete(session::sign_out))
        .merge(
            // Creating and revoking keys writes the store: off the workers.
            Router::new()
                .route("/api/self/tokens", get(self_tokens::list).post(self_tokens::create))
                .route("/api/self/tokens/{id}", axum::routing::delete(self_tokens::revoke))
                .route_layer(middleware::from_fn(on_admin_thread)),
        );
    let v1beta = Router::new().route("/v1beta/models/{target}", post(gemini::call));
    let console = if state.config.console.enabled { crate::console::routes() } else { Router::new() };
    let routes = Router::new()
        .merge(console)
        // Full paths rather than `nest`, which rebuilds every request's URI
        // to strip its prefix.
        .merge(v1)
        .merge(v1beta)
        .merge(own.merge(admin))
        .route("/health", get(status::health))
        .route("/metrics", get(metrics::scrape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // Around the router once, not through `Router::layer`, which wraps
    // every route in each layer: a request would clone all of them (a
    // boxed service per layer and route, ~45 allocations per request).
    let stack = tower::ServiceBuilder::new()
        .layer(request_id_checks())
        .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeId))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
        .layer(middleware::from_fn_with_state(state.clone(), front))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .service(routes);
    Router::new().fallback_service(stack)
}

/// Administration runs on its own thread: its writes flush sled (and an
/// upload compiles a plugin), and no request worker waits for that.
async fn on_admin_thread(req: Request, next: Next) -> Response {
    static ADMIN: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    let runtime = ADMIN.get_or_init(|| {
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wasmgate-admin")
            .enable_all()
            .build();
        built.inspect_err(|error| tracing::error!(%error, "no admin thread; administration runs on the workers")).ok()
    });
    let Some(runtime) = runtime else { return next.run(req).await };
    match runtime.spawn(next.run(req)).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "an administration request failed");
            ApiError::internal().into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found_url()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        Some("method_not_allowed"),
        "This method is not supported on this URL.",
    )
}

/// Whether a client's own `x-request-id` is usable: 1 to 128 characters
/// of letters, digits and `-_.:`, so it can be logged, stored in the usage
/// row and echoed back as it is. An unusable one is dropped (and replaced).
fn usable_request_id(v: &HeaderValue) -> bool {
    (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// New request ids ([`crate::billing::logs::new_request_id`]: they carry
/// their time) for `tower-http`'s request-id layers.
#[derive(Clone, Copy)]
struct MakeId;

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<tower_http::request_id::RequestId> {
        HeaderValue::from_bytes(&crate::billing::logs::new_request_id_bytes())
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

/// The first of the request-id layers (outermost first: an unusable
/// client id is dropped, a missing one made, and the id sent back on
/// every answer): an unusable `x-request-id` is dropped.
fn request_id_checks() -> tower::util::MapRequestLayer<fn(Request) -> Request> {
    fn strip(mut req: Request) -> Request {
        if req.headers().get(X_REQUEST_ID).is_some_and(|v| !usable_request_id(v)) {
            req.headers_mut().remove(X_REQUEST_ID);
        }
        req
    }
    tower::util::MapRequestLayer::new(strip)
}

/// In front of every route, in one layer: the limits on what the client
/// sends, then the request's span, which carries its id to every log line
/// (and, when traces are on, continues the client's trace).
async fn front(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Err(refused) = limits::check(&state, &req) {
        return *refused;
    }
    let id = req
        .extensions()
        .get::<tower_http::request_id::RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or_default()
        .to_string();
    let span = if req.uri().path().starts_with("/v1") {
        // INFO, so that every log line of the request carries its id.
        let span = tracing::info_span!(target: "wasmgate::request", "request", request_id = %id,
            otel.name = tracing::field::Empty, otel.kind = tracing::field::Empty);
        if crate::telemetry::traces_on() {
            span.record("otel.name", format!("{} {}", req.method(), req.uri().path()));
            span.record("otel.kind", "server");
            crate::telemetry::continue_trace(&span, req.headers());
        }
        span
    } else {
        tracing::Span::none()
    };
    req.extensions_mut().insert(RequestId(id));
    let response = next.run(limits::with_deadline(&state, req)).instrument(span.clone()).await;
    crate::telemetry::span_attribute(&span, "http.response.status_code", i64::from(response.status().as_u16()));
    response
}
