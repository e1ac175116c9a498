//! Rate limits per token (and, for requests in flight, per user): requests
//! per minute, tokens per minute (the estimate at admission, corrected at
//! settlement), requests in flight and open streams.
//!
//! The minute is a sliding window of sixty one-second buckets with running
//! totals, so an admission costs the same however busy the token is (a
//! window of timestamps summed per request grew quadratic under load). A
//! bucket expires as a whole, so the window is between 59 and 60 s long. A
//! token with no limits is not tracked at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Buckets in the window, one per second.
const SLOTS: usize = 60;

/// One token's last minute.
pub(super) struct Window {
    /// Second (since the limiter started) of the newest bucket.
    head: u64,
    requests: [u32; SLOTS],
    tokens: [i64; SLOTS],
    total_requests: u64,
    total_tokens: i64,
    in_flight: u32,
    streams: u32,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            head: 0,
            requests: [0; SLOTS],
            tokens: [0; SLOTS],
            total_requests: 0,
            total_tokens: 0,
            in_flight: 0,
            streams: 0,
        }
    }
}

impl Window {
    /// Move the window so that `now` is its newest second, expiring the
    /// buckets that fall out of it.
    pub(super) fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        for second in self.head + 1..=now.min(self.head.saturating_add(SLOTS as u64)) {
            let i = (second % SLOTS as u64) as usize;
            self.total_requests = self.total_requests.saturating_sub(u64::from(self.requests[i]));
            self.total_tokens = self.total_tokens.saturating_sub(self.tokens[i]);
            self.requests[i] = 0;
            self.tokens[i] = 0;
        }
        self.head = now;
    }

    pub(super) fn add(&mut self, now: u64, requests: u32, tokens: i64) {
        let i = (now % SLOTS as u64) as usize;
        self.requests[i] = self.requests[i].saturating_add(requests);
        self.tokens[i] = self.tokens[i].saturating_add(tokens);
        self.total_requests = self.total_requests.saturating_add(u64::from(requests));
        self.total_tokens = self.total_tokens.saturating_add(tokens);
    }

    /// Whether one more request of `tokens` tokens fits the `rpm` and `tpm`
    /// limits (call after [`Self::advance`]).
    pub(super) fn check_rates(&self, rpm: Option<u32>, tpm: Option<u64>, tokens: u64) -> Result<(), Limited> {
        if rpm.is_some_and(|rpm| self.total_requests >= u64::from(rpm)) {
            return Err(Limited { limit: "rpm", retry_after: self.retry_after(|i| self.requests[i] > 0) });
        }
        if tpm.is_some_and(|tpm| (self.total_tokens.max(0) as u64).saturating_add(tokens) > tpm) {
            return Err(Limited { limit: "tpm", retry_after: self.retry_after(|i| self.tokens[i] > 0) });
        }
        Ok(())
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

/// A window's buckets as the shared database keeps them (JSON; the
/// totals are recomputed when read).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct StoredWindow {
    head: u64,
    requests: Vec<u32>,
    tokens: Vec<i64>,
}

impl From<StoredWindow> for Window {
    fn from(s: StoredWindow) -> Self {
        let mut w = Window { head: s.head, ..Window::default() };
        for (i, (r, t)) in s.requests.iter().zip(&s.tokens).take(SLOTS).enumerate() {
            w.requests[i] = *r;
            w.tokens[i] = *t;
            w.total_requests = w.total_requests.saturating_add(u64::from(*r));
            w.total_tokens = w.total_tokens.saturating_add(*t);
        }
        w
    }
}

impl From<&Window> for StoredWindow {
    fn from(w: &Window) -> Self {
        Self { head: w.head, requests: w.requests.to_vec(), tokens: w.tokens.to_vec() }
    }
}

/// Which limit refused a request, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// `rpm`, `tpm`, `concurrency` or `streams`.
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
    /// Streams open.
    pub streams: Option<u32>,
}

impl TokenLimits {
    fn any(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some() || self.concurrency.is_some() || self.streams.is_some()
    }
}

/// Whose limits a window tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A token created through the API, by id.
    Token(u64),
    /// A token from the configuration file, by position.
    ConfigToken(usize),
    /// A user (requests in flight over all their tokens).
    User(u64),
}

