//! One client connection's state, shared by the server (which accepts and times it) and the
//! pipeline (whose requests mark it busy): what the connection is ([`ConnInfo`]), its counters and
//! timers' inputs ([`ConnState`]), the busy mark a request holds ([`Active`]), and its place in its
//! address's count ([`PerIp`], SPEC §3.4 "Connections per client"). A leaf: it imports nothing of
//! the server or the pipeline, so neither needs the other to name a connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// Facts about the client connection, fixed at accept.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Open connections per client address (SPEC §3.4 "Connections per client"). Written by hand:
/// a count per key that must go down when a connection ends, which no limiter crate keeps (a
/// rate limiter meters arrivals, not what is open).
#[derive(Default)]
pub struct PerIp {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One counted connection; uncounted when dropped.
pub struct IpSlot {
    table: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    /// Counts a new connection from `ip`, or refuses it when `ip` already has `max` open.
    pub fn enter(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// One client connection's shared state. Requests (and WebSocket tunnels) hold an [`Active`]
/// guard; the connection slot (`permit`) is released only when the connection *and* every tunnel
/// it opened are gone, so tunnels cannot escape `max_connections`.
pub struct ConnState {
    _permit: OwnedSemaphorePermit,
    /// The connection's place in its address's count (none for trusted proxies).
    _ip_slot: Option<IpSlot>,
    pub(crate) epoch: Instant,
    pub(crate) inflight: AtomicUsize,
    pub(crate) requests: AtomicUsize,
    pub(crate) last_active_ms: AtomicU64,
    /// Woken by the first request, so that the idle timer is armed then (an idle_timeout shorter
    /// than header_timeout must not wait for the first-head deadline to go by first).
    pub(crate) first_request: tokio::sync::Notify,
    /// The send clocks of the connection's responses (see `proxy::body::SendClock`); ended ones
    /// are pruned when the watchdog looks and as new ones register.
    pub(crate) sending: std::sync::Mutex<Vec<std::sync::Weak<AtomicU64>>>,
    /// Set when the watchdog cut the connection for a client that stopped reading.
    pub(crate) stalled: std::sync::atomic::AtomicBool,
    /// Client bodies still being streamed to an upstream (hyper is reading them): the
    /// connection is not parked meanwhile. Not counted as in flight for `idle_timeout`, which an
    /// upstream that stops reading must not hold off.
    pub(crate) uploads: AtomicUsize,
    /// A request asked for an upgrade: never parked (see `server`).
    pub(crate) no_park: std::sync::atomic::AtomicBool,
}

impl ConnState {
    pub fn new(permit: OwnedSemaphorePermit, ip_slot: Option<IpSlot>) -> ConnState {
        crate::metrics::connection_opened();
        ConnState {
            _permit: permit,
            _ip_slot: ip_slot,
            epoch: Instant::now(),
            inflight: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            first_request: tokio::sync::Notify::new(),
            sending: std::sync::Mutex::default(),
            stalled: std::sync::atomic::AtomicBool::new(false),
            uploads: AtomicUsize::new(0),
            no_park: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The client did something: the idle clocks start over.
    pub fn touch(&self) {
        self.stamp();
    }

    fn stamp(&self) {
        self.last_active_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// True when a response has waited on the client for `send_timeout` (SPEC §3.4 "Slow
    /// readers"): the client has not taken a byte of it for that long.
    pub fn stalled_for(&self, send_timeout: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let limit = send_timeout.as_millis() as u64;
        let mut sending = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        sending.retain(|w| w.strong_count() > 0);
        sending.iter().filter_map(|w| w.upgrade()).any(|c| {
            let since = c.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) >= limit
        })
    }

    /// When the connection, if still idle then, should be closed.
    pub fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return Instant::now() + idle;
        }
        self.epoch + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed)) + idle
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        crate::metrics::connection_closed();
    }
}

/// Held while a client body is being streamed to the upstream ([`Active::upload`]).
pub struct Upload(Arc<ConnState>);

impl Drop for Upload {
    fn drop(&mut self) {
        self.0.uploads.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Held while a request (or a tunnel) of the connection is in flight.
pub struct Active(Arc<ConnState>);

impl Active {
    pub fn new(conn: &Arc<ConnState>) -> Active {
        conn.inflight.fetch_add(1, Ordering::Relaxed);
        if conn.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            conn.first_request.notify_one();
        }
        conn.stamp();
        Active(conn.clone())
    }

    /// Marks a client body as being streamed to the upstream until the guard is dropped: hyper
    /// is reading it, even after the response has ended (an upstream that answered early).
    pub fn upload(&self) -> Upload {
        self.0.uploads.fetch_add(1, Ordering::Relaxed);
        Upload(self.0.clone())
    }

    /// A send clock for one response of this connection, watched by its watchdog.
    pub fn send_clock(&self) -> crate::proxy::body::SendClock {
        let c = Arc::new(AtomicU64::new(0));
        let mut sending = self.0.sending.lock().unwrap_or_else(|p| p.into_inner());
        // Ended responses are dropped here too, not only by the watchdog: a busy keep-alive
        // connection must not pile up a watchdog period's worth of them.
        if sending.len() >= 32 {
            sending.retain(|w| w.strong_count() > 0);
        }
        sending.push(Arc::downgrade(&c));
        drop(sending);
        crate::proxy::body::SendClock {
            pending_since: c,
            epoch: self.0.epoch,
        }
    }

    /// The connection was cut because its client stopped reading.
    pub fn stalled(&self) -> bool {
        self.0.stalled.load(Ordering::Relaxed)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
