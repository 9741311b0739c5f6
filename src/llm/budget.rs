//! Budgets and reservations (SPEC §7 "Budgets", "Reservations").
//!
//! The [`Book`] holds, per key and for the gateway as a whole, what was spent in the current
//! UTC day, week and month, and what requests in flight have reserved. Admission and settlement
//! both take its one lock, so "check, then add" is one step: fifty parallel requests see each
//! other's reservations and cannot overspend together. The book outlives any one config (like the
//! rate limiters), so a reload changes the caps, never the spend; at startup it is rebuilt from
//! the ledger, so a restart does not reset a budget either.
//!
//! Written by hand: this is bookkeeping over the ledger's own rows (governor's GCRA meters a rate,
//! not a sum of token counts over calendar periods), and no crate keeps calendar-period totals
//! with reservations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Day,
    Week,
    Month,
}

pub const PERIODS: [Period; 3] = [Period::Day, Period::Week, Period::Month];

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Start and end, in seconds since the epoch, of the UTC calendar period holding `t`: a day
    /// from 00:00Z, a week from Monday, a month from the 1st.
    pub fn bounds(self, t: i64) -> (i64, i64) {
        const DAY: i64 = 86_400;
        let days = t.div_euclid(DAY);
        match self {
            Period::Day => (days * DAY, (days + 1) * DAY),
            Period::Week => {
                // 1970-01-01 was a Thursday: three days after a Monday.
                let monday = days - (days + 3).rem_euclid(7);
                (monday * DAY, (monday + 7) * DAY)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(days);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (
                    days_from_civil(y, m, 1) * DAY,
                    days_from_civil(ny, nm, 1) * DAY,
                )
            }
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Tokens,
    Cost,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Cost => "cost_usd",
        }
    }
}

/// One cap: `tokens_per_day = 200000` is `Cap { Day, Tokens, 200000.0 }`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cap {
    pub period: Period,
    pub unit: Unit,
    pub limit: f64,
}

impl std::fmt::Display for Cap {
    /// As written in the config: `cost_per_day = 1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.unit {
            Unit::Tokens => "tokens",
            Unit::Cost => "cost",
        };
        write!(f, "{unit}_per_{} = {}", self.period.name(), self.limit)
    }
}

/// Rounds a USD figure to a billionth of a dollar, so sums of prices print as the operator
/// would write them (0.812, not 0.8120000000000003).
pub fn round_usd(v: f64) -> f64 {
    (v * 1e9).round() / 1e9
}

/// Tokens and USD together: a spend, a reservation or a charge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Amount {
    pub tokens: f64,
    pub cost: f64,
}

impl Amount {
    fn get(&self, unit: Unit) -> f64 {
        match unit {
            Unit::Tokens => self.tokens,
            Unit::Cost => self.cost,
        }
    }

    fn add(&mut self, o: Amount) {
        self.tokens += o.tokens;
        self.cost += o.cost;
    }

    fn sub(&mut self, o: Amount) {
        self.tokens = (self.tokens - o.tokens).max(0.0);
        self.cost = (self.cost - o.cost).max(0.0);
    }
}

/// Whose spend an account holds: the gateway's as a whole (no key), a key's (by id), or one
/// user's of a key (SPEC §8 `user_budget`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    pub key: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
}

impl Scope {
    pub fn gateway() -> Scope {
        Scope::default()
    }

    pub fn key(id: Arc<str>) -> Scope {
        Scope {
            key: Some(id),
            user: None,
        }
    }
}

/// Users with an account in the book at most: a client holding a key with `user_budget` picks
/// the user names, so their number is bounded. Past it, a request of a new user is refused
/// (429 `budget_exceeded`: its spend could not be tracked) and a warning logged.
const MAX_USER_ACCOUNTS: usize = 100_000;

#[derive(Debug, Default)]
struct Account {
    /// Start of the period each total belongs to (by [`Period::index`]).
    start: [i64; 3],
    spent: [Amount; 3],
    /// Reserved by requests in flight; not tied to a period.
    reserved: Amount,
}

impl Account {
    /// Starts a new period's total when `now` has left the one on record. A clock that steps
    /// back keeps the newer period's total rather than resetting it.
    fn roll(&mut self, now: i64) {
        for p in PERIODS {
            let start = p.bounds(now).0;
            if start > self.start[p.index()] {
                self.start[p.index()] = start;
                self.spent[p.index()] = Amount::default();
            }
        }
    }
}

