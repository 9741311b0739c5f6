//! Short-lived tokens minted by the gateway (SPEC §10), so that a browser never holds a
//! long-lived key: a key's holder (an app's backend) asks `POST /.portcullis/token` for a token
//! that authenticates as that key, on one route, until it expires.
//!
//! A token is `pct_` + base64url(payload) + `.` + base64url(tag): the payload names the key (its
//! id and the first 8 bytes of its stored hash, so a new key under the same id does not inherit
//! old tokens), the route and the expiry; the tag is HMAC-SHA256 over the payload with
//! `[tokens] secret`. The key itself is never in a token. Verification recomputes the tag and
//! compares it in constant time (the `hmac` crate's `verify_slice`), before the payload is read.
//! A token is dead when it expires, when its key is disabled, removed, expired or replaced, and
//! when the secret changes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const PREFIX: &str = "pct_";
/// Tokens longer than this are not parsed (they carry a key id and a route name).
const MAX_LEN: usize = 4096;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub key_id: String,
    /// The first 8 bytes of the key's stored SHA-256 hash, in hex.
    pub key_fp: String,
    pub route: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
}

/// The part of a key's hash a token carries.
pub fn fingerprint(hash: &[u8; 32]) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

/// Mints a token for `claims`.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let payload = format!(
        "v1|{}|{}|{}|{}",
        claims.key_id, claims.key_fp, claims.route, claims.exp
    );
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    let tag = m.finalize().into_bytes();
    format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(payload.as_bytes()),
        URL_SAFE_NO_PAD.encode(tag)
    )
}

/// Why a token was refused (all are 401 `invalid_token`; the reason is for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    BadTag,
    Expired,
}

/// Verifies `token` (with its `pct_` prefix) and returns its claims; `now`: seconds since the
/// epoch.
pub fn verify(secret: &[u8], token: &str, now: i64) -> Result<Claims, Refused> {
    let body = token.strip_prefix(PREFIX).ok_or(Refused::Malformed)?;
    if body.len() > MAX_LEN {
        return Err(Refused::Malformed);
    }
    let (payload_b64, tag_b64) = body.split_once('.').ok_or(Refused::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| Refused::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag_b64)
        .map_err(|_| Refused::Malformed)?;
    let mut m = mac(secret);
    m.update(&payload);
    m.verify_slice(&tag).map_err(|_| Refused::BadTag)?;
    // Authentic from here on: the gateway wrote this payload.
    let text = std::str::from_utf8(&payload).map_err(|_| Refused::Malformed)?;
    let mut parts = text.split('|');
    let (Some("v1"), Some(key_id), Some(key_fp), Some(route), Some(exp), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(Refused::Malformed);
    };
    let exp: i64 = exp.parse().map_err(|_| Refused::Malformed)?;
    if now >= exp {
        return Err(Refused::Expired);
    }
    Ok(Claims {
        key_id: key_id.to_owned(),
        key_fp: key_fp.to_owned(),
        route: route.to_owned(),
        exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims() -> Claims {
        Claims {
            key_id: "browser-demo".into(),
            key_fp: fingerprint(&[7; 32]),
            route: "realtime".into(),
            exp: 1_800_000_060,
        }
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let t = mint(SECRET, &claims());
        assert!(t.starts_with("pct_"));
        assert_eq!(verify(SECRET, &t, 1_800_000_000), Ok(claims()));
        assert_eq!(verify(SECRET, &t, 1_800_000_060), Err(Refused::Expired));
    }

    #[test]
    fn another_secret_or_any_changed_byte_is_refused() {
        let t = mint(SECRET, &claims());
        assert_eq!(
            verify(b"another-secret-of-32-bytes-length", &t, 0),
            Err(Refused::BadTag)
        );
        // Each character changed in turn: never accepted (a changed payload fails the tag).
        for i in PREFIX.len()..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let forged = String::from_utf8(b).unwrap();
            if forged != t {
                assert!(verify(SECRET, &forged, 0).is_err(), "accepted {forged}");
            }
        }
        assert_eq!(verify(SECRET, "pct_", 0), Err(Refused::Malformed));
        assert_eq!(verify(SECRET, "pcx_abc", 0), Err(Refused::Malformed));
    }

    #[test]
    fn the_token_holds_no_key_material() {
        let t = mint(SECRET, &claims());
        let payload = t[PREFIX.len()..].split_once('.').unwrap().0;
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(text, "v1|browser-demo|0707070707070707|realtime|1800000060");
    }
}
