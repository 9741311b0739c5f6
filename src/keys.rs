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

/// A key's SHA-256 digest, as the config holds it: `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        KeyHash(digest(key.as_bytes()))
    }
}

impl std::str::FromStr for KeyHash {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<KeyHash, Self::Err> {
        const BAD: &str = "expected \"sha256:<64 hex digits>\" (the output of `portcullis keygen` or `portcullis hash-key`)";
        let hex = s.strip_prefix("sha256:").ok_or(BAD)?.as_bytes();
        if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(BAD);
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex.chunks(2)) {
            let txt = std::str::from_utf8(pair).map_err(|_| BAD)?;
            *o = u8::from_str_radix(txt, 16).map_err(|_| BAD)?;
        }
        Ok(KeyHash(out))
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// `sha256:<64 hex>`, the form the config stores.
pub fn hash_string(key: &str) -> String {
    KeyHash::of(key).to_string()
}

/// Key ids and route names: letters, digits, `-`, `_` and `.`, so that they are safe in logs,
/// metric labels and the `usage` table.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
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
    fn hashes_round_trip_and_bad_ones_are_refused() {
        let h = KeyHash::of("abc");
        assert_eq!(h.to_string().parse::<KeyHash>(), Ok(h));
        for bad in [
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:",
            "sha256:+a7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
            "sha256:é7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015",
        ] {
            assert!(bad.parse::<KeyHash>().is_err(), "{bad}");
        }
        assert!(is_valid_id("phone-1.a_b") && !is_valid_id("") && !is_valid_id("a b"));
    }

    #[test]
    fn known_hash() {
        assert_eq!(
            hash_string("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
