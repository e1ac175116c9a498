//! `GET /metrics`: the Prometheus scrape endpoint (OpenMetrics text). Off
//! with `[metrics] enabled = false`; with `[metrics] token` set, scrapers
//! must send it as a bearer token (Prometheus's `authorization`).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::{AppState, hashes_equal, secret_hash};

/// The content type Prometheus negotiates for OpenMetrics.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`
pub async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let cfg = &state.config.metrics;
    if !cfg.enabled {
        return ApiError::not_found_url().into_response();
    }
    if let Some(token) = &cfg.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        if !presented.is_some_and(|key| hashes_equal(&secret_hash(key), &secret_hash(token))) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_metrics_token"),
                "The metrics endpoint needs its bearer token.",
            )
            .into_response();
        }
    }
    let snapshot = state.channels.snapshot();
    let channels: Vec<(u64, &'static str)> = snapshot.records.values().map(|r| (r.id, r.status.name())).collect();
    let instances = state.registry.instance_gauges();
    let body = crate::metrics::get().render(&channels, state.billing.writer.gauges(), instances);
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    response
}