impl Subject {
    fn key(self) -> u64 {
        match self {
            Self::Token(id) => id & !(3 << 62),
            Self::ConfigToken(i) => (1 << 62) | (i as u64 & !(3 << 62)),
            Self::User(id) => (2 << 62) | (id & !(3 << 62)),
        }
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

    /// Admit one request of about `tokens` tokens (a stream when `stream`)
    /// for `subject`.
    pub fn admit(
        self: &Arc<Self>,
        subject: Subject,
        limits: TokenLimits,
        tokens: u64,
        stream: bool,
    ) -> Result<InFlightGuard, Limited> {
        let token = subject.key();
        if !limits.any() {
            return Ok(InFlightGuard { limiter: None, token, stream });
        }
        let now = self.second();
        let mut all = self.windows();
        let w = all.entry(token).or_default();
        w.advance(now);
        if limits.concurrency.is_some_and(|max| w.in_flight >= max) {
            return Err(Limited { limit: "concurrency", retry_after: 1 });
        }
        if stream && limits.streams.is_some_and(|max| w.streams >= max) {
            return Err(Limited { limit: "streams", retry_after: 1 });
        }
        w.check_rates(limits.rpm, limits.tpm, tokens)?;
        w.add(now, 1, i64::try_from(tokens).unwrap_or(i64::MAX));
        w.in_flight += 1;
        w.streams += u32::from(stream);
        Ok(InFlightGuard { limiter: Some(self.clone()), token, stream })
    }

    /// Correct the token count of an admitted request of `subject` by `delta`.
    pub fn correct(&self, subject: Subject, delta: i64) {
        if delta == 0 {
            return;
        }
        let now = self.second();
        if let Some(w) = self.windows().get_mut(&subject.key()) {
            w.advance(now);
            w.add(now, 0, delta);
        }
    }
}

/// Holds one in-flight slot (and stream slot) of a subject until dropped.
pub struct InFlightGuard {
    /// `None` for a subject without limits (nothing is tracked).
    limiter: Option<Arc<Limiter>>,
    token: u64,
    stream: bool,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(limiter) = &self.limiter
            && let Some(w) = limiter.windows().get_mut(&self.token)
        {
            w.in_flight = w.in_flight.saturating_sub(1);
            w.streams = w.streams.saturating_sub(u32::from(self.stream));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_tpm_and_concurrency() {
        let l = Arc::new(Limiter::default());
        let t = Subject::Token;
        let rpm = TokenLimits { rpm: Some(2), ..TokenLimits::default() };
        let _a = l.admit(t(1), rpm, 1, false).expect("1st");
        let _b = l.admit(t(1), rpm, 1, false).expect("2nd");
        assert_eq!(l.admit(t(1), rpm, 1, false).err().map(|e| e.limit), Some("rpm"));
        let tpm = TokenLimits { tpm: Some(100), ..TokenLimits::default() };
        let _c = l.admit(t(2), tpm, 60, false).expect("60 of 100");
        assert_eq!(l.admit(t(2), tpm, 60, false).err().map(|e| e.limit), Some("tpm"));
        l.correct(t(2), -40);
        let _d = l.admit(t(2), tpm, 60, false).expect("corrected down to 20 + 60");
        let one = TokenLimits { concurrency: Some(1), ..TokenLimits::default() };
        let held = l.admit(t(3), one, 0, false).expect("first");
        assert_eq!(l.admit(t(3), one, 0, false).err().map(|e| e.limit), Some("concurrency"));
        assert!(l.admit(Subject::User(3), one, 0, false).is_ok(), "users and tokens are separate subjects");
        drop(held);
        assert!(l.admit(t(3), one, 0, false).is_ok());
        let streams = TokenLimits { streams: Some(1), ..TokenLimits::default() };
        let s = l.admit(t(4), streams, 0, true).expect("a stream");
        assert!(l.admit(t(4), streams, 0, false).is_ok(), "non-streamed requests are not streams");
        assert_eq!(l.admit(t(4), streams, 0, true).err().map(|e| e.limit), Some("streams"));
        drop(s);
        assert!(l.admit(t(4), streams, 0, true).is_ok());
        assert!(l.admit(t(u64::MAX), tpm, u64::MAX, false).is_err(), "huge estimates do not wrap");
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
        let _g = l.admit(Subject::Token(9), TokenLimits::default(), 1_000, false).expect("always");
        l.correct(Subject::Token(9), 5);
        assert!(l.windows().is_empty());
    }
}
