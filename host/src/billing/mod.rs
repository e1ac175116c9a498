//! The business side: users and tokens ([`accounts`]), prices
//! ([`pricing`]), admission (token rules, rate limits, a quota pre-charge
//! held in the [`ledger`]), settlement to the real usage, and usage logs
//! written in batches by the [`writer`] together with the charges.
//!
//! A request's life: [`Billing::admit`] checks the storage, the token's
//! model allowlist, the price and the completion limit, refuses at once a
//! caller with no quota left, applies the rate limits and reserves the
//! estimate — the prompt's cheap upper bound (its text bytes, see
//! `request.rs`) plus the completion it may generate; only when that bound
//! does not fit the balance is the prompt counted exactly, off the async
//! workers → the relay tries channels, each failed attempt logged as an
//! `error` row with quota 0 → the attempt that served settles the
//! [`Meter`]: the real usage from the adapter (or a local count, marked
//! `estimated`) is charged, the rest of the reservation released, and one
//! `consume` row logged. A stream is settled when it ends, or — if the
//! client goes away — for what was delivered.
//!
//! Money and token arithmetic saturates: no count, however large, wraps
//! around, and a request estimated above [`pricing::MAX_QUOTA`] is refused.

pub mod accounts;
pub mod accounts_pg;
pub mod dashboard;
pub mod journal;
mod journal_file;
pub mod leases;
pub mod ledger;
pub mod limits;
pub mod limits_pg;
pub mod log_blocks;
pub mod log_filter;
pub mod log_segments;
pub mod logs;
pub mod pricing;
pub mod rollup;
pub mod tokenize;
pub mod writer;
pub mod writer_pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use axum::http::StatusCode;
use bytes::Bytes;

use crate::config::{LimitsConfig, LogConfig};
use crate::error::ApiError;
use crate::plugins::{Endpoint, Usage};
use crate::request::ClientRequest;
use crate::store::postgres::Postgres;
use crate::store::{StorageGuard, Store, unix_now_ms};
use accounts::{Accounts, TokenRecord};
use journal::{Change, Journal};
use leases::{Leased, Leases};
use ledger::{Ledger, Reservation, Short};
use limits::{InFlightGuard, Limiter, Subject, TokenLimits};
use limits_pg::PgLimits;
use logs::{LogKind, LogRow};
use pricing::{MAX_QUOTA, Price, Pricing, PricingConfig};
use std::collections::HashMap;
use tokenize::GeneratedText;
use writer::{BatchLimits, Trees, Writer};

/// Who is calling `/v1`: set by the auth middleware.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's group (which channels serve it, which group ratio applies).
    pub group: Arc<str>,
    /// The user and token, for tokens created through the API; `None` for
    /// tokens from the configuration file (logged, never charged).
    pub account: Option<Account>,
    /// Position of the configuration file's token, for its limits.
    pub config_token: Option<usize>,
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
    store: Store,
    log_config: LogConfig,
    limits: LimitsConfig,
    /// Balances and rate limits shared with other nodes, when on PostgreSQL.
    shared: Option<SharedBilling>,
}

/// Billing's part of a database shared by several nodes.
struct SharedBilling {
    pg: Arc<Postgres>,
    leases: Arc<Leases>,
    limits: Arc<PgLimits>,
}

/// Balances as the API shows them: this node's ledger, or (several nodes)
/// the shared database's, read after this node's usage is written.
pub enum Live {
    /// One node: the ledger is the truth.
    Local(Arc<Ledger>),
    /// Shared: balances read from the database, reservations this node's.
    Shared {
        /// By user id.
        users: HashMap<u64, ledger::Balance>,
        /// By token id.
        tokens: HashMap<u64, ledger::Balance>,
        /// This node's reservations.
        ledger: Arc<Ledger>,
    },
}

impl Live {
    /// A user's balance.
    pub fn user(&self, id: u64) -> ledger::Balance {
        match self {
            Self::Local(l) => l.user(id),
            Self::Shared { users, ledger, .. } => {
                ledger::Balance { reserved: ledger.user(id).reserved, ..users.get(&id).copied().unwrap_or_default() }
            }
        }
    }

    /// A token's balance.
    pub fn token(&self, id: u64) -> ledger::Balance {
        match self {
            Self::Local(l) => l.token(id),
            Self::Shared { tokens, ledger, .. } => {
                ledger::Balance { reserved: ledger.token(id).reserved, ..tokens.get(&id).copied().unwrap_or_default() }
            }
        }
    }
}

