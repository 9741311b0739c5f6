//! Header rules for forwarded requests and responses (SPEC §3.2).
//!
//! The gateway never lets a client steer what it adds: client headers are cleaned first
//! (hop-by-hop, `Connection`-named, underscore names), and only then are the gateway's own
//! headers set. So `Connection: X-Forwarded-For` removes only the client's copy.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

use crate::conn::ConnInfo;

/// RFC 9110 §7.6.1 (Connection), RFC 9112 §9.6 (Keep-Alive, TE, Trailer, Transfer-Encoding,
/// Upgrade), plus every `Proxy-*` header (Proxy-Authorization is for this hop only).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            // RFC 7540 §3.2.1: HTTP2-Settings belongs to the h2c upgrade and is
            // connection-specific.
            | "http2-settings"
    ) || n.starts_with("proxy-")
}

/// Removes `Connection`, the headers it names, and all hop-by-hop headers.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // RFC 9110 §7.6.1: headers named in Connection are hop-by-hop. `close` and `keep-alive`,
    // what nearly every Connection header says, name no other header (Keep-Alive goes below
    // with the rest), so most messages allocate nothing here.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    headers.remove(header::CONNECTION);
    for n in named {
        headers.remove(n);
    }
    if headers.keys().any(is_hop_by_hop) {
        let hop: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_hop_by_hop(n))
            .cloned()
            .collect();
        for n in hop {
            headers.remove(n);
        }
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

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The authority the client addressed: the `Host` header, else the request target's authority
/// (HTTP/2's `:authority`). Every step reads it here; step 4 (`check_target`) has already refused
/// a request whose two disagree, a repeated `Host`, or an HTTP/1.1 absolute-form target.
pub fn authority<'a>(headers: &'a HeaderMap, uri: &'a http::Uri) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
}

/// What [`forwarded`] needs to know about the request beyond its head.
pub struct Forwarding<'a> {
    /// On `auth = "key"` routes, the headers the client's key may come in (`auth.headers`): the
    /// key is consumed, never forwarded. `None` on `auth = "none"` routes.
    pub key_headers: Option<&'a [HeaderName]>,
    pub trusted_proxies: &'a [ipnet::IpNet],
    pub conn: ConnInfo,
    /// The resolved client address (step 3).
    pub client_ip: IpAddr,
    pub request_id: &'a HeaderValue,
    /// A WebSocket handshake: `Connection: upgrade` and `Upgrade: websocket` are set again.
    pub websocket: bool,
}

/// The request head as the upstream receives it (SPEC §3.2): hop-by-hop and client-claim headers
/// removed, the client's key consumed on `auth = "key"` routes, `Host`, `X-Forwarded-*`,
/// `X-Real-IP` and `X-Request-Id` set by the gateway, then the route's `upstream_headers`.
pub fn forwarded<'h>(
    parts: &mut http::request::Parts,
    f: &Forwarding<'_>,
    upstream_headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
) {
    // Read what the gateway needs from the client's headers before they are cleaned.
    let host_value =
        authority(&parts.headers, &parts.uri).and_then(|a| HeaderValue::from_str(a).ok());
    let peer_ip = crate::client_ip::canonical(f.conn.peer.ip());
    let prior_xff = if crate::client_ip::is_trusted(peer_ip, f.trusted_proxies) {
        join_header(&parts.headers, &X_FORWARDED_FOR)
    } else {
        None
    };

    let h = &mut parts.headers;
    clean_request(h);
    if parts.version >= http::Version::HTTP_2 {
        // RFC 9113 §8.2.3: split cookie fields are joined with "; " for HTTP/1.1.
        join_cookies(h);
    }
    // Expect: 100-continue is answered by our server side; the upstream gets the body directly.
    h.remove(header::EXPECT);
    if let Some(key_headers) = f.key_headers {
        // The client's key is the gateway's business; the upstream never sees it, whichever
        // header it came in (the configured ones, and the two every SDK uses).
        for name in key_headers {
            h.remove(name);
        }
        h.remove(header::AUTHORIZATION);
        h.remove(&X_API_KEY);
    }
    if let Some(v) = host_value {
        h.insert(header::HOST, v.clone());
        h.insert(&X_FORWARDED_HOST, v);
    }
    let real_ip = ip_header(f.client_ip);
    let xff = match prior_xff {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {peer_ip}")).ok(),
        None if peer_ip == f.client_ip => real_ip.clone(),
        None => ip_header(peer_ip),
    };
    if let Some(v) = xff {
        h.insert(&X_FORWARDED_FOR, v);
    }
    h.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if f.conn.tls { "https" } else { "http" }),
    );
    if let Some(v) = real_ip {
        h.insert(&X_REAL_IP, v);
    }
    h.insert(&X_REQUEST_ID, f.request_id.clone());
    for (name, value) in upstream_headers {
        h.insert(name.clone(), value.clone());
    }
    if f.websocket {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

fn join_header(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    let vals: Vec<&str> = h
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.join(", "))
}

/// An IP address as a header value, formatted on the stack (one copy, no temporary String).
/// IPv4, the common case, is written digit by digit: `Display` costs several times as much.
pub fn ip_header(ip: IpAddr) -> Option<HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let n = match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        IpAddr::V6(_) => {
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            write!(cur, "{ip}").ok()?;
            cur.position() as usize
        }
    };
    HeaderValue::from_bytes(&buf[..n]).ok()
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

    #[test]
    fn ip_headers_read_as_display_does() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.255",
            "192.168.1.20",
            "255.255.255.255",
            "99.100.9.10",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header(ip).unwrap().to_str().unwrap(), ip.to_string());
        }
    }
}
