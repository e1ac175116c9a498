//! Users and their API tokens, stored in sled (`users`, `tokens` trees, JSON
//! values keyed by id) or, with a shared database, in PostgreSQL (see
//! [`super::accounts_pg`]), with an in-memory snapshot for the auth hot
//! path.
//!
//! Balances (`quota`, `used_quota`, `request_count`, a token's
//! `remain_quota`) are changed only by the billing writer, in the same sled
//! transaction as the usage log rows that justify them; the other fields
//! are changed by the admin API. Both read-modify-write in transactions.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::accounts_pg::{Follower, PgAccounts, Records};
use crate::config::DEFAULT_GROUP;
use crate::state::secret_hash;
use crate::store::local_writes::{LocalWrite, LocalWrites};
use crate::store::{Store, unix_now};

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Uses the API.
    #[default]
    User,
    /// Administers the gateway.
    Admin,
}

/// Enabled or disabled (users and tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// In use.
    #[default]
    Enabled,
    /// Refused.
    Disabled,
}

/// A user, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserRecord {
    /// Stable id.
    pub id: u64,
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Group: which channels serve the user, which group ratio applies.
    pub group: String,
    /// Remaining quota.
    pub quota: i64,
    /// Quota consumed so far (the sum of the user's charged log rows).
    pub used_quota: i64,
    /// Requests charged.
    pub request_count: u64,
    /// Enabled or not.
    pub status: Status,
    /// Unix seconds.
    pub created_at: u64,
}

impl Default for UserRecord {
    fn default() -> Self {
        Self {
            id: 0,
            name: String::new(),
            role: Role::User,
            group: DEFAULT_GROUP.to_string(),
            quota: 0,
            used_quota: 0,
            request_count: 0,
            status: Status::Enabled,
            created_at: 0,
        }
    }
}

/// An API token, as stored (never the key itself: its SHA-256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenRecord {
    /// Stable id.
    pub id: u64,
    /// Display name.
    pub name: String,
    /// Owner.
    pub user_id: u64,
    /// SHA-256 of the key, hex.
    pub key_hash: String,
    /// `sk-…wxyz`, to recognise the key.
    pub key_hint: String,
    /// Enabled or not.
    pub status: Status,
    /// Unix seconds after which the token is refused (`None`: never).
    pub expires_at: Option<u64>,
    /// Remaining quota of this token (ignored when `unlimited_quota`).
    pub remain_quota: i64,
    /// The token spends its owner's quota without a limit of its own.
    pub unlimited_quota: bool,
    /// Quota consumed through this token.
    pub used_quota: i64,
    /// Models this token may use (empty: all).
    pub models: Vec<String>,
    /// Client addresses or subnets allowed (empty: all), e.g. `10.0.0.0/8`.
    pub subnets: Vec<String>,
    /// Requests per minute (`None`: unlimited).
    pub rpm: Option<u32>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once (`None`: the gateway's default,
    /// `limits.token_concurrency`).
    pub concurrency: Option<u32>,
    /// Streams open at once (`None`: the gateway's default,
    /// `limits.token_streams`).
    pub streams: Option<u32>,
    /// Unix seconds.
    pub created_at: u64,
}

impl Default for TokenRecord {
    fn default() -> Self {
        Self {
            id: 0,
            name: String::new(),
            user_id: 0,
            key_hash: String::new(),
            key_hint: String::new(),
            status: Status::Enabled,
            expires_at: None,
            remain_quota: 0,
            unlimited_quota: true,
            used_quota: 0,
            models: Vec::new(),
            subnets: Vec::new(),
            rpm: None,
            tpm: None,
            concurrency: None,
            streams: None,
            created_at: 0,
        }
    }
}

/// Every user and token, immutable, swapped on each change.
#[derive(Default)]
pub struct AccountSet {
    /// Users by id.
    pub users: BTreeMap<u64, Arc<UserRecord>>,
    /// Tokens by id.
    pub tokens: BTreeMap<u64, Arc<TokenRecord>>,
    /// Token id by the SHA-256 of its key.
    pub by_hash: HashMap<[u8; 32], u64>,
}

impl AccountSet {
    fn rebuild(users: &BTreeMap<u64, UserRecord>, tokens: &BTreeMap<u64, TokenRecord>) -> Self {
        let by_hash = tokens
            .values()
            .filter_map(|t| {
                let bytes: [u8; 32] = hex::decode(&t.key_hash).ok()?.try_into().ok()?;
                Some((bytes, t.id))
            })
            .collect();
        Self {
            users: users.iter().map(|(k, v)| (*k, Arc::new(v.clone()))).collect(),
            tokens: tokens.iter().map(|(k, v)| (*k, Arc::new(v.clone()))).collect(),
            by_hash,
        }
    }

