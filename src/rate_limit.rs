//! Rate limits (SPEC §3 step 8): GCRA from governor, over state that is bounded.
//!
//! governor's own keyed stores (DashMap, HashMap) grow with every distinct key until someone
//! calls `retain_recent`; an attacker rotating source addresses or keys would grow them without
//! bound between sweeps. So the state lives here instead, in one LRU map shared by every limiter
//! and capped at `limits.max_tracked_clients`: the least recently seen client is evicted first,
//! and memory stops growing at the cap (SPEC §3.4 "State is bounded"). governor still does the
//! GCRA arithmetic through its `StateStore` trait; only the storage is ours.
//!
//! Limiters are identified by what they limit and at what rate ([`LimiterId`]); a reload that
//! keeps a limit unchanged keeps its limiter and so its clients' state.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use lru::LruCache;

use crate::config::units::Rate;

/// Who a limit counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// An IPv4 address or an IPv6 /64 (see `client_ip::limit_key`).
    Ip(IpAddr),
    Key(Arc<str>),
}

/// What the shared store holds for one (partition, subject).
pub enum Entry {
    /// A limiter's GCRA theoretical arrival time.
    Tat(Nanos),
    /// Failed key checks and lockout of one client (partition [`LOCKOUT_PARTITION`]).
    Failures(Failures),
}

/// One client's recent failed key checks and lockout.
pub struct Failures {
    pub(crate) recent: std::collections::VecDeque<std::time::Instant>,
    pub(crate) locked_until: Option<std::time::Instant>,
}
/// The partition of the store that lockout state uses (limiters count up from 0).
pub const LOCKOUT_PARTITION: u32 = u32::MAX;

/// The shared, bounded client state of every limiter *and* the lockout: SPEC §3.4 bounds the two
/// together by `max_tracked_clients` entries.
pub struct Store {
    lru: Mutex<LruCache<(u32, Subject), Entry>>,
}

/// An LRU map holding at most `capacity` entries (at least one).
pub fn bounded_lru<K: Hash + Eq, V>(capacity: usize) -> Mutex<LruCache<K, V>> {
    Mutex::new(LruCache::new(cap(capacity)))
}

/// Changes an LRU map's bound (on reload), evicting the least recently used if it shrank.
pub fn resize_lru<K: Hash + Eq, V>(lru: &Mutex<LruCache<K, V>>, capacity: usize) {
    if let Ok(mut l) = lru.lock() {
        l.resize(cap(capacity));
    }
}

fn cap(capacity: usize) -> NonZeroUsize {
    NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)
}

impl Store {
    pub fn new(capacity: usize) -> Store {
        Store {
            lru: bounded_lru(capacity),
        }
    }

    pub fn resize(&self, capacity: usize) {
        resize_lru(&self.lru, capacity);
    }

