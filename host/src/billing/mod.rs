//! The business side: users and tokens ([`accounts`]), prices
//! ([`pricing`]), admission (token rules, rate limits, a quota pre-charge
//! held in the [`ledger`]), settlement to the real usage, and usage logs
//! written in batches by the [`writer`] together with the charges.
//!
//! A request's life: [`Billing::admit`] checks the token's model allowlist,
//! prices the model, counts the prompt with tiktoken, applies the token's
//! RPM/TPM/concurrency limits and reserves the estimate (prompt +
//! `max_tokens`, or a default) from the user and the token → the relay
//! tries channels, each failed attempt logged as an `error` row with quota
//! 0 → the attempt that served settles the [`Meter`]: the real usage from
//! the adapter (or a local count, marked `estimated`) is charged, the rest
//! of the reservation released, and one `consume` row logged. A stream is
//! settled when it ends, or — if the client goes away — for what was
//! delivered.

pub mod accounts;
pub mod journal;
pub mod ledger;
pub mod limits;
pub mod logs;
pub mod pricing;
pub mod tokenize;
pub mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::config::LogConfig;
use crate::error::ApiError;
use crate::plugins::{Endpoint, Usage};
use crate::relay::ClientRequest;
use crate::store::{Store, unix_now_ms};
use accounts::{Accounts, TokenRecord};
use journal::{Change, Journal};
use ledger::{Ledger, Reservation};
use limits::{InFlightGuard, Limiter, TokenLimits};
use logs::{LogKind, LogRow};
use pricing::{Price, Pricing, PricingConfig};
use writer::{BatchLimits, Trees, Writer};

/// Who is calling `/v1`: set by the auth middleware.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's group (which channels serve it, which group ratio applies).
    pub group: Arc<str>,
    /// The user and token, for tokens created through the API; `None` for
    /// tokens from the configuration file (logged, never charged).
    pub account: Option<Account>,
}

/// A user's token, as the request carries it.
#[derive(Debug, Clone)]
pub struct Account {
    /// Owner.
    pub user_id: u64,
    /// The token.
    pub token: Arc<TokenRecord>,
}

/// Everything billing needs.
pub struct Billing {
    /// Users and tokens.
    pub accounts: Accounts,
    /// Balances and reservations.
    pub ledger: Arc<Ledger>,
    /// Per-token rate limits.
    pub limiter: Arc<Limiter>,
    /// Prices.
    pub pricing: Pricing,
    /// The log and charge writer.
    pub writer: Writer,
    /// The `logs` tree.
    pub logs: sled::Tree,
    store: Store,
    log_config: LogConfig,
}

fn insufficient_quota() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "insufficient_quota",
        Some("insufficient_quota"),
        "You exceeded your current quota, please check your plan and billing details.",
    )
}

impl Billing {
    /// Apply what a crash left in the journal, open the accounts, load
    /// prices and start the writer.
    pub fn open(store: &Store, pricing: &PricingConfig, log_config: &LogConfig) -> anyhow::Result<Self> {
        let trees = Trees {
            users: store.tree("users")?,
            tokens: store.tree("tokens")?,
            logs: store.tree("logs")?,
            state: store.tree("billing_state")?,
        };
        let (journal, pending) = Journal::open(store.dir(), trees.committed_seq()?)?;
        let (replayed, interrupted) = writer::recover(&trees, &journal, pending).map_err(anyhow::Error::msg)?;
        if replayed + interrupted > 0 {
            tracing::warn!(replayed, interrupted, "recovered usage records a crash left unwritten");
        }
        let accounts = Accounts::open(store)?;
        let ledger = Arc::new(Ledger::load(&accounts.snapshot()));
        let limits = BatchLimits {
            max_ops: log_config.batch_max.max(1),
            max_wait: Duration::from_millis(log_config.flush_interval_ms),
        };
        let logs = trees.logs.clone();
        let writer = Writer::spawn(trees, Arc::new(journal), limits)?;
        Ok(Self {
            accounts,
            ledger,
            limiter: Arc::default(),
            pricing: Pricing::load(pricing, store)?,
            writer,
            logs,
            store: store.clone(),
            log_config: log_config.clone(),
        })
    }

