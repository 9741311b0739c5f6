//! Who the client is (SPEC §3 step 3, §3.4 "Client identity").
//!
//! The peer address is the client, unless the peer is a trusted proxy: then the right-most
//! `X-Forwarded-For` entry that is not itself trusted is. Right-most, because every hop appends:
//! entries to the left of the first untrusted one were written by whoever sent the request and
//! prove nothing (a client that sends `X-Forwarded-For: 127.0.0.1` gains nothing).
//!
//! Rate limits and lockout key IPv6 clients by their /64: one subscriber gets a whole /64 and can
//! rotate addresses inside it at will.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;
use ipnet::IpNet;

/// Maps `::ffff:a.b.c.d` (a dual-stack socket's view of an IPv4 peer) to plain IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// Resolves the client address from the peer and, when the peer is trusted, `X-Forwarded-For`.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    // Walk the hops right to left, across every X-Forwarded-For header line in order.
    let lines: Vec<&[u8]> = headers
        .get_all(http::header::HeaderName::from_static("x-forwarded-for"))
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    for line in lines.iter().rev() {
        let Ok(line) = std::str::from_utf8(line) else {
            return client;
        };
        for entry in line.rsplit(',') {
            match parse_entry(entry) {
                // An unparsable entry ends the walk: the hop we trust vouched for nothing readable,
                // so the last address we could verify stands.
                None => return client,
                Some(ip) => {
                    client = ip;
                    if !is_trusted(ip, trusted) {
                        return ip;
                    }
                }
            }
        }
    }
    client
}

/// One X-Forwarded-For entry: an IP, optionally with a port (`1.2.3.4:5678`, `[::1]:80`).
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    None
}

/// The identity rate limits and lockout count against: IPv4 address, or IPv6 /64.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            IpAddr::V6(Ipv6Addr::new(seg[0], seg[1], seg[2], seg[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }
    fn xff(vals: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in vals {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn resolution_table() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        let cases: &[(&str, &[&str], &str)] = &[
            // untrusted peer: XFF ignored whatever it says
            ("203.0.113.9", &["1.1.1.1"], "203.0.113.9"),
            // trusted peer: right-most untrusted entry
            ("10.0.0.2", &["1.1.1.1, 198.51.100.7"], "198.51.100.7"),
            // trusted hops skipped
            ("10.0.0.2", &["198.51.100.7, 10.0.0.3"], "198.51.100.7"),
            // spoofed left part ignored
            ("10.0.0.2", &["127.0.0.1, 198.51.100.7"], "198.51.100.7"),
            // several header lines: the last line is the nearest hop
            ("10.0.0.2", &["192.0.2.1", "198.51.100.7"], "198.51.100.7"),
            // garbage stops the walk at the last verified hop
            ("10.0.0.2", &["198.51.100.7, garbage"], "10.0.0.2"),
            // no header: the trusted peer itself
            ("10.0.0.2", &[], "10.0.0.2"),
            // all trusted: the left-most trusted one
            ("10.0.0.2", &["10.0.0.9"], "10.0.0.9"),
            // ports and brackets
            ("10.0.0.2", &["[2001:db8::1]:443"], "2001:db8::1"),
            ("10.0.0.2", &["198.51.100.7:5555"], "198.51.100.7"),
            // v4-mapped peer treated as v4
            ("::ffff:10.0.0.2", &["198.51.100.7"], "198.51.100.7"),
        ];
        for (peer, hdrs, want) in cases {
            assert_eq!(
                resolve(ip(peer), &xff(hdrs), &trusted),
                ip(want),
                "{peer} {hdrs:?}"
            );
        }
        assert_eq!(
            resolve(ip("10.0.0.2"), &xff(&["1.1.1.1"]), &[]),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn limit_keys() {
        assert_eq!(limit_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("2001:db8:1:2:ffff::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}
