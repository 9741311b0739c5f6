//! API keys (SPEC §3 step 7, §3.4 "Keys").
//!
//! A presented key is hashed (SHA-256) and the digest looked up; the stored digest is then
//! compared in constant time. No secret is ever compared byte by byte, and the config holds only
//! digests. Presenting two different credentials is refused outright: a gateway and an upstream
//! that each pick "their" header is how one key gets checked and another one used.
//!
//! Which failures count towards a lockout is decided here (invalid and expired keys do, a
//! missing key does not); the lockout itself is `lockout.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

use crate::config::runtime::{Auth, Key, Route, Tokens};
use crate::error::GatewayError;
use crate::keys;

/// What a request presented as its credential.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    None,
    One(&'a str),
    /// Two credentials that differ, an `Authorization` that is not `Bearer <key>`, or an empty one.
    Malformed,
}

/// Finds the client's key in the configured headers and the opt-in query parameter.
pub fn extract<'a>(headers: &'a HeaderMap, query: Option<&'a str>, auth: &Auth) -> Presented<'a> {
    extract_with(headers, query, &auth.headers, auth.query_param.as_deref())
}

/// [`extract`] with a route's own query parameter (a route's `query_param` overrides
/// `auth.query_param`).
pub fn extract_with<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    key_headers: &[http::header::HeaderName],
    query_param: Option<&str>,
) -> Presented<'a> {
    let mut found: Option<&'a str> = None;
    let mut add = |k: &'a str| -> bool {
        match found {
            None => {
                found = Some(k);
                true
            }
            Some(prev) => prev == k,
        }
    };
    for name in key_headers {
        let mut lines = 0;
        for v in headers.get_all(name) {
            lines += 1;
            let Ok(v) = v.to_str() else {
                return Presented::Malformed;
            };
            let key = if *name == AUTHORIZATION {
                // RFC 6750 §2.1; the scheme is case-insensitive (RFC 9110 §11.1).
                match v.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                    _ => return Presented::Malformed,
                }
            } else {
                v.trim()
            };
            if key.is_empty() {
                return Presented::Malformed;
            }
            if !add(key) {
                return Presented::Malformed;
            }
        }
        // Two header lines of the same name are two credentials, even if equal.
        if lines > 1 {
            return Presented::Malformed;
        }
    }
    if let (Some(param), Some(q)) = (query_param, query) {
        let mut n = 0;
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == param {
                n += 1;
                if v.is_empty() || n > 1 || !add(v) {
                    return Presented::Malformed;
                }
            }
        }
    }
    match found {
        None => Presented::None,
        Some(k) => Presented::One(k),
    }
}

/// A key's user as its `user_header` names it (SPEC §8): 1 to 128 characters of
/// `[A-Za-z0-9._@:-]`. `Ok(None)` when the header is absent; `Err` (400) when it is repeated or
/// its value is anything else, so that one user cannot pass as another or as none.
pub fn user_name<'a>(
    headers: &'a HeaderMap,
    name: &http::HeaderName,
) -> Result<Option<&'a str>, crate::error::GatewayError> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(crate::error::GatewayError::BadRequest);
    }
    valid_user(v.as_bytes())
        .map(Some)
        .ok_or(crate::error::GatewayError::BadRequest)
}

/// `bytes` as a user name, if it is one (see [`user_name`]).
pub fn valid_user(bytes: &[u8]) -> Option<&str> {
    let ok = (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b':' | b'-'));
    // All ASCII: the conversion cannot fail.
    ok.then(|| std::str::from_utf8(bytes).ok()).flatten()
}

/// The query string without `param` (SPEC §2 `auth.query_param`: stripped before forwarding).
pub fn strip_query_param(query: &str, param: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map(|(k, _)| k).unwrap_or(pair) != param)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Keys by digest (and by id, for the short-lived tokens that name one), for one config.
pub struct KeyStore {
    by_digest: HashMap<[u8; 32], usize>,
    by_id: HashMap<String, usize>,
}

/// A key that passed every check.
pub struct Authenticated {
    pub index: usize,
}

