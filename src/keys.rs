//! Client API keys: generation and hashing (SPEC §1).
//!
//! A key is `pcx_` + 43 characters of URL-safe base64 of 32 bytes from the OS CSPRNG. The config
//! holds only `sha256:<hex>` of the whole key, so a leaked config leaks no usable key. (SHA-256
//! without salt is right here: the key has 256 bits of entropy, so there is nothing to brute-force.)

use base64::Engine;
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "pcx_";

/// A new random key. Fails only if the OS has no randomness to give.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)?;
    Ok(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    ))
}

pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// `sha256:<64 hex>`, the form the config stores.
pub fn hash_string(key: &str) -> String {
    let d = digest(key.as_bytes());
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shape() {
        let k = generate().unwrap();
        assert!(k.starts_with("pcx_"));
        assert_eq!(k.len(), 4 + 43);
        assert!(
            k[4..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(generate().unwrap(), k);
    }

    #[test]
    fn known_hash() {
        assert_eq!(
            hash_string("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
