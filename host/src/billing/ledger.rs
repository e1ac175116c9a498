//! The in-memory ledger: every user's and token's balance, what is reserved
//! by requests in flight, and what was charged. Admission reserves the
//! estimate under one lock, so a user whose quota covers ten requests gets
//! at most ten through however many arrive at once; settlement swaps the
//! reservation for the real charge. The billing writer makes the same
//! changes durable, together with the log rows (see `writer`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::accounts::AccountSet;

/// One account's money.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    /// Remaining quota.
    pub balance: i64,
    /// Held by requests in flight.
    pub reserved: i64,
    /// Charged so far.
    pub used: i64,
    /// Requests charged.
    pub requests: u64,
}

impl Balance {
    /// What no request holds: the balance less what is reserved.
    pub fn unreserved(&self) -> i64 {
        self.balance.saturating_sub(self.reserved)
    }
}

#[derive(Default)]
struct Books {
    users: HashMap<u64, Balance>,
    tokens: HashMap<u64, Balance>,
}

/// `(account id, amount)` pairs.
pub type Amounts = Vec<(u64, i64)>;

/// Whose quota is short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// The user's.
    User,
    /// The token's own limit.
    Token,
}

/// Balances of every account.
#[derive(Default)]
pub struct Ledger {
    books: Mutex<Books>,
}

impl Ledger {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Start from the stored balances.
    pub fn load(accounts: &AccountSet) -> Self {
        let ledger = Self::default();
        {
            let mut b = ledger.books();
            for u in accounts.users.values() {
                b.users.insert(
                    u.id,
                    Balance { balance: u.quota, reserved: 0, used: u.used_quota, requests: u.request_count },
                );
            }
            for t in accounts.tokens.values() {
                b.tokens
                    .insert(t.id, Balance { balance: t.remain_quota, reserved: 0, used: t.used_quota, requests: 0 });
            }
        }
        ledger
    }

    /// A new user's opening balance.
    pub fn open_user(&self, id: u64, quota: i64) {
        self.books().users.insert(id, Balance { balance: quota, ..Balance::default() });
    }

    /// A new token's opening balance.
    pub fn open_token(&self, id: u64, quota: i64) {
        self.books().tokens.insert(id, Balance { balance: quota, ..Balance::default() });
    }

    /// Forget a deleted account.
    pub fn close(&self, user: Option<u64>, token: Option<u64>) {
        let mut b = self.books();
        if let Some(u) = user {
            b.users.remove(&u);
        }
        if let Some(t) = token {
            b.tokens.remove(&t);
        }
    }

    /// A user's balance.
    pub fn user(&self, id: u64) -> Balance {
        self.books().users.get(&id).copied().unwrap_or_default()
    }

    /// A token's balance.
    pub fn token(&self, id: u64) -> Balance {
        self.books().tokens.get(&id).copied().unwrap_or_default()
    }

    /// Whether the user (and, when `token_limited`, the token) has any
    /// quota left: checked before anything costly is done for a request.
    pub fn has_quota(&self, user: u64, token: Option<u64>, token_limited: bool) -> Result<(), Short> {
        let b = self.books();
        let left = |bal: Option<&Balance>| bal.is_some_and(|x| x.unreserved() > 0);
        if !left(b.users.get(&user)) {
            return Err(Short::User);
        }
        if token_limited && token.is_some() && !left(token.and_then(|t| b.tokens.get(&t))) {
            return Err(Short::Token);
        }
        Ok(())
    }

    /// Reserve `amount` from the user and (when `token_limited`) the token.
    /// Free requests (amount 0) always pass.
    pub fn reserve(
        self: &Arc<Self>,
        user: u64,
        token: Option<u64>,
        token_limited: bool,
        amount: i64,
    ) -> Result<Reservation, Short> {
        // A hold is never negative: a negative one would saturate the sum of
        // holds and never release exactly (found by the ledger property).
        let amount = amount.max(0);
        let mut b = self.books();
        let fits = |bal: Option<&Balance>| bal.is_some_and(|x| amount <= 0 || x.unreserved() >= amount);
        if !fits(b.users.get(&user)) {
            return Err(Short::User);
        }
        let token_limited = token_limited && token.is_some();
        if token_limited && !fits(token.and_then(|t| b.tokens.get(&t))) {
            return Err(Short::Token);
        }
        if let Some(u) = b.users.get_mut(&user) {
            u.reserved = u.reserved.saturating_add(amount);
        }
        if token_limited && let Some(t) = token.and_then(|t| b.tokens.get_mut(&t)) {
            t.reserved = t.reserved.saturating_add(amount);
        }
        Ok(Reservation { ledger: self.clone(), user, token, token_limited, amount, open: true })
    }