impl KeyStore {
    pub fn new(keys: &[Key]) -> KeyStore {
        KeyStore {
            by_digest: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.hash.0, i))
                .collect(),
            by_id: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.id.clone(), i))
                .collect(),
        }
    }

    /// Authenticates `presented` for `route`. On failure also returns the key id when the key was
    /// recognised (for the audit log) and whether the failure counts towards lockout.
    ///
    /// With `tokens`, a short-lived token (`pct_...`) authenticates as its key on its route only
    /// (SPEC §10); any failure of one is 401 `invalid_token` and counts towards lockout. On the
    /// route that mints tokens (`mint`), only a key will do, and the key's own route scope is
    /// checked against the route it asks a token for instead.
    pub fn check(
        &self,
        keys: &[Key],
        presented: Presented<'_>,
        route: &Route,
        tokens: Option<&Tokens>,
        now: SystemTime,
    ) -> Result<Authenticated, (GatewayError, Option<usize>, bool)> {
        let key = match presented {
            Presented::None => return Err((GatewayError::MissingApiKey, None, false)),
            Presented::Malformed => return Err((GatewayError::InvalidApiKey, None, true)),
            Presented::One(k) => k,
        };
        if let Some(t) = tokens
            && key.starts_with(crate::tokens::PREFIX)
            && !route.mint
        {
            return self.check_token(keys, key, &route.name, t, now);
        }
        let digest = keys::digest(key.as_bytes());
        let index = match self.by_digest.get(&digest) {
            Some(&i) if bool::from(keys[i].hash.0.ct_eq(&digest)) => i,
            _ => return Err((GatewayError::InvalidApiKey, None, true)),
        };
        let k = &keys[index];
        if k.disabled {
            return Err((GatewayError::InvalidApiKey, Some(index), true));
        }
        if k.expires.is_some_and(|e| now >= e) {
            return Err((GatewayError::ExpiredApiKey, Some(index), true));
        }
        if !route.mint && !k.allows(&route.name) {
            return Err((GatewayError::KeyNotAllowed, Some(index), false));
        }
        Ok(Authenticated { index })
    }

    /// A short-lived token: authentic, unexpired, for this route, and its key still there (the
    /// same key: id and hash), enabled, unexpired and allowed on the route.
    fn check_token(
        &self,
        keys: &[Key],
        token: &str,
        route: &str,
        tokens: &Tokens,
        now: SystemTime,
    ) -> Result<Authenticated, (GatewayError, Option<usize>, bool)> {
        use secrecy::ExposeSecret;
        let refused = |known| Err((GatewayError::InvalidToken, known, true));
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let claims =
            match crate::tokens::verify(tokens.secret.expose_secret().as_bytes(), token, secs) {
                Ok(c) => c,
                Err(why) => {
                    tracing::debug!(?why, "token refused");
                    return refused(None);
                }
            };
        let Some(&index) = self.by_id.get(&claims.key_id) else {
            return refused(None);
        };
        let k = &keys[index];
        let alive = crate::tokens::fingerprint(&k.hash.0) == claims.key_fp
            && !k.disabled
            && k.expires.is_none_or(|e| now < e)
            && claims.route == route
            && k.allows(route);
        if !alive {
            return refused(Some(index));
        }
        Ok(Authenticated { index })
    }
}

/// Key ids shared as `Arc<str>` so limiter subjects clone cheaply.
pub fn key_ids(keys: &[Key]) -> Vec<Arc<str>> {
    keys.iter().map(|k| Arc::from(k.id.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::HeaderName;
    use std::time::Duration;

    fn auth(query: Option<&str>) -> Auth {
        Auth {
            headers: vec![AUTHORIZATION, HeaderName::from_static("x-api-key")],
            query_param: query.map(str::to_owned),
            lockout_failures: 3,
            lockout_window: Duration::from_secs(60),
            lockout_duration: Duration::from_secs(900),
        }
    }

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn extraction_table() {
        let a = auth(Some("api_key"));
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, Presented<'a>);
        let cases: &[Case] = &[
            (&[], None, Presented::None),
            (
                &[("authorization", "Bearer k1")],
                None,
                Presented::One("k1"),
            ),
            (
                &[("authorization", "bearer k1")],
                None,
                Presented::One("k1"),
            ),
            (&[("x-api-key", "k1")], None, Presented::One("k1")),
            (&[], Some("a=1&api_key=k1"), Presented::One("k1")),
            (
                &[("authorization", "Bearer k1"), ("x-api-key", "k1")],
                None,
                Presented::One("k1"),
            ),
            (
                &[("authorization", "Bearer k1"), ("x-api-key", "k2")],
                None,
                Presented::Malformed,
            ),
            (
                &[
                    ("authorization", "Bearer k1"),
                    ("authorization", "Bearer k1"),
                ],
                None,
                Presented::Malformed,
            ),
            (&[("authorization", "Bearer ")], None, Presented::Malformed),
            (
                &[("authorization", "Basic dXNlcjpwYXNz")],
                None,
                Presented::Malformed,
            ),
            (
                &[("x-api-key", "k1")],
                Some("api_key=k2"),
                Presented::Malformed,
            ),
            (&[], Some("api_key=k1&api_key=k1"), Presented::Malformed),
            (&[], Some("api_key="), Presented::Malformed),
        ];
        for (hs, q, want) in cases {
            let mut m = HeaderMap::new();
            for (k, v) in *hs {
                m.append(
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            assert_eq!(&extract(&m, *q, &a), want, "{hs:?} {q:?}");
        }
        // Without query_param configured, the query is ignored.
        assert_eq!(
            extract(&h(&[]), Some("api_key=k1"), &auth(None)),
            Presented::None
        );
    }

    #[test]
    fn strips_only_the_key_parameter() {
        assert_eq!(
            strip_query_param("a=1&api_key=x&b=2", "api_key").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(strip_query_param("api_key=x", "api_key"), None);
        assert_eq!(
            strip_query_param("api_keyx=1", "api_key").as_deref(),
            Some("api_keyx=1")
        );
    }
}
