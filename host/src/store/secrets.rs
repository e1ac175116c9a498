//! Secrets at rest: upstream keys are stored encrypted (ChaCha20-Poly1305,
//! from `ring`, already in the build for TLS) with a key the operator
//! controls — `secrets_key` in the configuration or `WASMGATE_SECRETS_KEY`
//! — or, when none is given, a key generated into `<data>/secret.key`
//! (readable by the gateway's user only). Keep that file, or better the
//! configured key, apart from backups of the data directory: a copy of the
//! store alone does not reveal the keys.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use ring::aead::{CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// Prefix of an encrypted value.
const PREFIX: &str = "enc:v1:";
/// The generated key file.
pub const KEY_FILE: &str = "secret.key";

/// Encrypts and decrypts stored secrets.
pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox")
    }
}

impl SecretBox {
    /// A box with the key derived from `passphrase` (any length; use a long
    /// random one).
    pub fn from_passphrase(passphrase: &str) -> Result<Self> {
        let digest: [u8; 32] = Sha256::digest(passphrase.as_bytes()).into();
        let key = UnboundKey::new(&CHACHA20_POLY1305, &digest).map_err(|_| anyhow!("invalid secrets key"))?;
        Ok(Self { key: LessSafeKey::new(key), rng: SystemRandom::new() })
    }

    /// The configured key, else the one in `<dir>/secret.key` (created on
    /// first use).
    pub fn open(configured: Option<&str>, dir: &Path) -> Result<Self> {
        if let Some(k) = configured.filter(|k| !k.is_empty()) {
            if k.len() < 16 {
                bail!("secrets_key must be at least 16 characters (use a long random string)");
            }
            return Self::from_passphrase(k);
        }
        let path = dir.join(KEY_FILE);
        let key = match std::fs::read_to_string(&path) {
            Ok(k) => k.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow!("no randomness for the secrets key"))?;
                let k = hex::encode(bytes);
                std::fs::write(&path, &k).with_context(|| format!("writing {}", path.display()))?;
                tracing::warn!(file = %path.display(), "generated a key for secrets at rest; set secrets_key in the configuration to keep it apart from the data");
                k
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::from_passphrase(&key)
    }

    /// `plaintext` encrypted, as stored.
    pub fn seal(&self, plaintext: &str) -> String {
        if plaintext.is_empty() {
            return String::new();
        }
        let mut nonce = [0u8; NONCE_LEN];
        if self.rng.fill(&mut nonce).is_err() {
            // The system's randomness failing is not recoverable.
            panic!("the system random number generator failed");
        }
        let mut data = plaintext.as_bytes().to_vec();
        let sealed =
            self.key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), ring::aead::Aad::empty(), &mut data);
        if sealed.is_err() {
            panic!("encrypting a secret failed");
        }
        format!("{PREFIX}{}:{}", hex::encode(nonce), hex::encode(data))
    }

    /// A stored value decrypted; a value without the prefix is returned as
    /// it is (written before encryption, sealed on the next write).
    pub fn open_value(&self, stored: &str) -> Result<String> {
        let Some(rest) = stored.strip_prefix(PREFIX) else { return Ok(stored.to_string()) };
        let (nonce, data) = rest.split_once(':').ok_or_else(|| anyhow!("malformed encrypted value"))?;
        let nonce: [u8; NONCE_LEN] =
            hex::decode(nonce).ok().and_then(|n| n.try_into().ok()).ok_or_else(|| anyhow!("malformed nonce"))?;
        let mut data = hex::decode(data).map_err(|_| anyhow!("malformed encrypted value"))?;
        let plain =
            self.key.open_in_place(Nonce::assume_unique_for_key(nonce), ring::aead::Aad::empty(), &mut data).map_err(
                |_| anyhow!("a stored secret cannot be decrypted: the secrets key is not the one it was written with"),
            )?;
        String::from_utf8(plain.to_vec()).map_err(|_| anyhow!("a stored secret is not text"))
    }

    /// Whether `stored` is encrypted.
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_round_trip_and_a_wrong_key_fails() {
        let a = SecretBox::from_passphrase("0123456789abcdef-a").expect("key");
        let sealed = a.seal("sk-upstream-secret");
        assert!(SecretBox::is_sealed(&sealed) && !sealed.contains("sk-upstream"));
        assert_ne!(sealed, a.seal("sk-upstream-secret"), "fresh nonce per value");
        assert_eq!(a.open_value(&sealed).expect("open"), "sk-upstream-secret");
        assert_eq!(a.open_value("plain-old").expect("legacy"), "plain-old");
        let b = SecretBox::from_passphrase("0123456789abcdef-b").expect("key");
        assert!(b.open_value(&sealed).is_err());
    }
}