fn insufficient_quota() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "insufficient_quota",
        Some("insufficient_quota"),
        "You exceeded your current quota, please check your plan and billing details.",
    )
}

fn rate_limited(l: limits::Limited) -> ApiError {
    crate::metrics::get().rate_limited(l.limit);
    let what = match l.limit {
        "concurrency" => "requests in flight",
        "streams" => "open streams",
        other => other,
    };
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        if l.limit == "tpm" { "tokens" } else { "requests" },
        Some("rate_limit_exceeded"),
        format!("Rate limit reached for this API key ({what}); retry in {} s.", l.retry_after),
    );
    e.retry_after = Some(l.retry_after);
    e
}

/// The 503 of a request that cannot be billed because the store cannot
/// record it.
pub fn storage_unavailable() -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("storage_unavailable"),
        "The gateway cannot record usage right now (its storage is failing); retry later.",
    );
    e.retry_after = Some(5);
    e
}

/// A usage record could not be journaled: the request must not be served
/// as paid.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the billing journal could not record a usage row: {0}")]
pub struct NotRecorded(pub String);

/// Open the usage trees and the journal of `store`, and apply what a crash
/// left in the journal (also to `sink`, the shared database's, when
/// given), as a start does before anything is served.
fn recover(store: &Store, sink: Option<&writer_pg::PgSink>) -> anyhow::Result<(Trees, Journal)> {
    let trees = Trees::open(store)?;
    logs::ensure_rollups(&trees.logs, &trees.rollups)?;
    let committed = trees.committed_seq()?;
    // A store that lost committed usage (a truncated or restored db)
    // is refused rather than billed again from an old state.
    store.check_mark("journal_seq", committed)?;
    let (journal, pending) = Journal::open(store.dir(), committed)?;
    let (replayed, interrupted) = writer::recover(&trees, &journal, pending, sink).map_err(anyhow::Error::msg)?;
    store.committed(trees.committed_seq()?);
    if replayed + interrupted > 0 {
        tracing::warn!(replayed, interrupted, "recovered usage records a crash left unwritten");
    }
    Ok((trees, journal))
}

/// Apply what a crash left in the journal of a store no gateway is serving
/// (`wasmgate migrate` from a node that was killed).
pub fn recover_journal(store: &Store) -> anyhow::Result<()> {
    recover(store, None).map(drop)
}

impl Billing {
    /// Apply what a crash left in the journal, open the accounts, load
    /// prices (overrides from `options`) and start the writer. With `pg`,
    /// accounts, balances, usage rows and rate limits are shared with the
    /// other nodes on that database.
    pub fn open(
        store: &Store,
        options: Arc<dyn crate::store::overrides::OptionStore>,
        pricing: &PricingConfig,
        log_config: &LogConfig,
        limits: &LimitsConfig,
        pg: Option<&Arc<Postgres>>,
    ) -> anyhow::Result<Self> {
        let node = pg.map(|_| store.node_id()).transpose()?;
        let sink = pg.zip(node.as_deref()).map(|(pg, node)| Arc::new(writer_pg::PgSink::new(pg, node)));
        let (trees, journal) = recover(store, sink.as_deref())?;
        let (accounts, ledger, shared) = match pg.zip(node) {
            None => {
                let accounts = Accounts::open(store)?;
                let ledger = Arc::new(Ledger::load(&accounts.snapshot()));
                (accounts, ledger, None)
            }
            Some((pg, node)) => {
                // Balances stay in the database: this node holds leases
                // only, starting from none (what it held before the
                // journal was written back is returned first).
                let ledger = Arc::new(Ledger::default());
                let leases = Leases::start(pg, &node, &ledger).context("returning this node's earlier quota leases")?;
                let limits = PgLimits::start(pg, &node)?;
                let shared = SharedBilling { pg: pg.clone(), leases, limits };
                (Accounts::open_pg(pg)?, ledger, Some(shared))
            }
        };
        let batch = BatchLimits {
            max_ops: log_config.batch_max.max(1),
            max_wait: Duration::from_millis(log_config.flush_interval_ms),
        };
        drop(trees);
        let writer = Writer::spawn(Arc::new(journal), batch, store.clone(), sink)?;
        Ok(Self {
            accounts,
            ledger,
            limiter: Arc::default(),
            pricing: Pricing::load(pricing, options)?,
            writer,
            store: store.clone(),
            log_config: log_config.clone(),
            limits: limits.clone(),
            shared,
        })
    }

