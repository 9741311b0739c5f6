//! Admission state in this instance's memory: the rate limiters' bounded store and the lockout
//! counters that share it (`rate_limit.rs`, `lockout.rs`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use super::checks::{Checks, LockedOut, State, Verdict};
use crate::lockout::Lockout;
use crate::rate_limit::{Store, Subject};

pub struct Local {
    lockout: Lockout,
}

impl Local {
    pub fn new(store: Arc<Store>) -> Local {
        Local {
            lockout: Lockout::new(store),
        }
    }

    /// The checks, in order, stopping at the first refusal. Synchronous: nothing here waits.
    pub fn decide(&self, c: &Checks<'_>) -> Verdict {
        let now = Instant::now();
        let mut v = Verdict::default();
        if c.lockout
            && let Err(left) = self.lockout.check(c.who, now)
        {
            v.locked = Some(left);
            return v;
        }
        if let Some(l) = c.ip {
            let r = l.check(&Subject::Ip(c.who));
            let refused = r.is_err();
            v.ip = Some(r);
            if refused {
                return v;
            }
        }
        if let Some(auth) = c.failure {
            v.lockout_started = self.lockout.fail(c.who, now, auth).map(|l| LockedOut {
                failures: l.failures,
                until: l.until,
            });
            return v;
        }
        if let Some((l, id)) = c.key {
            v.key = Some(l.check(&Subject::Key((*id).clone())));
        }
        v
    }
}

impl State for Local {
    type Error = Infallible;

    async fn admit(&self, checks: &Checks<'_>) -> Result<Verdict, Infallible> {
        Ok(self.decide(checks))
    }
}
