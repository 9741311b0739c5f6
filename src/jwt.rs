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
            Some(text) => parse_jwks(text.as_bytes())?,
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

    /// Verifies `token` for this issuer; its `sub` when valid.
    fn verify(&self, token: &str) -> Option<String> {
        // An unknown `alg`, `none` among them, fails here.
        let header = decode_header(token).ok()?;
        if !self.algorithms.contains(&header.alg) {
            return None;
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
        let fetched = self.remote.as_ref().map(|r| r.keys());
        let fetched: &[(Option<String>, DecodingKey)] = match fetched.as_ref() {
            Some(guard) => match guard.as_deref() {
                Some(set) => set,
                None => {
                    tracing::debug!(issuer = %self.name, "no JWKS fetched yet from jwks_url");
                    &[]
                }
            },
            None => &[],
        };
        let candidates = self.keys.iter().chain(fetched).filter(|(kid, key)| {
            same_family(header.alg, key)
                && (header.kid.is_none() || kid.is_none() || *kid == header.kid)
        });
        for (_, key) in candidates {
            let Ok(data) = decode::<serde_json::Value>(token, key, &v) else {
                continue;
            };
            let claims = data.claims;
            // `iss` exactly: one string (the crate also accepts a list that holds it).
            if claims.get("iss").and_then(|i| i.as_str()) != Some(self.issuer.as_str()) {
                return None;
            }
            if !self
                .required
                .iter()
                .all(|(k, want)| claims.get(k) == Some(want))
            {
                return None;
            }
            let sub = claims.get("sub")?.as_str()?;
            let sane =
                !sub.is_empty() && sub.len() <= MAX_SUBJECT && !sub.chars().any(char::is_control);
            return sane.then(|| sub.to_owned());
        }
        None
    }
}

/// Whether `credential` has the shape of a JWT (three base64url parts, a JSON header) rather
/// than an API key, for `auth = "key_or_jwt"`.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.bytes().filter(|b| *b == b'.').count() == 2
}

/// Verifies `token` against `issuers` in turn: the first that accepts it gives the identity,
/// `(index in issuers, "<issuer name>:<sub>")`.
pub fn verify<'a>(
    issuers: impl IntoIterator<Item = &'a Issuer>,
    token: &str,
) -> Option<(&'a Issuer, String)> {
    issuers
        .into_iter()
        .find_map(|i| i.verify(token).map(|sub| (i, format!("{}:{sub}", i.name))))
}
