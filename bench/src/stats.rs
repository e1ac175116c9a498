//! Percentiles of latency samples.

use std::time::Duration;

/// Percentiles of one series, raw and formatted.
pub struct Summary {
    pub p50: String,
    pub p90: String,
    pub p99: String,
    pub mean: String,
    pub p50_raw: Duration,
    pub p90_raw: Duration,
    pub p99_raw: Duration,
    pub mean_raw: Duration,
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
        let (p50, p90, p99) = (pct(&sorted, 0.5), pct(&sorted, 0.9), pct(&sorted, 0.99));
        Self {
            p50: us(p50),
            p90: us(p90),
            p99: us(p99),
            mean: us(mean),
            p50_raw: p50,
            p90_raw: p90,
            p99_raw: p99,
            mean_raw: mean,
        }
    }
}
