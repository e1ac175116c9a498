//! Per-token rate limits: requests per minute, tokens per minute (the
//! estimate at admission, corrected at settlement) and requests in flight,
//! each over a sliding 60 s window kept in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Window {
    /// (when, tokens) of recent admissions and corrections.
    events: VecDeque<(Instant, i64)>,
    requests: VecDeque<Instant>,
    in_flight: u32,
}

/// Which limit refused a request, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// `rpm`, `tpm` or `concurrency`.
    pub limit: &'static str,
    /// Seconds until it may pass.
    pub retry_after: u32,
}

/// The limits of one token.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenLimits {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests in flight.
    pub concurrency: Option<u32>,
}

/// Windows of every token.
#[derive(Default)]
pub struct Limiter {
    windows: Mutex<HashMap<u64, Window>>,
}

fn secs_until(t: Instant, now: Instant) -> u32 {
    (WINDOW.saturating_sub(now.duration_since(t)).as_secs_f64().ceil() as u32).max(1)
}

impl Limiter {
    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Window>> {
        self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admit one request of about `tokens` tokens for `token`.
    pub fn admit(self: &Arc<Self>, token: u64, limits: TokenLimits, tokens: u64) -> Result<InFlightGuard, Limited> {
        let now = Instant::now();
        let mut all = self.windows();
        let w = all.entry(token).or_default();
        while w.requests.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            w.requests.pop_front();
        }
        while w.events.front().is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW) {
            w.events.pop_front();
        }
        if limits.concurrency.is_some_and(|max| w.in_flight >= max) {
            return Err(Limited { limit: "concurrency", retry_after: 1 });
        }
        if limits.rpm.is_some_and(|rpm| w.requests.len() >= rpm as usize) {
            let oldest = w.requests.front().copied().unwrap_or(now);
            return Err(Limited { limit: "rpm", retry_after: secs_until(oldest, now) });
        }
        let used: i64 = w.events.iter().map(|(_, n)| n).sum();
        if limits.tpm.is_some_and(|tpm| used.max(0) as u64 + tokens > tpm) {
            let oldest = w.events.front().map_or(now, |(t, _)| *t);
            return Err(Limited { limit: "tpm", retry_after: secs_until(oldest, now) });
        }
        w.requests.push_back(now);
        w.events.push_back((now, tokens as i64));
        w.in_flight += 1;
        Ok(InFlightGuard { limiter: self.clone(), token })
    }

    /// Correct the token count of an admitted request by `delta`.
    pub fn correct(&self, token: u64, delta: i64) {
        if delta != 0
            && let Some(w) = self.windows().get_mut(&token)
        {
            w.events.push_back((Instant::now(), delta));
        }
    }
}

/// Holds one in-flight slot of a token until dropped.
pub struct InFlightGuard {
    limiter: Arc<Limiter>,
    token: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(w) = self.limiter.windows().get_mut(&self.token) {
            w.in_flight = w.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_tpm_and_concurrency() {
        let l = Arc::new(Limiter::default());
        let rpm = TokenLimits { rpm: Some(2), ..TokenLimits::default() };
        let _a = l.admit(1, rpm, 1).expect("1st");
        let _b = l.admit(1, rpm, 1).expect("2nd");
        assert_eq!(l.admit(1, rpm, 1).err().map(|e| e.limit), Some("rpm"));
        let tpm = TokenLimits { tpm: Some(100), ..TokenLimits::default() };
        let _c = l.admit(2, tpm, 60).expect("60 of 100");
        assert_eq!(l.admit(2, tpm, 60).err().map(|e| e.limit), Some("tpm"));
        l.correct(2, -40);
        let _d = l.admit(2, tpm, 60).expect("corrected down to 20 + 60");
        let one = TokenLimits { concurrency: Some(1), ..TokenLimits::default() };
        let held = l.admit(3, one, 0).expect("first");
        assert_eq!(l.admit(3, one, 0).err().map(|e| e.limit), Some("concurrency"));
        drop(held);
        assert!(l.admit(3, one, 0).is_ok());
    }
}
