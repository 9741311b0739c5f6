//! The request pipeline: the one place where the SPEC §3 order lives.
//!
//! Every request to a client listener passes these steps, in this order:
//!
//! 1. connection limits, TLS, header read timeout ............ `server.rs` (before this module)
//! 2. request id: kept from a trusted proxy if well-formed, else a new ULID
//! 3. client IP: peer, or right-most untrusted `X-Forwarded-For` hop via a trusted proxy
//! 4. request-target checks, path normalization, route match .. 400 / 404 / 405
//! 5. IP allow/deny lists, lockout, per-IP rate limit ......... 403 `ip_denied`, 429
//! 6. CORS: preflights answered here; foreign Origin refused .. 204, 403 `origin_not_allowed`
//! 7. API key, then scope and expiry (`auth = "key"` routes) .. 401, 403 `key_not_allowed`
//! 8. the per-key rate limit .................................. 429 `rate_limited`
//! 9. body cap (Content-Length up front, then mid-stream); on `llm` routes the body is read for
//!    its model and a key's `models` applied (403 `model_not_allowed`); forward with the route
//!    timeout, the response's usage noted as it streams back (SPEC §7)
//!
//! Per-request state lives in [`Ctx`] (client IP, request id, and the [`Record`] that collects
//! route, key id and usage) rather than in request extensions: each step is a plain function of
//! what earlier steps established, so the order is visible in [`process`] and cannot drift from a
//! doc comment. The [`Record`], created at step 2, owns the request's audit record and charge and
//! writes them exactly once however the request ends (see `record.rs`): [`finish`] hands it to
//! the response body (WebSocket: to the tunnel); if the client goes away first, it is dropped
//! with the request's future and writes itself as `client_closed`.

pub mod record;
pub mod target;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use self::record::{Ending, Record};
use self::target::{check_ip_lists, check_target, content_length, method_name, request_id};
use crate::audit::Audit;
use crate::auth;
use crate::client_ip;
use crate::config::Config;
use crate::config::runtime::{AuthMode, Route};
use crate::conn::Active;
pub use crate::conn::ConnInfo;
use crate::cors::{self, Verdict};
use crate::error::GatewayError;
use crate::live::Live;
use crate::llm::admit::Admission;
use crate::llm::meter::{Exchange, Meter};
use crate::lockout::{self, Lockout};
use crate::path;
use crate::proxy::body::{self, Ended, OnEnd, ResponseBody, Streamed};
use crate::proxy::headers::{self, X_REQUEST_ID};
use crate::proxy::{Forwarder, websocket};
use crate::rate_limit::{Allowed, Registry, Subject};
use crate::route::{self, Match};

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// What every request handler shares: the live config, the upstream client, the audit log.
pub struct Shared {
    pub live: ArcSwap<Live>,
    /// The usage ledger's writer (opened at startup; `usage.database` changes need a restart).
    pub ledger: Option<crate::llm::ledger::Ledger>,
    /// Spend and reservations per key and period; with the ledger (budgets need it).
    pub budgets: Option<Arc<crate::llm::budget::Book>>,
    /// Rate-limit and lockout state outlive any one config (SPEC §6: kept across reloads).
    pub limiters: Registry,
    pub lockout: Lockout,
    pub forwarder: Forwarder,
    pub audit: Audit,
    /// WebSocket tunnels outlive their connection's HTTP state; shutdown waits for them here.
    pub tunnels: TaskTracker,
    /// Cancelled when `shutdown_grace` runs out: connections and tunnels still open are cut
    /// (their records are written before the process exits).
    pub cut: tokio_util::sync::CancellationToken,
}

/// What the steps have established about one request.
struct Ctx {
    request_id: HeaderValue,
    client_ip: IpAddr,
    /// A HEAD request: its response has no body to read.
    head: bool,
    /// The tightest rate limit that applied, for the `RateLimit` response headers.
    rate: Option<(Allowed, std::time::Duration)>,
    /// An allowed cross-origin request: the Origin to echo.
    cors_origin: Option<HeaderValue>,
    /// Keeps the connection counted as busy until the response ends.
    active: Option<Active>,
    /// The share of `limits.max_buffered_bytes` the request's body holds while it is in
    /// memory: until the upstream has answered, or the request ended.
    buffered: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The request's audit record and charge, written once however it ends.
    record: Record,
}