pub use crate::audit::BudgetEvent;

/// The ledger's spend of one key (`None`: no key) and user in one period, for [`Book::rebuild`].
pub type PeriodTotal = (Option<String>, Option<String>, Period, Amount);

#[derive(Default)]
pub struct Book {
    accounts: Mutex<HashMap<Scope, Account>>,
    /// User accounts in `accounts` (changed under its lock), against [`MAX_USER_ACCOUNTS`].
    users: AtomicUsize,
    /// With `[cluster]`: spend and reservations kept in Redis, the source of truth while it
    /// answers. This book then holds this instance's own share, which `on_error = "local"`
    /// decides with while Redis does not answer.
    shared: std::sync::OnceLock<SharedBudgets>,
}

/// Where shared budgets are decided, and where the `budget` events of a charge settled in
/// Redis are written (they are known only once Redis answers).
struct SharedBudgets {
    store: Arc<dyn SharedStore>,
    audit: crate::audit::Audit,
    /// Settles in flight (tasks on the workers' runtimes), waited for at shutdown.
    sending: tokio_util::task::TaskTracker,
    /// Settles Redis did not take yet: sent again every second by the main runtime
    /// ([`Book::flush_pending`]) and at shutdown, until Redis takes them.
    pending: Mutex<std::collections::VecDeque<Settle>>,
}

/// Charges waiting for Redis at most; past it the oldest is dropped (logged): its spend then
/// stays in this instance's book and ledger only.
const MAX_PENDING: usize = 100_000;

/// One charge to settle in Redis.
struct Settle {
    applies: Applies,
    /// The periods it belongs to (as when it was charged, however late it is sent).
    now: i64,
    /// Counted once in Redis however often it is sent.
    id: String,
    charged: Amount,
    /// The reservation it releases.
    member: Option<String>,
    /// A realtime session's: set when a cap is found spent.
    spent_out: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// A future that a [`SharedStore`] answers with.
pub type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Budgets kept with other instances (`[cluster]`: Redis, through `gate`): one call reserves,
/// one settles. Behind a trait so that this module does not know where they are kept.
pub trait SharedStore: Send + Sync {
    /// Reserves `own` (tokens, USD) in every scope if every cap allows it: `None` when admitted,
    /// else the latest end (unix seconds) of the caps that refused.
    fn reserve<'a>(
        &'a self,
        scopes: &'a [BudgetScope],
        periods: &'a Periods,
        own: (f64, f64),
        member: &'a str,
        hold: Duration,
    ) -> Pending<'a, Answered<Option<i64>>>;

    /// Adds `charged` (tokens, USD) to every scope's spend, releasing the reservation `member`
    /// (`None`: keep holding it); answers what is now spent of each cap, scope by scope.
    /// Counted once per `charge_id`, however often it is sent: answers whether this call
    /// counted it. Never paused, never refused: it answers, or it fails (and is sent again).
    fn settle<'a>(
        &'a self,
        scopes: &'a [BudgetScope],
        periods: &'a Periods,
        charge_id: &'a str,
        charged: (f64, f64),
        member: Option<&'a str>,
    ) -> Pending<'a, Answered<(bool, Vec<f64>)>>;
}

/// What a [`SharedStore`] answered, or what to do without an answer (`cluster.on_error`).
pub enum Answered<T> {
    Answer(T),
    /// Decide with this book.
    Local,
    /// Refuse (503 `overloaded`).
    Deny,
}

/// One scope of a budget (a key, a key's user, the gateway): its name in Redis and its caps.
pub struct BudgetScope {
    /// `*` for the gateway, `k:<key id or identity>`, `u:<key id>:<user>`.
    pub name: String,
    pub caps: Vec<BudgetCap>,
}

/// One cap, with its current period (from the instance's clock, in UTC).
pub struct BudgetCap {
    /// 0 day, 1 week, 2 month.
    pub period: usize,
    pub tokens: bool,
    pub limit: f64,
}

/// The current periods' `(start, end)` in unix seconds: day, week, month.
pub type Periods = [(i64, i64); 3];

/// How long Redis holds a reservation: an instance that dies with requests in flight holds
/// their reservations no longer than this. A realtime session longer than this keeps being
/// charged, but its reservation no longer counts against other requests.
const HOLD: Duration = Duration::from_secs(3600);