    pub fn len(&self) -> usize {
        self.lru.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Runs `f` with the map locked (no await inside: the lock is a std mutex).
    pub fn with<R>(&self, f: impl FnOnce(&mut LruCache<(u32, Subject), Entry>) -> R) -> R {
        let mut lru = match self.lru.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut lru)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One limiter's view of the shared store.
pub struct Partition {
    id: u32,
    store: Arc<Store>,
}

impl StateStore for Partition {
    type Key = Subject;

    fn measure_and_replace<T, F, E>(&self, key: &Subject, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // The lock is held only for the GCRA arithmetic: no await, no I/O.
        self.store.with(|lru| {
            let k = (self.id, key.clone());
            let prev = match lru.get(&k) {
                Some(Entry::Tat(n)) => Some(*n),
                _ => None,
            };
            let (t, next) = f(prev)?;
            lru.put(k, Entry::Tat(next));
            Ok(t)
        })
    }
}

/// The outcome of a check that let the request through.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    pub limit: u32,
    pub remaining: u32,
    pub window: Duration,
}

pub struct Limiter {
    inner: RateLimiter<Subject, Partition, DefaultClock, StateInformationMiddleware>,
    clock: DefaultClock,
    limit: u32,
    window: Duration,
    /// What it limits at what rate, as text (`ip:bridge:10/60000ms`): the same on every
    /// instance with the same config, so `[cluster]` names its Redis state by it.
    name: Arc<str>,
}

impl Limiter {
    /// `Ok` with what is left, or `Err(retry_after)`.
    pub fn check(&self, subject: &Subject) -> Result<Allowed, Duration> {
        match self.inner.check_key(subject) {
            Ok(snap) => Ok(Allowed {
                limit: self.limit,
                remaining: snap.remaining_burst_capacity(),
                window: self.window,
            }),
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl LimiterId {
    /// The limiter's name (see [`Limiter::name`]). A changed rate is a new name, so a reload
    /// that changes a limit starts it afresh, locally and in Redis alike.
    fn name(&self, n: u32, period: Duration) -> String {
        let (kind, who) = match self {
            LimiterId::RouteIp { route, .. } => ("ip", route.as_str()),
            LimiterId::RouteKey { route, .. } => ("key", route.as_str()),
            LimiterId::KeyOwn { key, .. } => ("own", key.as_str()),
            LimiterId::DefaultKey { .. } => ("key", "*"),
        };
        format!("{kind}:{who}:{n}/{}ms", period.as_millis())
    }
}

/// What a limiter limits. Equal ids across a reload mean the same limiter, state kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimiterId {
    RouteIp { route: String, rate: Rate },
    RouteKey { route: String, rate: Rate },
    KeyOwn { key: String, rate: Rate },
    DefaultKey { rate: Rate },
}

/// All limiters, living across reloads.
pub struct Registry {
    store: Arc<Store>,
    next: AtomicU32,
    limiters: Mutex<HashMap<LimiterId, Arc<Limiter>>>,
}

impl Registry {
    pub fn new(max_tracked_clients: usize) -> Registry {
        Registry {
            store: Arc::new(Store::new(max_tracked_clients)),
            next: AtomicU32::new(0),
            limiters: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store, for the lockout state that shares its bound.
    pub fn store_arc(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The limiter for `id`, reusing the existing one if the id (and so the rate) is unchanged.
    /// `None` when the rate is `off`.
    pub fn get(&self, id: LimiterId) -> Option<Arc<Limiter>> {
        let rate = match &id {
            LimiterId::RouteIp { rate, .. }
            | LimiterId::RouteKey { rate, .. }
            | LimiterId::KeyOwn { rate, .. }
            | LimiterId::DefaultKey { rate } => *rate,
        };
        let Rate::Limit { n, period } = rate else {
            return None;
        };
        let mut map = match self.limiters.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(l) = map.get(&id) {
            return Some(l.clone());
        }
        // "n/period": a burst of n, then one more every period/n (SPEC §2).
        let quota = Quota::with_period(period / n.get())?.allow_burst(n);
        let clock = DefaultClock::default();
        let partition = Partition {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            store: self.store.clone(),
        };
        let limiter = Arc::new(Limiter {
            inner: RateLimiter::new(quota, partition, clock.clone()),
            clock,
            limit: n.get(),
            window: period,
            name: id.name(n.get(), period).into(),
        });
        map.insert(id, limiter.clone());
        Some(limiter)
    }

    /// Drops limiters no longer in use after a reload (their state then ages out of the LRU).
    pub fn retain(&self, keep: &[LimiterId]) {
        if let Ok(mut map) = self.limiters.lock() {
            map.retain(|id, _| keep.contains(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        Rate::parse(s).unwrap()
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let reg = Registry::new(100);
        let l = reg
            .get(LimiterId::DefaultKey {
                rate: rate("3/min"),
            })
            .unwrap();
        let who = Subject::Ip("192.0.2.1".parse().unwrap());
        for i in 0..3 {
            assert_eq!(l.check(&who).unwrap().remaining, 2 - i);
        }
        let wait = l.check(&who).unwrap_err();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        // Another subject is unaffected.
        assert!(l.check(&Subject::Ip("192.0.2.2".parse().unwrap())).is_ok());
    }

    #[test]
    fn off_is_no_limiter_and_same_id_is_same_limiter() {
        let reg = Registry::new(100);
        assert!(reg.get(LimiterId::DefaultKey { rate: Rate::Off }).is_none());
        let a = reg
            .get(LimiterId::DefaultKey { rate: rate("1/s") })
            .unwrap();
        let b = reg
            .get(LimiterId::DefaultKey { rate: rate("1/s") })
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = reg
            .get(LimiterId::DefaultKey { rate: rate("2/s") })
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn state_never_exceeds_the_cap() {
        let reg = Registry::new(1000);
        let l = reg
            .get(LimiterId::DefaultKey {
                rate: rate("1/min"),
            })
            .unwrap();
        for i in 0..50_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = l.check(&Subject::Ip(ip));
        }
        assert_eq!(reg.store().len(), 1000);
    }
}
