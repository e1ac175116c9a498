//! The store's manifest: `<data>/store.manifest`, a small file kept beside
//! sled recording which store the directory holds and how far it had got
//! (the billing journal's committed sequence number, the id counters). A
//! store that opens empty, replaced or behind its manifest — a truncated
//! or rolled-back `db`, a lost snapshot — is refused with the recovery
//! steps, instead of starting with old or no data.
//!
//! The manifest is written after sled has flushed what it records, so a
//! crash can leave it behind sled, never ahead of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// File name in the data directory.
pub const FILE: &str = "store.manifest";

/// What the manifest records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Manifest {
    /// Random id of the store, also kept inside it.
    pub store_id: String,
    /// Progress markers (`journal_seq`, `next_user_id`...), each only
    /// ever increasing.
    pub marks: BTreeMap<String, u64>,
}

/// The recovery steps, for refusal messages.
pub const RECOVERY: &str = "Restore the data directory from a backup (docs/security.md, \"Recovering a damaged \
    store\"). To start with what the store holds anyway — accepting that what it lost is gone — delete \
    the file store.manifest in the data directory.";

impl Manifest {
    /// The manifest of `dir`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        match std::fs::read(path(dir)) {
            Ok(raw) => match serde_json::from_slice(&raw) {
                Ok(m) => Ok(Some(m)),
                Err(e) => bail!("{} is unreadable ({e}). {RECOVERY}", path(dir).display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Write it atomically.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap_or_default())?;
        std::fs::rename(&tmp, path(dir))
    }

    /// Refuse a store whose mark `name` is `actual` when the manifest
    /// recorded more.
    pub fn check_mark(&self, name: &str, actual: u64) -> Result<()> {
        match self.marks.get(name) {
            Some(&recorded) if actual < recorded => bail!(
                "the store is behind its manifest: `{name}` is {actual}, the manifest recorded {recorded} — \
                 the store lost writes (a truncated or restored db). {RECOVERY}"
            ),
            _ => Ok(()),
        }
    }
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}