/// Why a request was not admitted.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// A cap is spent: until the latest of the spent caps' periods ends.
    Spent(Duration),
    /// Redis did not answer and `cluster.on_error = "deny"`.
    Unavailable,
}

/// The caps a request is held to: its key's, its user's (of that key) and the gateway's.
#[derive(Debug, Clone, Default)]
pub struct Applies {
    pub key: Option<Arc<str>>,
    /// Set only where the key has a `user_budget` (there is nothing to hold otherwise).
    pub user: Option<Arc<str>>,
    pub key_caps: Arc<[Cap]>,
    pub user_caps: Arc<[Cap]>,
    pub gateway_caps: Arc<[Cap]>,
}

impl Applies {
    fn scopes(&self) -> impl Iterator<Item = (Scope, &[Cap])> {
        let key = self
            .key
            .as_ref()
            .map(|k| (Scope::key(k.clone()), &*self.key_caps));
        let user = self.key.as_ref().zip(self.user.as_ref()).map(|(k, u)| {
            let scope = Scope {
                key: Some(k.clone()),
                user: Some(u.clone()),
            };
            (scope, &*self.user_caps)
        });
        key.into_iter()
            .chain(user)
            .chain(std::iter::once((Scope::gateway(), &*self.gateway_caps)))
    }
}

/// Held by an admitted request until its usage is known. Dropped unsettled (the request never
/// reached the upstream, or became a WebSocket tunnel), it is released without a charge.
pub struct Reservation {
    book: Arc<Book>,
    applies: Applies,
    own: Amount,
    settled: bool,
    /// Held in Redis too (`[cluster]`).
    hold: Option<Hold>,
}

/// A reservation's place in Redis.
struct Hold {
    /// Its member in each scope's set of reservations: `<id>|<tokens>|<cost>`.
    member: String,
    /// A realtime session's: set once a charge settled in Redis found a cap spent.
    spent_out: Arc<std::sync::atomic::AtomicBool>,
}