    /// Whether balances and limits are shared with other nodes.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The balances of `users` and `tokens` as the API shows them.
    pub async fn live(&self, users: Vec<u64>, tokens: Vec<u64>) -> Result<Live, ApiError> {
        let Some(shared) = &self.shared else {
            return Ok(Live::Local(self.ledger.clone()));
        };
        // This node's charges first, so that what it served is counted.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer.flush()).await;
        let pg = shared.pg.clone();
        let read = shared.pg.call(async move {
            let c = pg.pooled().await?;
            let users: Vec<i64> = users.into_iter().map(|id| id as i64).collect();
            let tokens: Vec<i64> = tokens.into_iter().map(|id| id as i64).collect();
            let mut out = (HashMap::new(), HashMap::new());
            for row in c
                .query(
                    "SELECT u.id, u.quota + COALESCE((SELECT sum(amount) FROM quota_leases l
                         WHERE l.kind = 'u' AND l.id = u.id), 0)::bigint, u.used_quota, u.request_count
                     FROM users u WHERE u.id = ANY($1)",
                    &[&users],
                )
                .await?
            {
                let b = ledger::Balance {
                    balance: row.get(1),
                    used: row.get(2),
                    requests: row.get::<_, i64>(3) as u64,
                    reserved: 0,
                };
                out.0.insert(row.get::<_, i64>(0) as u64, b);
            }
            for row in c
                .query(
                    "SELECT t.id, t.remain_quota + COALESCE((SELECT sum(amount) FROM quota_leases l
                         WHERE l.kind = 't' AND l.id = t.id), 0)::bigint, t.used_quota
                     FROM tokens t WHERE t.id = ANY($1)",
                    &[&tokens],
                )
                .await?
            {
                let b = ledger::Balance { balance: row.get(1), used: row.get(2), ..ledger::Balance::default() };
                out.1.insert(row.get::<_, i64>(0) as u64, b);
            }
            anyhow::Ok(out)
        });
        let (users, tokens) = read.await.map_err(|error| {
            tracing::warn!(error = format!("{error:#}"), "reading shared balances failed");
            storage_unavailable()
        })?;
        Ok(Live::Shared { users, tokens, ledger: self.ledger.clone() })
    }

    /// Give back every quota lease and in-flight slot this node holds (at
    /// a clean stop, once its usage is written).
    pub async fn return_leases(&self) {
        let Some(shared) = &self.shared else { return };
        if let Err(error) = shared.leases.return_all().await {
            tracing::warn!(error = format!("{error:#}"), "returning quota leases failed; the next start returns them");
        }
        if let Err(error) = shared.limits.return_all().await {
            tracing::warn!(
                error = format!("{error:#}"),
                "returning in-flight slots failed; the next start returns them"
            );
        }
    }

    /// The `logs` tree (fetched for each use: the store may be reopened).
    pub fn logs(&self) -> anyhow::Result<sled::Tree> {
        self.store.tree("logs")
    }

    /// The `log_rollup` tree: usage per minute and hour, and each hour's
    /// row ids.
    pub fn log_rollups(&self) -> anyhow::Result<sled::Tree> {
        self.store.tree("log_rollup")
    }

    /// The storage health (fail-closed admission, `/health`).
    pub fn storage(&self) -> &StorageGuard {
        self.store.guard()
    }

    /// The limits of `caller`: its token's own, else the defaults.
    fn token_limits(&self, caller: &Caller) -> (Option<Subject>, TokenLimits) {
        let default = |v: u32| (v > 0).then_some(v);
        let d = &self.limits;
        match (&caller.account, caller.config_token) {
            (Some(acct), _) => {
                let t = &acct.token;
                let limits = TokenLimits {
                    rpm: t.rpm,
                    tpm: t.tpm,
                    concurrency: t.concurrency.or(default(d.token_concurrency)),
                    streams: t.streams.or(default(d.token_streams)),
                };
                (Some(Subject::Token(t.id)), limits)
            }
            (None, Some(i)) => {
                let limits = TokenLimits {
                    concurrency: default(d.token_concurrency),
                    streams: default(d.token_streams),
                    ..TokenLimits::default()
                };
                (Some(Subject::ConfigToken(i)), limits)
            }
            (None, None) => (None, TokenLimits::default()),
        }
    }

    /// Admit `req` for `caller`: storage, model allowlist, price, the
    /// completion limit, rate limits and the quota pre-charge. The
    /// [`Meter`] bills the request.
    pub async fn admit(self: &Arc<Self>, caller: &Caller, req: &ClientRequest) -> Result<Meter, ApiError> {
        if !self.storage().writable() {
            return Err(storage_unavailable());
        }
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
        let limit = pricing.max_output_tokens(&req.model);
        if let Some(asked) = req.max_tokens.filter(|m| *m > limit) {
            return Err(ApiError::bad_request(format!(
                "max_tokens is too large: {asked}. This model supports at most {limit} completion tokens, whereas you provided {asked}."
            ))
            .param("max_tokens"));
        }
        let completion = if generates {
            req.max_tokens.unwrap_or(u64::from(pricing.default_completion_tokens)).min(limit).saturating_mul(req.n)
        } else {
            0
        };
        let paid = caller.account.as_ref().filter(|_| !price.is_free());
        // What can be checked before any counting: is anything left at all?
        // (Several nodes: an empty lease is not an empty balance.)
        if let Some(acct) = paid.filter(|_| self.shared.is_none()) {
            let t = &acct.token;
            if let Err(short) = self.ledger.has_quota(acct.user_id, Some(t.id), !t.unlimited_quota) {
                tracing::info!(user = acct.user_id, token = t.id, ?short, "no quota left");
                return Err(insufficient_quota());
            }
        }
        let bound = req.prompt.token_bound();
        // A relayed operation at a per-unit price (images, speech) is billed
        // per unit asked.
        let units = req.relayed.as_ref().map_or(1, |r| r.units.max(1));
        let estimate = per_units(&price, price.quota(bound, completion, 0), units);
        if estimate >= MAX_QUOTA {
            return Err(ApiError::bad_request(
                "This request cannot be priced: its prompt and completion limit are too large.",
            )
            .param("max_tokens"));
        }
        let (subject, mut limits) = self.token_limits(caller);
        // Several nodes: a token's own limits are counted in the database
        // (requests in flight first, as on one node). The database calls'
        // futures are boxed so that one node's requests do not carry them.
        let mut shared_slot = None;
        if let (Some(shared), Some(Subject::Token(id)), Some(acct)) = (&self.shared, subject, &caller.account)
            && let Some(max) = acct.token.concurrency
        {
            limits.concurrency = (self.limits.token_concurrency > 0).then_some(self.limits.token_concurrency);
            shared_slot = Some(shared_limit(Box::pin(shared.limits.occupy(id, max)).await)?);
        }
        if let (Some(shared), Some(Subject::Token(id))) = (&self.shared, subject)
            && (limits.rpm.is_some() || limits.tpm.is_some())
        {
            let estimate = bound.saturating_add(completion);
            shared_limit(Box::pin(shared.limits.admit(id, limits.rpm.take(), limits.tpm.take(), estimate)).await)?;
        }
        let mut meter = Meter {
            billing: self.clone(),
            caller: caller.clone(),
            request_id: req.request_id.clone(),
            model: req.model.clone(),
            stream: req.stream,
            price,
            // A stream keeps its body for as long as it runs: a copy sized
            // to it, not a view pinning the connection's read buffer.
            body: if req.stream { Bytes::copy_from_slice(&req.body) } else { req.body.clone() },
            prompt_typical: req.prompt.typical_tokens(),
            token_estimate: bound.saturating_add(completion),
            subject,
            units,
            started: Instant::now(),
            reservation: None,
            _in_flight: Vec::new(),
            _shared_slot: shared_slot,
            served: None,
        };
        if let Some(subject) = subject {
            let guard = self.limiter.admit(subject, limits, meter.token_estimate, req.stream).map_err(rate_limited)?;
            meter._in_flight.push(guard);
        }
        if let Some(acct) = &caller.account {
            let user = TokenLimits {
                concurrency: (self.limits.user_concurrency > 0).then_some(self.limits.user_concurrency),
                ..TokenLimits::default()
            };
            let guard = self.limiter.admit(Subject::User(acct.user_id), user, 0, false).map_err(rate_limited)?;
            meter._in_flight.push(guard);
        }
        if let Some(acct) = &caller.account {
            // A free request reserves nothing but is still counted.
            let amount = if paid.is_some() { estimate } else { 0 };
            meter.reservation = Some(self.reserve(acct, req, &meter, completion, amount).await?);
        }
        Ok(meter)
    }

    /// Reserve `estimate` (from the prompt's bound); when it does not fit,
    /// count the prompt exactly off the workers and try again with that.
    async fn reserve(
        &self,
        acct: &Account,
        req: &ClientRequest,
        meter: &Meter,
        completion: u64,
        estimate: i64,
    ) -> Result<Reservation, ApiError> {
        let (short, spent) = match self.hold(acct, estimate).await? {
            Ok(r) => return Ok(r),
            Err(refused) => refused,
        };
        // Nothing left at all: an exact count cannot help.
        // (A relayed body may be audio: nothing to count.)
        if spent || req.relayed.is_some() || req.prompt.text_bytes as usize > tokenize::MAX_EXACT_BYTES {
            return Err(self.short(acct, estimate, short));
        }
        let (model, body) = (req.model.clone(), req.body.clone());
        let prompt = tokenize::off_worker(move || tokenize::prompt_tokens(&model, &body)).await;
        let exact = meter.price.quota(prompt, completion, 0);
        self.hold(acct, exact).await?.map_err(|(short, _)| self.short(acct, exact, short))
    }

    /// Reserve `amount` in the ledger; with several nodes, lease what the
    /// node lacks from the database first. Refused: whose quota is short,
    /// and whether the balance is spent (no smaller amount would pass).
    async fn hold(&self, acct: &Account, amount: i64) -> Result<Result<Reservation, (Short, bool)>, ApiError> {
        let t = &acct.token;
        let limited = !t.unlimited_quota;
        let Some(shared) = &self.shared else {
            return Ok(self.ledger.reserve(acct.user_id, Some(t.id), limited, amount).map_err(|s| (s, false)));
        };
        shared.leases.used(acct.user_id, Some(t.id), amount);
        let short = match self.ledger.reserve(acct.user_id, Some(t.id), limited, amount) {
            Ok(r) => {
                shared.leases.top_up_if_low(acct.user_id, Some(t.id), limited, amount);
                return Ok(Ok(r));
            }
            Err(short) => short,
        };
        let lacking = |b: ledger::Balance| amount.saturating_sub(b.unreserved()).max(0);
        let need_user = lacking(self.ledger.user(acct.user_id));
        let need_token = if limited { lacking(self.ledger.token(t.id)) } else { 0 };
        match Box::pin(shared.leases.acquire(acct.user_id, need_user, Some(t.id), need_token)).await {
            Ok(Leased::Granted) => {
                Ok(self.ledger.reserve(acct.user_id, Some(t.id), limited, amount).map_err(|s| (s, false)))
            }
            Ok(Leased::Refused { available }) => {
                let lease = if need_user > 0 {
                    self.ledger.user(acct.user_id).unreserved()
                } else {
                    self.ledger.token(t.id).unreserved()
                };
                Ok(Err((short, available.saturating_add(lease.max(0)) <= 0)))
            }
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "cannot lease quota from the database");
                Err(storage_unavailable())
            }
        }
    }

    fn short(&self, acct: &Account, estimate: i64, short: Short) -> ApiError {
        tracing::info!(user = acct.user_id, token = acct.token.id, estimate, ?short, "insufficient quota");
        insufficient_quota()
    }

    /// Set the balance of a user or a token to `target`. It is recorded as
    /// an adjustment by the difference, so it composes with charges being
    /// written at the same moment. Returns the difference.
    pub fn set_balance(&self, user: Option<u64>, token: Option<u64>, target: i64) -> Result<i64, NotRecorded> {
        if let Some(shared) = &self.shared {
            return shared_set_balance(&shared.pg, user, token, target);
        }
        let current = match (user, token) {
            (Some(u), _) => self.ledger.user(u).balance,
            (None, Some(t)) => self.ledger.token(t).balance,
            (None, None) => return Ok(0),
        };
        let delta = target.saturating_sub(current);
        self.writer.send(Change::Adjust { user, token, delta })?;
        self.ledger.adjust(user, token, delta);
        Ok(delta)
    }

    /// Add `delta` to a user's balance (negative deducts) and record it in
    /// the usage log with the administrator's `note`.
    pub fn top_up(&self, user: u64, delta: i64, note: &str) -> Result<(), NotRecorded> {
        let row = LogRow {
            at_ms: unix_now_ms(),
            kind: LogKind::Topup,
            request_id: format!("topup_{:016x}", rand::random::<u64>()),
            user_id: Some(user),
            quota: delta,
            status: 200,
            note: Some(note.to_string()),
            ..LogRow::default()
        };
        let row = self.numbered(row).ok_or_else(|| NotRecorded("no row id".into()))?;
        match &self.shared {
            // A committed update is durable: nothing to journal.
            Some(shared) => {
                let pg = shared.pg.clone();
                shared
                    .pg
                    .block(async move {
                        let c = pg.pooled().await?;
                        c.execute("UPDATE users SET quota = quota + $2 WHERE id = $1", &[&(user as i64), &delta])
                            .await?;
                        Ok(())
                    })
                    .map_err(|e| NotRecorded(format!("{e:#}")))?;
            }
            None => {
                self.writer.send(Change::Adjust { user: Some(user), token: None, delta })?;
                self.ledger.adjust(Some(user), None, delta);
            }
        }
        // The balance moved: a lost row is logged, never a reason to undo it.
        if let Err(error) = self.writer.send_or_keep(Change::Row(row)) {
            tracing::error!(%error, user, delta, "a top-up's log row could not be recorded");
        }
        Ok(())
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

    /// Queue a row that moves no money (an error row): written even when
    /// the journal cannot record it.
    fn queue(&self, row: LogRow) -> Result<(), NotRecorded> {
        match self.numbered(row) {
            Some(row) => self.writer.send_or_keep(Change::Row(row)),
            None => Err(NotRecorded("no row id".into())),
        }
    }

    /// Delete log rows older than the retention, if one is set, and the
    /// minute rollups older than two days.
    pub fn sweep_logs(&self) {
        let result = self.logs().and_then(|tree| {
            let rollups = self.log_rollups()?;
            let minutes = rollup::prune(&rollups, false, unix_now_ms().saturating_sub(rollup::MINUTES_KEPT_MS))?;
            if self.log_config.retention_secs == 0 {
                return Ok((0, minutes));
            }
            let cutoff = unix_now_ms().saturating_sub(self.log_config.retention_secs.saturating_mul(1000));
            Ok((logs::delete_before(&tree, &rollups, cutoff)?, minutes))
        });
        match result {
            Ok((0, _)) => {}
            Ok((n, _)) => tracing::info!(rows = n, "old usage logs deleted"),
            Err(error) => tracing::error!(%error, "deleting old usage logs failed"),
        }
    }

    /// The retention sweep interval.
    pub fn retention_interval(&self) -> Duration {
        Duration::from_secs(self.log_config.retention_interval_secs.max(1))
    }
}

