//! Step 2–5 checks that are plain functions of the request (SPEC §3.1, §3.4 "Targets"): the
//! request target and Host, the request id, the IP lists, the declared body length, and the
//! method's name for the record.

use std::net::IpAddr;

use http::header::{self, HeaderValue};
use http::{Method, Request, Version};

use crate::config::parse::normalize_host;
use crate::config::runtime::Route;
use crate::error::GatewayError;
use crate::proxy::headers::X_REQUEST_ID;

/// SPEC §3.1 and §3.4 "Targets": what must be refused before the path is even looked at.
/// Returns the request's host (lower-case, no port) for route matching.
pub fn check_target<B>(
    req: &Request<B>,
    max_header_bytes: usize,
) -> Result<Option<String>, GatewayError> {
    if req.method() == Method::CONNECT {
        return Err(GatewayError::BadRequest);
    }
    // Request line + headers, as counted on the wire (hyper's own buffer cap is a little larger
    // so that this check, with its JSON answer, is the one that normally fires).
    let head: usize = req.method().as_str().len()
        + req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().len())
            .unwrap_or(1)
        + 12
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > max_header_bytes {
        return Err(GatewayError::HeadersTooLarge);
    }
    // SPEC §3.4 "Framing": `chunked` is the only transfer coding accepted from a client.
    let mut te = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(v) = te.next()
        && (te.next().is_some() || !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"))
    {
        return Err(GatewayError::BadRequest);
    }
    let hosts = req.headers().get_all(header::HOST);
    let mut hosts = hosts.iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest);
    }
    let host = if req.version() >= Version::HTTP_2 {
        // HTTP/2: :authority, and a Host header (if any) must agree with it (RFC 9113 §8.3.1).
        let authority = req.uri().authority().map(|a| a.as_str());
        if let (Some(a), Some(h)) = (authority, host_header)
            && !h.as_bytes().eq_ignore_ascii_case(a.as_bytes())
        {
            return Err(GatewayError::BadRequest);
        }
        authority.or_else(|| host_header.and_then(|h| h.to_str().ok()))
    } else {
        // HTTP/1.x: origin-form only; absolute-form is what proxies (not gateways) accept, and a
        // URI authority that differs from Host is a classic routing confusion.
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            return Err(GatewayError::BadRequest);
        }
        match host_header {
            Some(h) => Some(h.to_str().map_err(|_| GatewayError::BadRequest)?),
            // RFC 9112 §3.2: a 1.1 request without Host is 400; 1.0 may omit it.
            None if req.version() == Version::HTTP_11 => return Err(GatewayError::BadRequest),
            None => None,
        }
    };
    if let Some(h) = host
        && (h.is_empty()
            || h.bytes()
                .any(|b| b <= b' ' || b == b'/' || b == b'@' || b == 0x7f))
    {
        return Err(GatewayError::BadRequest);
    }
    Ok(host.map(normalize_host))
}

pub fn check_ip_lists(route: &Route, ip: IpAddr) -> Result<(), GatewayError> {
    if route.deny_ips.iter().any(|n| n.contains(&ip)) {
        return Err(GatewayError::IpDenied);
    }
    if !route.allow_ips.is_empty() && !route.allow_ips.iter().any(|n| n.contains(&ip)) {
        return Err(GatewayError::IpDenied);
    }
    Ok(())
}

pub fn content_length<B>(req: &Request<B>) -> Result<Option<u64>, GatewayError> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Some)
            .ok_or(GatewayError::BadRequest),
    }
}

/// The method for the audit record, without an allocation for the standard ones.
pub fn method_name(m: &Method) -> std::borrow::Cow<'static, str> {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    const NAMES: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().position(|s| s == m) {
        Some(i) => std::borrow::Cow::Borrowed(NAMES[i]),
        None => std::borrow::Cow::Owned(m.as_str().to_owned()),
    }
}

/// A client-supplied `X-Request-Id` is kept only from a trusted proxy, and only when it is
/// 1–128 characters of `[A-Za-z0-9._-]`: anything else could forge or break log correlation.
pub fn request_id<B>(req: &Request<B>, peer_trusted: bool) -> HeaderValue {
    if peer_trusted
        && let Some(v) = req.headers().get(&X_REQUEST_ID)
        && (1..=128).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return v.clone();
    }
    let mut buf = [0; ulid::ULID_LEN];
    let id = ulid::Ulid::new().array_to_str(&mut buf);
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_are_named_without_allocating() {
        assert!(matches!(
            method_name(&Method::POST),
            std::borrow::Cow::Borrowed("POST")
        ));
        let custom = Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(method_name(&custom), "PROPFIND");
    }
}
