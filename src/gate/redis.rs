//! Admission state in Redis (SPEC §9): one Lua script, loaded once and called by its SHA,
//! answers every check of a request in one round trip (`admit.lua`).
//!
//! Each worker thread keeps its own connection (a `redis::aio::ConnectionManager`, which
//! reconnects by itself), on its own runtime: a request never waits on another thread's I/O.

use std::cell::RefCell;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use super::checks::{Checks, LockedOut, State, Verdict};
use crate::llm::budget::{BudgetScope, Periods};
use crate::rate_limit::{Allowed, Limiter};

static ADMIT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("admit.lua")));

/// Tells apart the `Shared` instances of one process (tests build several), so a worker's
/// connection is never one made for another.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static CONN: RefCell<Option<(u64, ConnectionManager)>> = const { RefCell::new(None) };
}

/// Why Redis did not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no answer within cluster.timeout")]
    Timeout,
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected answer from the admission script")]
    Answer,
}

pub struct Redis {
    id: u64,
    client: redis::Client,
    prefix: String,
    /// Read per request from the live config (reloadable).
    timeout_us: AtomicU64,
}

impl Redis {
    /// The client for `cfg` (no connection yet: each worker connects on its first request).
    pub fn new(cfg: &crate::config::runtime::Cluster) -> Result<Redis, String> {
        let client = redis::Client::open(cfg.redis.expose_secret())
            .map_err(|e| format!("cluster.redis: {e}"))?;
        Ok(Redis {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            client,
            prefix: cfg.prefix.clone(),
            timeout_us: AtomicU64::new(cfg.timeout.as_micros() as u64),
        })
    }

    /// `cluster.timeout` after a reload.
    pub fn set_timeout(&self, t: Duration) {
        self.timeout_us
            .store(t.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_micros(self.timeout_us.load(Ordering::Relaxed))
    }

    /// This thread's connection, made on first use (lazily: it connects when first asked).
    fn conn(&self) -> Result<ConnectionManager, Error> {
        CONN.with(|c| {
            let mut c = c.borrow_mut();
            if let Some((id, m)) = c.as_ref()
                && *id == self.id
            {
                return Ok(m.clone());
            }
            let t = self.timeout();
            let config = ConnectionManagerConfig::new()
                // A connection attempt may take longer than one round trip (a Redis across
                // the internet); requests do not wait for it beyond their own timeout.
                .set_connection_timeout(Some(t.max(Duration::from_secs(1))))
                .set_response_timeout(Some(t))
                // Retry soon and keep retrying: the outage ends when Redis is back.
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            let m = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
            *c = Some((self.id, m.clone()));
            Ok(m)
        })
    }

    fn key(&self, parts: std::fmt::Arguments<'_>) -> String {
        format!("{}{parts}", self.prefix)
    }

    /// The admission script's call for `c`.
    fn admit_call(&self, c: &Checks<'_>) -> redis::ScriptInvocation<'static> {
        let (ip_t, ip_n) = interval(c.ip);
        let (key_t, key_n) = interval(c.key.map(|(l, _)| l));
        let auth = c.failure;
        let mut call = ADMIT.prepare_invoke();
        call.key(self.key(format_args!("lock:{}", c.who)))
            .key(self.key(format_args!("fail:{}", c.who)))
            .key(match c.ip {
                Some(l) => self.key(format_args!("rl:{}:{}", l.name(), c.who)),
                None => self.key(format_args!("none")),
            })
            .key(match c.key {
                Some((l, id)) => self.key(format_args!("rl:{}:{id}", l.name())),
                None => self.key(format_args!("none")),
            })
            .arg(u8::from(c.lockout))
            .arg(ip_t)
            .arg(ip_n)
            .arg(u8::from(auth.is_some()))
            .arg(auth.map_or(0, |a| a.lockout_failures))
            .arg(auth.map_or(0, |a| a.lockout_window.as_micros() as u64))
            .arg(auth.map_or(0, |a| a.lockout_duration.as_millis() as u64))
            // A fresh member per failure: a client-chosen id (X-Request-Id through a trusted
            // proxy) repeated would otherwise count as one failure.
            .arg(ulid::Ulid::new().to_string())
            .arg(key_t)
            .arg(key_n);
        call
    }

    async fn run(&self, c: &Checks<'_>) -> Result<Verdict, Error> {
        let answer: Vec<i64> = self.round_trip(self.admit_call(c)).await?;
        let auth = c.failure;
        let &[stage, ip_left, key_left, wait, failures] = answer.as_slice() else {
            return Err(Error::Answer);
        };
        let allowed = |l: &Limiter, left: i64| Allowed {
            limit: l.limit(),
            remaining: u32::try_from(left).unwrap_or(0),
            window: l.window(),
        };
        let micros = |w: i64| Duration::from_micros(u64::try_from(w).unwrap_or(0));
        let mut v = Verdict::default();
        if let Some(l) = c.ip
            && stage != 1
        {
            v.ip = Some(if stage == 2 {
                Err(micros(wait))
            } else {
                Ok(allowed(l, ip_left))
            });
        }
        match stage {
            0 => {}
            1 => v.locked = Some(Duration::from_millis(u64::try_from(wait).unwrap_or(0))),
            2 => {}
            3 => {
                if wait == 1 {
                    let duration = auth.map_or(Duration::ZERO, |a| a.lockout_duration);
                    v.lockout_started = Some(LockedOut {
                        failures: u32::try_from(failures).unwrap_or(u32::MAX),
                        until: SystemTime::now() + duration,
                    });
                }
                return Ok(v);
            }
            4 => {}
            _ => return Err(Error::Answer),
        }
        if let Some((l, _)) = c.key
            && (stage == 0 || stage == 4)
        {
            v.key = Some(if stage == 4 {
                Err(micros(wait))
            } else {
                Ok(allowed(l, key_left))
            });
        }
        Ok(v)
    }
}

/// A limiter's GCRA parameters for the script: emission interval in µs, burst (0, 0: none).
fn interval(l: Option<&Limiter>) -> (u64, u32) {
    match l {
        Some(l) => {
            let t = (l.window().as_micros() as u64 / u64::from(l.limit().max(1))).max(1);
            (t, l.limit())
        }
        None => (0, 0),
    }
}

impl State for Redis {
    type Error = Error;

    async fn admit(&self, checks: &Checks<'_>) -> Result<Verdict, Error> {
        self.run(checks).await
    }
}

/// At startup: one connection, the script loaded, and a log line saying whether Redis answers
/// (the gateway starts either way; `on_error` covers the time until it does).
pub async fn announce(cfg: &crate::config::runtime::Cluster) {
    let attempt = async {
        let client = redis::Client::open(cfg.redis.expose_secret())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        ADMIT.prepare_invoke().load_async(&mut conn).await
    };
    let wait = cfg.timeout.max(Duration::from_secs(2));
    match tokio::time::timeout(wait, attempt).await {
        Ok(Ok(_)) => {
            tracing::info!(prefix = %cfg.prefix, "cluster: Redis answers; limits are shared")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cluster: Redis does not answer yet; on_error applies until it does")
        }
        Err(_) => tracing::warn!(
            "cluster: Redis does not answer yet (timed out); on_error applies until it does"
        ),
    }
}

static RESERVE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("reserve.lua")));
static SETTLE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("settle.lua")));

