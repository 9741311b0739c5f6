//! API keys and lockout (SPEC §3 steps 5 and 7, §3.4 "Keys").
//!
//! A presented key is hashed (SHA-256) and the digest looked up; the stored digest is then
//! compared in constant time. No secret is ever compared byte by byte, and the config holds only
//! digests. Presenting two different credentials is refused outright: a gateway and an upstream
//! that each pick "their" header is how one key gets checked and another one used.
//!
//! Lockout: invalid and expired keys count as failures for the client IP (IPv6 by /64) across all
//! routes, whichever key they name; a missing key does not (a browser's first request has none).
//! `lockout_failures` within `lockout_window` locks the IP out of every route for
//! `lockout_duration`. Lockout state is bounded like the rate limiters'.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

use crate::config::runtime::{Auth, Key};
use crate::error::GatewayError;
use crate::keys;
use crate::rate_limit::{Entry, LOCKOUT_PARTITION, Store, Subject};

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
    for name in &auth.headers {
        for v in headers.get_all(name) {
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
        if headers.get_all(name).iter().count() > 1 {
            return Presented::Malformed;
        }
    }
    if let (Some(param), Some(q)) = (&auth.query_param, query) {
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

/// The query string without `param` (SPEC §2 `auth.query_param`: stripped before forwarding).
pub fn strip_query_param(query: &str, param: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map(|(k, _)| k).unwrap_or(pair) != param)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Keys by digest, for one config.
pub struct KeyStore {
    by_digest: HashMap<[u8; 32], usize>,
}

/// A key that passed every check.
pub struct Authenticated {
    pub index: usize,
}

impl KeyStore {
    pub fn new(keys: &[Key]) -> KeyStore {
        KeyStore {
            by_digest: keys.iter().enumerate().map(|(i, k)| (k.hash, i)).collect(),
        }
    }

    /// Authenticates `presented` for `route`. On failure also returns the key id when the key was
    /// recognised (for the audit log) and whether the failure counts towards lockout.
    pub fn check(
        &self,
        keys: &[Key],
        presented: Presented<'_>,
        route: &str,
        now: SystemTime,
    ) -> Result<Authenticated, (GatewayError, Option<usize>, bool)> {
        let key = match presented {
            Presented::None => return Err((GatewayError::MissingApiKey, None, false)),
            Presented::Malformed => return Err((GatewayError::InvalidApiKey, None, true)),
            Presented::One(k) => k,
        };
        let digest = keys::digest(key.as_bytes());
        let index = match self.by_digest.get(&digest) {
            Some(&i) if bool::from(keys[i].hash.ct_eq(&digest)) => i,
            _ => return Err((GatewayError::InvalidApiKey, None, true)),
        };
        let k = &keys[index];
        if k.disabled {
            return Err((GatewayError::InvalidApiKey, Some(index), true));
        }
        if k.expires.is_some_and(|e| now >= e) {
            return Err((GatewayError::ExpiredApiKey, Some(index), true));
        }
        if let Some(routes) = &k.routes
            && !routes.iter().any(|r| r == route)
        {
            return Err((GatewayError::KeyNotAllowed, Some(index), false));
        }
        Ok(Authenticated { index })
    }
}

/// One client's recent failed key checks and lockout.
pub struct Failures {
    recent: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

/// Failed-key counters and lockouts per client. They live in the rate limiters' store, so the
/// two together never exceed `max_tracked_clients` entries (least recently seen evicted first).
pub struct Lockout {
    store: Arc<Store>,
}

/// A lockout that has just begun.
pub struct LockedOut {
    pub failures: u32,
    pub until: SystemTime,
}

fn key(who: IpAddr) -> (u32, Subject) {
    (LOCKOUT_PARTITION, Subject::Ip(who))
}

impl Lockout {
    pub fn new(store: Arc<Store>) -> Lockout {
        Lockout { store }
    }

    /// `Err(time left)` while `who` is locked out.
    pub fn check(&self, who: IpAddr, now: Instant) -> Result<(), Duration> {
        self.store.with(|lru| match lru.peek_mut(&key(who)) {
            Some(Entry::Failures(f)) => match f.locked_until {
                Some(until) if until > now => Err(until - now),
                Some(_) => {
                    f.locked_until = None;
                    f.recent.clear();
                    Ok(())
                }
                None => Ok(()),
            },
            _ => Ok(()),
        })
    }

    /// Counts a failure; returns the lockout if this one started it.
    pub fn fail(&self, who: IpAddr, now: Instant, auth: &Auth) -> Option<LockedOut> {
        self.store.with(|lru| {
            let fresh = || {
                Entry::Failures(Failures {
                    recent: VecDeque::new(),
                    locked_until: None,
                })
            };
            let entry = lru.get_or_insert_mut(key(who), fresh);
            if !matches!(entry, Entry::Failures(_)) {
                *entry = fresh();
            }
            let Entry::Failures(f) = entry else {
                return None;
            };
            while f
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > auth.lockout_window)
            {
                f.recent.pop_front();
            }
            f.recent.push_back(now);
            if f.recent.len() > auth.lockout_failures as usize {
                f.recent.pop_front();
            }
            if f.recent.len() >= auth.lockout_failures as usize
                && f.locked_until.is_none_or(|u| u <= now)
            {
                f.locked_until = Some(now + auth.lockout_duration);
                return Some(LockedOut {
                    failures: f.recent.len() as u32,
                    until: SystemTime::now() + auth.lockout_duration,
                });
            }
            None
        })
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

    #[test]
    fn lockout_after_n_failures_and_it_ends() {
        let a = auth(None);
        let l = Lockout::new(Arc::new(Store::new(10)));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t0 = Instant::now();
        assert!(l.fail(ip, t0, &a).is_none());
        assert!(l.fail(ip, t0, &a).is_none());
        assert!(l.check(ip, t0).is_ok());
        assert!(l.fail(ip, t0, &a).is_some());
        assert_eq!(
            l.check(ip, t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(899))
        );
        assert!(l.check(ip, t0 + Duration::from_secs(900)).is_ok());
        // Counting starts afresh after a lockout ended.
        assert!(l.fail(ip, t0 + Duration::from_secs(901), &a).is_none());
    }

    #[test]
    fn lockout_and_limiter_state_share_one_bound() {
        let reg = crate::rate_limit::Registry::new(10);
        let l = Lockout::new(reg.store_arc());
        let lim = reg
            .get(crate::rate_limit::LimiterId::DefaultKey {
                rate: crate::config::units::Rate::parse("5/min").unwrap(),
            })
            .unwrap();
        let a = auth(None);
        for i in 0..50u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            l.fail(ip, Instant::now(), &a);
            let _ = lim.check(&Subject::Ip(ip));
        }
        assert_eq!(reg.store().len(), 10);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let a = auth(None);
        let l = Lockout::new(Arc::new(Store::new(10)));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t0 = Instant::now();
        l.fail(ip, t0, &a);
        l.fail(ip, t0 + Duration::from_secs(61), &a);
        assert!(l.fail(ip, t0 + Duration::from_secs(62), &a).is_none());
        assert!(l.fail(ip, t0 + Duration::from_secs(63), &a).is_some());
    }
}