/// A WebSocket tunnel to open once the 101 has been handed to the client.
struct Tunnel {
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
}

impl Shared {
    /// Sets `portcullis_budget_remaining` for every cap of the live config (startup, reload).
    pub fn publish_budgets(&self) {
        let Some(book) = &self.budgets else { return };
        let live = self.live.load();
        let now = crate::clock::now_secs();
        let scopes = std::iter::once((None, &*live.config.budgets)).chain(
            live.config
                .keys
                .iter()
                .zip(&live.key_ids)
                .map(|(k, id)| (Some(id.clone()), &*k.budget)),
        );
        for (scope, caps) in scopes {
            book.publish(&scope, caps, now);
        }
    }
}

/// The hyper service entry point. Never fails: every error becomes a SPEC response.
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    active: Active,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, std::convert::Infallible> {
    // Backpressure: while the audit writer is behind, new requests wait here (nothing is held
    // afterwards; the record takes its place in the queue when it is written).
    if shared.audit.wait_for_room().await {
        crate::metrics::audit_backpressure();
    }
    let live = shared.live.load_full();
    let start = Instant::now();
    let cfg = &live.config;
    // Step 3 before step 2: whether a client's X-Request-Id is kept depends on the peer.
    let peer = client_ip::canonical(conn.peer.ip());
    let peer_trusted = client_ip::is_trusted(peer, &cfg.server.trusted_proxies);
    let client_ip = client_ip::resolve(peer, req.headers(), &cfg.server.trusted_proxies);
    let request_id = request_id(&req, peer_trusted);
    let record = Record::new(
        shared.audit.clone(),
        shared.ledger.clone(),
        live.clone(),
        start,
        request_id.to_str().unwrap_or("").to_owned(),
        client_ip,
        method_name(req.method()),
        req.uri().path(),
        req.headers()
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    );
    let mut ctx = Ctx {
        request_id,
        client_ip,
        head: req.method() == Method::HEAD,
        rate: None,
        cors_origin: None,
        active: Some(active),
        buffered: None,
        record,
    };

    let (resp, tunnel, outcome) = match process(&shared, &live, conn, &mut ctx, req).await {
        Ok((resp, tunnel)) => (resp, tunnel, "forwarded"),
        Err(e) => (e.response(), None, e.code()),
    };
    Ok(finish(&shared, &live, ctx, conn, resp, tunnel, outcome))
}

/// What the steps answer: a response, and a tunnel to open behind a WebSocket's 101.
type Answer = (Response<ResponseBody>, Option<Tunnel>);