    /// Admit `req` for `caller`: model allowlist, price, rate limits and
    /// the quota pre-charge. The [`Meter`] bills the request.
    pub fn admit(self: &Arc<Self>, caller: &Caller, req: &ClientRequest, request_id: &str) -> Result<Meter, ApiError> {
        if let Some(acct) = &caller.account
            && !acct.token.models.is_empty()
            && !acct.token.models.iter().any(|m| m == &req.model)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("model_not_allowed"),
                format!("This API key is not allowed to use the model `{}`.", req.model),
            )
            .param("model"));
        }
        let pricing = self.pricing.table();
        let price = pricing.price(&req.model, &caller.group).ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("model_not_priced"),
                format!("The model `{}` has no price on this gateway; an administrator must set one.", req.model),
            )
            .param("model")
        })?;
        let generates = req.endpoint != Endpoint::Embeddings;
        let default_completion = u64::from(pricing.default_completion_tokens);
        let (prompt, completion) = tokenize::estimate(&req.model, &req.body, default_completion, generates);
        let estimate = price.quota(prompt, completion, 0) as i64;
        let mut meter = Meter {
            billing: self.clone(),
            caller: caller.clone(),
            request_id: request_id.to_string(),
            model: req.model.clone(),
            stream: req.stream,
            price,
            prompt_estimate: prompt,
            token_estimate: prompt + completion,
            started: Instant::now(),
            reservation: None,
            _in_flight: None,
            served: None,
        };
        if let Some(acct) = &caller.account {
            let t = &acct.token;
            let limits = TokenLimits { rpm: t.rpm, tpm: t.tpm, concurrency: t.concurrency };
            let guard = self.limiter.admit(t.id, limits, prompt + completion).map_err(|l| {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    if l.limit == "tpm" { "tokens" } else { "requests" },
                    Some("rate_limit_exceeded"),
                    format!("Rate limit reached for this API key ({}); retry in {} s.", l.limit, l.retry_after),
                );
                e.retry_after = Some(l.retry_after);
                e
            })?;
            meter._in_flight = Some(guard);
            let reservation =
                self.ledger.reserve(acct.user_id, Some(t.id), !t.unlimited_quota, estimate).map_err(|short| {
                    tracing::info!(user = acct.user_id, token = t.id, estimate, ?short, "insufficient quota");
                    insufficient_quota()
                })?;
            meter.reservation = Some(reservation);
        }
        Ok(meter)
    }

    /// Set the balance of a user or a token to `target`. It is recorded as
    /// an adjustment by the difference, so it composes with charges being
    /// written at the same moment. Returns the difference.
    pub fn set_balance(&self, user: Option<u64>, token: Option<u64>, target: i64) -> i64 {
        let current = match (user, token) {
            (Some(u), _) => self.ledger.user(u).balance,
            (None, Some(t)) => self.ledger.token(t).balance,
            (None, None) => return 0,
        };
        let delta = target - current;
        self.ledger.adjust(user, token, delta);
        self.writer.send(Change::Adjust { user, token, delta });
        delta
    }

    /// A row with a fresh id, or `None` (logged) when sled cannot give one.
    fn numbered(&self, mut row: LogRow) -> Option<Box<LogRow>> {
        match self.store.generate_id() {
            Ok(id) => row.id = id,
            Err(error) => {
                tracing::error!(%error, request_id = %row.request_id, "no id for a usage row; it is lost");
                return None;
            }
        }
        Some(Box::new(row))
    }

    fn queue(&self, row: LogRow) {
        if let Some(row) = self.numbered(row) {
            self.writer.send(Change::Row(row));
        }
    }

    /// Delete log rows older than the retention, if one is set.
    pub fn sweep_logs(&self) {
        if self.log_config.retention_secs == 0 {
            return;
        }
        let cutoff = unix_now_ms().saturating_sub(self.log_config.retention_secs * 1000);
        match logs::delete_before(&self.logs, cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "old usage logs deleted"),
            Err(error) => tracing::error!(%error, "deleting old usage logs failed"),
        }
    }

    /// The retention sweep interval.
    pub fn retention_interval(&self) -> Duration {
        Duration::from_secs(self.log_config.retention_interval_secs.max(1))
    }
}

/// Which channel and plugin an attempt went to.
#[derive(Debug, Clone, Default)]
pub struct AttemptInfo {
    /// Channel id.
    pub channel_id: u64,
    /// Upstream model name.
    pub upstream_model: String,
    /// Adapter plugin.
    pub plugin: String,
    /// Its SHA-256.
    pub plugin_sha256: String,
}

/// What the served attempt produced.
#[derive(Debug, Default)]
pub struct Delivery<'a> {
    /// Usage the adapter reported.
    pub usage: Option<Usage>,
    /// Generated text, to count locally when there is no usage.
    pub text: &'a str,
    /// Time to first token (streams).
    pub ttft: Option<Duration>,
    /// The client went away before the end.
    pub client_disconnected: bool,
}

