//! CORS (SPEC §3 step 6).
//!
//! Written here rather than with tower-http's `CorsLayer` because the SPEC asks for something that
//! layer deliberately does not do: a request whose `Origin` is not allowed is refused with 403
//! `origin_not_allowed`, not merely left without CORS headers. Without CORS headers a browser
//! still *sends* the request (a form POST, or a WebSocket handshake, which CORS does not cover at
//! all), so only a refusal at the gateway stops cross-site WebSocket hijacking and blind
//! cross-site writes.
//!
//! A request without `Origin` (phone apps, scripts) passes. A same-origin request (Origin equal
//! to the scheme and Host the request came in on) passes: a browser sends Origin on its own POSTs
//! and WebSocket handshakes, and OpenWebUI behind the gateway must keep working. Every other
//! Origin must be listed in `cors.allowed_origins` (or `"*"`).

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::config::runtime::{Cors, HeaderPattern};
use crate::proxy::body::{self, ResponseBody};

/// What the CORS step decided for a request that carries an `Origin`.
#[derive(Clone)]
pub enum Verdict {
    /// No Origin, or a same-origin request: nothing to add.
    NotCors,
    /// A cross-origin request from an allowed origin: add these headers to the response.
    Allowed(HeaderValue),
    Refused,
}

pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Decides on `Origin` for a request that arrived on `scheme` for `host` (the Host header value).
/// `known_host` says whether a host name is one the operator configured.
pub fn check(
    cors: Option<&Cors>,
    headers: &HeaderMap,
    tls: bool,
    host: Option<&str>,
    known_host: impl Fn(&str) -> bool,
) -> Verdict {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Verdict::NotCors;
    };
    let Ok(o) = origin.to_str() else {
        return Verdict::Refused;
    };
    let o_lower = o.to_ascii_lowercase();
    if let Some(h) = host {
        let scheme = if tls { "https" } else { "http" };
        let h = h.to_ascii_lowercase();
        if o_lower
            .strip_prefix(scheme)
            .and_then(|r| r.strip_prefix("://"))
            == Some(&h)
            && (tls || rebinding_proof(&h, &known_host))
        {
            return Verdict::NotCors;
        }
    }
    match cors {
        Some(c) if c.any_origin || c.allowed_origins.contains(&o_lower) => {
            Verdict::Allowed(origin.clone())
        }
        _ => Verdict::Refused,
    }
}

/// An IP literal, `localhost`, or a configured host name cannot be a rebound attacker domain.
fn rebinding_proof(host_port: &str, known_host: &impl Fn(&str) -> bool) -> bool {
    let host = crate::config::parse::normalize_host(host_port);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_ok() || host == "localhost" || known_host(&host)
}

/// Headers on an actual (non-preflight) response to an allowed cross-origin request — whichever
/// step answered it (SPEC §3 step 6: a 404, 429 or 403 the page cannot read is an opaque "Failed
/// to fetch"), with the headers page code may read (`expose_headers`: the request id,
/// `Retry-After`, the rate-limit state).
pub fn decorate(headers: &mut HeaderMap, cors: Option<&Cors>, origin: HeaderValue) {
    let Some(c) = cors else { return };
    set_origin(headers, c, origin);
    if let Some(expose) = &c.expose_headers {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
    }
}

fn set_origin(headers: &mut HeaderMap, c: &Cors, origin: HeaderValue) {
    if c.any_origin && !c.allow_credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    } else {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    if c.allow_credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// The gateway's own answer to an allowed preflight: 204, never forwarded. The allowed headers it
/// lists are the requested ones the config allows (a `x-stainless-*` prefix cannot be sent as
/// such), plus the exact names configured.
pub fn preflight(
    cors: Option<&Cors>,
    origin: HeaderValue,
    requested: Option<&HeaderValue>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let Some(c) = cors else {
        return resp;
    };
    let h = resp.headers_mut();
    set_origin(h, c, origin);
    let join = |items: Vec<&str>| HeaderValue::from_str(&items.join(", ")).ok();
    if let Some(v) = join(c.allowed_methods.iter().map(|m| m.as_str()).collect()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    let mut allowed: Vec<&str> = c
        .allowed_headers
        .iter()
        .filter_map(|p| match p {
            HeaderPattern::Exact(n) => Some(n.as_str()),
            HeaderPattern::Prefix(_) => None,
        })
        .collect();
    let requested = requested.and_then(|r| r.to_str().ok()).unwrap_or_default();
    for name in requested
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        let name_lower = name.to_ascii_lowercase();
        if c.allowed_headers.iter().any(|p| p.matches(name))
            && !allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
            && http::HeaderName::from_bytes(name_lower.as_bytes()).is_ok()
        {
            allowed.push(name);
        }
    }
    if let Some(v) = join(allowed) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from(c.max_age.as_secs()),
    );
    resp
}