/// A shared limit's answer as the client's: refused (429), or 503 when the
/// database cannot say.
fn shared_limit<T>(answer: anyhow::Result<Result<T, limits::Limited>>) -> Result<T, ApiError> {
    match answer {
        Ok(Ok(admitted)) => Ok(admitted),
        Ok(Err(limited)) => Err(rate_limited(limited)),
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "shared rate limits unreachable");
            Err(storage_unavailable())
        }
    }
}

/// `quota` (of one unit) times `units` for a per-unit price; token prices
/// already count what was used.
fn per_units(price: &Price, quota: i64, units: u64) -> i64 {
    match price {
        Price::PerRequest(_) => quota.saturating_mul(i64::try_from(units).unwrap_or(i64::MAX)).min(MAX_QUOTA),
        Price::Tokens { .. } => quota,
    }
}

/// Set a shared balance (the database's plus every lease) to `target`;
/// returns the difference applied.
fn shared_set_balance(
    pg: &Arc<Postgres>,
    user: Option<u64>,
    token: Option<u64>,
    target: i64,
) -> Result<i64, NotRecorded> {
    let (table, column, kind, id) = match (user, token) {
        (Some(u), _) => ("users", "quota", "u", u),
        (None, Some(t)) => ("tokens", "remain_quota", "t", t),
        (None, None) => return Ok(0),
    };
    let sql = format!(
        "WITH held AS (SELECT COALESCE(sum(amount), 0)::bigint AS amount FROM quota_leases WHERE kind = '{kind}' AND id = $1),
              old AS (SELECT {column} AS before FROM {table} WHERE id = $1 FOR UPDATE)
         UPDATE {table} SET {column} = $2 - held.amount FROM held, old WHERE id = $1
         RETURNING {column} - old.before"
    );
    let pg2 = pg.clone();
    pg.block(async move {
        let c = pg2.pooled().await?;
        let row = c.query_opt(&sql, &[&(id as i64), &target]).await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0)))
    })
    .map_err(|e| NotRecorded(format!("{e:#}")))
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