    /// The token whose key hashes to `hash`, with its owner.
    pub fn by_key_hash(&self, hash: &[u8; 32]) -> Option<(&Arc<TokenRecord>, &Arc<UserRecord>)> {
        let token = self.tokens.get(self.by_hash.get(hash)?)?;
        Some((token, self.users.get(&token.user_id)?))
    }
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// No such user or token.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Invalid input: (field, message).
    #[error("{1}")]
    Invalid(String, String),
    /// Storage failed.
    #[error("storage failed: {0:#}")]
    Backend(#[from] anyhow::Error),
}

/// Insert record `id` and flush.
fn insert_durably<T: Serialize>(tree: &sled::Tree, id: u64, rec: &T) -> anyhow::Result<()> {
    tree.insert(id.to_be_bytes(), serde_json::to_vec(rec)?)?;
    tree.flush()?;
    Ok(())
}

/// Write `next` over record `id` in one transaction, keeping what `keep`
/// copies from the stored version (the balances the writer owns).
fn merge_in<T>(tree: &sled::Tree, id: u64, next: &T, keep: impl Fn(&T, &mut T)) -> Result<T, AccountError>
where
    T: Clone + Serialize + for<'de> Deserialize<'de>,
{
    use sled::transaction::ConflictableTransactionError as Tx;
    let merged = tree
        .transaction(|tx| {
            let raw = tx.get(id.to_be_bytes())?.ok_or(Tx::Abort("not found"))?;
            let stored: T = serde_json::from_slice(&raw).map_err(|_| Tx::Abort("unreadable record"))?;
            let mut merged = next.clone();
            keep(&stored, &mut merged);
            tx.insert(&id.to_be_bytes(), serde_json::to_vec(&merged).map_err(|_| Tx::Abort("unserializable"))?)?;
            Ok(merged)
        })
        .map_err(|e| match e {
            sled::transaction::TransactionError::Abort("not found") => AccountError::NotFound("record"),
            other => AccountError::Backend(anyhow::anyhow!("{other:?}")),
        })?;
    tree.flush().map_err(anyhow::Error::from)?;
    Ok(merged)
}

/// Where the accounts are kept.
enum Backend {
    /// The embedded store.
    Sled(Store),
    /// A database shared with other nodes.
    Pg(Arc<PgAccounts>),
}

type Master = (BTreeMap<u64, UserRecord>, BTreeMap<u64, TokenRecord>);

/// The master copy and the snapshot published from it.
struct Shared {
    master: Mutex<Master>,
    snapshot: ArcSwap<AccountSet>,
    /// This node's writes to a shared database.
    local: LocalWrites,
}

/// What a write holds: on sled the master lock throughout; on a shared
/// database a [`LocalWrite`] mark, the lock only once the database answered.
struct Writing<'a> {
    guard: Option<std::sync::MutexGuard<'a, Master>>,
    mark: Option<LocalWrite<'a>>,
}

impl<'a> Writing<'a> {
    /// The master copy, locked, for the write's publication.
    fn master(self, shared: &'a Shared) -> MasterWrite<'a> {
        let Writing { guard, mark } = self;
        MasterWrite { guard: guard.unwrap_or_else(|| shared.lock()), _mark: mark }
    }
}

/// The locked master copy during a write; the mark ends after the lock
/// (fields drop in order).
struct MasterWrite<'a> {
    guard: std::sync::MutexGuard<'a, Master>,
    _mark: Option<LocalWrite<'a>>,
}

impl std::ops::Deref for MasterWrite<'_> {
    type Target = Master;
    fn deref(&self) -> &Master {
        &self.guard
    }
}

