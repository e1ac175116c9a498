//! `GET /api/status`: the gateway at a glance — channels by health state,
//! each channel's state, and the plugins in service.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::channels::ChannelState;
use crate::state::AppState;

/// How many channels are in each health state (every state named, 0 included).
pub(super) fn channels_by_state(set: &crate::channels::ChannelSet) -> BTreeMap<&'static str, usize> {
    let mut counts: BTreeMap<&str, usize> = ChannelState::NAMES.into_iter().map(|s| (s, 0)).collect();
    for rec in set.records.values() {
        *counts.entry(rec.status.name()).or_default() += 1;
    }
    counts
}

/// `GET /api/status`
pub async fn status(State(state): State<AppState>) -> Json<Value> {
    let snapshot = state.channels.snapshot();
    let counts = channels_by_state(&snapshot);
    let mut channels = Vec::with_capacity(snapshot.records.len());
    for rec in snapshot.records.values() {
        let keys_disabled = rec.keys.iter().filter(|k| !k.enabled).count();
        channels.push(json!({
            "id": rec.id, "name": rec.name, "status": rec.status,
            "keys": rec.keys.len(), "keys_disabled": keys_disabled,
            "since_ms": rec.history.last().map(|e| e.at_ms),
        }));
    }
    let plugins = state.registry.snapshot();
    Json(json!({
        "object": "status",
        "storage": state.billing.storage().status(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": crate::store::unix_now().saturating_sub(state.started_at),
        "channels": {"total": snapshot.records.len(), "by_status": counts, "data": channels,
            "pending_writes": state.channels.pending_writes()},
        "plugins": {"adapters": plugins.adapters.len(), "routers": plugins.routers.len()},
    }))
}

/// `GET /health`: 200 `{"status":"ok"}` while the gateway can serve and
/// bill; 503 `{"status":"degraded", ...}` with the reason when its storage
/// cannot record usage (billed requests are refused meanwhile).
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let storage = state.billing.storage().status();
    if storage.writable {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "degraded", "storage": storage})))
    }
}
