//! Per-token rate limits: requests per minute, tokens per minute (the
//! estimate at admission, corrected at settlement) and requests in flight.
//!
//! The minute is a sliding window of sixty one-second buckets with running
//! totals, so an admission costs the same however busy the token is (a
//! window of timestamps summed per request grew quadratic under load). A
//! bucket expires as a whole, so the window is between 59 and 60 s long. A
//! token with no limits is not tracked at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Buckets in the window, one per second.
const SLOTS: usize = 60;

/// One token's last minute.
struct Window {
    /// Second (since the limiter started) of the newest bucket.
    head: u64,
    requests: [u32; SLOTS],
    tokens: [i64; SLOTS],
    total_requests: u64,
    total_tokens: i64,
    in_flight: u32,
}

impl Default for Window {
    fn default() -> Self {
        Self { head: 0, requests: [0; SLOTS], tokens: [0; SLOTS], total_requests: 0, total_tokens: 0, in_flight: 0 }
    }
}

impl Window {
    /// Move the window so that `now` is its newest second, expiring the
    /// buckets that fall out of it.
    fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        for second in self.head + 1..=now.min(self.head + SLOTS as u64) {
            let i = (second % SLOTS as u64) as usize;
            self.total_requests -= u64::from(self.requests[i]);
            self.total_tokens -= self.tokens[i];
            self.requests[i] = 0;
            self.tokens[i] = 0;
        }
        self.head = now;
    }

    fn add(&mut self, now: u64, requests: u32, tokens: i64) {
        let i = (now % SLOTS as u64) as usize;
        self.requests[i] += requests;
        self.tokens[i] += tokens;
        self.total_requests += u64::from(requests);
        self.total_tokens += tokens;
    }

    /// Seconds until the oldest bucket for which `used` holds expires (a
    /// bucket of second `s` leaves the window at `s + 60`).
    fn retry_after(&self, used: impl Fn(usize) -> bool) -> u32 {
        let oldest = (0..SLOTS as u64)
            .rev()
            .filter(|age| *age <= self.head)
            .find(|age| used(((self.head - age) % SLOTS as u64) as usize));
        oldest.map_or(1, |age| (SLOTS as u64 - age) as u32)
    }
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

impl TokenLimits {
    fn any(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some() || self.concurrency.is_some()
    }
}

/// Windows of every token.
pub struct Limiter {
    epoch: Instant,
    windows: Mutex<HashMap<u64, Window>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self { epoch: Instant::now(), windows: Mutex::default() }
    }
}

impl Limiter {
    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Window>> {
        self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn second(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Admit one request of about `tokens` tokens for `token`.
    pub fn admit(self: &Arc<Self>, token: u64, limits: TokenLimits, tokens: u64) -> Result<InFlightGuard, Limited> {
        if !limits.any() {
            return Ok(InFlightGuard { limiter: None, token });
        }
        let now = self.second();
        let mut all = self.windows();
        let w = all.entry(token).or_default();
        w.advance(now);
        if limits.concurrency.is_some_and(|max| w.in_flight >= max) {
            return Err(Limited { limit: "concurrency", retry_after: 1 });
        }
        if limits.rpm.is_some_and(|rpm| w.total_requests >= u64::from(rpm)) {
            return Err(Limited { limit: "rpm", retry_after: w.retry_after(|i| w.requests[i] > 0) });
        }
        if limits.tpm.is_some_and(|tpm| w.total_tokens.max(0) as u64 + tokens > tpm) {
            return Err(Limited { limit: "tpm", retry_after: w.retry_after(|i| w.tokens[i] > 0) });
        }
        w.add(now, 1, tokens as i64);
        w.in_flight += 1;
        Ok(InFlightGuard { limiter: Some(self.clone()), token })
    }

    /// Correct the token count of an admitted request by `delta`.
    pub fn correct(&self, token: u64, delta: i64) {
        if delta == 0 {
            return;
        }
        let now = self.second();
        if let Some(w) = self.windows().get_mut(&token) {
            w.advance(now);
            w.add(now, 0, delta);
        }
    }
}

/// Holds one in-flight slot of a token until dropped.
pub struct InFlightGuard {
    /// `None` for a token without limits (nothing is tracked).
    limiter: Option<Arc<Limiter>>,
    token: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(limiter) = &self.limiter
            && let Some(w) = limiter.windows().get_mut(&self.token)
        {
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

    #[test]
    fn buckets_expire_after_a_minute_and_say_when() {
        let mut w = Window::default();
        w.advance(10);
        w.add(10, 1, 5);
        w.advance(30);
        w.add(30, 2, 7);
        assert_eq!((w.total_requests, w.total_tokens), (3, 12));
        assert_eq!(w.retry_after(|i| w.requests[i] > 0), 40, "the second-10 bucket leaves at 70");
        w.advance(70);
        assert_eq!((w.total_requests, w.total_tokens), (2, 7), "second 10 expired");
        w.advance(500);
        assert_eq!((w.total_requests, w.total_tokens), (0, 0), "a long gap clears everything");
        assert_eq!(w.retry_after(|i| w.requests[i] > 0), 1);
    }

    #[test]
    fn tokens_without_limits_are_not_tracked() {
        let l = Arc::new(Limiter::default());
        let _g = l.admit(9, TokenLimits::default(), 1_000).expect("always");
        l.correct(9, 5);
        assert!(l.windows().is_empty());
    }
}
