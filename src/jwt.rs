//! JWT verification (SPEC §10): tokens from an identity provider the operator already runs
//! (Authentik, Keycloak, Authelia) accepted on routes with `auth = "jwt"` or `"key_or_jwt"`.
//!
//! Verified with the `jsonwebtoken` crate. What this module adds is the policy: only the
//! algorithms the issuer lists (so `alg: none` and an RS256 key used as an HS256 secret, the
//! classic confusion, are refused before any signature check), a key of the algorithm's own
//! family (HMAC only from `secret`, RSA/EC/Ed25519 only from the JWKS), `iss`, `aud`, `exp`, `nbf`
//! with `leeway`, and `required_claims` compared exactly. A valid token's identity is
//! `<issuer name>:<sub>`.
//!
//! An issuer's public keys come from its `jwks_file` (read with the config) or its `jwks_url`
//! (fetched and refreshed off the request path by [`crate::jwks`], read here without a lock).
//!
//! A refusal is [`Refused::Invalid`] (it counts toward lockout) or [`Refused::NoKey`]: the token
//! claims an issuer that has no key to check it with — none fetched yet from its `jwks_url`, or
//! none with the token's `kid`, as right after the provider rotates its signing key. Such a
//! token may well be valid, so it does not count toward lockout (an office behind one address
//! would lock itself out), and it wakes the issuer's fetch task
//! ([`crate::jwks::Remote::fetch_soon`], rate-limited) so that a new key is picked up soon. It
//! cannot be accepted either way.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

/// The algorithms an issuer may list (SPEC §10).
pub const ALGORITHMS: [(&str, Algorithm); 4] = [
    ("RS256", Algorithm::RS256),
    ("ES256", Algorithm::ES256),
    ("EdDSA", Algorithm::EdDSA),
    ("HS256", Algorithm::HS256),
];

pub use crate::jwks::{Keys, parse_jwks};

/// The longest `sub` accepted (it becomes the identity in audit records and limiter state).
const MAX_SUBJECT: usize = 256;

/// One `[[issuers]]` entry, with its keys loaded.
pub struct Issuer {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    /// Verification keys: `(kid, key)`, from the JWKS file or the secret.
    keys: Keys,
    /// The keys fetched from `jwks_url` (SPEC §10), when the issuer has one.
    pub remote: Option<std::sync::Arc<crate::jwks::Remote>>,
    pub leeway: Duration,
    pub required: serde_json::Map<String, serde_json::Value>,
    /// Caps for each subject of this issuer separately (SPEC §10 `[[issuers]] budget`).
    pub budget: std::sync::Arc<[crate::llm::budget::Cap]>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .field("keys", &self.keys.len())
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// Whether `alg` takes a key of the kind `key` is (HMAC secret, RSA, EC, Ed25519).
fn same_family(alg: Algorithm, key: &DecodingKey) -> bool {
    use jsonwebtoken::AlgorithmFamily as F;
    matches!(
        (alg, key.family()),
        (Algorithm::HS256, F::Hmac)
            | (Algorithm::RS256, F::Rsa)
            | (Algorithm::ES256, F::Ec)
            | (Algorithm::EdDSA, F::Ed)
    )
}

impl Issuer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        issuer: String,
        audiences: Vec<String>,
        algorithms: Vec<Algorithm>,
        jwks: Option<&str>,
        secret: Option<&[u8]>,
        leeway: Duration,
        required: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Issuer, String> {
        let mut keys = match jwks {
            Some(text) => parse_jwks(text.as_bytes(), &algorithms)?,
            None => Vec::new(),
        };
        if let Some(s) = secret {
            keys.push((None, DecodingKey::from_secret(s)));
        }
        Ok(Issuer {
            name,
            issuer,
            audiences,
            algorithms,
            keys,
            remote: None,
            leeway,
            required,
            budget: std::sync::Arc::from([]),
        })
    }

