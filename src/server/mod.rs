//! Listeners and connections: accept, connection limit, TLS, HTTP/1.1 or HTTP/2 (by ALPN, or by
//! the connection's first bytes) with their timers armed, idle HTTP/1.1 connections parked
//! without their buffers, and graceful drain.
//!
//! SPEC §3.4 obligations handled here:
//! - hyper's `header_read_timeout` does nothing without a timer: the builder gets `TokioTimer`
//!   for both protocols. A TLS handshake must also finish within `header_timeout`, and a
//!   connection must deliver its first request head within it (HTTP/2 slowloris: a preface and
//!   nothing else).
//! - HTTP/2: at most `http2_max_concurrent_streams` streams; header list capped at
//!   `max_header_bytes`; pending-accept and locally-errored resets bounded (CVE-2023-44487 rapid
//!   reset); stream window 64 KiB and connection window 1 MiB, as Envoy recommends for edges.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::pin::Pin;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::runtime::Server;
use crate::conn::{Active, ConnInfo, ConnState, IpSlot, PerIp};
use crate::pipeline::{self, Shared};

mod io;
use io::{ClientIo, IoState};

/// HTTP/2 RST_STREAM budgets (CVE-2023-44487): streams a client may open and reset before the
/// server accepted them, and streams the server may reset for protocol errors, per connection.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESETS: usize = 256;
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONN_WINDOW: u32 = 1024 * 1024;

pub struct Listeners {
    pub bound: Vec<(TcpListener, SocketAddr)>,
}

/// Binds every listen address up front, so a taken port fails startup before anything serves.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Listeners, (SocketAddr, std::io::Error)> {
    let mut bound = Vec::new();
    for a in addrs {
        let l = TcpListener::bind(a).await.map_err(|e| (*a, e))?;
        let local = l.local_addr().map_err(|e| (*a, e))?;
        bound.push((l, local));
    }
    Ok(Listeners { bound })
}

/// The HTTP/1.1 side of a client connection.
fn http1(s: &Server) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(s.header_timeout)
        // Slightly above max_header_bytes: the pipeline's own check answers with the SPEC's JSON
        // 431; hyper's cap (a bare 431) only catches heads far over the limit.
        .max_buf_size((s.max_header_bytes + 4096).max(8192))
        // One flat buffer per write: head and a small body go out in one `write` instead of a
        // `writev` of separate slices (measured: 6 % less CPU per proxied request).
        .writev(false)
        .keep_alive(true);
    b
}