impl Book {
    /// A book with the spend of the current periods, as read from the ledger: one entry per key
    /// (`None`: requests without a key), user and period. The gateway's totals are their sum, a
    /// key's the sum of its users'.
    pub fn rebuild(rows: &[PeriodTotal], now: i64) -> Book {
        let book = Book::default();
        {
            let mut acc = book.lock();
            for (key, user, period, amount) in rows {
                let mut scopes = vec![Scope::gateway()];
                if let Some(k) = key {
                    let k = Arc::<str>::from(k.as_str());
                    if let Some(u) = user {
                        scopes.push(Scope {
                            key: Some(k.clone()),
                            user: Some(Arc::from(u.as_str())),
                        });
                    }
                    scopes.push(Scope::key(k));
                }
                for scope in scopes {
                    if scope.user.is_some() && !acc.contains_key(&scope) {
                        book.users.fetch_add(1, Ordering::Relaxed);
                    }
                    let a = acc.entry(scope).or_default();
                    a.roll(now);
                    a.spent[period.index()].add(*amount);
                }
            }
        }
        book
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, Account>> {
        // A panic while holding the lock leaves consistent numbers (every update is a plain
        // add); keep serving rather than poisoning every later request.
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request that would reserve `own`, or says how long until the latest of the spent
    /// caps' periods ends. A cap refuses when its spend has reached it, or when spend plus what is
    /// reserved in flight plus `own` would pass it.
    pub fn admit(
        self: &Arc<Self>,
        applies: Applies,
        own: Amount,
        now: i64,
    ) -> Result<Reservation, Duration> {
        let mut acc = self.lock();
        let mut refused_until: Option<i64> = None;
        let mut new_user = false;
        for (scope, caps) in applies.scopes() {
            // An account is made only for an admitted request: a refused one (a spent key, a
            // stream of made-up user names) leaves nothing behind.
            let mut fresh = Account::default();
            let a = match acc.get_mut(&scope) {
                Some(a) => a,
                None => {
                    new_user |= scope.user.is_some();
                    &mut fresh
                }
            };
            a.roll(now);
            for cap in caps {
                let spent = a.spent[cap.period.index()].get(cap.unit);
                let reserved = a.reserved.get(cap.unit);
                if spent >= cap.limit || spent + reserved + own.get(cap.unit) > cap.limit {
                    let end = cap.period.bounds(now).1;
                    refused_until = Some(refused_until.map_or(end, |e| e.max(end)));
                }
            }
        }
        if let Some(end) = refused_until {
            return Err(Duration::from_secs((end - now).max(1) as u64));
        }
        let users = &self.users;
        if new_user {
            if users.load(Ordering::Relaxed) >= MAX_USER_ACCOUNTS {
                return Err(too_many_users(now));
            }
            // Counted under the book's lock, so the count and the accounts agree.
            users.fetch_add(1, Ordering::Relaxed);
        }
        for (scope, _) in applies.scopes() {
            acc.entry(scope).or_default().reserved.add(own);
        }
        drop(acc);
        Ok(Reservation {
            book: self.clone(),
            applies,
            own,
            settled: false,
            hold: None,
        })
    }

    /// With `[cluster]`: budgets are decided in Redis from now on; `budget` events of charges
    /// settled there go to `audit`.
    pub fn share(&self, store: Arc<dyn SharedStore>, audit: crate::audit::Audit) {
        let _ = self.shared.set(SharedBudgets {
            store,
            audit,
            sending: tokio_util::task::TaskTracker::new(),
            pending: Mutex::default(),
        });
    }

    /// Sends a charge to Redis from a task on this thread's runtime (off the request's path);
    /// queued for [`Book::flush_pending`] if there is none, if shutdown has begun, or if Redis
    /// does not take it.
    fn send(self: &Arc<Self>, job: Settle) {
        let Some(sh) = self.shared.get() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if !sh.sending.is_closed() => {
                let book = self.clone();
                rt.spawn(sh.sending.track_future(async move {
                    if let Some(sh) = book.shared.get()
                        && !deliver(sh, &job).await
                    {
                        book.queue(job);
                    }
                }));
            }
            _ => self.queue(job),
        }
    }

    fn queue(&self, job: Settle) {
        let Some(sh) = self.shared.get() else { return };
        let mut q = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_PENDING {
            q.pop_front();
            tracing::warn!(
                max = MAX_PENDING,
                "cluster: too many charges waiting for Redis; the oldest is kept in this instance's book only"
            );
        }
        q.push_back(job);
    }

    /// Sends the charges Redis did not take yet, in order; keeps those it still does not take.
    /// Called every second on the main runtime and at shutdown.
    pub async fn flush_pending(&self) {
        let Some(sh) = self.shared.get() else { return };
        let jobs: Vec<Settle> = {
            let mut q = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
            q.drain(..).collect()
        };
        let mut jobs = jobs.into_iter();
        while let Some(job) = jobs.next() {
            if !deliver(sh, &job).await {
                // Still not answering: keep this one and the rest for the next round.
                let mut q = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
                let rest: Vec<Settle> = std::iter::once(job).chain(jobs).collect();
                for j in rest.into_iter().rev() {
                    q.push_front(j);
                }
                return;
            }
        }
    }

    /// At shutdown: waits (at most `limit`) for the settles in flight, then sends what waits.
    /// Settles that begin later (records written after this) are queued, for a last
    /// [`Book::flush_pending`].
    pub async fn finish(&self, limit: Duration) {
        let Some(sh) = self.shared.get() else { return };
        sh.sending.close();
        let _ = tokio::time::timeout(limit, async {
            sh.sending.wait().await;
            self.flush_pending().await;
        })
        .await;
    }

    /// [`Book::admit`], in Redis where budgets are shared: one round trip holds the
    /// reservation in every scope that applies, atomically across instances. While Redis does
    /// not answer, `cluster.on_error` decides (this book, or a refusal).
    pub async fn reserve(
        self: &Arc<Self>,
        applies: Applies,
        own: Amount,
        now: i64,
    ) -> Result<Reservation, Refusal> {
        let Some(sh) = self.shared.get() else {
            return self.admit(applies, own, now).map_err(Refusal::Spent);
        };
        // The same bound on users as without Redis: this book holds an account for each.
        let new_user = applies
            .key
            .as_ref()
            .zip(applies.user.as_ref())
            .is_some_and(|(k, u)| {
                !self.lock().contains_key(&Scope {
                    key: Some(k.clone()),
                    user: Some(u.clone()),
                })
            });
        if new_user && self.users.load(Ordering::Relaxed) >= MAX_USER_ACCOUNTS {
            return Err(Refusal::Spent(too_many_users(now)));
        }
        let scopes = redis_scopes(&applies);
        let periods = current_periods(now);
        let member = format!("{}|{}|{}", ulid::Ulid::new(), own.tokens, own.cost);
        let asked = sh
            .store
            .reserve(&scopes, &periods, (own.tokens, own.cost), &member, HOLD)
            .await;
        match asked {
            Answered::Answer(None) => {
                // Held in Redis; this book holds it too (without its own check: it knows only
                // this instance's share), for `on_error = "local"` during a later outage.
                let mut acc = self.lock();
                for (scope, _) in applies.scopes() {
                    if scope.user.is_some() && !acc.contains_key(&scope) {
                        self.users.fetch_add(1, Ordering::Relaxed);
                    }
                    let a = acc.entry(scope).or_default();
                    a.roll(now);
                    a.reserved.add(own);
                }
                drop(acc);
                Ok(Reservation {
                    book: self.clone(),
                    applies,
                    own,
                    settled: false,
                    hold: Some(Hold {
                        member,
                        spent_out: Arc::default(),
                    }),
                })
            }
            Answered::Answer(Some(end)) => Err(Refusal::Spent(Duration::from_secs(
                (end - now).max(1) as u64,
            ))),
            Answered::Local => self.admit(applies, own, now).map_err(Refusal::Spent),
            Answered::Deny => Err(Refusal::Unavailable),
        }
    }

    /// Sets `portcullis_budget_remaining` for each of `scope`'s caps (startup, reload).
    pub fn publish(&self, scope: &Scope, caps: &[Cap], now: i64) {
        let mut acc = self.lock();
        let a = acc.entry(scope.clone()).or_default();
        a.roll(now);
        for c in caps {
            publish(scope, c, a.spent[c.period.index()].get(c.unit));
        }
    }

    /// Spent in the current periods.
    #[cfg(test)]
    fn spent(&self, scope: &Scope, period: Period, now: i64) -> Amount {
        let mut acc = self.lock();
        let a = acc.entry(scope.clone()).or_default();
        a.roll(now);
        a.spent[period.index()]
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("applies", &self.applies)
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    pub fn amount(&self) -> Amount {
        self.own
    }

    /// Replaces the reservation by what the request really cost, and sets
    /// `portcullis_budget_remaining` for each cap it counts against. Returns the `budget` events of
    /// the caps whose spend this charge carried across 80 % or 100 % (both, if it crossed both).
    pub fn settle(mut self, charged: Amount, now: i64) -> Vec<BudgetEvent> {
        self.settled = true;
        let events = self.add(charged, now, true).0;
        if self.book.shared.get().is_none() {
            return events;
        }
        // Shared budgets: Redis says what is spent, and so which lines this charge crossed. A
        // request admitted while Redis did not answer (no hold) is charged there too.
        let member = self.hold.as_ref().map(|h| h.member.clone());
        self.settle_shared(charged, now, member);
        Vec::new()
    }

    /// Charges `charged` on top of what the reservation holds, which stays held: one response of
    /// a realtime session (SPEC §8), charged when it is seen. Returns the `budget` events, and
    /// whether one of the caps is now spent (the session is to be closed).
    pub fn charge(&self, charged: Amount, now: i64) -> (Vec<BudgetEvent>, bool) {
        let (events, spent_here) = self.add(charged, now, false);
        if self.book.shared.get().is_none() {
            return (events, spent_here);
        }
        // In Redis, a charge is known spent once it has settled there: a session is closed at
        // the first response after the one that spent the cap (or at once, if this instance's
        // own share already spent it).
        self.settle_shared(charged, now, None);
        let spent_shared = self
            .hold
            .as_ref()
            .is_some_and(|h| h.spent_out.load(Ordering::Relaxed));
        (Vec::new(), spent_here || spent_shared)
    }

    /// Settles `charged` in Redis, off the request's path (a task on this worker's runtime):
    /// writes the `budget` events of the lines it crossed and sets the remaining-budget gauges.
    /// `member`: the reservation to release (`None`: keep holding it). If Redis does not answer,
    /// the charge stays in this instance's book only (counted in
    /// `portcullis_cluster_errors_total{op="settle"}`).
    fn settle_shared(&self, charged: Amount, now: i64, member: Option<String>) {
        if self.book.shared.get().is_none() {
            return;
        }
        self.book.send(Settle {
            applies: self.applies.clone(),
            now,
            id: ulid::Ulid::new().to_string(),
            charged,
            member,
            spent_out: self.hold.as_ref().map(|h| h.spent_out.clone()),
        });
    }

    fn add(&self, charged: Amount, now: i64, release: bool) -> (Vec<BudgetEvent>, bool) {
        let shared = self.book.shared.get().is_some();
        let mut events = Vec::new();
        let mut spent_out = false;
        let mut acc = self.book.lock();
        for (scope, caps) in self.applies.scopes() {
            let a = acc.entry(scope.clone()).or_default();
            a.roll(now);
            if release {
                a.reserved.sub(self.own);
            }
            let before = a.spent;
            for p in PERIODS {
                a.spent[p.index()].add(charged);
            }
            for cap in caps {
                let was = before[cap.period.index()].get(cap.unit);
                let is = a.spent[cap.period.index()].get(cap.unit);
                spent_out |= is >= cap.limit;
                events.extend(crossings(&scope, cap, was, is));
                // Set under the lock, so the gauge follows the order of the charges. Users are
                // never a metrics label (their number is the clients' to choose). With shared
                // budgets the gauge shows Redis's spend (set when the charge settles there),
                // not this instance's share.
                if scope.user.is_none() && !shared {
                    publish(&scope, cap, is);
                }
            }
        }
        (events, spent_out)
    }
}

/// A new user's refusal once [`MAX_USER_ACCOUNTS`] are tracked (logged): until the day ends.
fn too_many_users(now: i64) -> Duration {
    tracing::warn!(
        max = MAX_USER_ACCOUNTS,
        "user_budget: too many users to track; a new user's request is refused"
    );
    let end = Period::Day.bounds(now).1;
    Duration::from_secs((end - now).max(1) as u64)
}

/// Settles `job` in Redis: writes the `budget` events of the lines it crossed and sets the
/// remaining-budget gauges. False if Redis did not take it (to be sent again).
async fn deliver(sh: &SharedBudgets, job: &Settle) -> bool {
    let scopes = redis_scopes(&job.applies);
    let periods = current_periods(job.now);
    let charged = job.charged;
    let asked = sh
        .store
        .settle(
            &scopes,
            &periods,
            &job.id,
            (charged.tokens, charged.cost),
            job.member.as_deref(),
        )
        .await;
    let Answered::Answer((applied, spent)) = asked else {
        return false;
    };
    let mut spent = spent.into_iter();
    for (scope, caps) in job.applies.scopes() {
        for cap in caps {
            let is = spent.next().unwrap_or(0.0);
            if is >= cap.limit
                && let Some(out) = &job.spent_out
            {
                out.store(true, Ordering::Relaxed);
            }
            // A charge counted by an earlier send crossed its lines then.
            if applied {
                for e in crossings(&scope, cap, is - charged.get(cap.unit), is) {
                    sh.audit.emit(&e);
                }
            }
            if scope.user.is_none() {
                publish(&scope, cap, is);
            }
        }
    }
    true
}

/// The `budget` events of a charge that took `cap`'s spend from `was` to `is`: one per line
/// (80 %, 100 %) it crossed.
fn crossings(scope: &Scope, cap: &Cap, was: f64, is: f64) -> Vec<BudgetEvent> {
    let mut events = Vec::new();
    for threshold in [80u8, 100] {
        let line = cap.limit * f64::from(threshold) / 100.0;
        if was < line && is >= line {
            events.push(BudgetEvent {
                ts: crate::clock::now_rfc3339(),
                event: "budget",
                key_id: scope.key.as_deref().map(str::to_owned),
                user: scope.user.as_deref().map(str::to_owned),
                period: cap.period.name(),
                unit: cap.unit.name(),
                spent: match cap.unit {
                    Unit::Cost => round_usd(is),
                    Unit::Tokens => is,
                },
                limit: cap.limit,
                threshold,
            });
        }
    }
    events
}

/// A request's scopes as Redis names them: `*` (the gateway), `k:<key id or identity>`,
/// `u:<key id>:<user>` (key ids have no `:`), each with its caps.
fn redis_scopes(applies: &Applies) -> Vec<BudgetScope> {
    applies
        .scopes()
        .map(|(scope, caps)| BudgetScope {
            name: match (&scope.key, &scope.user) {
                (None, _) => "*".to_owned(),
                (Some(k), None) => format!("k:{k}"),
                (Some(k), Some(u)) => format!("u:{k}:{u}"),
            },
            caps: caps
                .iter()
                .map(|c| BudgetCap {
                    period: c.period.index(),
                    tokens: c.unit == Unit::Tokens,
                    limit: c.limit,
                })
                .collect(),
        })
        .collect()
}

/// The current day, week and month (UTC) as `(start, end)` unix seconds.
fn current_periods(now: i64) -> Periods {
    PERIODS.map(|p| p.bounds(now))
}

/// Sets `portcullis_budget_remaining` for `cap`, given what is spent of it.
fn publish(scope: &Scope, cap: &Cap, spent: f64) {
    let left = round_usd((cap.limit - spent).max(0.0));
    crate::metrics::budget_remaining(
        scope.key.as_deref(),
        cap.period.name(),
        cap.unit.name(),
        left,
    );
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(h) = &self.hold {
            // Released in Redis too: a settle of nothing.
            self.settle_shared(
                Amount::default(),
                crate::clock::now_secs(),
                Some(h.member.clone()),
            );
        }
        let mut acc = self.book.lock();
        for (scope, _) in self.applies.scopes() {
            if let Some(a) = acc.get_mut(&scope) {
                a.reserved.sub(self.own);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        humantime::parse_rfc3339(s)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn calendar_periods_in_utc() {
        let t = ts("2026-11-23T16:20:00Z"); // a Monday
        assert_eq!(
            Period::Day.bounds(t),
            (ts("2026-11-23T00:00:00Z"), ts("2026-11-24T00:00:00Z"))
        );
        assert_eq!(
            Period::Week.bounds(t),
            (ts("2026-11-23T00:00:00Z"), ts("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            Period::Week.bounds(ts("2026-11-29T23:59:59Z")),
            (ts("2026-11-23T00:00:00Z"), ts("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(t),
            (ts("2026-11-01T00:00:00Z"), ts("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(ts("2026-12-31T23:59:59Z")),
            (ts("2026-12-01T00:00:00Z"), ts("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(ts("2028-02-29T12:00:00Z")),
            (ts("2028-02-01T00:00:00Z"), ts("2028-03-01T00:00:00Z"))
        );
        // 1970-01-01 was a Thursday: its week began three days before the epoch.
        assert_eq!(Period::Week.bounds(0), (-3 * 86_400, 4 * 86_400));
        // Every day of four centuries round-trips through the civil calendar.
        for d in -146_097..146_097 {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    fn applies(key: &str, key_caps: Vec<Cap>, gateway_caps: Vec<Cap>) -> Applies {
        Applies {
            key: Some(Arc::from(key)),
            user: None,
            key_caps: key_caps.into(),
            user_caps: Arc::from([]),
            gateway_caps: gateway_caps.into(),
        }
    }

    fn tokens(n: f64) -> Amount {
        Amount {
            tokens: n,
            cost: 0.0,
        }
    }

    const DAY_100: Cap = Cap {
        period: Period::Day,
        unit: Unit::Tokens,
        limit: 100.0,
    };

    #[test]
    fn reservations_in_flight_count_against_the_cap() {
        let book = Arc::new(Book::default());
        let now = ts("2026-11-23T16:20:00Z");
        let a = || applies("phone", vec![DAY_100], vec![]);
        let held: Vec<_> = (0..4)
            .map(|_| book.admit(a(), tokens(25.0), now).unwrap())
            .collect();
        let refused = book.admit(a(), tokens(25.0), now).unwrap_err();
        assert_eq!(
            refused,
            Duration::from_secs((ts("2026-11-24T00:00:00Z") - now) as u64)
        );
        // Settled below their reservations, they free room for more.
        for r in held {
            let _ = r.settle(tokens(10.0), now);
        }
        assert_eq!(
            book.spent(&Scope::key(Arc::from("phone")), Period::Day, now),
            tokens(40.0)
        );
        assert!(book.admit(a(), tokens(25.0), now).is_ok());
    }

    #[test]
    fn a_dropped_reservation_is_released_and_a_new_day_starts_from_zero() {
        let book = Arc::new(Book::default());
        let now = ts("2026-11-23T23:59:00Z");
        let a = || applies("phone", vec![DAY_100], vec![]);
        drop(book.admit(a(), tokens(100.0), now).unwrap());
        let r = book.admit(a(), tokens(100.0), now).unwrap();
        let _ = r.settle(tokens(100.0), now);
        assert!(book.admit(a(), tokens(0.0), now).is_err());
        assert!(book.admit(a(), tokens(1.0), now + 60).is_ok());
    }

    #[test]
    fn one_charge_crossing_both_thresholds_writes_both_events() {
        let book = Arc::new(Book::default());
        let now = ts("2026-11-23T12:00:00Z");
        let gw = Cap {
            period: Period::Month,
            unit: Unit::Cost,
            limit: 1.0,
        };
        let a = || applies("phone", vec![DAY_100], vec![gw]);
        let ev = book
            .admit(a(), tokens(10.0), now)
            .unwrap()
            .settle(tokens(79.0), now);
        assert!(ev.is_empty());
        let ev = book.admit(a(), tokens(10.0), now).unwrap().settle(
            Amount {
                tokens: 30.0,
                cost: 0.85,
            },
            now,
        );
        let got: Vec<_> = ev
            .iter()
            .map(|e| (e.key_id.as_deref(), e.period, e.unit, e.threshold))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("phone"), "day", "tokens", 80),
                (Some("phone"), "day", "tokens", 100),
                (None, "month", "cost_usd", 80),
            ]
        );
        assert_eq!(
            book.spent(&Scope::key(Arc::from("phone")), Period::Day, now)
                .tokens,
            109.0
        );
        assert!((book.spent(&Scope::gateway(), Period::Month, now).cost - 0.85).abs() < 1e-9);
        // The gateway's month cap is not spent, but the key's day is: 429 until midnight.
        assert_eq!(
            book.admit(a(), tokens(1.0), now).unwrap_err(),
            Duration::from_secs(12 * 3600)
        );
    }

    #[test]
    fn the_latest_end_of_the_spent_caps_is_the_retry_after() {
        let now = ts("2026-11-23T12:00:00Z");
        let week = Cap {
            period: Period::Week,
            unit: Unit::Tokens,
            limit: 50.0,
        };
        let book = Arc::new(Book::rebuild(
            &[(Some("phone".into()), None, Period::Week, tokens(60.0))],
            now,
        ));
        let a = applies("phone", vec![DAY_100, week], vec![]);
        assert_eq!(
            book.admit(a, tokens(1.0), now).unwrap_err(),
            Duration::from_secs((ts("2026-11-30T00:00:00Z") - now) as u64)
        );
        // The rebuilt spend counts for the gateway as a whole too.
        assert_eq!(
            book.spent(&Scope::gateway(), Period::Week, now),
            tokens(60.0)
        );
        assert_eq!(book.spent(&Scope::gateway(), Period::Day, now), tokens(0.0));
    }

    #[test]
    fn each_user_of_a_key_has_its_own_cap_and_the_key_cap_holds_their_sum() {
        let now = ts("2026-11-23T12:00:00Z");
        let user_cap = Cap {
            period: Period::Day,
            unit: Unit::Tokens,
            limit: 30.0,
        };
        let book = Arc::new(Book::rebuild(
            &[(
                Some("webui".into()),
                Some("alice".into()),
                Period::Day,
                tokens(25.0),
            )],
            now,
        ));
        let a = |user: &str| Applies {
            key: Some(Arc::from("webui")),
            user: Some(Arc::from(user)),
            key_caps: vec![DAY_100].into(),
            user_caps: vec![user_cap].into(),
            gateway_caps: Arc::from([]),
        };
        // alice's rebuilt spend leaves her 5; bob has his own 30.
        assert!(book.admit(a("alice"), tokens(10.0), now).is_err());
        let bob = book.admit(a("bob"), tokens(30.0), now).unwrap();
        let events = bob.settle(tokens(30.0), now);
        // bob's own cap crossed 80 % and 100 %; the key's (55 of 100) neither.
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.user.as_deref() == Some("bob")));
        assert!(book.admit(a("bob"), tokens(1.0), now).is_err());
        // The key's cap counts both users: 55 spent, 45 left across all of them.
        for u in ["carol", "dave"] {
            let r = book.admit(a(u), tokens(20.0), now).unwrap();
            let _ = r.settle(tokens(20.0), now);
        }
        assert!(book.admit(a("erin"), tokens(10.0), now).is_err());
        assert_eq!(
            book.spent(&Scope::key(Arc::from("webui")), Period::Day, now),
            tokens(95.0)
        );
    }
}
