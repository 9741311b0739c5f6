//! Header rules for forwarded requests and responses (SPEC §3.2).
//!
//! The gateway never lets a client steer what it adds: client headers are cleaned first
//! (hop-by-hop, `Connection`-named, underscore names), and only then are the gateway's own
//! headers set. So `Connection: X-Forwarded-For` removes only the client's copy.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // RFC 7540 §3.2.1: HTTP2-Settings belongs to the h2c upgrade and is connection-specific.
    "http2-settings",
];

/// RFC 9110 §7.6.1 (Connection), RFC 9112 §9.6 (Keep-Alive, TE, Trailer, Transfer-Encoding,
/// Upgrade), plus every `Proxy-*` header (Proxy-Authorization is for this hop only).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n) || n.starts_with("proxy-")
}

/// Removes `Connection`, the headers it names, and all hop-by-hop headers.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // RFC 9110 §7.6.1: headers named in Connection are hop-by-hop.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for n in hop {
        headers.remove(n);
    }
}

/// Headers by which a client could claim another address, host or path to the upstream. The
/// gateway sets the X-Forwarded-* family itself; the rest are never forwarded.
const CLIENT_CLAIMS: &[&str] = &[
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-proto",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-forwarded-for",
];

/// Client request headers before forwarding: hop-by-hop gone, claims about the client's address,
/// host or path gone, and (as nginx does by default) every name with `_`, because WSGI/CGI
/// upstreams map `X_Api_Key` and `X-Api-Key` to one variable.
pub fn clean_request(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
    // One pass over the names the request has (a handful), rather than a lookup for each of the
    // fifteen claims: usually nothing matches and nothing is allocated.
    let drop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let s = n.as_str();
            CLIENT_CLAIMS.contains(&s) || s.contains('_')
        })
        .cloned()
        .collect();
    for n in drop {
        headers.remove(n);
    }
}

/// Joins several `Cookie` fields into one (RFC 9113 §8.2.3), as an HTTP/1.1 upstream expects.
pub fn join_cookies(headers: &mut HeaderMap) {
    let all: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if all.len() < 2 {
        return;
    }
    let joined = all.join(&b"; "[..]);
    if let Ok(mut v) = HeaderValue::from_bytes(&joined) {
        v.set_sensitive(true);
        headers.insert(header::COOKIE, v);
    }
}

/// True when this is a WebSocket opening handshake (RFC 6455 §4.1).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has_token(header::UPGRADE, "websocket") && has_token(header::CONNECTION, "upgrade")
}

/// Security headers on responses, where the upstream did not set them.
pub fn add_security_headers(headers: &mut HeaderMap, tls: bool) {
    headers
        .entry(HeaderName::from_static("x-content-type-options"))
        .or_insert(HeaderValue::from_static("nosniff"));
    headers
        .entry(header::REFERRER_POLICY)
        .or_insert(HeaderValue::from_static("no-referrer"));
    if tls {
        headers
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert(HeaderValue::from_static("max-age=31536000"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cannot_name_away_more_than_client_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Forwarded-For, x-secret"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-secret", HeaderValue::from_static("a"));
        h.insert("x_api_key", HeaderValue::from_static("b"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("proxy-authorization", HeaderValue::from_static("c"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("http2-settings", HeaderValue::from_static("AAA"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        clean_request(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn websocket_detection() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("WebSocket"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_websocket_upgrade(&h));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        assert!(!is_websocket_upgrade(&h));
    }
}
