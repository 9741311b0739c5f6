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

mod mint;
mod respond;
mod steps;
mod upstream;

pub mod record;
pub mod target;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use self::record::Record;
use self::target::{content_length, method_name, request_id};
use crate::audit::Audit;
use crate::client_ip;
use crate::conn::Active;
pub use crate::conn::ConnInfo;
use crate::error::GatewayError;
use crate::live::Live;
use crate::proxy::Forwarder;
use crate::proxy::body::ResponseBody;
use crate::rate_limit::{Allowed, Registry};

/// What every request handler shares: the live config, the upstream client, the audit log.
pub struct Shared {
    pub live: ArcSwap<Live>,
    /// The usage ledger's writer (opened at startup; `usage.database` changes need a restart).
    pub ledger: Option<crate::llm::ledger::Ledger>,
    /// Spend and reservations per key and period; with the ledger (budgets need it).
    pub budgets: Option<Arc<crate::llm::budget::Book>>,
    /// Rate-limit and lockout state outlive any one config (SPEC §6: kept across reloads).
    pub limiters: Registry,
    /// Where lockout and limit checks are decided: this instance's state, or Redis.
    pub gate: Arc<crate::gate::Gate>,
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
    /// The CORS verdict on the request's Origin (taken at entry, acted on at step 6).
    cors: crate::cors::Verdict,
    /// A CORS preflight answered by the gateway (outcome `preflight`).
    preflight: bool,
    /// A short-lived token minted by the gateway (outcome `token_minted`).
    minted: bool,
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
        use crate::llm::budget::Scope;
        let scopes = std::iter::once((Scope::gateway(), &*live.config.budgets)).chain(
            live.config
                .keys
                .iter()
                .zip(&live.key_ids)
                .map(|(k, id)| (Scope::key(id.clone()), &*k.budget)),
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
    if shared.audit.is_full() {
        // Counted as the wait begins, so a stuck output shows while it is stuck.
        crate::metrics::audit_backpressure();
        shared.audit.wait_for_room().await;
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
        cors: steps::cors_verdict(&live, conn, &req),
        preflight: false,
        minted: false,
        active: Some(active),
        buffered: None,
        record,
    };

    let (resp, tunnel, outcome) = match process(&shared, &live, conn, &mut ctx, req).await {
        Ok((resp, tunnel)) if ctx.preflight => (resp, tunnel, "preflight"),
        Ok((resp, tunnel)) if ctx.minted => (resp, tunnel, "token_minted"),
        Ok((resp, tunnel)) => (resp, tunnel, "forwarded"),
        Err(e) => (e.response(), None, e.code()),
    };
    Ok(respond::finish(
        &shared, &live, ctx, conn, resp, tunnel, outcome,
    ))
}

/// A request body as it is forwarded: streamed as it arrives, or already read (LLM inspection).
enum ClientBody {
    Streaming(Incoming),
    Buffered(bytes::Bytes),
}

/// What the steps answer: a response, and a tunnel to open behind a WebSocket's 101.
type Answer = (Response<ResponseBody>, Option<Tunnel>);

/// Steps 4–9 in SPEC order, one call each; the first that refuses answers.
async fn process(
    shared: &Shared,
    live: &Live,
    conn: ConnInfo,
    ctx: &mut Ctx,
    req: Request<Incoming>,
) -> Result<Answer, GatewayError> {
    // Step 4: the request target, the normalized path, the route.
    let routed = steps::route(live, ctx, &req)?;
    let route = routed.route;
    // Step 5: the IP lists (the config's own, no shared state).
    target::check_ip_lists(route, ctx.client_ip)?;
    // Steps 5-8 ask shared state (lockout, the per-IP limit, a failure counted, the per-key
    // limit) in one call: with `[cluster]`, one Redis round trip. Step 7's credential is looked
    // up first for it; nothing it found counts until the checks let the request that far.
    let who = client_ip::limit_key(ctx.client_ip);
    let cred = steps::identify(live, ctx, route, routed.preflight, &req);
    let mut verdict = shared
        .gate
        .admit(&steps::checks(live, route, who, &cred))
        .await
        .map_err(|_| GatewayError::Overloaded)?;
    // Step 5: lockout, the route's per-IP limit (before the key: a keyless flood is limited too).
    steps::admit_client(live, ctx, route, &verdict)?;
    // Step 6: CORS; a preflight is answered here.
    if let Some(preflight) = steps::cors(live, ctx, &req, routed.preflight)? {
        return Ok((preflight, None));
    }
    // Step 7: the API key, its scope and expiry (or a JWT).
    let key_index = steps::authenticate(shared, live, ctx, route, who, cred, &mut verdict).await?;
    // Step 8: the per-key limit.
    steps::limit_key(live, ctx, route, key_index, &verdict)?;
    // The route `[tokens]` adds: answered here (SPEC §10), nothing forwarded.
    if route.mint {
        return mint::answer(live, ctx, key_index, req).await;
    }
    // Step 9: the body cap up front; on `llm` routes the body read and admitted; forward.
    if let Some(len) = content_length(&req)?
        && len > route.max_body
    {
        return Err(GatewayError::PayloadTooLarge);
    }
    let req = if route.llm {
        upstream::meter_request(shared, live, ctx, route, key_index, req).await?
    } else {
        req.map(ClientBody::Streaming)
    };
    upstream::forward(shared, &live.config, conn, ctx, route, &routed.path, req).await
}