/// Tokens billed for a served request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Cached prompt tokens.
    pub cached: u64,
    /// Counted locally (the upstream reported no usage).
    pub estimated: bool,
}

impl From<Usage> for Tokens {
    fn from(u: Usage) -> Self {
        Self {
            prompt: u64::from(u.prompt_tokens),
            completion: u64::from(u.completion_tokens),
            cached: u64::from(u.cached_tokens),
            estimated: false,
        }
    }
}

/// How a served request ended, besides its tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ending {
    /// Time to first token (streams).
    pub ttft: Option<Duration>,
    /// The client went away before the end.
    pub client_disconnected: bool,
    /// The upstream stream ended (or broke) before its end marker.
    pub upstream_cut: bool,
    /// The stream was ended by the gateway's length or duration limit.
    pub limited: bool,
}

/// Bills one request: holds its reservation and concurrency slots, logs
/// failed attempts, and settles once for the attempt that served. Dropped
/// unsettled (every attempt failed), it releases the reservation.
pub struct Meter {
    billing: Arc<Billing>,
    caller: Caller,
    request_id: String,
    model: String,
    stream: bool,
    price: Price,
    /// The request body, to count its prompt if the upstream reports no usage.
    body: Bytes,
    /// The prompt's tokens at one per four bytes of text (interrupted streams).
    prompt_typical: u64,
    token_estimate: u64,
    subject: Option<Subject>,
    /// Units a per-unit price is multiplied by (relayed operations; 1
    /// otherwise).
    units: u64,
    started: Instant,
    reservation: Option<Reservation>,
    _in_flight: Vec<InFlightGuard>,
    /// A request in flight counted over every node (a token's own
    /// `concurrency`, several nodes).
    _shared_slot: Option<limits_pg::SharedSlot>,
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
        // An error row moves no money: if it cannot be journaled, the writer
        // still gets it.
        let _ = self.billing.queue(row);
    }

    /// Remember which attempt is serving (non-streamed: settled next).
    pub fn serving(&mut self, attempt: AttemptInfo) {
        self.served = Some(attempt);
    }

    /// A stream on `attempt` is about to reach the client: remember the
    /// attempt and journal what the stream is billed if the process dies
    /// before it settles — its prompt at one token per four bytes of text,
    /// marked `interrupted` (see `docs/billing.md`). Fails when the journal
    /// cannot record it: the stream must not start.
    pub fn stream_started(&mut self, attempt: AttemptInfo, ttft: Duration) -> Result<(), NotRecorded> {
        let tokens = Tokens { prompt: self.prompt_typical, estimated: true, ..Tokens::default() };
        let mut row = self.consume_row(&attempt, tokens);
        row.interrupted = true;
        row.ttft_ms = Some(ttft.as_millis() as u64);
        if let Some(row) = self.billing.numbered(row) {
            self.billing.writer.send(Change::Open(row))?;
        }
        self.served = Some(attempt);
        Ok(())
    }

    /// The `consume` row charging `tokens`.
    fn consume_row(&self, attempt: &AttemptInfo, tokens: Tokens) -> LogRow {
        let mut row = self.row(LogKind::Consume, attempt, 200);
        row.prompt_tokens = tokens.prompt;
        row.completion_tokens = tokens.completion;
        row.cached_tokens = tokens.cached;
        row.quota = if self.caller.account.is_some() {
            per_units(&self.price, self.price.quota(tokens.prompt, tokens.completion, tokens.cached), self.units)
        } else {
            0
        };
        row.token_limited = self.reservation.as_ref().is_some_and(Reservation::token_limited);
        row.estimated = tokens.estimated;
        row
    }

    /// The units the served operation is billed by, as the upstream
    /// reported them (images returned, minutes of audio).
    pub fn set_units(&mut self, units: u64) {
        self.units = units.max(1);
    }

    /// Whether billing needs the tokens at all: a free model on a token
    /// without a tokens-per-minute limit charges nothing and counts nothing.
    pub fn needs_tokens(&self) -> bool {
        !self.price.is_free() || self.caller.account.as_ref().is_some_and(|a| a.token.tpm.is_some())
    }

    /// The tokens to bill: `usage` when the upstream reported it, else the
    /// prompt and `generated` counted locally (blocking: call it through
    /// [`tokenize::off_worker`]).
    pub fn tokens_blocking(&self, usage: Option<Usage>, generated: &GeneratedText) -> Tokens {
        match usage {
            Some(u) => u.into(),
            None if !self.needs_tokens() => Tokens { estimated: true, ..Tokens::default() },
            None => Tokens {
                prompt: tokenize::prompt_tokens(&self.model, &self.body),
                completion: generated.tokens(&self.model),
                cached: 0,
                estimated: true,
            },
        }
    }

    /// The tokens of a relayed operation (images, audio, moderations,
    /// rerank): the upstream's usage, else its text fields at the typical
    /// rate — never a count of its body, which may be audio.
    pub fn relayed_tokens(&self, usage: Option<Usage>) -> Tokens {
        match usage {
            Some(u) => u.into(),
            None => Tokens { prompt: self.prompt_typical, estimated: true, ..Tokens::default() },
        }
    }

    /// [`Self::tokens_blocking`], off the async workers when it counts.
    pub async fn tokens(&self, usage: Option<Usage>, generated: GeneratedText) -> Tokens {
        if usage.is_some() || !self.needs_tokens() {
            return self.tokens_blocking(usage, &generated);
        }
        let (model, body) = (self.model.clone(), self.body.clone());
        tokenize::off_worker(move || Tokens {
            prompt: tokenize::prompt_tokens(&model, &body),
            completion: generated.tokens(&model),
            cached: 0,
            estimated: true,
        })
        .await
    }

    /// Charge `tokens` and log the `consume` row. A non-streamed answer
    /// must not be sent when this fails (nothing is charged then); a
    /// stream that already reached its client is still charged in memory
    /// and written when the storage recovers (its journaled start bills it
    /// after a crash).
    pub fn settle(mut self, tokens: Tokens, ending: Ending) -> Result<(), NotRecorded> {
        let attempt = self.served.take().unwrap_or_default();
        let mut row = self.consume_row(&attempt, tokens);
        row.ttft_ms = ending.ttft.map(|t| t.as_millis() as u64);
        row.client_disconnected = ending.client_disconnected;
        row.upstream_cut = ending.upstream_cut;
        row.limited = ending.limited;
        let quota = row.quota;
        let billed = (row.prompt_tokens, row.completion_tokens, row.model.clone());
        let Some(row) = self.billing.numbered(row) else {
            return Err(NotRecorded("no row id".into()));
        };
        let recorded = if self.stream {
            self.billing.writer.send_or_keep(Change::Row(row))
        } else {
            self.billing.writer.send(Change::Row(row))
        };
        if recorded.is_err() && !self.stream {
            // Not served: the reservation is released when `self` drops.
            return recorded;
        }
        crate::metrics::get().billed(&billed.2, billed.0, billed.1, quota);
        crate::telemetry::attribute("gen_ai.usage.input_tokens", i64::try_from(billed.0).unwrap_or(i64::MAX));
        crate::telemetry::attribute("gen_ai.usage.output_tokens", i64::try_from(billed.1).unwrap_or(i64::MAX));
        if let Some(r) = self.reservation.take() {
            r.settle(quota);
        }
        if let Some(subject) = self.subject {
            let used = tokens.prompt.saturating_add(tokens.completion);
            let delta = i64::try_from(used)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(self.token_estimate).unwrap_or(i64::MAX));
            // A token's own tokens-per-minute window is the database's
            // when nodes share one (see `admit`).
            let own_tpm = self.caller.account.as_ref().is_some_and(|a| a.token.tpm.is_some());
            match (&self.billing.shared, subject) {
                (Some(shared), Subject::Token(id)) if own_tpm => shared.limits.correct(id, delta),
                _ => self.billing.limiter.correct(subject, delta),
            }
        }
        tracing::debug!(charge = quota, estimated = tokens.estimated, "request settled");
        recorded
    }
}