impl std::ops::DerefMut for MasterWrite<'_> {
    fn deref_mut(&mut self) -> &mut Master {
        &mut self.guard
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Master> {
        self.master.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publish the master copy as the new snapshot.
    fn publish(&self, master: &Master) {
        self.snapshot.store(Arc::new(AccountSet::rebuild(&master.0, &master.1)));
    }
}

impl Follower for Shared {
    fn before_read(&self) -> Option<u64> {
        self.local.stamp()
    }

    fn replace(&self, records: Records, stamp: Option<u64>) -> bool {
        let mut master = self.lock();
        if self.local.overlapped(stamp) {
            return false;
        }
        if *master != records {
            *master = records;
            self.publish(&master);
        }
        true
    }
}

/// Users and tokens: in sled, or in PostgreSQL shared with other nodes.
pub struct Accounts {
    backend: Backend,
    shared: Arc<Shared>,
}

fn load<T: for<'de> Deserialize<'de>>(tree: &sled::Tree) -> anyhow::Result<Vec<T>> {
    tree.iter()
        .map(|item| {
            let (_, v) = item?;
            serde_json::from_slice(&v).context("account record is not valid JSON")
        })
        .collect()
}

fn shared(master: Master) -> Arc<Shared> {
    let snapshot = ArcSwap::from_pointee(AccountSet::rebuild(&master.0, &master.1));
    Arc::new(Shared { master: Mutex::new(master), snapshot, local: LocalWrites::default() })
}

impl Accounts {
    /// Load every user and token from sled.
    pub fn open(store: &Store) -> anyhow::Result<Self> {
        let users_tree = store.tree("users")?;
        let tokens_tree = store.tree("tokens")?;
        let users: BTreeMap<u64, UserRecord> =
            load::<UserRecord>(&users_tree)?.into_iter().map(|u| (u.id, u)).collect();
        let tokens: BTreeMap<u64, TokenRecord> =
            load::<TokenRecord>(&tokens_tree)?.into_iter().map(|t| (t.id, t)).collect();
        Ok(Self { backend: Backend::Sled(store.clone()), shared: shared((users, tokens)) })
    }

    /// Load every user and token from PostgreSQL and follow the changes
    /// other nodes make.
    pub fn open_pg(pg: &Arc<crate::store::postgres::Postgres>) -> anyhow::Result<Self> {
        let (db, records) = PgAccounts::open(pg)?;
        let shared = shared(records);
        let follower: Arc<dyn Follower> = shared.clone();
        db.follow(Arc::downgrade(&follower));
        Ok(Self { backend: Backend::Pg(db), shared })
    }

    /// The current users and tokens.
    pub fn snapshot(&self) -> Arc<AccountSet> {
        self.shared.snapshot.load_full()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Master> {
        self.shared.lock()
    }

    /// The master copy's lock for a write: held across a sled write; with
    /// PostgreSQL taken only after the database answered (the database
    /// thread takes it to apply other nodes' changes, and must never wait
    /// for a writer that waits for the database). Every change of the
    /// master is published under this lock, so a writer holding it reads
    /// the master's records from the snapshot.
    fn lock_for_write(&self) -> Writing<'_> {
        match self.backend {
            Backend::Sled(_) => Writing { guard: Some(self.lock()), mark: None },
            Backend::Pg(_) => Writing { guard: None, mark: Some(self.shared.local.start()) },
        }
    }

    fn publish(&self, master: &Master) {
        self.shared.publish(master);
    }

    fn ensure_writable(&self) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Sled(store) => store.ensure_writable(),
            Backend::Pg(_) => Ok(()),
        }
    }

    /// Create a user (balances as given: its opening quota).
    pub fn create_user(&self, mut user: UserRecord) -> Result<UserRecord, AccountError> {
        self.ensure_writable()?;
        user.created_at = unix_now();
        user.used_quota = 0;
        user.request_count = 0;
        let guard = self.lock_for_write();
        match &self.backend {
            Backend::Sled(store) => {
                user.id = store.next_counter("next_user_id")?;
                insert_durably(&store.tree("users")?, user.id, &user)?;
            }
            Backend::Pg(db) => user.id = db.insert_user(&user)?,
        }
        let mut master = guard.master(&self.shared);
        master.0.insert(user.id, user.clone());
        self.publish(&master);
        Ok(user)
    }

    /// Create a token for an existing user; returns it and its full key
    /// (shown once, never stored).
    pub fn create_token(&self, mut token: TokenRecord) -> Result<(TokenRecord, String), AccountError> {
        self.ensure_writable()?;
        if !self.snapshot().users.contains_key(&token.user_id) {
            return Err(AccountError::Invalid("user_id".into(), format!("`user_id` {} does not exist", token.user_id)));
        }
        let key = crate::store::random_key("sk-");
        token.key_hash = hex::encode(secret_hash(&key));
        token.key_hint = crate::channels::mask(&key);
        token.created_at = unix_now();
        token.used_quota = 0;
        let guard = self.lock_for_write();
        match &self.backend {
            Backend::Sled(store) => {
                token.id = store.next_counter("next_token_id")?;
                insert_durably(&store.tree("tokens")?, token.id, &token)?;
            }
            Backend::Pg(db) => token.id = db.insert_token(&token)?,
        }
        let mut master = guard.master(&self.shared);
        master.1.insert(token.id, token.clone());
        self.publish(&master);
        Ok((token, key))
    }

    /// Change a user's descriptive fields with `f` (balances are the
    /// writer's: whatever `f` does to them is discarded).
    pub fn update_user(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut UserRecord) -> Result<(), AccountError>,
    ) -> Result<UserRecord, AccountError> {
        self.ensure_writable()?;
        let guard = self.lock_for_write();
        let stored =
            self.snapshot().users.get(&id).map(|u| UserRecord::clone(u)).ok_or(AccountError::NotFound("user"))?;
        let mut next = stored.clone();
        f(&mut next)?;
        next.id = id;
        let keep = |stored: &UserRecord, merged: &mut UserRecord| {
            (merged.quota, merged.used_quota, merged.request_count) =
                (stored.quota, stored.used_quota, stored.request_count);
        };
        let user = match &self.backend {
            Backend::Sled(store) => merge_in(&store.tree("users")?, id, &next, keep)?,
            Backend::Pg(db) => {
                keep(&stored, &mut next);
                if !db.update_user(&next)? {
                    return Err(AccountError::NotFound("user"));
                }
                next
            }
        };
        let mut master = guard.master(&self.shared);
        master.0.insert(id, user.clone());
        self.publish(&master);
        Ok(user)
    }

    /// Change a token's descriptive fields with `f` (balances, owner and key
    /// are kept).
    pub fn update_token(
        &self,
        id: u64,
        f: &mut dyn FnMut(&mut TokenRecord) -> Result<(), AccountError>,
    ) -> Result<TokenRecord, AccountError> {
        self.ensure_writable()?;
        let guard = self.lock_for_write();
        let stored =
            self.snapshot().tokens.get(&id).map(|t| TokenRecord::clone(t)).ok_or(AccountError::NotFound("token"))?;
        let mut next = stored.clone();
        f(&mut next)?;
        next.id = id;
        let keep = |stored: &TokenRecord, merged: &mut TokenRecord| {
            merged.user_id = stored.user_id;
            merged.key_hash.clone_from(&stored.key_hash);
            merged.key_hint.clone_from(&stored.key_hint);
            (merged.remain_quota, merged.used_quota) = (stored.remain_quota, stored.used_quota);
        };
        let token = match &self.backend {
            Backend::Sled(store) => merge_in(&store.tree("tokens")?, id, &next, keep)?,
            Backend::Pg(db) => {
                keep(&stored, &mut next);
                if !db.update_token(&next)? {
                    return Err(AccountError::NotFound("token"));
                }
                next
            }
        };
        let mut master = guard.master(&self.shared);
        master.1.insert(id, token.clone());
        self.publish(&master);
        Ok(token)
    }

    /// Delete a token.
    pub fn delete_token(&self, id: u64) -> Result<TokenRecord, AccountError> {
        self.ensure_writable()?;
        let guard = self.lock_for_write();
        let token =
            self.snapshot().tokens.get(&id).map(|t| TokenRecord::clone(t)).ok_or(AccountError::NotFound("token"))?;
        match &self.backend {
            Backend::Sled(store) => {
                let tokens = store.tree("tokens")?;
                tokens.remove(id.to_be_bytes()).map_err(anyhow::Error::from)?;
                tokens.flush().map_err(anyhow::Error::from)?;
            }
            Backend::Pg(db) => {
                db.delete_token(id)?;
            }
        }
        let mut master = guard.master(&self.shared);
        master.1.remove(&id);
        self.publish(&master);
        Ok(token)
    }

    /// Delete a user and every token of theirs. Their log rows stay.
    pub fn delete_user(&self, id: u64) -> Result<UserRecord, AccountError> {
        self.ensure_writable()?;
        let guard = self.lock_for_write();
        let snapshot = self.snapshot();
        let user = snapshot.users.get(&id).map(|u| UserRecord::clone(u)).ok_or(AccountError::NotFound("user"))?;
        let owned: Vec<u64> = snapshot.tokens.values().filter(|t| t.user_id == id).map(|t| t.id).collect();
        match &self.backend {
            Backend::Sled(store) => {
                let tokens = store.tree("tokens")?;
                for t in &owned {
                    tokens.remove(t.to_be_bytes()).map_err(anyhow::Error::from)?;
                }
                let users = store.tree("users")?;
                users.remove(id.to_be_bytes()).map_err(anyhow::Error::from)?;
                users.flush().map_err(anyhow::Error::from)?;
                tokens.flush().map_err(anyhow::Error::from)?;
            }
            Backend::Pg(db) => {
                db.delete_user(id)?;
            }
        }
        let mut master = guard.master(&self.shared);
        for t in owned {
            master.1.remove(&t);
        }
        master.0.remove(&id);
        self.publish(&master);
        Ok(user)
    }
}
