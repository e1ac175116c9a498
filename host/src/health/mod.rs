//! Channel health: the relay reports each attempt's classified outcome
//! here, and the channel's state changes accordingly (see
//! `channels::status` for the state machine):
//!
//! - invalid key, deactivated account, exhausted quota → `auto_disabled` at
//!   once (on a multi-key channel, only that key, until no key is left);
//! - rate limited → `cooling_down` for `Retry-After`, or a default;
//! - transient → `cooling_down` only after `transient_threshold` failures
//!   inside `transient_window_secs`; a success clears the window.
//!
//! Only channels in service change state here: a transition never
//! overrides an admin's decision. The recovery tester ([`tester`]) probes
//! what was disabled automatically and ends cool-downs.

pub mod tester;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::channels::{Channel, ChannelState, ChannelStore, EventSource, KeyAuto, StatusEvent};
use crate::config::HealthConfig;
use crate::plugins::ErrorKind;
use crate::relay::kind_name;
use crate::store::unix_now_ms;

/// What the relay tells health about one failed attempt.
pub struct Fault<'a> {
    /// Classified kind.
    pub kind: &'a ErrorKind,
    /// Index of the key used, if the channel has keys.
    pub key: Option<usize>,
    /// Failures in a row on this channel, this one included.
    pub consecutive_failures: u32,
}

/// Health bookkeeping shared by all requests.
pub struct Health {
    cfg: HealthConfig,
    channels: Arc<dyn ChannelStore>,
    windows: Mutex<HashMap<u64, VecDeque<Instant>>>,
    /// Whether any channel has transient failures in its window: a success
    /// takes the lock only then.
    any_window: std::sync::atomic::AtomicBool,
}

impl Health {
    /// Health over `channels`.
    pub fn new(cfg: HealthConfig, channels: Arc<dyn ChannelStore>) -> Self {
        Self { cfg, channels, windows: Mutex::default(), any_window: Default::default() }
    }

    /// The configuration.
    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, VecDeque<Instant>>> {
        self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An attempt on `channel` succeeded: its transient window starts over.
    pub fn on_success(&self, channel: &Channel) {
        if !self.any_window.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut windows = self.windows();
        if windows.get(&channel.id).is_some_and(|w| !w.is_empty()) {
            windows.remove(&channel.id);
        }
        if windows.is_empty() {
            self.any_window.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// An attempt on `channel` failed with `fault`.
    pub fn on_failure(&self, channel: &Channel, fault: &Fault<'_>) {
        let kind = kind_name(fault.kind);
        let now = unix_now_ms();
        let cooling = |secs: u64, reason: String| ChannelState::CoolingDown {
            until_ms: now + secs * 1000,
            reason,
            error_kind: kind.to_string(),
        };
        match fault.kind {
            ErrorKind::Auth | ErrorKind::QuotaExhausted => self.disable(channel, fault, kind, now),
            ErrorKind::RateLimited(retry_after) => {
                let secs = retry_after.map_or(self.cfg.rate_limit_cooldown_secs, u64::from);
                let reason = format!("rate limited by the upstream; resting {secs} s");
                self.change(channel.id, EventSource::Auto, &reason, |state| {
                    matches!(state, ChannelState::Enabled).then(|| cooling(secs, reason.clone()))
                });
            }
            ErrorKind::Transient | ErrorKind::Other => {
                if self.window_full(channel.id) {
                    let secs = self.cfg.transient_cooldown_secs;
                    let reason = format!(
                        "{} transient failures within {} s; resting {secs} s",
                        self.cfg.transient_threshold, self.cfg.transient_window_secs
                    );
                    self.change(channel.id, EventSource::Auto, &reason, |state| {
                        matches!(state, ChannelState::Enabled).then(|| cooling(secs, reason.clone()))
                    });
                }
            }
            ErrorKind::BadRequest | ErrorKind::ContentFiltered | ErrorKind::ModelNotFound => {}
        }
    }

    /// Record a transient failure; true when the window is full (and reset).
    fn window_full(&self, id: u64) -> bool {
        let now = Instant::now();
        let span = Duration::from_secs(self.cfg.transient_window_secs);
        let mut windows = self.windows();
        self.any_window.store(true, std::sync::atomic::Ordering::Relaxed);
        let window = windows.entry(id).or_default();
        window.push_back(now);
        while window.front().is_some_and(|t| now.duration_since(*t) > span) {
            window.pop_front();
        }
        if window.len() >= self.cfg.transient_threshold as usize {
            window.clear();
            return true;
        }
        false
    }

    /// Auth or quota failure: disable the key of a multi-key channel, or
    /// the channel when it has a single key (or none left).
    fn disable(&self, channel: &Channel, fault: &Fault<'_>, kind: &str, now: u64) {
        let reason = match fault.kind {
            ErrorKind::QuotaExhausted => "the upstream account's quota is exhausted",
            _ => "the upstream refused the key (invalid, revoked or deactivated)",
        };
        let result = self.channels.update_soon(channel.id, &mut |rec| {
            if !matches!(rec.status, ChannelState::Enabled | ChannelState::CoolingDown { .. }) {
                return Ok(());
            }
            let enabled_keys = rec.keys.iter().filter(|k| k.enabled).count();
            if let Some(i) = fault.key.filter(|_| enabled_keys > 1) {
                if let Some(k) = rec.keys.get_mut(i).filter(|k| k.enabled) {
                    k.enabled = false;
                    k.auto = Some(KeyAuto {
                        reason: reason.to_string(),
                        error_kind: kind.to_string(),
                        at: now / 1000,
                        recovery_attempts: 0,
                    });
                    let state = rec.status.name().to_string();
                    rec.record_event(StatusEvent {
                        at_ms: now,
                        from: state.clone(),
                        to: state,
                        source: EventSource::Auto,
                        reason: format!("key {i} disabled: {reason}"),
                    });
                }
                return Ok(());
            }
            let to = ChannelState::AutoDisabled {
                reason: reason.to_string(),
                error_kind: kind.to_string(),
                first_failure_at: now / 1000,
                consecutive_failures: fault.consecutive_failures,
                recovery_attempts: 0,
            };
            rec.transition(to, EventSource::Auto, reason, now);
            Ok(())
        });
        match result {
            Ok(rec) => {
                crate::metrics::get().transition(channel.id, rec.status.name());
                tracing::warn!(channel = channel.id, state = rec.status.name(), key = ?fault.key, reason, "channel health changed")
            }
            Err(error) => tracing::error!(channel = channel.id, %error, "recording a channel's health failed"),
        }
    }

    /// Apply `to(current)` when it yields a new state.
    fn change(&self, id: u64, source: EventSource, reason: &str, to: impl Fn(&ChannelState) -> Option<ChannelState>) {
        let mut changed = false;
        let result = self.channels.update_soon(id, &mut |rec| {
            if let Some(next) = to(&rec.status) {
                rec.transition(next, source, reason, unix_now_ms());
                changed = true;
            }
            Ok(())
        });
        match result {
            Ok(rec) if changed => {
                crate::metrics::get().transition(id, rec.status.name());
                tracing::warn!(channel = id, state = rec.status.name(), reason, "channel health changed")
            }
            Ok(_) => {}
            Err(error) => tracing::error!(channel = id, %error, "recording a channel's health failed"),
        }
    }
}