/// Bills one request: holds its reservation and concurrency slot, logs
/// failed attempts, and settles once for the attempt that served. Dropped
/// unsettled (every attempt failed), it releases the reservation.
pub struct Meter {
    billing: Arc<Billing>,
    caller: Caller,
    request_id: String,
    model: String,
    stream: bool,
    price: Price,
    prompt_estimate: u64,
    token_estimate: u64,
    started: Instant,
    reservation: Option<Reservation>,
    _in_flight: Option<InFlightGuard>,
    served: Option<AttemptInfo>,
}

impl Meter {
    fn row(&self, kind: LogKind, attempt: &AttemptInfo, status: u16) -> LogRow {
        let account = self.caller.account.as_ref();
        LogRow {
            at_ms: unix_now_ms(),
            kind,
            request_id: self.request_id.clone(),
            user_id: account.map(|a| a.user_id),
            token_id: account.map(|a| a.token.id),
            token_name: account.map_or_else(|| "config".to_string(), |a| a.token.name.clone()),
            group: self.caller.group.to_string(),
            channel_id: attempt.channel_id,
            model: self.model.clone(),
            upstream_model: attempt.upstream_model.clone(),
            stream: self.stream,
            status,
            plugin: attempt.plugin.clone(),
            plugin_sha256: attempt.plugin_sha256.clone(),
            latency_ms: self.started.elapsed().as_millis() as u64,
            ..LogRow::default()
        }
    }

    /// Log a failed attempt (quota 0).
    pub fn attempt_failed(&self, attempt: &AttemptInfo, status: u16, error_kind: &str) {
        let mut row = self.row(LogKind::Error, attempt, status);
        row.error_kind = Some(error_kind.to_string());
        self.billing.queue(row);
    }

    /// Remember which attempt is serving (non-streamed: settled next).
    pub fn serving(&mut self, attempt: AttemptInfo) {
        self.served = Some(attempt);
    }

    /// A stream on `attempt` is about to reach the client: remember the
    /// attempt and journal what the stream is billed if the process dies
    /// before it settles — its prompt, marked `interrupted` (see
    /// `docs/billing.md`).
    pub fn stream_started(&mut self, attempt: AttemptInfo, ttft: Duration) {
        let mut row = self.consume_row(&attempt, (self.prompt_estimate, 0, 0), true);
        row.interrupted = true;
        row.ttft_ms = Some(ttft.as_millis() as u64);
        if let Some(row) = self.billing.numbered(row) {
            self.billing.writer.send(Change::Open(row));
        }
        self.served = Some(attempt);
    }

    /// The `consume` row charging `(prompt, completion, cached)` tokens.
    fn consume_row(
        &self,
        attempt: &AttemptInfo,
        (prompt, completion, cached): (u64, u64, u64),
        estimated: bool,
    ) -> LogRow {
        let mut row = self.row(LogKind::Consume, attempt, 200);
        row.prompt_tokens = prompt;
        row.completion_tokens = completion;
        row.cached_tokens = cached;
        row.quota = if self.caller.account.is_some() { self.price.quota(prompt, completion, cached) as i64 } else { 0 };
        row.token_limited = self.reservation.as_ref().is_some_and(Reservation::token_limited);
        row.estimated = estimated;
        row
    }

    /// Charge the real usage (or a local count) and log the `consume` row.
    pub fn settle(mut self, delivery: Delivery<'_>) {
        let attempt = self.served.take().unwrap_or_default();
        let (tokens, estimated) = match delivery.usage {
            Some(u) => {
                ((u64::from(u.prompt_tokens), u64::from(u.completion_tokens), u64::from(u.cached_tokens)), false)
            }
            None => ((self.prompt_estimate, tokenize::count(&self.model, delivery.text), 0), true),
        };
        let mut row = self.consume_row(&attempt, tokens, estimated);
        if let Some(r) = self.reservation.take() {
            r.settle(row.quota);
        }
        if let Some(acct) = &self.caller.account {
            let used = (tokens.0 + tokens.1) as i64;
            self.billing.limiter.correct(acct.token.id, used - self.token_estimate as i64);
        }
        row.ttft_ms = delivery.ttft.map(|t| t.as_millis() as u64);
        row.client_disconnected = delivery.client_disconnected;
        tracing::debug!(request_id = %self.request_id, charge = row.quota, estimated, "request settled");
        self.billing.queue(row);
    }
}
