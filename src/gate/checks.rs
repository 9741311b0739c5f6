//! What the admission checks of one request ask, and what they answer: the same for the
//! instance's own state and for state shared through Redis.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::runtime::Auth;
use crate::rate_limit::{Allowed, Limiter};

/// The shared-state checks of SPEC §3 steps 5–8, in that order; each is optional. They run in
/// order and stop at the first refusal, so a refused step leaves the later ones untouched (an
/// address over its limit does not spend its key's).
pub struct Checks<'a> {
    /// The client's limit identity (IPv6 by /64): what lockout and the per-IP limit count.
    pub who: IpAddr,
    /// Step 5: is the client locked out?
    pub lockout: bool,
    /// Step 5: the route's per-IP limit.
    pub ip: Option<&'a Limiter>,
    /// Step 7: a failed key check that counts towards lockout, with the lockout settings.
    pub failure: Option<&'a Auth>,
    /// Step 8: the per-key limit and the identity it counts (a key id, or `<issuer>:<sub>`).
    pub key: Option<(&'a Limiter, &'a Arc<str>)>,
}

/// A lockout that has just begun.
#[derive(Debug, Clone, Copy)]
pub struct LockedOut {
    pub failures: u32,
    pub until: SystemTime,
}

/// The answers, in the order of [`Checks`]; checks after a refusal are `None`.
#[derive(Debug, Default)]
pub struct Verdict {
    /// `Some(time left)` when the client is locked out.
    pub locked: Option<Duration>,
    /// The per-IP limit: what is left, or how long to wait.
    pub ip: Option<Result<Allowed, Duration>>,
    /// The failure was counted, and started a lockout.
    pub lockout_started: Option<LockedOut>,
    /// The per-key limit: what is left, or how long to wait.
    pub key: Option<Result<Allowed, Duration>>,
}

/// Where admission state lives: this instance's memory, or Redis. An error means the state
/// could not be reached (the caller falls back or refuses, per `cluster.on_error`).
pub trait State {
    type Error: std::fmt::Display;

    fn admit(
        &self,
        checks: &Checks<'_>,
    ) -> impl std::future::Future<Output = Result<Verdict, Self::Error>>;
}
