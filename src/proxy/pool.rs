//! Upstream HTTP/1.1 connections, kept per worker thread and upstream.
//!
//! Written here instead of using hyper-util's legacy `Client`, which it replaced: that client's
//! general pool cost about 5 % of a proxied request's CPU time in the profile (a lock and a
//! SipHash of the pool key per checkout, a task spawned per request to wait until the
//! connection is free again, the `Host` and URI rebuilt per request). A gateway worker runs on
//! one thread and talks to a handful of upstreams, so its pool is a short list per upstream in
//! a thread-local, and a connection goes back to it when the response body has been read to
//! its end. The connections themselves are hyper's (`hyper::client::conn::http1`).
//!
//! What it keeps of the legacy client's behaviour:
//! - the newest idle connection is used first, closed ones are dropped, and one idle for
//!   [`IDLE_TIMEOUT`] is closed;
//! - a request that a reused connection could not even start (the upstream had closed it while
//!   it was idle, a race every keep-alive client has) is sent again on a new connection; one
//!   that was written is not (it may not be idempotent);
//! - a request without `Host` gets the upstream's authority, and the target is sent in origin
//!   form.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri, header::HOST};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use super::body::ResponseBody;

/// Idle connections kept per upstream and worker thread. Above the concurrency one worker sees
/// (HTTP/2 clients multiplex: 50 connections of 10 streams are 500 exchanges at once), so that a
/// busy moment's connections are reused, not closed and opened again.
const MAX_IDLE: usize = 1024;

/// An idle connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connect that has not succeeded after this long fails (the route timeout, if shorter, ends
/// it first).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Sender = SendRequest<ResponseBody>;

struct Idle {
    sender: Sender,
    since: Instant,
}

#[derive(Default)]
struct Pool {
    /// The runtime whose tasks drive the pooled connections. A connection is only of use on
    /// it: the gateway's workers run one runtime per thread for their whole life, but a thread
    /// that ran another runtime before (tests) must not hand out connections nobody drives.
    runtime: Option<tokio::runtime::Id>,
    /// Idle connections by upstream, oldest first. A linear search: a gateway has a few
    /// upstreams, and comparing a short authority beats hashing it.
    upstreams: Vec<(Authority, Vec<Idle>)>,
    /// The task closing expired connections, once one is pooled (on a current-thread runtime,
    /// the gateway's workers; elsewhere they expire when met at checkout).
    sweeper: Option<tokio::task::JoinHandle<()>>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
    /// Resolves names, tries each address (IPv4 and IPv6 raced, "happy eyeballs"), and bounds
    /// the connect: hyper-util's connector, without its client.
    static CONNECTOR: HttpConnector = connector();
}

fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http
}

impl Pool {
    /// Forgets the connections of another runtime than the current one.
    fn on_this_runtime(&mut self) {
        let current = tokio::runtime::Handle::try_current().ok();
        let id = current.as_ref().map(|h| h.id());
        if id != self.runtime {
            self.upstreams.clear();
            self.sweeper = None;
            self.runtime = id;
        }
    }

    /// The newest idle connection to `upstream` that is ready for a request. Closed and expired
    /// ones met on the way are dropped; one still finishing its last exchange stays.
    fn checkout(&mut self, upstream: &Authority, now: Instant) -> Option<Sender> {
        self.on_this_runtime();
        let (_, idle) = self.upstreams.iter_mut().find(|(a, _)| same(a, upstream))?;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let conn = &idle[i];
            if conn.sender.is_closed() || now.duration_since(conn.since) >= IDLE_TIMEOUT {
                idle.remove(i);
            } else if conn.sender.is_ready() {
                return Some(idle.remove(i).sender);
            }
        }
        None
    }

    fn checkin(&mut self, upstream: Authority, sender: Sender, now: Instant) {
        // No runtime check here: a pool left from another runtime is cleared at the next
        // checkout, which comes before any connection is taken from it.
        if sender.is_closed() {
            return;
        }
        let idle = match self.upstreams.iter().position(|(a, _)| same(a, &upstream)) {
            Some(i) => &mut self.upstreams[i].1,
            None => {
                self.upstreams.push((upstream, Vec::new()));
                let last = self.upstreams.len() - 1;
                &mut self.upstreams[last].1
            }
        };
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle { sender, since: now });
        if self.sweeper.as_ref().is_none_or(|t| t.is_finished()) {
            use tokio::runtime::{Handle, RuntimeFlavor};
            self.sweeper = Handle::try_current()
                .ok()
                .filter(|rt| rt.runtime_flavor() == RuntimeFlavor::CurrentThread)
                .map(|rt| rt.spawn(sweep()));
        }
    }

    /// Drops the connections idle for [`IDLE_TIMEOUT`] or closed.
    fn expire(&mut self, now: Instant) {
        for (_, idle) in &mut self.upstreams {
            idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT);
        }
        self.upstreams.retain(|(_, idle)| !idle.is_empty());
    }
}

