//! Live per-channel statistics fed to routing policies: EWMA latency and
//! time to first token, recent error rate, requests in flight, consecutive
//! failures. In memory only: they describe the last minutes, not history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Weight of the newest sample in the latency averages.
const LATENCY_ALPHA: f64 = 0.2;
/// Weight of the newest outcome in the error rate (≈ the last 20 requests).
const ERROR_ALPHA: f64 = 0.05;

#[derive(Debug, Default, Clone, Copy)]
struct Averages {
    latency_ms: f64,
    ttft_ms: f64,
    error_rate: f64,
    consecutive_failures: u32,
}

fn ewma(old: f64, sample: f64, alpha: f64) -> f64 {
    if old == 0.0 { sample } else { old + alpha * (sample - old) }
}

/// Statistics of one channel.
#[derive(Debug, Default)]
pub struct ChannelStats {
    averages: Mutex<Averages>,
    in_flight: AtomicU32,
}

/// A copy of one channel's statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StatsView {
    /// EWMA latency of successful requests, ms (0 = unknown).
    pub latency_ms: f64,
    /// EWMA time to first token of streams, ms (0 = unknown).
    pub ttft_ms: f64,
    /// EWMA of failures among recent attempts, 0–1.
    pub error_rate: f64,
    /// Attempts in flight.
    pub in_flight: u32,
    /// Failures since the last success.
    pub consecutive_failures: u32,
}

impl ChannelStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Averages> {
        self.averages.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A success after `latency` (whole response, or first token of a
    /// stream, whose time to first token is also `ttft`).
    pub fn success(&self, latency: Duration, ttft: Option<Duration>) {
        let mut a = self.lock();
        a.latency_ms = ewma(a.latency_ms, latency.as_secs_f64() * 1e3, LATENCY_ALPHA);
        if let Some(t) = ttft {
            a.ttft_ms = ewma(a.ttft_ms, t.as_secs_f64() * 1e3, LATENCY_ALPHA);
        }
        a.error_rate *= 1.0 - ERROR_ALPHA;
        a.consecutive_failures = 0;
    }

    /// A failure the channel is responsible for.
    pub fn failure(&self) {
        let mut a = self.lock();
        a.error_rate = a.error_rate * (1.0 - ERROR_ALPHA) + ERROR_ALPHA;
        a.consecutive_failures = a.consecutive_failures.saturating_add(1);
    }

    /// Count an attempt in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A copy of the current values.
    pub fn view(&self) -> StatsView {
        let a = *self.lock();
        StatsView {
            latency_ms: a.latency_ms,
            ttft_ms: a.ttft_ms,
            error_rate: a.error_rate,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            consecutive_failures: a.consecutive_failures,
        }
    }
}

/// Holds one in-flight count; streams keep it until they end.
#[derive(Debug)]
pub struct InFlight(Arc<ChannelStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Statistics of every channel, by id.
#[derive(Debug, Default)]
pub struct StatsBook {
    channels: RwLock<HashMap<u64, Arc<ChannelStats>>>,
}

impl StatsBook {
    /// The statistics of channel `id`, created on first use.
    pub fn of(&self, id: u64) -> Arc<ChannelStats> {
        if let Some(s) = self.channels.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id) {
            return s.clone();
        }
        let mut map = self.channels.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(id).or_default().clone()
    }

    /// A copy of channel `id`'s statistics (zeros when it has none).
    pub fn view(&self, id: u64) -> StatsView {
        self.channels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .map(|s| s.view())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_follow_samples_and_failures_reset_on_success() {
        let s = Arc::new(ChannelStats::default());
        s.success(Duration::from_millis(100), None);
        assert_eq!(s.view().latency_ms, 100.0);
        s.success(Duration::from_millis(200), Some(Duration::from_millis(50)));
        let v = s.view();
        assert!((v.latency_ms - 120.0).abs() < 1e-9, "{v:?}");
        assert_eq!(v.ttft_ms, 50.0);
        s.failure();
        s.failure();
        assert_eq!(s.view().consecutive_failures, 2);
        assert!(s.view().error_rate > 0.09);
        {
            let _a = s.start();
            let _b = s.start();
            assert_eq!(s.view().in_flight, 2);
        }
        assert_eq!(s.view().in_flight, 0);
        s.success(Duration::from_millis(100), None);
        assert_eq!(s.view().consecutive_failures, 0);
    }
}
