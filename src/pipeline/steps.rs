//! Steps 4–8 of the pipeline (SPEC §3), one function each, in the order `process` calls them.

use std::net::IpAddr;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::target::check_target;
use super::{Ctx, Shared};
use crate::auth;
use crate::config::runtime::{AuthMode, Route};
use crate::conn::ConnInfo;
use crate::cors::{self, Verdict};
use crate::error::GatewayError;
use crate::gate::{self, checks::Checks};
use crate::live::Live;
use crate::path;
use crate::proxy::body::ResponseBody;
use crate::rate_limit::Allowed;
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

/// Step 7's lookup of the credential, made before step 5's shared checks so that one call
/// (with `[cluster]`, one Redis round trip) decides lockout, the per-IP limit, counting a
/// failure and the per-key limit together. It records nothing: what it found counts only once
/// those checks have let the request that far.
pub(super) enum Credential<'r> {
    /// The route asks for none, or the request ends before step 7 (a preflight, a foreign
    /// Origin).
    NotAsked,
    /// A valid key, and its user (`user_header`) if it names one.
    Key { index: usize, user: Option<&'r str> },
    /// A valid key with an unusable `user_header` value (400).
    BadUser { index: usize, err: GatewayError },
    /// Refused: `known` the key named, if any; `counts` towards lockout.
    Refused {
        err: GatewayError,
        known: Option<usize>,
        counts: bool,
    },
    /// A JWT of one of the route's issuers: verified after step 5's checks (a signature costs
    /// more than a key lookup, so a locked-out or limited client does not get one checked).
    Jwt(&'r str),
}

/// Looks up the credential step 7 will judge (see [`Credential`]).
pub(super) fn identify<'r>(
    live: &Live,
    ctx: &Ctx,
    route: &Route,
    preflight: bool,
    req: &'r Request<Incoming>,
) -> Credential<'r> {
    if route.auth == AuthMode::None || preflight || matches!(ctx.cors, Verdict::Refused) {
        return Credential::NotAsked;
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
    match (route.auth, &presented) {
        (AuthMode::Jwt, auth::Presented::One(t)) => return Credential::Jwt(t),
        (AuthMode::KeyOrJwt, auth::Presented::One(t)) if crate::jwt::looks_like_jwt(t) => {
            return Credential::Jwt(t);
        }
        (AuthMode::Jwt, _) => {
            // Nothing, or something that is not one credential.
            let err = match presented {
                auth::Presented::None => GatewayError::MissingApiKey,
                _ => GatewayError::InvalidToken,
            };
            return Credential::Refused {
                err,
                known: None,
                counts: false,
            };
        }
        _ => {}
    }
    match live.keys.check(
        &cfg.keys,
        presented,
        route,
        cfg.tokens.as_ref(),
        std::time::SystemTime::now(),
    ) {
        Ok(a) => match &cfg.keys[a.index].user_header {
            None => Credential::Key {
                index: a.index,
                user: None,
            },
            Some(h) => match auth::user_name(req.headers(), h) {
                Ok(user) => Credential::Key {
                    index: a.index,
                    user,
                },
                Err(err) => Credential::BadUser {
                    index: a.index,
                    err,
                },
            },
        },
        Err((err, known, counts)) => Credential::Refused { err, known, counts },
    }
}

/// The shared-state checks of steps 5–8 for a request whose credential is `cred`.
pub(super) fn checks<'a>(
    live: &'a Live,
    route: &Route,
    who: IpAddr,
    cred: &Credential<'_>,
) -> Checks<'a> {
    Checks {
        who,
        lockout: true,
        ip: live.route_ip[route.index].as_deref(),
        failure: matches!(cred, Credential::Refused { counts: true, .. })
            .then_some(&live.config.auth),
        key: match cred {
            Credential::Key { index, .. } => live
                .per_key_limiter(*index, route.index)
                .map(|l| (&**l, &live.key_ids[*index])),
            _ => None,
        },
    }
}