    /// Quota leased from the shared database: add each `(id, amount)` to
    /// that user's or token's balance (opening it).
    pub fn grant(&self, user: Option<(u64, i64)>, token: Option<(u64, i64)>) {
        let mut b = self.books();
        if let Some((id, amount)) = user {
            let u = b.users.entry(id).or_default();
            u.balance = u.balance.saturating_add(amount);
        }
        if let Some((id, amount)) = token {
            let t = b.tokens.entry(id).or_default();
            t.balance = t.balance.saturating_add(amount);
        }
    }

    /// Take back what no request holds of every idle lease: the users' and
    /// tokens' unreserved balances, for which `idle` says yes, leaving their
    /// balances at what is reserved. Returns `(users, tokens)` with the
    /// amounts taken (negative: a debt charged past the lease).
    pub fn take_unreserved(&self, idle: impl Fn(bool, u64) -> bool) -> (Amounts, Amounts) {
        let mut b = self.books();
        let take = |map: &mut HashMap<u64, Balance>, is_user: bool| {
            let mut taken = Vec::new();
            for (id, bal) in map.iter_mut() {
                let spare = bal.unreserved();
                if spare != 0 && idle(is_user, *id) {
                    bal.balance = bal.reserved;
                    taken.push((*id, spare));
                }
            }
            taken
        };
        let users = take(&mut b.users, true);
        let tokens = take(&mut b.tokens, false);
        (users, tokens)
    }

    /// Change balances by `delta` (admin top-ups and corrections).
    pub fn adjust(&self, user: Option<u64>, token: Option<u64>, delta: i64) {
        let mut b = self.books();
        if let Some(u) = user.and_then(|u| b.users.get_mut(&u)) {
            u.balance = u.balance.saturating_add(delta);
        }
        if let Some(t) = token.and_then(|t| b.tokens.get_mut(&t)) {
            t.balance = t.balance.saturating_add(delta);
        }
    }
}

/// Quota held for one request; released if dropped unsettled.
pub struct Reservation {
    ledger: Arc<Ledger>,
    user: u64,
    token: Option<u64>,
    token_limited: bool,
    amount: i64,
    open: bool,
}

impl Reservation {
    /// Replace the hold by the real `charge`.
    pub fn settle(mut self, charge: i64) {
        let mut b = self.ledger.books();
        if let Some(u) = b.users.get_mut(&self.user) {
            u.reserved = u.reserved.saturating_sub(self.amount);
            u.balance = u.balance.saturating_sub(charge);
            u.used = u.used.saturating_add(charge);
            u.requests = u.requests.saturating_add(1);
        }
        if let Some(t) = self.token.and_then(|t| b.tokens.get_mut(&t)) {
            if self.token_limited {
                t.reserved = t.reserved.saturating_sub(self.amount);
                t.balance = t.balance.saturating_sub(charge);
            }
            t.used = t.used.saturating_add(charge);
            t.requests = t.requests.saturating_add(1);
        }
        self.open = false;
    }

    /// Whether the token's own balance is charged.
    pub fn token_limited(&self) -> bool {
        self.token_limited
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let mut b = self.ledger.books();
        if let Some(u) = b.users.get_mut(&self.user) {
            u.reserved = u.reserved.saturating_sub(self.amount);
        }
        if self.token_limited
            && let Some(t) = self.token.and_then(|t| b.tokens.get_mut(&t))
        {
            t.reserved = t.reserved.saturating_sub(self.amount);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_bound_concurrent_spending_and_release_on_drop() {
        let ledger = Arc::new(Ledger::default());
        ledger.open_user(1, 100);
        let held: Vec<Reservation> = (0..10).filter_map(|_| ledger.reserve(1, None, false, 30).ok()).collect();
        assert_eq!(held.len(), 3, "100 covers three holds of 30");
        drop(held);
        assert_eq!(ledger.user(1).reserved, 0);
        let r = ledger.reserve(1, None, false, 30).expect("fits again");
        r.settle(20);
        assert_eq!(ledger.user(1), Balance { balance: 80, reserved: 0, used: 20, requests: 1 });
        ledger.open_token(7, 10);
        assert_eq!(ledger.reserve(1, Some(7), true, 30).err(), Some(Short::Token));
        ledger.adjust(Some(1), None, -80);
        assert_eq!(ledger.reserve(1, None, false, 0).map(|r| r.amount).ok(), Some(0), "free requests pass at 0");
        assert_eq!(ledger.reserve(1, None, false, 1).err(), Some(Short::User));
    }
}