    /// Verifies `token` for this issuer; its `sub` when valid. [`Refused::NoKey`] says only
    /// that no key could check it, whatever its `iss` ([`verify`] looks at that).
    fn verify(&self, token: &str) -> Result<String, Refused> {
        use Refused::Invalid;
        // An unknown `alg`, `none` among them, fails here.
        let header = decode_header(token).map_err(|_| Invalid)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(Invalid);
        }
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
        }
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        if self.audiences.is_empty() {
            v.set_required_spec_claims(&["exp", "iss", "sub"]);
        } else {
            // A token without `aud` must not pass where audiences are checked.
            v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        }
        // The fetched set of a `jwks_url`, as it is now (no lock; a refresh swaps it whole).
        let guard = self.remote.as_ref().map(|r| r.keys());
        // A `jwks_url` whose first fetch has not succeeded yet.
        let unfetched = guard.as_ref().is_some_and(|g| g.is_none());
        let fetched: &[(Option<String>, DecodingKey)] = match guard.as_ref() {
            Some(g) => g.as_deref().map_or(&[][..], Vec::as_slice),
            None => &[],
        };
        let mut candidates = self
            .keys
            .iter()
            .chain(fetched)
            .filter(|(kid, key)| {
                same_family(header.alg, key)
                    && (header.kid.is_none() || kid.is_none() || *kid == header.kid)
            })
            .peekable();
        if candidates.peek().is_none() {
            // No keys yet, or none with the token's `kid` (of any kind: a `kid` of a key of
            // another kind is a token that does not match its key, an invalid one).
            let unknown_kid = header.kid.as_ref().is_some_and(|want| {
                !self
                    .keys
                    .iter()
                    .chain(fetched)
                    .any(|(kid, _)| kid.as_ref() == Some(want))
            });
            if unfetched || unknown_kid {
                tracing::debug!(issuer = %self.name, kid = ?header.kid, unfetched,
                    "no key of the issuer for the token");
                return Err(Refused::NoKey);
            }
            return Err(Invalid);
        }
        for (_, key) in candidates {
            let Ok(data) = decode::<serde_json::Value>(token, key, &v) else {
                continue;
            };
            let claims = data.claims;
            // `iss` exactly: one string (the crate also accepts a list that holds it).
            if claims.get("iss").and_then(|i| i.as_str()) != Some(self.issuer.as_str()) {
                return Err(Invalid);
            }
            if !self
                .required
                .iter()
                .all(|(k, want)| claims.get(k) == Some(want))
            {
                return Err(Invalid);
            }
            let sub = claims.get("sub").and_then(|s| s.as_str()).ok_or(Invalid)?;
            let sane =
                !sub.is_empty() && sub.len() <= MAX_SUBJECT && !sub.chars().any(char::is_control);
            return if sane {
                Ok(sub.to_owned())
            } else {
                Err(Invalid)
            };
        }
        Err(Invalid)
    }
}

/// Why [`verify`] refused a token (both are 401 `invalid_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A bad signature, an unlisted algorithm, a claim that does not hold, not a JWT…: counts
    /// toward lockout.
    Invalid,
    /// The token claims (`iss`, unverified) an issuer that has no key to check it with: none
    /// fetched yet from its `jwks_url`, or none with the token's `kid`. It may be valid (the
    /// provider has just rotated its key), so it does not count toward lockout; the issuer's
    /// JWKS is fetched again soon.
    NoKey,
}

/// Whether `credential` has the shape of a JWT (three base64url parts, a JSON header) rather
/// than an API key, for `auth = "key_or_jwt"`.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.bytes().filter(|b| *b == b'.').count() == 2
}