/// The same upstream: its authority as the config wrote it (`Authority`'s own `==` ignores
/// case, byte by byte, which cost more than the rest of the checkout).
fn same(a: &Authority, b: &Authority) -> bool {
    a.as_str() == b.as_str()
}

/// Closes expired connections of the thread it runs on (spawned only on a current-thread
/// runtime: the thread whose pool spawned it); ends with the runtime.
async fn sweep() {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        POOL.with_borrow_mut(|p| p.expire(Instant::now()));
    }
}

/// Why an exchange failed.
pub enum Failed {
    /// No connection could be made.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed, or the request or response did.
    Exchange(hyper::Error),
}

/// Sends `req` (its target in origin form) to `upstream` on a pooled connection or a new one, and
/// returns the response head; the connection goes back to the pool when its body has ended.
pub async fn send(
    upstream: &Authority,
    mut req: Request<ResponseBody>,
) -> Result<Response<Pooled>, Failed> {
    prepare(&mut req, upstream);
    let mut pooled = POOL.with_borrow_mut(|p| p.checkout(upstream, Instant::now()));
    loop {
        let reused = pooled.is_some();
        let mut sender = match pooled.take() {
            Some(s) => s,
            None => connect(upstream).await?,
        };
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(pooled_response(resp, upstream, sender)),
            Err(mut e) => match e.take_message() {
                // Not started on a connection the upstream had closed while it was idle: once
                // more, on a new connection.
                Some(back) if reused => {
                    tracing::debug!(error = %e.error(), "pooled upstream connection closed; retrying on a new one");
                    req = back;
                }
                _ => return Err(Failed::Exchange(e.into_error())),
            },
        }
    }
}

/// `Host` from the upstream's authority if the client sent none, as hyper-util's client wrote it
/// (the target is already in origin form: `route::upstream_uri`).
fn prepare(req: &mut Request<ResponseBody>, upstream: &Authority) {
    // Without the default port, as hyper-util wrote it.
    let host = match upstream.port_u16() {
        Some(80) => upstream.host(),
        _ => upstream.as_str(),
    };
    if !req.headers().contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        req.headers_mut().insert(HOST, v);
    }
}

async fn connect(upstream: &Authority) -> Result<Sender, Failed> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(upstream.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| Failed::Connect(Box::new(e)))?;
    let mut http = CONNECTOR.with(HttpConnector::clone);
    std::future::poll_fn(|cx| http.poll_ready(cx))
        .await
        .map_err(|e| Failed::Connect(Box::new(e)))?;
    let stream = http
        .call(uri)
        .await
        .map_err(|e| Failed::Connect(Box::new(e)))?;
    let (sender, conn) = Builder::new()
        // As the server side (`server::builder`): one flat buffer per write.
        .writev(false)
        .handshake(stream)
        .await
        .map_err(Failed::Exchange)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

fn pooled_response(
    resp: Response<Incoming>,
    upstream: &Authority,
    sender: Sender,
) -> Response<Pooled> {
    let (parts, body) = resp.into_parts();
    let back = if body.is_end_stream() {
        // Nothing to read (204, 304, an answer to HEAD): free again at once.
        POOL.with_borrow_mut(|p| p.checkin(upstream.clone(), sender, Instant::now()));
        None
    } else {
        Some((upstream.clone(), sender))
    };
    Response::from_parts(parts, Pooled { body, back })
}

/// An upstream response body; its connection goes back to the pool when the body has ended. A
/// body dropped before its end takes the connection with it (hyper closes it: what is left of
/// the body is unread).
pub struct Pooled {
    body: Incoming,
    back: Option<(Authority, Sender)>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some((upstream, sender)) = self.back.take() {
            POOL.with_borrow_mut(|p| p.checkin(upstream, sender, Instant::now()));
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            // Trailers end a body: hyper reads no further than them (nor does its server, which
            // drops the body after passing them on), and its connection is idle by then.
            Poll::Ready(Some(Ok(f))) if f.is_trailers() || this.body.is_end_stream() => {
                this.release()
            }
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