/// Step 5, as the checks found it: lockout, then the route's per-IP limit — before the key, as
/// nginx limits in its preaccess phase: a flood without a key is limited too (CORS preflights
/// count).
pub(super) fn admit_client(
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
    verdict: &gate::checks::Verdict,
) -> Result<(), GatewayError> {
    if let Some(left) = verdict.locked {
        return Err(GatewayError::LockedOut { retry_after: left });
    }
    if let (Some(l), Some(r)) = (&live.route_ip[route.index], verdict.ip) {
        limit(ctx, l, r).inspect_err(|_| crate::metrics::rate_limited(&route.name, "ip"))?;
    }
    Ok(())
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

/// Step 7: the credential's verdict (a key, then its scope and expiry; or a JWT). Invalid and
/// expired ones counted towards the client's lockout in the checks. Returns the key's index in
/// the config. A JWT is verified here, and its failure or its subject's limit is a second call
/// to the gate (`verdict.key` then holds the subject's limit).
pub(super) async fn authenticate(
    shared: &Shared,
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
    who: IpAddr,
    cred: Credential<'_>,
    verdict: &mut gate::checks::Verdict,
) -> Result<Option<usize>, GatewayError> {
    let cfg = &live.config;
    match cred {
        Credential::NotAsked => Ok(None),
        Credential::Key { index, user } => {
            ctx.record.set_key(&cfg.keys[index].id);
            if let Some(user) = user {
                ctx.record.set_user(user);
            }
            Ok(Some(index))
        }
        Credential::BadUser { index, err } => {
            ctx.record.set_key(&cfg.keys[index].id);
            Err(err)
        }
        Credential::Refused { err, known, .. } => {
            if let Some(i) = known {
                ctx.record.set_key(&cfg.keys[i].id);
            }
            crate::metrics::auth_failure(err.code());
            if let Some(lock) = verdict.lockout_started {
                emit_lockout(shared, ctx.client_ip, lock);
            }
            Err(err)
        }
        Credential::Jwt(token) => {
            let issuers = route.issuers.iter().map(|i| &*cfg.issuers[*i]);
            let mut checks = Checks {
                who,
                lockout: false,
                ip: None,
                failure: None,
                key: None,
            };
            let (issuer, identity) = match crate::jwt::verify(issuers, token) {
                Ok(found) => found,
                Err(refused) => {
                    crate::metrics::auth_failure(GatewayError::InvalidToken.code());
                    // A token its issuer has no key for yet (none fetched, or a `kid` it has
                    // just rotated to) may be valid: refused, but not counted toward lockout.
                    if refused == crate::jwt::Refused::Invalid {
                        checks.failure = Some(&cfg.auth);
                        let v = shared
                            .gate
                            .admit(&checks)
                            .await
                            .map_err(|_| GatewayError::Overloaded)?;
                        if let Some(lock) = v.lockout_started {
                            emit_lockout(shared, ctx.client_ip, lock);
                        }
                    }
                    return Err(GatewayError::InvalidToken);
                }
            };
            // A JWT subject is limited like a key, by its identity `<issuer>:<sub>`.
            let subject: std::sync::Arc<str> = std::sync::Arc::from(identity.as_str());
            if let Some(l) = live.per_subject_limiter(route.index) {
                checks.key = Some((l, &subject));
                let v = shared
                    .gate
                    .admit(&checks)
                    .await
                    .map_err(|_| GatewayError::Overloaded)?;
                verdict.key = v.key;
            }
            ctx.record.set_subject(&identity, &issuer.name);
            Ok(None)
        }
    }
}

/// Step 8: the per-key limit (the key's own, else the route's, else the default; for a JWT
/// subject, the route's or the default), as the checks found it.
pub(super) fn limit_key(
    live: &Live,
    ctx: &mut Ctx,
    route: &Route,
    key_index: Option<usize>,
    verdict: &gate::checks::Verdict,
) -> Result<(), GatewayError> {
    let limiter = match key_index {
        Some(k) => live.per_key_limiter(k, route.index),
        None => live.per_subject_limiter(route.index),
    };
    if let (Some(l), Some(r)) = (limiter, verdict.key) {
        limit(ctx, l, r).inspect_err(|_| crate::metrics::rate_limited(&route.name, "key"))?;
    }
    Ok(())
}

/// Applies one limiter's answer; remembers the tightest one for the `RateLimit` headers.
fn limit(
    ctx: &mut Ctx,
    l: &crate::rate_limit::Limiter,
    answer: Result<Allowed, std::time::Duration>,
) -> Result<(), GatewayError> {
    match answer {
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

fn emit_lockout(shared: &Shared, ip: IpAddr, lock: gate::checks::LockedOut) {
    shared.audit.emit(&crate::audit::Lockout {
        ts: crate::clock::now_rfc3339(),
        event: "lockout",
        client_ip: ip,
        failures: lock.failures,
        until: humantime::format_rfc3339_seconds(lock.until).to_string(),
    });
}
