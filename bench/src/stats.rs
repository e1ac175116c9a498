//! Percentiles of latency samples.

use std::time::Duration;

/// Percentiles of one series.
pub struct Summary {
    /// Median.
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Mean.
    pub mean: Duration,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Format a duration in µs.
pub fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

impl Summary {
    /// Summarise `samples`.
    pub fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let mean =
            if sorted.is_empty() { Duration::ZERO } else { sorted.iter().sum::<Duration>() / sorted.len() as u32 };
        Self { p50: pct(&sorted, 0.5), p95: pct(&sorted, 0.95), p99: pct(&sorted, 0.99), mean }
    }
}
