//! Percentiles of latency samples.

use std::time::Duration;

/// Percentiles of one series.
pub struct Summary {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
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

/// `a - b`, signed, in µs.
pub fn diff(a: Duration, b: Duration) -> String {
    let v = a.as_secs_f64() * 1e6 - b.as_secs_f64() * 1e6;
    format!("{v:+.1} µs")
}

impl Summary {
    /// Summarise `samples`.
    pub fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let mean =
            if sorted.is_empty() { Duration::ZERO } else { sorted.iter().sum::<Duration>() / sorted.len() as u32 };
        Self { p50: pct(&sorted, 0.5), p90: pct(&sorted, 0.9), p99: pct(&sorted, 0.99), mean }
    }

    /// `p50 | p90 | p99 | mean` as table cells.
    pub fn cells(&self) -> String {
        format!("{} | {} | {} | {}", us(self.p50), us(self.p90), us(self.p99), us(self.mean))
    }
}
