//! Tenant API key secrets: generated randomly, shown once, stored as a SHA-256 hash.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Every tenant key starts with this, so it is recognisable in configs and secret scanners.
pub const PREFIX: &str = "cyb_";
/// 32 random bytes as unpadded base64url.
const SECRET_CHARS: usize = 43;
/// How much of a key is kept in clear to tell keys apart in lists.
const DISPLAY_CHARS: usize = PREFIX.len() + 8;

/// A freshly generated key. The full secret exists only in the response that creates it.
pub struct NewApiKey {
    pub secret: String,
    pub display_prefix: String,
    pub hash: [u8; 32],
}

impl NewApiKey {
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        let secret = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        Ok(Self {
            display_prefix: secret[..DISPLAY_CHARS].to_owned(),
            hash: hash_secret(&secret),
            secret,
        })
    }
}

/// Whether a bearer token has the shape of a tenant key (cheap check before hashing).
pub fn looks_like_key(token: &str) -> bool {
    token.len() == PREFIX.len() + SECRET_CHARS
        && token.starts_with(PREFIX)
        && token[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// SHA-256 is enough for 256-bit random secrets: nothing to brute-force, no salt needed.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_recognised_and_distinct() {
        let a = NewApiKey::generate().unwrap();
        let b = NewApiKey::generate().unwrap();
        assert!(looks_like_key(&a.secret));
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash_secret(&a.secret));
        assert!(a.secret.starts_with(&a.display_prefix));
        assert!(!looks_like_key("cyb_short"));
        assert!(!looks_like_key(&format!("xyz_{}", &a.secret[4..])));
    }
}