/// Steps 4–9 in SPEC order.
async fn process(
    shared: &Shared,
    live: &Live,
    conn: ConnInfo,
    ctx: &mut Ctx,
    req: Request<Incoming>,
) -> Result<Answer, GatewayError> {
    let cfg = &live.config;
    // Step 4: the request target, then the route. A preflight is routed by the method it asks
    // about, so a POST-only route still gets its preflight answered.
    let host = check_target(&req, cfg.server.max_header_bytes)?;
    let path = path::normalize(req.uri().path()).map_err(|why| {
        tracing::debug!(%why, "refused path");
        GatewayError::BadRequest
    })?;
    if let Some(q) = req.uri().query()
        && !path::query_is_acceptable(q)
    {
        return Err(GatewayError::BadRequest);
    }
    let preflight = cors::is_preflight(req.method(), req.headers());
    let routed_method = if preflight {
        req.headers()
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .ok_or(GatewayError::BadRequest)?
    } else {
        req.method().clone()
    };
    let route = match route::find(&cfg.routes, host.as_deref(), &routed_method, &path) {
        Match::Found(r) => r,
        Match::MethodNotAllowed(r) => {
            ctx.record
                .set_route(&r.name, live.route_metrics[r.index].clone());
            return Err(GatewayError::MethodNotAllowed);
        }
        Match::NoRoute => return Err(GatewayError::NoRoute),
    };
    ctx.record
        .set_route(&route.name, live.route_metrics[route.index].clone());

    // Step 5: IP allow/deny (deny wins), then lockout, ...
    check_ip_lists(route, ctx.client_ip)?;
    let who = client_ip::limit_key(ctx.client_ip);
    shared
        .lockout
        .check(who, Instant::now())
        .map_err(|left| GatewayError::LockedOut { retry_after: left })?;
    // ... then the route's per-IP limit, before the key check (nginx limits in its preaccess
    // phase for the same reason): a flood without a key is limited too, instead of costing a
    // key lookup and an audit line each. CORS preflights count.
    if let Some(l) = &live.route_ip[route.index] {
        limit(ctx, l, &Subject::Ip(who))
            .inspect_err(|_| crate::metrics::rate_limited(&route.name, "ip"))?;
    }

    // Step 6: CORS. Checked against the Host the browser used, so same-origin always passes.
    let raw_host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
    match cors::check(
        cfg.cors.as_ref(),
        req.headers(),
        conn.tls,
        raw_host.as_deref(),
        |h| cfg.routes.iter().any(|r| r.host.as_deref() == Some(h)),
    ) {
        Verdict::Refused => return Err(GatewayError::OriginNotAllowed),
        Verdict::Allowed(origin) if preflight => {
            return Ok((cors::preflight(cfg.cors.as_ref(), origin), None));
        }
        Verdict::NotCors if preflight => {
            return Ok((
                cors::preflight(None, HeaderValue::from_static("null")),
                None,
            ));
        }
        Verdict::Allowed(origin) => ctx.cors_origin = Some(origin),
        Verdict::NotCors => {}
    }

    // Step 7: the API key, on routes that ask for one.
    let mut key_index = None;
    if route.auth == AuthMode::Key {
        let presented = auth::extract(req.headers(), req.uri().query(), &cfg.auth);
        match live.keys.check(
            &cfg.keys,
            presented,
            &route.name,
            std::time::SystemTime::now(),
        ) {
            Ok(a) => {
                ctx.record.set_key(&cfg.keys[a.index].id);
                key_index = Some(a.index);
            }
            Err((err, known, counts)) => {
                if let Some(i) = known {
                    ctx.record.set_key(&cfg.keys[i].id);
                }
                crate::metrics::auth_failure(err.code());
                if counts && let Some(lock) = shared.lockout.fail(who, Instant::now(), &cfg.auth) {
                    emit_lockout(shared, ctx.client_ip, lock);
                }
                return Err(err);
            }
        }
    }

    // Step 8: the per-key limit.
    if let Some(k) = key_index
        && let Some(l) = live.per_key_limiter(k, route.index)
    {
        limit(ctx, l, &Subject::Key(live.key_ids[k].clone()))
            .inspect_err(|_| crate::metrics::rate_limited(&route.name, "key"))?;
    }

    // Step 9: body cap up front, then forward.
    if let Some(len) = content_length(&req)?
        && len > route.max_body
    {
        return Err(GatewayError::PayloadTooLarge);
    }
    let req = if route.llm {
        meter_request(shared, live, ctx, route, key_index, req).await?
    } else {
        req.map(ClientBody::Streaming)
    };
    forward(shared, cfg, conn, ctx, route, &path, req).await
}

/// SPEC §7 on `llm` routes: the request body (capped by `max_body` already) is read once, then
/// admitted by `llm/admit.rs` (allow-list, limits, budgets) before anything is forwarded.
async fn meter_request(
    shared: &Shared,
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
    key_index: Option<usize>,
    req: Request<Incoming>,
) -> Result<Request<ClientBody>, GatewayError> {
    let admission = Admission {
        live,
        book: shared.budgets.as_ref(),
        key_index,
    };
    let meter = ctx.record.meter.insert(Meter::new(None));
    if route.websocket && headers::is_websocket_upgrade(req.headers()) {
        admission.handshake(meter, req.uri().query())?;
        return Ok(req.map(ClientBody::Streaming));
    }
    if http_body::Body::is_end_stream(req.body()) {
        admission.bodiless(meter)?;
        return Ok(req.map(ClientBody::Streaming));
    }
    let (mut parts, incoming) = req.into_parts();
    let bytes = read_body(incoming, route, live, ctx).await?;
    let meter = ctx.record.meter.get_or_insert_with(|| Meter::new(None));
    let body = admission.body(meter, bytes)?;
    // The body is sent whole; its length is the gateway's to state, not the client's.
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Request::from_parts(parts, ClientBody::Buffered(body)))
}

/// A request body as it is forwarded: streamed as it arrives, or already read (LLM inspection).
enum ClientBody {
    Streaming(Incoming),
    Buffered(bytes::Bytes),
}

