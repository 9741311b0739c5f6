//! Step 9 of the pipeline (SPEC §3): the body read and admitted on `llm` routes, then the
//! exchange with the upstream — the WebSocket handshake or the HTTP request — noting how far it
//! got, for the request's charge.

use std::sync::Arc;
use std::time::Instant;

use http::header;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;

use super::{Answer, ClientBody, Ctx, Shared, Tunnel};
use crate::config::Config;
use crate::config::runtime::{AuthMode, Route};
use crate::conn::ConnInfo;
use crate::error::GatewayError;
use crate::live::Live;
use crate::llm::admit::Admission;
use crate::llm::meter::{Exchange, Meter};
use crate::proxy::body::{self, ResponseBody, Streamed};
use crate::proxy::{Pooled, headers, websocket};
use crate::route;

/// SPEC §7 on `llm` routes: the request body (capped by `max_body` already) is read once, then
/// admitted by `llm/admit.rs` (allow-list, limits, budgets) before anything is forwarded.
pub(super) async fn meter_request(
    shared: &Shared,
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
    key_index: Option<usize>,
    req: Request<Incoming>,
) -> Result<Request<ClientBody>, GatewayError> {
    let user = ctx.record.user().map(str::to_owned);
    // A JWT identity: its issuer's per-subject caps (SPEC §10 `[[issuers]] budget`).
    let subject = ctx.record.subject_with_issuer().map(|(id, issuer)| {
        let caps = live
            .config
            .issuers
            .iter()
            .find(|i| i.name == issuer)
            .map_or_else(|| Arc::from([]), |i| i.budget.clone());
        (id.to_owned(), caps)
    });
    let admission = Admission {
        live,
        book: shared.budgets.as_ref(),
        key_index,
        user: user.as_deref(),
        subject: subject
            .as_ref()
            .map(|(id, caps)| (id.as_str(), caps.clone())),
        anthropic: req.headers().contains_key("anthropic-version"),
    };
    let meter = ctx.record.meter.insert(Meter::new(None));
    if route.websocket && headers::is_websocket_upgrade(req.headers()) {
        admission.handshake(meter, req.uri().query()).await?;
        return Ok(req.map(ClientBody::Streaming));
    }
    if http_body::Body::is_end_stream(req.body()) {
        admission.bodiless(meter).await?;
        return Ok(req.map(ClientBody::Streaming));
    }
    let (mut parts, incoming) = req.into_parts();
    let bytes = read_body(incoming, route, live, ctx).await?;
    let meter = ctx.record.meter.get_or_insert_with(|| Meter::new(None));
    let body = admission.body(meter, bytes).await?;
    // The body is sent whole; its length is the gateway's to state, not the client's.
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Request::from_parts(parts, ClientBody::Buffered(body)))
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

/// Step 9's exchange: the request as the upstream receives it, sent on the WebSocket or the
/// HTTP path.
pub(super) async fn forward(
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
    let uri = route::upstream_uri(route, path, parts.uri.query(), route.query_param.as_deref())?;
    headers::forwarded(
        &mut parts,
        &headers::Forwarding {
            // Credentials never travel upstream: keys, tokens and JWTs alike.
            key_headers: (route.auth != AuthMode::None).then_some(&cfg.auth.headers[..]),
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
    // SPEC §8: a metered session's messages must be readable, so no compression is negotiated.
    let mut parts = parts;
    if ctx.record.meters_realtime() {
        parts.headers.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
    }
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

/// A client body on its way to the upstream: keeps the connection from being parked until it
/// ends or is dropped.
struct Uploading {
    _busy: crate::conn::Upload,
}

impl body::OnEnd for Uploading {
    fn ended(self: Box<Self>, _: body::Ended) {}
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
            // The connection is not parked until the body has been read or dropped, even if the
            // response ends first (the upstream answered early): hyper reads it until then.
            let busy = ctx
                .active
                .as_ref()
                .map(|a| Box::new(Uploading { _busy: a.upload() }) as Box<dyn body::OnEnd>);
            let b = Streamed::new(
                incoming,
                idle,
                ctx.record.bytes_in.clone(),
                route.max_body,
                busy,
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
        .send(
            &route.upstream.authority,
            Request::from_parts(parts, up_body),
            route.timeout,
        )
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
fn metered_response(resp: Response<Pooled>, meter: &Meter) -> Response<ResponseBody> {
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let (mut parts, incoming) = resp.into_parts();
    answer_head(&mut parts);
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
pub(super) fn upstream_response(resp: Response<Pooled>) -> Response<ResponseBody> {
    use http_body_util::BodyExt;
    let (mut parts, incoming) = resp.into_parts();
    answer_head(&mut parts);
    Response::from_parts(parts, incoming.map_err(Into::into).boxed_unsync())
}

/// The upstream's response head as the client's connection speaks it: hop-by-hop headers
/// removed, and the client's own protocol version — an HTTP/1.0 upstream (Python's `http.server`,
/// many small tool servers) must not turn the client's HTTP/1.1 keep-alive connection into
/// HTTP/1.0 and close it after every response.
fn answer_head(parts: &mut http::response::Parts) {
    headers::remove_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
}