/// How long spend stays in Redis after its period ended (for late readers; then it expires).
const SPEND_KEPT_SECS: i64 = 86_400;

impl Redis {
    fn spend_key(&self, scope: &str, period: usize, start: i64) -> String {
        self.key(format_args!("b:{scope}:{period}:{start}"))
    }

    fn hold_key(&self, scope: &str) -> String {
        self.key(format_args!("r:{scope}"))
    }

    fn totals_key(&self, scope: &str) -> String {
        self.key(format_args!("rt:{scope}"))
    }

    /// One script call within `cluster.timeout`; a connection found dead (Redis restarted, a
    /// proxy between closed it) is replaced by the manager and the call tried once more.
    async fn round_trip<T: redis::FromRedisValue>(
        &self,
        call: redis::ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        let start = Instant::now();
        let mut conn = self.conn()?;
        let attempt = async {
            match call.invoke_async(&mut conn).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    call.invoke_async(&mut conn).await
                }
                r => r,
            }
        };
        let r = tokio::time::timeout(self.timeout(), attempt)
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(Error::from);
        if r.is_ok() {
            crate::metrics::cluster_duration(start.elapsed());
        }
        r
    }

    /// Reserves `own` (tokens, USD) in every scope if every cap allows it: `None` when admitted,
    /// else the latest end (unix seconds) of the caps that refused.
    pub async fn reserve(
        &self,
        scopes: &[BudgetScope],
        periods: &Periods,
        own: (f64, f64),
        member: &str,
        hold: Duration,
    ) -> Result<Option<i64>, Error> {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut call = RESERVE.prepare_invoke();
        call.arg(now_ms)
            .arg(now_ms + hold.as_millis() as i64)
            .arg(member)
            .arg(own.0)
            .arg(own.1)
            .arg(scopes.len());
        for s in scopes {
            call.arg(self.hold_key(&s.name))
                .arg(self.totals_key(&s.name))
                .arg(s.caps.len());
            for c in &s.caps {
                let (start, end) = periods[c.period];
                call.arg(self.spend_key(&s.name, c.period, start))
                    .arg(if c.tokens { "t" } else { "c" })
                    .arg(c.limit)
                    .arg(end);
            }
        }
        let until: i64 = self.round_trip(call).await?;
        Ok((until != 0).then_some(until))
    }

    /// Adds `charged` (tokens, USD) to every scope's spend, once per `charge_id` however often
    /// it is sent, releasing the reservation `member` (`None`: nothing to release). Returns
    /// whether this call counted it, and what is now spent of each cap, scope by scope.
    pub async fn settle(
        &self,
        scopes: &[BudgetScope],
        periods: &Periods,
        charge_id: &str,
        charged: (f64, f64),
        member: Option<&str>,
    ) -> Result<(bool, Vec<f64>), Error> {
        let mut call = SETTLE.prepare_invoke();
        call.arg(self.key(format_args!("c:{charge_id}")))
            .arg(member.unwrap_or(""))
            .arg(charged.0)
            .arg(charged.1)
            .arg(SPEND_KEPT_SECS)
            .arg(scopes.len());
        for s in scopes {
            call.arg(self.hold_key(&s.name))
                .arg(self.totals_key(&s.name));
            for (p, (start, end)) in periods.iter().enumerate() {
                call.arg(self.spend_key(&s.name, p, *start)).arg(*end);
            }
            call.arg(s.caps.len());
            for c in &s.caps {
                call.arg(c.period + 1).arg(if c.tokens { "t" } else { "c" });
            }
        }
        let answer: Vec<String> = self.round_trip(call).await?;
        let Some((applied, spent)) = answer.split_first() else {
            return Err(Error::Answer);
        };
        let spent = spent.iter().map(|s| s.parse().unwrap_or(0.0)).collect();
        Ok((applied == "1", spent))
    }
}