/// Reads a whole request body, within the route's cap and timeout, and within
/// `limits.max_buffered_bytes` (SPEC §3.4 "Buffered bodies"): every byte held takes a permit
/// first, up front for a declared length, frame by frame for a chunked body; past the bound the
/// request is 503 `overloaded`, nothing forwarded. The permits stay in `ctx` until the request's
/// answer is ready (the body is held until the upstream has read it).
async fn read_body(
    incoming: Incoming,
    route: &Route,
    live: &Live,
    ctx: &mut Ctx,
) -> Result<bytes::Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let take = |ctx: &mut Ctx, n: u64| -> Result<(), GatewayError> {
        let n = u32::try_from(n).map_err(|_| GatewayError::Overloaded)?;
        let permit = live
            .buffered
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| GatewayError::Overloaded)?;
        match &mut ctx.buffered {
            Some(held) => held.merge(permit),
            None => ctx.buffered = Some(permit),
        }
        Ok(())
    };
    let declared = http_body::Body::size_hint(&incoming).exact();
    if let Some(len) = declared {
        take(ctx, len)?;
    }
    let mut body = Streamed::new(
        incoming.map_err(body::ClientBodyError),
        live.config.server.stream_idle_timeout,
        ctx.record.bytes_in.clone(),
        route.max_body,
        None,
    );
    let read = async {
        let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| crate::proxy::classify(&*e))?;
            if let Ok(data) = frame.into_data() {
                if declared.is_none() {
                    take(ctx, data.len() as u64)?;
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(route.timeout, read)
        .await
        .unwrap_or(Err(GatewayError::RequestTimeout))
}

/// Applies one limiter; remembers the tightest one for the `RateLimit` headers.
fn limit(ctx: &mut Ctx, l: &crate::rate_limit::Limiter, who: &Subject) -> Result<(), GatewayError> {
    match l.check(who) {
        Ok(a) => {
            // Time until the bucket is full again: one emission interval per used cell.
            let reset = l.window() / l.limit() * (a.limit - a.remaining);
            if ctx
                .rate
                .is_none_or(|(prev, _)| a.remaining < prev.remaining)
            {
                ctx.rate = Some((a, reset));
            }
            Ok(())
        }
        Err(wait) => {
            let a = Allowed {
                limit: l.limit(),
                remaining: 0,
                window: l.window(),
            };
            ctx.rate = Some((a, wait));
            Err(GatewayError::RateLimited { retry_after: wait })
        }
    }
}

fn emit_lockout(shared: &Shared, ip: IpAddr, lock: lockout::LockedOut) {
    #[derive(serde::Serialize)]
    struct Lockout {
        ts: String,
        event: &'static str,
        client_ip: IpAddr,
        failures: u32,
        until: String,
    }
    shared.audit.emit(&Lockout {
        ts: crate::clock::now_rfc3339(),
        event: "lockout",
        client_ip: ip,
        failures: lock.failures,
        until: humantime::format_rfc3339_seconds(lock.until).to_string(),
    });
}

/// Step 9's exchange: the request as the upstream receives it, sent on the WebSocket or the
/// HTTP path.
async fn forward(
    shared: &Shared,
    cfg: &Config,
    conn: ConnInfo,
    ctx: &mut Ctx,
    route: &Route,
    path: &str,
    req: Request<ClientBody>,
) -> Result<Answer, GatewayError> {
    let (mut parts, incoming) = req.into_parts();
    let is_ws = route.websocket
        && parts.version == Version::HTTP_11
        && headers::is_websocket_upgrade(&parts.headers);
    let uri = route::upstream_uri(
        route,
        path,
        parts.uri.query(),
        cfg.auth.query_param.as_deref(),
    )?;
    headers::forwarded(
        &mut parts,
        &headers::Forwarding {
            key_headers: (route.auth == AuthMode::Key).then_some(&cfg.auth.headers[..]),
            trusted_proxies: &cfg.server.trusted_proxies,
            conn,
            client_ip: ctx.client_ip,
            request_id: &ctx.request_id,
            websocket: is_ws,
        },
        route.upstream_headers.iter().map(|u| (&u.name, &u.value)),
    );
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    if is_ws {
        return open_websocket(ctx, route, parts, cfg.server.stream_idle_timeout).await;
    }
    exchange(
        shared,
        ctx,
        route,
        parts,
        incoming,
        cfg.server.stream_idle_timeout,
    )
    .await
}

/// A WebSocket handshake on a connection of its own (see `proxy/websocket.rs`); the tunnel opens
/// once the 101 has reached the client.
async fn open_websocket(
    ctx: &mut Ctx,
    route: &Route,
    parts: http::request::Parts,
    idle: std::time::Duration,
) -> Result<Answer, GatewayError> {
    let sent = Instant::now();
    ctx.record.exchange = Exchange::Sent;
    let opened = websocket::open(parts, &route.upstream.authority, route.timeout)
        .await
        .inspect_err(|e| {
            if *e != GatewayError::UpstreamTimeout {
                ctx.record.exchange = Exchange::NotSent;
            }
        })?;
    ctx.record.set_upstream_ms(crate::clock::ms(sent.elapsed()));
    ctx.record.exchange = Exchange::Answered(opened.status);
    let tunnel = opened.upgrades.map(|(client, upstream)| Tunnel {
        client,
        upstream,
        idle,
    });
    Ok((opened.response, tunnel))
}

/// Sends the request to the upstream and returns its answer, with the usage tap on `llm`
/// routes. Notes how far the exchange got, for the charge.
async fn exchange(
    shared: &Shared,
    ctx: &mut Ctx,
    route: &Route,
    parts: http::request::Parts,
    incoming: ClientBody,
    idle: std::time::Duration,
) -> Result<Answer, GatewayError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Whether the client's body has fully arrived (a timeout before that is the client's).
    let body_done = Arc::new(AtomicBool::new(true));
    let up_body = match incoming {
        ClientBody::Buffered(bytes) => body::full(bytes),
        ClientBody::Streaming(incoming) => {
            body_done.store(http_body::Body::is_end_stream(&incoming), Ordering::Relaxed);
            let incoming = http_body_util::BodyExt::map_err(incoming, body::ClientBodyError);
            let b = Streamed::new(
                incoming,
                idle,
                ctx.record.bytes_in.clone(),
                route.max_body,
                None,
            )
            .finished_flag(body_done.clone());
            http_body_util::BodyExt::boxed_unsync(b)
        }
    };
    let post = parts.method == Method::POST;
    let sent = Instant::now();
    ctx.record.exchange = Exchange::Sent;
    let resp = match shared
        .forwarder
        .send(Request::from_parts(parts, up_body), route.timeout)
        .await
    {
        Ok(resp) => resp,
        Err(failed) => {
            let error = match failed.error {
                // The upstream cannot answer a request it has not fully received: a body still
                // arriving when the route timeout fires is the client's slowness (408), not the
                // upstream's (504).
                GatewayError::UpstreamTimeout if !body_done.load(Ordering::Relaxed) => {
                    GatewayError::RequestTimeout
                }
                e => e,
            };
            // SPEC §7: the upstream never received it (connect failed), or the gateway refused
            // it (the client's body was too slow, too large or malformed): nothing to charge.
            let upstream_side = matches!(
                error,
                GatewayError::UpstreamTimeout | GatewayError::UpstreamUnavailable
            );
            if !(upstream_side && failed.connected) {
                ctx.record.exchange = Exchange::NotSent;
            }
            return Err(error);
        }
    };
    ctx.record.exchange = Exchange::Answered(resp.status().as_u16());
    ctx.record.set_upstream_ms(crate::clock::ms(sent.elapsed()));
    if let Some(m) = &ctx.record.metrics {
        m.upstream(sent.elapsed());
    }
    // SPEC §7: usage is read only from answers to POST requests (a GET may fetch a stored file
    // that merely looks like usage).
    let resp = match &ctx.record.meter {
        Some(meter) if post => metered_response(resp, meter),
        _ => upstream_response(resp),
    };
    Ok((resp, None))
}

