//! Steps 4–8 of the pipeline (SPEC §3), one function each, in the order `process` calls them.

use std::net::IpAddr;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::target::{check_ip_lists, check_target};
use super::{Ctx, Shared};
use crate::auth;
use crate::client_ip;
use crate::config::runtime::{AuthMode, Route};
use crate::conn::ConnInfo;
use crate::cors::{self, Verdict};
use crate::error::GatewayError;
use crate::live::Live;
use crate::lockout;
use crate::path;
use crate::proxy::body::ResponseBody;
use crate::rate_limit::{Allowed, Subject};
use crate::route::{self, Match};

/// What step 4 found.
pub(super) struct Routed<'a> {
    pub route: &'a Route,
    /// The normalized path: what routing decided on, and what the upstream receives.
    pub path: String,
    /// A CORS preflight (routed by the method it asks about).
    pub preflight: bool,
}

/// Step 4: the request target (SPEC §3.1, §3.4 "Targets"), the normalized path, the route. A
/// preflight is routed by the method it asks about, so a POST-only route still gets its
/// preflight answered.
pub(super) fn route<'l>(
    live: &'l Live,
    ctx: &mut Ctx,
    req: &Request<Incoming>,
) -> Result<Routed<'l>, GatewayError> {
    let cfg = &live.config;
    let host = check_target(req, cfg.server.max_header_bytes)?;
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
    match route::find(&cfg.routes, host.as_deref(), &routed_method, &path) {
        Match::Found(r) => {
            ctx.record
                .set_route(&r.name, live.route_metrics[r.index].clone());
            Ok(Routed {
                route: r,
                path,
                preflight,
            })
        }
        Match::MethodNotAllowed(r) => {
            ctx.record
                .set_route(&r.name, live.route_metrics[r.index].clone());
            Err(GatewayError::MethodNotAllowed)
        }
        Match::NoRoute => Err(GatewayError::NoRoute),
    }
}

/// Step 5: IP allow/deny (deny wins), lockout, then the route's per-IP limit — before the key
/// check, as nginx limits in its preaccess phase: a flood without a key is limited too, instead
/// of costing a key lookup and an audit line each (CORS preflights count). Returns the client's
/// limit identity (IPv6 by /64).
pub(super) fn admit_client(
    shared: &Shared,
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
) -> Result<IpAddr, GatewayError> {
    check_ip_lists(route, ctx.client_ip)?;
    let who = client_ip::limit_key(ctx.client_ip);
    shared
        .lockout
        .check(who, Instant::now())
        .map_err(|left| GatewayError::LockedOut { retry_after: left })?;
    if let Some(l) = &live.route_ip[route.index] {
        limit(ctx, l, &Subject::Ip(who))
            .inspect_err(|_| crate::metrics::rate_limited(&route.name, "ip"))?;
    }
    Ok(who)
}

/// Step 6: CORS, checked against the Host the browser used, so same-origin always passes. A
/// preflight is answered here (`Some`); a foreign Origin is refused.
pub(super) fn cors(
    live: &Live,
    ctx: &mut Ctx,
    req: &Request<Incoming>,
    preflight: bool,
) -> Result<Option<Response<ResponseBody>>, GatewayError> {
    let cfg = &live.config;
    let requested = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS);
    let answer = match &ctx.cors {
        Verdict::Refused => return Err(GatewayError::OriginNotAllowed),
        Verdict::Allowed(origin) if preflight => {
            cors::preflight(cfg.cors.as_ref(), origin.clone(), requested)
        }
        Verdict::NotCors if preflight => {
            cors::preflight(None, HeaderValue::from_static("null"), requested)
        }
        Verdict::Allowed(_) | Verdict::NotCors => return Ok(None),
    };
    ctx.preflight = true;
    Ok(Some(answer))
}

/// The CORS verdict on a request's `Origin`, taken when the request enters the pipeline: an
/// allowed origin's CORS headers then go on every answer, whichever step gives it (SPEC §3 step
/// 6); refusing a foreign origin stays step 6's.
pub(super) fn cors_verdict(live: &Live, conn: ConnInfo, req: &Request<Incoming>) -> Verdict {
    let cfg = &live.config;
    cors::check(
        cfg.cors.as_ref(),
        req.headers(),
        conn.tls,
        crate::proxy::headers::authority(req.headers(), req.uri()),
        |h| cfg.routes.iter().any(|r| r.host.as_deref() == Some(h)),
    )
}