/// The HTTP/2 side of a client connection.
fn http2(s: &Server) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(s.http2_max_concurrent_streams)
        .max_header_list_size(s.max_header_bytes as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

pub struct Serve {
    pub shared: Arc<Shared>,
    /// Open connections by client address (IPv6 by /64), for `limits.max_connections_per_ip`.
    pub per_ip: Arc<PerIp>,
    pub shutdown: CancellationToken,
    pub connections: TaskTracker,
    pub semaphore: Arc<Semaphore>,
}

/// Accepts until shutdown. Each connection runs in `connections`.
pub async fn accept_loop(serve: Arc<Serve>, listener: TcpListener) {
    loop {
        // Wait for a free connection slot before accepting: excess clients queue in the kernel's
        // backlog instead of costing us memory.
        let permit = tokio::select! {
            p = serve.semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = serve.shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = serve.shutdown.cancelled() => return,
        };
        let Ok(ip_slot) = count_peer(&serve, peer) else {
            // Closed at accept: dropping the stream closes it, the permit frees the slot.
            continue;
        };
        let _ = stream.set_nodelay(true);
        let serve2 = serve.clone();
        serve.connections.spawn(connection(
            serve2,
            stream,
            peer,
            Arc::new(ConnState::new(permit, ip_slot)),
        ));
    }
}

/// The threads that serve connections: nginx's worker model with threads. Each worker runs a
/// current-thread tokio runtime and accepts on every listener itself (the listening sockets are
/// shared, one file descriptor per worker), so a connection, its requests, their upstream
/// exchanges and the pooled upstream connections they use all live on the thread that accepted
/// it: no work stealing and no cross-thread wake-ups on the request path. State that is
/// per-process (limits, keys, budgets, connection counts) is shared as before.
///
/// One shared socket rather than `SO_REUSEPORT` sockets: a second gateway started on the same
/// port by mistake must fail to bind, not silently take a share of the connections. The cost is
/// that every idle worker wakes for a new connection and one accepts it; keep-alive clients make
/// that rare, and a busy worker polls its sockets less often, so idle workers take the new ones.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The accept loops, across all workers; closed and awaited at shutdown.
    accepting: TaskTracker,
    /// Ends the workers' runtimes (dropping whatever still runs on them) once drained.
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` workers accepting on `listeners` (which move to them). Each worker's
    /// runtime is built here, so a failure to start one fails startup.
    pub fn start(
        serve: &Arc<Serve>,
        listeners: Vec<TcpListener>,
        count: usize,
    ) -> std::io::Result<Workers> {
        let std_listeners = listeners
            .into_iter()
            .map(TcpListener::into_std)
            .collect::<std::io::Result<Vec<_>>>()?;
        let accepting = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut threads = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let own = std_listeners
                .iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (serve, accepting, stop) = (serve.clone(), accepting.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("portcullis-w{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        for l in own {
                            match TcpListener::from_std(l) {
                                Ok(l) => {
                                    accepting.spawn(accept_loop(serve.clone(), l));
                                }
                                Err(e) => tracing::error!(error = %e, "worker cannot accept"),
                            }
                        }
                        stop.cancelled().await;
                    });
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            threads,
            accepting,
            stop,
        })
    }

    /// Waits until every worker has stopped accepting (after `Serve::shutdown`).
    pub async fn accepting_stopped(&self) {
        self.accepting.close();
        self.accepting.wait().await;
    }

    /// Ends the workers and waits for their threads; whatever still runs on them is dropped
    /// (after the drain, only what `shutdown_grace` cut).
    pub async fn finish(self) {
        self.stop.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Serves one already-accepted stream as [`accept_loop`] would (TLS if configured); returns when
/// the connection ends. For benchmarks that drive the gateway over in-memory streams. `None` when
/// `max_connections` are already open.
#[doc(hidden)]
pub fn serve_stream<S>(
    serve: Arc<Serve>,
    stream: S,
    peer: SocketAddr,
) -> Option<impl std::future::Future<Output = ()>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let permit = serve.semaphore.clone().try_acquire_owned().ok()?;
    let ip_slot = count_peer(&serve, peer).ok()?;
    Some(connection(
        serve,
        stream,
        peer,
        Arc::new(ConnState::new(permit, ip_slot)),
    ))
}

/// `limits.max_connections_per_ip` for a new connection from `peer`: its slot, none for a trusted
/// proxy (every client behind it shares its address; their requests are limited per client IP),
/// or `Err` when the address has its maximum open already (counted in metrics).
fn count_peer(serve: &Serve, peer: SocketAddr) -> Result<Option<IpSlot>, ()> {
    let live = serve.shared.live.load();
    let ip = crate::client_ip::canonical(peer.ip());
    if crate::client_ip::is_trusted(ip, &live.config.server.trusted_proxies) {
        return Ok(None);
    }
    match serve.per_ip.enter(
        crate::client_ip::limit_key(ip),
        live.config.limits.max_connections_per_ip,
    ) {
        Some(slot) => Ok(Some(slot)),
        None => {
            crate::metrics::connection_refused("per_ip");
            tracing::debug!(%peer, "too many connections from this address; closed at accept");
            Err(())
        }
    }
}

async fn connection<S>(serve: Arc<Serve>, stream: S, peer: SocketAddr, state: Arc<ConnState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let live = serve.shared.live.load_full();
    let cfg = &live.config;
    // One clock from accept: the TLS handshake and the first request head share header_timeout.
    let first_head = Instant::now() + cfg.server.header_timeout;
    let timers = Timers {
        first_head,
        header: cfg.server.header_timeout,
        idle: cfg.server.idle_timeout,
        send: cfg.server.send_timeout,
    };
    let server = (http1(&cfg.server), http2(&cfg.server));
    let tls = live.tls.clone();
    drop(live);
    let args = Args {
        peer,
        server,
        timers,
        state,
    };
    // What a connection holds is boxed in parts (the TLS handshake, the TLS session, the served
    // connection, hyper's connection, the timers' futures) rather than kept inline in its task:
    // a task is as large as the largest state it ever passes through (it was 9.6 KiB), and an
    // idle connection should hold only what it still needs (the task is now under 1 KiB).
    match tls {
        None => {
            let mut stream = stream;
            match tokio::time::timeout_at(first_head, sniff(&mut stream)).await {
                Ok(Ok((ahead, h2))) => {
                    Box::pin(serve_io(serve, stream, ahead, false, h2, args)).await
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, %peer, "connection failed before a request")
                }
                Err(_) => tracing::debug!(%peer, "no request head within header_timeout; closing"),
            }
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let mut s = match tokio::time::timeout_at(first_head, Box::pin(acceptor.accept(stream)))
                .await
            {
                // Boxed: a TLS session is over a kilobyte, and the connection's task is sized by
                // the largest thing it holds at any point of its life.
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => return tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            // ALPN decides; a client that named no protocol may still speak HTTP/2 directly.
            let (ahead, h2) = match s.get_ref().1.alpn_protocol() {
                Some(p) => (Bytes::new(), p == b"h2"),
                None => match tokio::time::timeout_at(first_head, sniff(&mut s)).await {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        return tracing::debug!(error = %e, %peer, "connection failed before a request");
                    }
                    Err(_) => {
                        return tracing::debug!(%peer, "no request head within header_timeout; closing");
                    }
                },
            };
            Box::pin(serve_io(serve, s, ahead, true, h2, args)).await
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the start of a connection until it is known whether it begins with the HTTP/2 preface
/// (HTTP/2 with prior knowledge, RFC 9113 §3.3) or not (HTTP/1.1): the bytes read, and which.
/// hyper-util's auto server does the same, but it cannot give a connection back to be parked.
async fn sniff<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(Bytes, bool)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut have = 0;
    while have < buf.len() {
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            break;
        }
        have += n;
        if buf[..have] != H2_PREFACE[..have] {
            break;
        }
    }
    Ok((
        Bytes::copy_from_slice(&buf[..have]),
        buf[..have] == H2_PREFACE[..],
    ))
}

/// A connection's deadlines, fixed at accept.
struct Timers {
    first_head: Instant,
    header: Duration,
    idle: Duration,
    send: Duration,
}

/// What a connection is served with, fixed at accept.
struct Args {
    peer: SocketAddr,
    server: (http1::Builder, http2::Builder<TokioExecutor>),
    timers: Timers,
    state: Arc<ConnState>,
}

/// An HTTP/1.1 keep-alive connection with no request for this long gives its buffers back: hyper
/// keeps an 8 KiB read and a write buffer per connection for as long as it serves it, so an idle
/// connection is taken from hyper (at a message boundary, with any bytes hyper had read) and
/// only its socket is kept until the client sends again (then a new hyper connection serves
/// it). nginx does the same, freeing its request buffers on every keep-alive wait. A quarter of a
/// second: a client sending requests back to back is never parked, and one that pauses pays a
/// few microseconds to be served again; measured, 1 s left an idle TLS connection at 22 KiB and
/// 250 ms at 15 KiB (the connections a busy moment holds unparked pin the allocator's pages).
const PARK_AFTER: Duration = Duration::from_millis(250);

/// What `drive` needs to park an HTTP/1.1 connection.
#[derive(Clone, Copy)]
struct Park<'a> {
    io: &'a IoState,
    /// Woken from a park: the request count then, and when the next request head must have
    /// arrived (`header_timeout` after the last request, as hyper's own timer would have it).
    woken: Option<(usize, Instant)>,
}

/// How a served connection ended.
enum Ended {
    Closed,
    /// Idle, and hyper's close kept from the socket: the connection may be parked.
    Parking,
}

async fn serve_io<S>(serve: Arc<Serve>, stream: S, ahead: Bytes, tls: bool, h2: bool, args: Args)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Args {
        peer,
        server: (h1_builder, h2_builder),
        timers,
        state,
    } = args;
    let info = ConnInfo { peer, tls };
    let shared = serve.shared.clone();
    let st = state.clone();
    // The request's future (about 4 KiB: the whole pipeline and the upstream exchange) is boxed
    // rather than kept inline in the connection's task: inline, its pages stay resident for as
    // long as a keep-alive connection idles after its first request (measured: 4 KiB of the
    // ~26 KiB an idle TLS connection costs); boxed, they are freed when the response is sent.
    let svc = service_fn(move |req: Request<Incoming>| {
        if req.headers().contains_key(http::header::UPGRADE) {
            // hyper keeps a request's upgrade pending until the connection ends, even after a
            // refusal, and then hands the socket to it: such a connection is never parked.
            st.no_park.store(true, Ordering::Relaxed);
        }
        Box::pin(pipeline::handle(
            shared.clone(),
            info,
            Active::new(&st),
            req,
        ))
    });
    let io_state = Arc::new(IoState::default());
    let io = ClientIo::new(stream, ahead, io_state.clone());
    if h2 {
        let mut conn = Box::pin(h2_builder.serve_connection(io, svc));
        Box::pin(drive(&serve, &mut conn, &state, &timers, peer, None)).await;
        return;
    }
    let parks = PARK_AFTER < timers.header;
    // After a park, the request count then and when the next head must have arrived: a new
    // hyper connection is not parked before its first request (it is not idle in hyper's eyes
    // until then), and its head keeps the deadline hyper would have set.
    let mut woken: Option<(usize, Instant)> = None;
    let (mut io, mut service) = (io, svc);
    loop {
        let parts = {
            // Boxed, in a scope of its own, so that a parked connection frees it (1.9 KiB with
            // TLS) along with hyper's buffers.
            let mut conn = Box::new(h1_builder.serve_connection(io, service).with_upgrades());
            let park = parks.then_some(Park {
                io: &io_state,
                woken,
            });
            if let Ended::Closed =
                Box::pin(drive(&serve, &mut conn, &state, &timers, peer, park)).await
            {
                return;
            }
            if !io_state.end_park() {
                // hyper was not idle after all (it answered a request with `Connection: close`
                // and closed the socket itself).
                return;
            }
            match (*conn).into_parts() {
                Some(parts) => parts,
                None => return,
            }
        };
        let hyper::server::conn::http1::Parts {
            io: parked_io,
            read_buf,
            service: parked_service,
            ..
        } = parts;
        (io, service) = (parked_io, parked_service);
        io.unread(read_buf);
        let head_by = state.idle_deadline(timers.header);
        // A request head had begun (served at once), or the client sends again.
        if !io.has_ahead() && !Box::pin(parked(&serve, &mut io, &state, &timers)).await {
            close(io, timers.send).await;
            return;
        }
        woken = Some((state.requests.load(Ordering::Relaxed), head_by));
        // The client is active again: the idle clocks start over.
        state.touch();
    }
}

/// Waits, holding only the socket, until the client sends again (true, with what it sent put
/// back for hyper), or until the connection is to close: idle for `idle_timeout`, or no request
/// head begun within `header_timeout` of the last request (what hyper would have enforced), or
/// shutdown.
async fn parked<S>(serve: &Serve, io: &mut ClientIo<S>, state: &ConnState, timers: &Timers) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = state
        .idle_deadline(timers.idle)
        .min(state.idle_deadline(timers.header));
    crate::metrics::connection_parked(true);
    let mut first = [0u8; 1];
    let woke = tokio::select! {
        r = io.stream().read(&mut first) => matches!(r, Ok(1)),
        _ = tokio::time::sleep_until(deadline) => false,
        _ = serve.shutdown.cancelled() => false,
        _ = serve.shared.cut.cancelled() => false,
    };
    crate::metrics::connection_parked(false);
    if woke {
        io.unread(Bytes::copy_from_slice(&first));
    }
    woke
}

/// Closes a parked connection as hyper would (TLS close_notify, then FIN), within `within`.
async fn close<S: AsyncWrite + Unpin>(mut io: ClientIo<S>, within: Duration) {
    let _ = tokio::time::timeout(within, io.stream().shutdown()).await;
}

/// A served connection: hyper's HTTP/1.1 or HTTP/2 connection future.
trait Served: std::future::Future<Output = hyper::Result<()>> + Unpin {
    fn graceful_shutdown(&mut self);
}

impl<I, S, B> Served for Box<http1::UpgradeableConnection<I, S>>
where
    Self: std::future::Future<Output = hyper::Result<()>> + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(&mut self) {
        Pin::new(&mut **self).graceful_shutdown();
    }
}

impl<I, S, B> Served for Pin<Box<http2::Connection<I, S, TokioExecutor>>>
where
    http2::Connection<I, S, TokioExecutor>: std::future::Future<Output = hyper::Result<()>>,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(&mut self) {
        self.as_mut().graceful_shutdown();
    }
}

/// Runs a connection with its timers until it ends, or until it was idle for `PARK_AFTER` and
/// hyper, asked to close it, did (`park`: the connection's IO, for HTTP/1.1 connections that may
/// be parked now).
async fn drive<C: Served>(
    serve: &Serve,
    conn: &mut C,
    state: &ConnState,
    timers: &Timers,
    peer: SocketAddr,
    park: Option<Park<'_>>,
) -> Ended {
    let (first_head_deadline, idle) = (timers.first_head, timers.idle);
    let mut closing = false;
    let mut parking = false;
    // The slow-reader watchdog looks twice per send_timeout while the connection has served.
    let check_every = (timers.send / 2).max(Duration::from_millis(100));
    let mut next_check = Instant::now() + check_every;
    // An idle close that cannot finish (the client does not read the last bytes) is forced.
    let mut close_by: Option<Instant> = None;
    // A park the connection was not ready for (a response still leaving) is tried again later.
    let mut park_not_before = Instant::now();
    let mut woken_head_by = park.and_then(|p| p.woken).map(|(_, by)| by);
    loop {
        let got_request = state.requests.load(Ordering::Relaxed) > 0;
        // The timers armed this round. One `Sleep` waits for the earliest: every wake of the
        // connection's task polls each branch, and four timers polled on every wake cost 3 % of
        // a request's instructions. When it fires, the first due timer (in this order) acts and
        // the loop goes round, so the others are judged again with the guards of the next round.
        let head_at = (!got_request).then_some(first_head_deadline);
        let idle_at = (got_request && !closing).then(|| state.idle_deadline(idle));
        let park_at = (got_request && !closing && park.is_some())
            .then(|| state.idle_deadline(PARK_AFTER).max(park_not_before));
        let check_at = got_request.then_some(next_check);
        let wake = [head_at, idle_at, park_at, check_at, close_by, woken_head_by]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            r = &mut *conn => {
                match r {
                    Ok(()) if parking => return Ended::Parking,
                    Ok(()) => {}
                    Err(e) => tracing::debug!(error = %e, %peer, "connection ended with an error"),
                }
                return Ended::Closed;
            }
            _ = tokio::time::sleep_until(wake.unwrap_or(first_head_deadline)), if wake.is_some() => {
                let now = Instant::now();
                let due = |at: Option<Instant>| at.is_some_and(|t| now >= t);
                if due(head_at) {
                    // A connection that never completes a request head (slowloris, or an HTTP/2
                    // preface and silence) is dropped at header_timeout.
                    if state.requests.load(Ordering::Relaxed) == 0 {
                        tracing::debug!(%peer, "no request head within header_timeout; closing");
                        return Ended::Closed;
                    }
                } else if due(idle_at) {
                    // Keep-alive idle (HTTP/2 above all: its PINGs are answered by the client's
                    // library, so only this notices that no request has come for idle_timeout).
                    if state.inflight.load(Ordering::Relaxed) == 0 && now >= state.idle_deadline(idle) {
                        tracing::debug!(%peer, "connection idle; closing");
                        conn.graceful_shutdown();
                        closing = true;
                        close_by = Some(now + timers.send);
                    }
                } else if due(park_at) {
                    // Idle for PARK_AFTER with nothing waiting on the client: hyper is asked to
                    // close, which an idle connection does at once, without a byte written, and
                    // its close is kept from the socket (a connection not idle after all answers
                    // with `Connection: close` and really closes).
                    let quiet = now >= state.idle_deadline(PARK_AFTER);
                    if let Some(p) = park.filter(|p| {
                        quiet && p.io.quiet()
                            && state.uploads.load(Ordering::Relaxed) == 0
                            && !state.no_park.load(Ordering::Relaxed)
                            && p.woken.is_none_or(|(at, _)| state.requests.load(Ordering::Relaxed) != at)
                    }) {
                        p.io.begin_park();
                        conn.graceful_shutdown();
                        closing = true;
                        parking = true;
                        close_by = Some(now + timers.send);
                    } else if quiet {
                        // Quiet long enough but not ready: look again a PARK_AFTER later.
                        park_not_before = now + PARK_AFTER;
                    }
                } else if due(check_at) {
                    // SPEC §3.4 "Slow readers": a response the client has not taken a byte of for
                    // send_timeout (a full socket buffer, an HTTP/2 window kept at zero) is
                    // abandoned with its connection, and the upstream exchange with it; the
                    // records say client_stalled.
                    next_check = now + check_every;
                    if state.stalled_for(timers.send) {
                        tracing::debug!(%peer, "client took nothing for send_timeout; closing");
                        state.stalled.store(true, Ordering::Relaxed);
                        return Ended::Closed;
                    }
                } else if due(close_by) {
                    // A request that came in meanwhile is served (with `Connection: close`); the
                    // slow-reader watchdog times it.
                    if state.inflight.load(Ordering::Relaxed) > 0 {
                        close_by = Some(now + timers.send);
                    } else {
                        tracing::debug!(%peer, "idle close not finished within send_timeout; cutting");
                        return Ended::Closed;
                    }
                } else if due(woken_head_by) {
                    // Woken from a park: the next request head within header_timeout of the
                    // last request.
                    if park.and_then(|p| p.woken).is_some_and(|(at, _)| state.requests.load(Ordering::Relaxed) == at) {
                        tracing::debug!(%peer, "no request head within header_timeout; closing");
                        return Ended::Closed;
                    }
                    woken_head_by = None;
                }
            }
            // The first request came: go round again with the idle timer armed.
            () = state.first_request.notified(), if !got_request => {}
            // One cancellation at a time: `cut` comes only after `shutdown`, and once closing,
            // shutdown has nothing left to do.
            _ = serve.shutdown.cancelled(), if !closing => {
                conn.graceful_shutdown();
                closing = true;
            }
            // shutdown_grace ran out: dropping the connection drops its requests, whose
            // records then write themselves.
            _ = serve.shared.cut.cancelled(), if closing => return Ended::Closed,
        }
    }
}