/// The upstream's answer on an `llm` route: its usage noted as it streams past, and the
/// usage-only event the gateway asked for left out of what the client sees.
fn metered_response(resp: Response<Incoming>, meter: &Meter) -> Response<ResponseBody> {
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let (mut parts, incoming) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    let mut tapped = crate::llm::usage::UsageTap::new(incoming, sse, meter.slot.clone());
    if meter.injected && sse {
        tapped = tapped.strip_usage_event();
        // The client gets fewer bytes than the upstream sent: its length no longer holds.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let body = http_body_util::BodyExt::map_err(tapped, Into::into);
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
}

/// The upstream's answer with its hop-by-hop headers removed. `finish` wraps the body.
fn upstream_response(resp: Response<Incoming>) -> Response<ResponseBody> {
    use http_body_util::BodyExt;
    let (mut parts, incoming) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, incoming.map_err(Into::into).boxed_unsync())
}

/// What the response body carries to its end: the record, and the connection's busy mark.
struct Guard {
    record: Record,
    _active: Option<Active>,
}

impl Drop for Guard {
    /// Dropped without an ending: the client went away — or, when the watchdog cut the
    /// connection, stopped reading (a record already written is not written again).
    fn drop(&mut self) {
        if self._active.as_ref().is_some_and(Active::stalled) {
            self.record.end(Ending::ClientStalled);
        }
    }
}

