//! Lockout (SPEC §3 step 5, §3.4 "Keys"): invalid and expired keys count as failures for the
//! client IP (IPv6 by /64) across all routes, whichever key they name; a missing key does not (a
//! browser's first request has none). `lockout_failures` within `lockout_window` locks the IP out
//! of every route for `lockout_duration`. The state lives in the rate limiters' bounded store.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::runtime::Auth;
use crate::rate_limit::{Entry, Failures, LOCKOUT_PARTITION, Store, Subject};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth {
            headers: Vec::new(),
            query_param: None,
            lockout_failures: 3,
            lockout_window: Duration::from_secs(60),
            lockout_duration: Duration::from_secs(900),
        }
    }

    #[test]
    fn lockout_after_n_failures_and_it_ends() {
        let a = auth();
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
        let a = auth();
        for i in 0..50u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            l.fail(ip, Instant::now(), &a);
            let _ = lim.check(&Subject::Ip(ip));
        }
        assert_eq!(reg.store().len(), 10);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let a = auth();
        let l = Lockout::new(Arc::new(Store::new(10)));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t0 = Instant::now();
        l.fail(ip, t0, &a);
        l.fail(ip, t0 + Duration::from_secs(61), &a);
        assert!(l.fail(ip, t0 + Duration::from_secs(62), &a).is_none());
        assert!(l.fail(ip, t0 + Duration::from_secs(63), &a).is_some());
    }
}
