//! The admission gate: the shared-state checks of SPEC §3 steps 5–8 (lockout, the per-IP
//! limit, counting a failed key check, the per-key limit), asked in one call per request.
//!
//! Without `[cluster]` the state is this instance's memory ([`local::Local`]); with it, Redis
//! ([`redis::Redis`], SPEC §9), so several instances enforce one set of limits. The pipeline
//! sees only [`Gate::admit`]. While Redis cannot answer, `cluster.on_error` decides: `local`
//! falls back to the instance's own state, `deny` refuses (503 `overloaded`); every fallback is
//! counted (`portcullis_cluster_errors_total{op}`) and an outage is logged once, when it begins,
//! and once when it ends. Recovery needs no restart: after a failure, a worker's requests skip
//! Redis for a short pause (so an outage does not add `cluster.timeout` to every request), then
//! try again; a connection found dead is replaced and the request tried once more.

pub mod checks;
pub mod local;
pub mod redis;

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use self::checks::{Checks, State, Verdict};
use crate::config::runtime::{Cluster, OnError};
use crate::llm;
use crate::rate_limit::Store;

/// How long requests skip Redis after it failed to answer, before one tries again.
const PAUSE: Duration = Duration::from_millis(250);

/// How long Redis must answer with no failure for an outage to be over (logged as ended).
const QUIET: Duration = Duration::from_secs(1);

/// Redis could not answer and `on_error = "deny"`: the request gets 503 `overloaded`.
#[derive(Debug)]
pub struct Unavailable;

/// What [`Gate::ask`] got: Redis's answer, or what to do without one (`cluster.on_error`).
pub enum Asked<T> {
    Answer(T),
    /// No `[cluster]`, or Redis did not answer and `on_error = "local"`: this instance's state.
    Local,
    /// Redis did not answer and `on_error = "deny"`.
    Deny,
}

pub struct Gate {
    local: local::Local,
    shared: Option<redis::Redis>,
    /// `cluster.on_error` (follows reloads): 0 local, 1 deny.
    deny: AtomicU8,
    /// In an outage (logged once when it begins, once when it ends).
    down: AtomicBool,
    /// When Redis last failed to answer, in ms after `epoch`.
    last_failure_ms: AtomicU64,
    epoch: Instant,
}

thread_local! {
    /// Until when this worker's requests do not try Redis (each worker has its own connection,
    /// so each pauses on its own failures).
    static SKIP_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
}

impl Gate {
    /// The gate over `store` (the limiters' bounded store) and, with `[cluster]`, Redis.
    pub fn new(store: Arc<Store>, cluster: Option<&Cluster>) -> Result<Gate, String> {
        let gate = Gate {
            local: local::Local::new(store),
            shared: cluster.map(redis::Redis::new).transpose()?,
            deny: AtomicU8::new(0),
            down: AtomicBool::new(false),
            last_failure_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        gate.configure(cluster);
        Ok(gate)
    }

    /// Whether limits are shared through Redis.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Follows a reload: `timeout` and `on_error` change; the URL and prefix need a restart
    /// (the reload checks that).
    pub fn configure(&self, cluster: Option<&Cluster>) {
        if let (Some(r), Some(c)) = (&self.shared, cluster) {
            r.set_timeout(c.timeout);
            self.deny
                .store(u8::from(c.on_error == OnError::Deny), Ordering::Relaxed);
        }
    }

    /// The verdict on `checks`, from Redis where configured (and reachable).
    pub async fn admit(&self, checks: &Checks<'_>) -> Result<Verdict, Unavailable> {
        if self.shared.is_none() {
            return Ok(self.local.decide(checks));
        }
        match self.ask("admit", true, |r| r.admit(checks)).await {
            Asked::Answer(v) => Ok(v),
            Asked::Local => Ok(self.local.decide(checks)),
            Asked::Deny => Err(Unavailable),
        }
    }

    /// Asks Redis (`op` names it in metrics), unless this worker is pausing after a failure
    /// (`pausable`: a charge is never skipped, it is sent again later); says what to do instead
    /// when it does not answer.
    pub async fn ask<'a, T, F>(
        &'a self,
        op: &'static str,
        pausable: bool,
        f: impl FnOnce(&'a redis::Redis) -> F,
    ) -> Asked<T>
    where
        F: Future<Output = Result<T, redis::Error>>,
    {
        let Some(r) = &self.shared else {
            return Asked::Local;
        };
        let paused = pausable && SKIP_UNTIL.get().is_some_and(|until| Instant::now() < until);
        if !paused {
            match f(r).await {
                Ok(v) => {
                    SKIP_UNTIL.set(None);
                    // The outage ends when Redis has answered with no failure anywhere for a
                    // while (workers recover one by one; one answer amid failures is not the
                    // end), so it is logged once, not once per flap.
                    let quiet = self.epoch.elapsed().as_millis() as u64
                        >= self.last_failure_ms.load(Ordering::Relaxed) + QUIET.as_millis() as u64;
                    if quiet && self.down.swap(false, Ordering::Relaxed) {
                        tracing::info!("cluster: Redis answers again; limits are shared again");
                    }
                    return Asked::Answer(v);
                }
                Err(e) => {
                    SKIP_UNTIL.set(Some(Instant::now() + PAUSE));
                    self.last_failure_ms
                        .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if !self.down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            op,
                            on_error = self.on_error_name(),
                            "cluster: Redis does not answer; limits are not shared until it does"
                        );
                    }
                }
            }
        }
        crate::metrics::cluster_error(op);
        if self.deny.load(Ordering::Relaxed) == 1 {
            Asked::Deny
        } else {
            Asked::Local
        }
    }

    fn on_error_name(&self) -> &'static str {
        if self.deny.load(Ordering::Relaxed) == 1 {
            "deny"
        } else {
            "local"
        }
    }
}

/// Budgets shared through Redis (`[cluster]`), for the budget book: `reserve` and `settle`
/// asked like the admission checks, with the same fallback.
impl llm::budget::SharedStore for Gate {
    fn reserve<'a>(
        &'a self,
        scopes: &'a [llm::budget::BudgetScope],
        periods: &'a llm::budget::Periods,
        own: (f64, f64),
        member: &'a str,
        hold: Duration,
    ) -> llm::budget::Pending<'a, llm::budget::Answered<Option<i64>>> {
        Box::pin(async move {
            let asked = self
                .ask("reserve", true, |r| {
                    r.reserve(scopes, periods, own, member, hold)
                })
                .await;
            answered(asked)
        })
    }

    fn settle<'a>(
        &'a self,
        scopes: &'a [llm::budget::BudgetScope],
        periods: &'a llm::budget::Periods,
        charge_id: &'a str,
        charged: (f64, f64),
        member: Option<&'a str>,
    ) -> llm::budget::Pending<'a, llm::budget::Answered<(bool, Vec<f64>)>> {
        Box::pin(async move {
            let asked = self
                .ask("settle", false, |r| {
                    r.settle(scopes, periods, charge_id, charged, member)
                })
                .await;
            answered(asked)
        })
    }
}

fn answered<T>(a: Asked<T>) -> llm::budget::Answered<T> {
    match a {
        Asked::Answer(v) => llm::budget::Answered::Answer(v),
        Asked::Local => llm::budget::Answered::Local,
        Asked::Deny => llm::budget::Answered::Deny,
    }
}
