//! A channel's health state, its transitions and their history.
//!
//! ```text
//!             admin disable                      admin enable
//!   enabled ───────────────▶ manually_disabled ───────────────▶ enabled
//!      │  rate limited / N transient failures in the window
//!      ├──────────────────▶ cooling_down ──(time passes)──────▶ enabled
//!      │  invalid key / account deactivated / quota exhausted
//!      └──────────────────▶ auto_disabled ──probe ok──────────▶ enabled
//!                               │ N failed probes
//!                               └──────▶ needs_attention ──admin enable──▶ enabled
//! ```
//!
//! Only an admin leaves `manually_disabled` and `needs_attention`; nothing
//! automatic ever enables a channel an admin disabled.

use serde::{Deserialize, Serialize};

/// Where a channel stands.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ChannelState {
    /// In service.
    #[default]
    Enabled,
    /// Taken out of service by an admin; only an admin brings it back.
    ManuallyDisabled {
        /// Who disabled it.
        by: String,
        /// Unix seconds.
        at: u64,
        /// The admin's note.
        note: String,
    },
    /// Resting after rate limits or a burst of transient failures; serves
    /// again by itself at `until_ms`.
    CoolingDown {
        /// Unix milliseconds the cool-down ends.
        until_ms: u64,
        /// Why.
        reason: String,
        /// Classified error kind that caused it.
        error_kind: String,
    },
    /// Failed in a way that will not pass by itself (bad key, deactivated
    /// account, exhausted quota); the recovery tester probes it.
    AutoDisabled {
        /// Why.
        reason: String,
        /// Classified error kind.
        error_kind: String,
        /// Unix seconds of the failure that disabled it.
        first_failure_at: u64,
        /// Consecutive failures when it was disabled.
        consecutive_failures: u32,
        /// Failed recovery probes so far.
        recovery_attempts: u32,
    },
    /// Auto-disabled and every recovery probe failed: no longer probed; an
    /// admin must look.
    NeedsAttention {
        /// Why it was disabled.
        reason: String,
        /// Classified error kind.
        error_kind: String,
        /// Unix seconds it reached this state.
        since: u64,
        /// Failed recovery probes.
        recovery_attempts: u32,
    },
}

impl ChannelState {
    /// Every state's name, in lifecycle order.
    pub const NAMES: [&'static str; 5] =
        ["enabled", "manually_disabled", "cooling_down", "auto_disabled", "needs_attention"];

    /// The state's name, as in `{"state": ...}`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::ManuallyDisabled { .. } => "manually_disabled",
            Self::CoolingDown { .. } => "cooling_down",
            Self::AutoDisabled { .. } => "auto_disabled",
            Self::NeedsAttention { .. } => "needs_attention",
        }
    }

    /// Whether the channel may take traffic at `now_ms`.
    pub fn routable(&self, now_ms: u64) -> bool {
        match self {
            Self::Enabled => true,
            Self::CoolingDown { until_ms, .. } => *until_ms <= now_ms,
            _ => false,
        }
    }
}

/// Who caused a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// The relay, from a classified upstream error or a success.
    Auto,
    /// An admin, through the API.
    Manual,
    /// The recovery tester or an admin-triggered test.
    Probe,
    /// A cool-down ended.
    Timer,
    /// A store migration.
    Migration,
}

/// One transition in a channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// State before.
    pub from: String,
    /// State after.
    pub to: String,
    /// Who caused it.
    pub source: EventSource,
    /// Why.
    pub reason: String,
}

/// Health of one key of a multi-key channel, when it is not simply on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAuto {
    /// Why the key was disabled automatically.
    pub reason: String,
    /// Classified error kind.
    pub error_kind: String,
    /// Unix seconds.
    pub at: u64,
    /// Failed recovery probes of this key.
    pub recovery_attempts: u32,
}
