//! The recovery tester: a background task that ends cool-downs whose time
//! has come and probes, with the adapter's own health probe, only what was
//! disabled automatically — `auto_disabled` channels and auto-disabled keys
//! — never a channel in service, never one an admin disabled, never one
//! that reached `needs_attention`. Probes are bounded in concurrency and
//! time.

use std::time::Duration;

use futures_util::StreamExt;

use crate::channels::{Channel, ChannelRecord, ChannelState, EventSource, StatusEvent};
use crate::relay::{ProbeOutcome, probe};
use crate::state::AppState;
use crate::store::unix_now_ms;

/// What one probe is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// An `auto_disabled` channel, probed with the key at this index (if any).
    Channel(Option<usize>),
    /// An auto-disabled key of a channel otherwise in service.
    Key(usize),
}

/// Run until the process ends: sweep cool-downs every `tick`, probe every
/// `probe_interval_ms`.
pub async fn run(state: AppState) {
    let cfg = state.health.config().clone();
    let interval = Duration::from_millis(cfg.probe_interval_ms.max(10));
    let tick = interval.min(Duration::from_secs(1));
    let mut next_probe = tokio::time::Instant::now() + interval;
    loop {
        tokio::time::sleep(tick).await;
        end_cooldowns(&state);
        if tokio::time::Instant::now() >= next_probe {
            probe_round(&state).await;
            next_probe = tokio::time::Instant::now() + interval;
        }
    }
}

/// Put channels whose cool-down has run out back in service.
pub fn end_cooldowns(state: &AppState) {
    let now = unix_now_ms();
    let due: Vec<u64> = state
        .channels
        .snapshot()
        .records
        .values()
        .filter(|r| matches!(r.status, ChannelState::CoolingDown { until_ms, .. } if until_ms <= now))
        .map(|r| r.id)
        .collect();
    for id in due {
        let _ = state.channels.update_soon(id, &mut |rec| {
            if matches!(rec.status, ChannelState::CoolingDown { until_ms, .. } if until_ms <= now) {
                rec.transition(ChannelState::Enabled, EventSource::Timer, "cool-down ended", now);
            }
            Ok(())
        });
    }
}

/// What the tester would probe in `rec` now.
fn targets(rec: &ChannelRecord, max_attempts: u32) -> Vec<Target> {
    match rec.status {
        ChannelState::AutoDisabled { .. } => {
            // Prefer a key that failed automatically; an admin's disabled key is never used.
            let key =
                rec.keys.iter().position(|k| k.auto.is_some()).or_else(|| rec.keys.iter().position(|k| k.enabled));
            if !rec.keys.is_empty() && key.is_none() {
                return Vec::new();
            }
            vec![Target::Channel(key)]
        }
        ChannelState::Enabled | ChannelState::CoolingDown { .. } => rec
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.auto.as_ref().is_some_and(|a| a.recovery_attempts < max_attempts))
            .map(|(i, _)| Target::Key(i))
            .collect(),
        ChannelState::ManuallyDisabled { .. } | ChannelState::NeedsAttention { .. } => Vec::new(),
    }
}

/// Probe everything due, at most `probe_concurrency` at a time.
pub async fn probe_round(state: &AppState) {
    let cfg = state.health.config().clone();
    let mut jobs: Vec<(ChannelRecord, Target)> = state
        .channels
        .snapshot()
        .records
        .values()
        .flat_map(|r| targets(r, cfg.max_recovery_attempts).into_iter().map(|t| ((**r).clone(), t)))
        .collect();
    if jobs.is_empty() {
        return;
    }
    // Several nodes: only the one holding a channel's lease probes it.
    let mut ids: Vec<u64> = jobs.iter().map(|(r, _)| r.id).collect();
    ids.dedup();
    let lease = Duration::from_millis(cfg.probe_interval_ms.saturating_mul(3)).max(Duration::from_secs(1));
    let channels = state.channels.clone();
    let claimed = tokio::task::spawn_blocking(move || channels.claim_probes(&ids, lease)).await.unwrap_or_default();
    jobs.retain(|(r, _)| claimed.contains(&r.id));
    futures_util::stream::iter(jobs)
        .map(|(rec, target)| async move {
            let channel = match target {
                Target::Channel(Some(i)) | Target::Key(i) => Channel::with_only_key(&rec, i),
                Target::Channel(None) => Channel::from_record(&rec),
            };
            let outcome = probe(state, &channel).await;
            crate::metrics::get().probe(if outcome.success { "success" } else { "failure" });
            apply(state, rec.id, target, &outcome, cfg.max_recovery_attempts);
        })
        .buffer_unordered(cfg.probe_concurrency.max(1))
        .collect::<Vec<()>>()
        .await;
}

/// Record a recovery probe's outcome.
fn apply(state: &AppState, id: u64, target: Target, outcome: &ProbeOutcome, max_attempts: u32) {
    let now = unix_now_ms();
    let failure = outcome.message.clone().unwrap_or_default();
    let result = state.channels.update_soon(id, &mut |rec| {
        match target {
            Target::Channel(_) => match &mut rec.status {
                ChannelState::AutoDisabled { recovery_attempts, reason, error_kind, .. } if !outcome.success => {
                    *recovery_attempts += 1;
                    if *recovery_attempts >= max_attempts {
                        let to = ChannelState::NeedsAttention {
                            reason: reason.clone(),
                            error_kind: error_kind.clone(),
                            since: now / 1000,
                            recovery_attempts: *recovery_attempts,
                        };
                        let why = format!("{max_attempts} recovery probes failed; last: {failure}");
                        rec.transition(to, EventSource::Probe, &why, now);
                    }
                }
                ChannelState::AutoDisabled { .. } => {
                    let why = format!("recovery probe succeeded in {} ms", outcome.time_ms);
                    rec.restore(EventSource::Probe, &why, now);
                }
                _ => {}
            },
            Target::Key(i) => {
                let state_name = rec.status.name().to_string();
                let Some(k) = rec.keys.get_mut(i) else { return Ok(()) };
                let Some(auto) = k.auto.as_mut() else { return Ok(()) };
                let reason = if outcome.success {
                    k.enabled = true;
                    k.auto = None;
                    format!("key {i} re-enabled: recovery probe succeeded")
                } else {
                    auto.recovery_attempts += 1;
                    if auto.recovery_attempts < max_attempts {
                        return Ok(());
                    }
                    format!("key {i} needs attention: {max_attempts} recovery probes failed")
                };
                rec.record_event(StatusEvent {
                    at_ms: now,
                    from: state_name.clone(),
                    to: state_name,
                    source: EventSource::Probe,
                    reason,
                });
            }
        }
        Ok(())
    });
    match result {
        Ok(rec) => tracing::info!(
            channel = id,
            ?target,
            success = outcome.success,
            time_ms = outcome.time_ms,
            state = rec.status.name(),
            "recovery probe"
        ),
        Err(error) => tracing::error!(channel = id, %error, "recording a recovery probe failed"),
    }
}
