//! The embedded sled store. For now it keeps gateway options (generated
//! tokens); channels, users, tokens and logs move here with their issues.

use std::path::Path;

use anyhow::{Context, Result};
use rand::Rng;

/// Schema version written on first open, for future migrations.
const SCHEMA_VERSION: u32 = 1;

/// The gateway's data store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    options: sled::Tree,
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let db = sled::open(dir.join("db")).with_context(|| format!("opening sled store in {}", dir.display()))?;
        let options = db.open_tree("options")?;
        if options.get("schema_version")?.is_none() {
            options.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
        }
        Ok(Self { db, options })
    }

    /// The option `key`, creating it with `make` on first use.
    pub fn option_or_insert(&self, key: &str, make: impl FnOnce() -> String) -> Result<String> {
        if let Some(v) = self.options.get(key)? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let value = make();
        // Another process may race us; keep whichever landed first.
        let _ = self.options.compare_and_swap(key, None as Option<&[u8]>, Some(value.as_bytes()))?;
        let stored = self.options.get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(stored.unwrap_or(value))
    }

    /// Flush everything to disk (on shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// A random gateway key: `sk-` and 48 alphanumerics.
pub fn random_key(prefix: &str) -> String {
    let mut rng = rand::rng();
    let body: String = (0..48).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect();
    format!("{prefix}{body}")
}
