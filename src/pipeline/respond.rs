//! The answer's last touches (SPEC §3.2 response headers, `RateLimit`, CORS) and the hand-over of
//! the request's record to the end of the response body, or to the WebSocket tunnel.

use http::Response;
use http::header::{HeaderName, HeaderValue};

use super::record::{Ending, Record};
use super::{Ctx, Shared, Tunnel};
use crate::conn::{Active, ConnInfo};
use crate::cors;
use crate::live::Live;
use crate::proxy::body::{self, Ended, OnEnd, ResponseBody, Streamed};
use crate::proxy::headers::{self, X_REQUEST_ID};
use crate::proxy::websocket;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// What the response body carries to its end: the record, and the connection's busy mark.
struct Guard {
    record: Record,
    active: Option<Active>,
}

impl Drop for Guard {
    /// Dropped without an ending: the client went away — or, when the watchdog cut the
    /// connection, stopped reading (a record already written is not written again).
    fn drop(&mut self) {
        if self.active.as_ref().is_some_and(Active::stalled) {
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
pub(super) fn finish(
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
    if let crate::cors::Verdict::Allowed(origin) = &ctx.cors {
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
            // SPEC §8: an admitted `llm` session's upstream messages are watched for usage.
            let metered = record.meters_realtime();
            let mut watch = |m: &[u8]| record.realtime_message(m);
            let watch: Option<websocket::Watch<'_>> = if metered { Some(&mut watch) } else { None };
            let ending = tokio::select! {
                () = websocket::tunnel(t.client, t.upstream, t.idle, bin, bout, watch) => Ending::Complete,
                () = cut.cancelled() => Ending::ClientGone,
            };
            record.end(ending);
            drop(active);
        });
        return Response::from_parts(parts, body);
    }
    let out = record.bytes_out.clone();
    // Only a response with a body can wait on its client.
    let clock = ctx
        .active
        .as_ref()
        .filter(|_| !bodiless)
        .map(Active::send_clock);
    // The connection counts as busy (for idle_timeout) until this response body has ended.
    let guard = Box::new(Guard {
        record,
        active: ctx.active.take(),
    });
    let idle = live.config.server.stream_idle_timeout;
    let mut body = Streamed::new(body, idle, out, u64::MAX, Some(guard));
    if let Some(clock) = clock {
        body = body.send_clock(clock);
    }
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body))
}