/// Verifies `token` against `issuers` in turn: the first that accepts it gives the identity,
/// `(issuer, "<issuer name>:<sub>")`.
///
/// Refused, it is [`Refused::NoKey`] when an issuer the token claims (its unverified `iss`) has
/// no key for it and no issuer it claims found it invalid; that issuer's `jwks_url` is then
/// fetched again soon (rate-limited, off the request path). Else [`Refused::Invalid`].
pub fn verify<'a>(
    issuers: impl IntoIterator<Item = &'a Issuer>,
    token: &str,
) -> Result<(&'a Issuer, String), Refused> {
    let mut refusals: Vec<(&Issuer, Refused)> = Vec::new();
    for i in issuers {
        match i.verify(token) {
            Ok(sub) => return Ok((i, format!("{}:{sub}", i.name))),
            Err(r) => refusals.push((i, r)),
        }
    }
    if refusals.iter().all(|(_, r)| *r == Refused::Invalid) {
        return Err(Refused::Invalid);
    }
    // Only now, and only to tell which issuer the token is meant for (never to accept it): a
    // token of issuer A must not escape lockout because issuer B has no key with its `kid`.
    let claimed = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token)
        .ok()
        .and_then(|d| d.claims.get("iss")?.as_str().map(str::to_owned));
    let Some(claimed) = claimed else {
        return Err(Refused::Invalid);
    };
    let theirs = || refusals.iter().filter(|(i, _)| i.issuer == claimed);
    if theirs().any(|(_, r)| *r == Refused::Invalid) || theirs().next().is_none() {
        return Err(Refused::Invalid);
    }
    for (i, _) in theirs() {
        if let Some(remote) = &i.remote {
            remote.fetch_soon();
        }
    }
    Err(Refused::NoKey)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use serde_json::json;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    /// An RS256 issuer `name` for `iss` whose JWKS holds one RSA key, `kid` `rsa-1`.
    fn issuer(name: &str, iss: &str) -> Issuer {
        let jwks = json!({"keys": [{
            "kty": "RSA", "kid": "rsa-1", "e": "AQAB",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        }]});
        Issuer::new(
            name.to_owned(),
            iss.to_owned(),
            Vec::new(),
            vec![Algorithm::RS256],
            Some(&jwks.to_string()),
            None,
            Duration::from_secs(30),
            serde_json::Map::new(),
        )
        .unwrap()
    }

    /// A token with `header` and `claims` and a signature no key makes.
    fn token(header: serde_json::Value, claims: serde_json::Value) -> String {
        let part = |v: serde_json::Value| B64.encode(v.to_string());
        format!(
            "{}.{}.{}",
            part(header),
            part(claims),
            B64.encode([7u8; 256])
        )
    }

    fn refusal(issuers: &[&Issuer], token: &str) -> Refused {
        match verify(issuers.iter().copied(), token) {
            Ok((_, who)) => panic!("accepted as {who}"),
            Err(r) => r,
        }
    }

    #[test]
    fn a_kid_the_claimed_issuer_lacks_is_no_key_and_anything_else_invalid() {
        let a = issuer("a", "https://a.example/");
        let claims = |iss: &str| json!({"iss": iss, "sub": "alice", "exp": 4_000_000_000u64});
        let rs = |kid: &str| json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        let new_kid = token(rs("rsa-2"), claims("https://a.example/"));
        assert_eq!(refusal(&[&a], &new_kid), Refused::NoKey);
        // A known kid with a bad signature.
        let forged = token(rs("rsa-1"), claims("https://a.example/"));
        assert_eq!(refusal(&[&a], &forged), Refused::Invalid);
        // An unknown kid for another issuer than any of the route's.
        let elsewhere = token(rs("rsa-2"), claims("https://b.example/"));
        assert_eq!(refusal(&[&a], &elsewhere), Refused::Invalid);
        // No kid: every key of the kind is tried, so a failure is an invalid token.
        let no_kid = token(
            json!({"alg": "RS256", "typ": "JWT"}),
            claims("https://a.example/"),
        );
        assert_eq!(refusal(&[&a], &no_kid), Refused::Invalid);
        // An algorithm the issuer does not list, a payload that is not JSON.
        let es = token(
            json!({"alg": "ES256", "kid": "x"}),
            claims("https://a.example/"),
        );
        assert_eq!(refusal(&[&a], &es), Refused::Invalid);
        let [h, _, sig] = <[&str; 3]>::try_from(new_kid.split('.').collect::<Vec<_>>()).unwrap();
        let garbled = format!("{h}.{}.{sig}", B64.encode("not json"));
        assert_eq!(refusal(&[&a], &garbled), Refused::Invalid);
    }

    #[test]
    fn with_several_issuers_an_invalid_verdict_of_a_claimed_one_wins() {
        let a = issuer("a", "https://a.example/");
        let b = issuer("b", "https://b.example/");
        let claims = json!({"iss": "https://a.example/", "sub": "alice", "exp": 4_000_000_000u64});
        // `b` lacks the kid too, but the token is not `b`'s: still no key.
        let new_kid = token(json!({"alg": "RS256", "kid": "rsa-2"}), claims.clone());
        assert_eq!(refusal(&[&b, &a], &new_kid), Refused::NoKey);
        // A second issuer of the same `iss` that has the kid finds the forgery invalid.
        let mut a2 = issuer("a2", "https://a.example/");
        a2.keys[0].0 = Some("rsa-2".to_owned());
        assert_eq!(refusal(&[&a, &a2], &new_kid), Refused::Invalid);
        assert_eq!(refusal(&[&a2, &a], &new_kid), Refused::Invalid);
    }
}