impl OnEnd for Guard {
    fn ended(mut self: Box<Self>, how: Ended) {
        self.record.end(match how {
            Ended::Complete => Ending::Complete,
            Ended::Failed | Ended::Cut(body::BodyError::TooLarge) => Ending::UpstreamCut,
            Ended::Cut(body::BodyError::Idle) => Ending::UpstreamIdle,
        });
    }
}

/// Adds the response headers every answer carries and hands the record to the body's end (or to
/// the WebSocket tunnel, which writes it at close).
fn finish(
    shared: &Shared,
    live: &Live,
    mut ctx: Ctx,
    conn: ConnInfo,
    resp: Response<ResponseBody>,
    tunnel: Option<Tunnel>,
    outcome: &'static str,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    headers::add_security_headers(&mut parts.headers, conn.tls);
    parts.headers.insert(&X_REQUEST_ID, ctx.request_id.clone());
    if let Some((a, reset)) = ctx.rate {
        // draft-ietf-httpapi-ratelimit-headers: the policy, and what is left of it. Written
        // straight into the header's buffer (no temporary Strings on every request).
        use std::fmt::Write;
        let mut policy = bytes::BytesMut::with_capacity(24);
        let mut state = bytes::BytesMut::with_capacity(48);
        let _ = write!(policy, "{};w={}", a.limit, a.window.as_secs());
        let _ = write!(
            state,
            "limit={}, remaining={}, reset={}",
            a.limit,
            a.remaining,
            crate::error::retry_after_secs(reset)
        );
        if let (Ok(p), Ok(s)) = (
            HeaderValue::from_maybe_shared(policy.freeze()),
            HeaderValue::from_maybe_shared(state.freeze()),
        ) {
            parts.headers.insert(&RATELIMIT_POLICY, p);
            parts.headers.insert(&RATELIMIT, s);
        }
    }
    if let Some(origin) = &ctx.cors_origin {
        cors::decorate(
            &mut parts.headers,
            live.config.cors.as_ref(),
            origin.clone(),
        );
    }
    let status = parts.status;
    let bodiless = ctx.head
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
        || http_body::Body::is_end_stream(&body);
    ctx.record.responded(status.as_u16(), outcome, bodiless);
    let mut record = ctx.record;
    if let Some(t) = tunnel {
        // SPEC §3.2: the record of a WebSocket is written at close, with the byte counts.
        let (bin, bout) = (record.bytes_in.clone(), record.bytes_out.clone());
        let active = ctx.active.take();
        let cut = shared.cut.clone();
        shared.tunnels.spawn(async move {
            let ending = tokio::select! {
                () = websocket::tunnel(t.client, t.upstream, t.idle, bin, bout) => Ending::Complete,
                () = cut.cancelled() => Ending::ClientGone,
            };
            record.end(ending);
            drop(active);
        });
        return Response::from_parts(parts, body);
    }
    let out = record.bytes_out.clone();
    let clock = ctx.active.as_ref().map(Active::send_clock);
    // The connection counts as busy (for idle_timeout) until this response body has ended.
    let guard = Box::new(Guard {
        record,
        _active: ctx.active.take(),
    });
    let idle = live.config.server.stream_idle_timeout;
    let mut body = Streamed::new(body, idle, out, u64::MAX, Some(guard));
    if let Some(clock) = clock
        && !bodiless
    {
        body = body.send_clock(clock);
    }
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
}