/// Step 7: the API key on routes that ask for one, then its scope and expiry. Invalid and
/// expired keys count towards the client's lockout. Returns the key's index in the config.
pub(super) fn authenticate(
    shared: &Shared,
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
    who: IpAddr,
    req: &Request<Incoming>,
) -> Result<Option<usize>, GatewayError> {
    if route.auth == AuthMode::None {
        return Ok(None);
    }
    let cfg = &live.config;
    let presented = auth::extract_with(
        req.headers(),
        req.uri().query(),
        &cfg.auth.headers,
        route.query_param.as_deref(),
    );
    // SPEC §10: a JWT of one of the route's issuers (on `key_or_jwt` routes, a credential shaped
    // like one); its identity stands where a key's id would.
    let jwt = match (route.auth, &presented) {
        (AuthMode::Jwt, auth::Presented::One(t)) => Some(*t),
        (AuthMode::KeyOrJwt, auth::Presented::One(t)) if crate::jwt::looks_like_jwt(t) => Some(*t),
        _ => None,
    };
    if let Some(token) = jwt {
        let issuers = route.issuers.iter().map(|i| &*cfg.issuers[*i]);
        return match crate::jwt::verify(issuers, token) {
            Some((issuer, identity)) => {
                ctx.record.set_subject(&identity, &issuer.name);
                Ok(None)
            }
            None => {
                crate::metrics::auth_failure(GatewayError::InvalidToken.code());
                if let Some(lock) = shared.lockout.fail(who, Instant::now(), &cfg.auth) {
                    emit_lockout(shared, ctx.client_ip, lock);
                }
                Err(GatewayError::InvalidToken)
            }
        };
    }
    if route.auth == AuthMode::Jwt {
        // Nothing, or something that is not one credential.
        let err = match presented {
            auth::Presented::None => GatewayError::MissingApiKey,
            _ => GatewayError::InvalidToken,
        };
        crate::metrics::auth_failure(err.code());
        return Err(err);
    }
    match live.keys.check(
        &cfg.keys,
        presented,
        route,
        cfg.tokens.as_ref(),
        std::time::SystemTime::now(),
    ) {
        Ok(a) => {
            let key = &cfg.keys[a.index];
            ctx.record.set_key(&key.id);
            if let Some(h) = &key.user_header
                && let Some(user) = auth::user_name(req.headers(), h)?
            {
                ctx.record.set_user(user);
            }
            Ok(Some(a.index))
        }
        Err((err, known, counts)) => {
            if let Some(i) = known {
                ctx.record.set_key(&cfg.keys[i].id);
            }
            crate::metrics::auth_failure(err.code());
            if counts && let Some(lock) = shared.lockout.fail(who, Instant::now(), &cfg.auth) {
                emit_lockout(shared, ctx.client_ip, lock);
            }
            Err(err)
        }
    }
}

/// Step 8: the per-key limit (the key's own, else the route's, else the default).
pub(super) fn limit_key(
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
    key_index: Option<usize>,
) -> Result<(), GatewayError> {
    if let Some(k) = key_index
        && let Some(l) = live.per_key_limiter(k, route.index)
    {
        limit(ctx, l, &Subject::Key(live.key_ids[k].clone()))
            .inspect_err(|_| crate::metrics::rate_limited(&route.name, "key"))?;
    } else if let Some((subject, _)) = ctx.record.subject_with_issuer()
        && let Some(l) = live.per_subject_limiter(route.index)
    {
        // A JWT subject: limited like a key, by its identity `<issuer>:<sub>`.
        let who = Subject::Key(std::sync::Arc::from(subject));
        limit(ctx, l, &who).inspect_err(|_| crate::metrics::rate_limited(&route.name, "key"))?;
    }
    Ok(())
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
    shared.audit.emit(&crate::audit::Lockout {
        ts: crate::clock::now_rfc3339(),
        event: "lockout",
        client_ip: ip,
        failures: lock.failures,
        until: humantime::format_rfc3339_seconds(lock.until).to_string(),
    });
}
