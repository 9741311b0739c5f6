//! The small value parsers the config sections share: `${NAME}` in plain strings, addresses,
//! CIDRs, upstream URLs, methods, header names, key hashes, hosts. Each turns a string into a
//! type that cannot hold an invalid value, or an [`Invalid`] naming the key path.

use std::net::SocketAddr;

use http::header::HeaderName;
use http::uri::Scheme;
use http::{Method, Uri};
use ipnet::IpNet;
use secrecy::ExposeSecret;

use super::runtime::{Invalid, Upstream};
use super::secret::{self, Env};

pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// Resolves `${NAME}` in a non-secret string (paths, addresses, URLs).
pub(super) fn plain(s: &str, path: &str, env: &dyn Env) -> Result<String, Invalid> {
    if !secret::has_reference(s) {
        return Ok(s.to_owned());
    }
    secret::resolve(s, env)
        .map(|v| v.expose_secret().to_owned())
        .map_err(|m| invalid(path, m))
}

pub(super) fn cidrs(list: &[String], path: &str, env: &dyn Env) -> Result<Vec<IpNet>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let p = format!("{path}[{i}]");
            parse_cidr(&plain(s, &p, env)?).map_err(|m| invalid(p, m))
        })
        .collect()
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address (taken as /32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => s
            .parse::<std::net::IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("invalid CIDR or IP address {s:?}"))?,
    };
    // Clients are matched as plain IPv4 (see client_ip::canonical), so an IPv4-mapped net
    // (::ffff:a.b.c.d/n) is turned into the IPv4 net it means; otherwise it would match nothing.
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .map(IpNet::V4)
            .map_err(|_| format!("invalid CIDR {s:?}"));
    }
    Ok(net)
}

pub(super) fn parse_listen(s: &str, path: &str) -> Result<SocketAddr, Invalid> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        invalid(
            path,
            format!("invalid listen address {s:?}: expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8443\""),
        )
    })
}

pub(super) fn parse_upstream(s: &str, path: &str) -> Result<Upstream, Invalid> {
    let bad = |why: &str| invalid(path, format!("invalid URL {s:?}: {why}"));
    let uri: Uri = s.parse().map_err(|_| bad("not a URL"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| bad("expected http://HOST:PORT"))?;
    if scheme != Scheme::HTTP {
        return Err(bad(
            "only http:// upstreams are supported (portcullis guards services on the same host or LAN)",
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad("expected http://HOST:PORT"))?;
    if authority.as_str().contains('@') {
        return Err(bad(
            "credentials in the URL are not supported; use upstream_headers",
        ));
    }
    if uri.query().is_some() {
        return Err(bad("a query string is not allowed in an upstream URL"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(Upstream {
        scheme,
        authority,
        base_path,
    })
}

pub(super) fn parse_methods(list: &[String], path: &str) -> Result<Vec<Method>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let upper = m.trim().to_ascii_uppercase();
            Method::from_bytes(upper.as_bytes())
                .map_err(|_| invalid(format!("{path}[{i}]"), format!("invalid method {m:?}")))
        })
        .collect()
}

pub(super) fn parse_header_name(s: &str, path: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(s.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| invalid(path, format!("invalid header name {s:?}")))
}

pub(super) fn parse_hash(s: &str, path: &str) -> Result<crate::keys::KeyHash, Invalid> {
    s.parse().map_err(|m: &str| invalid(path, m))
}

/// A key id or route name (see [`crate::keys::is_valid_id`]).
pub(super) fn check_id(s: &str, path: &str) -> Result<(), Invalid> {
    if crate::keys::is_valid_id(s) {
        Ok(())
    } else {
        Err(invalid(
            path,
            "must be non-empty: letters, digits, '-', '_' or '.'",
        ))
    }
}

pub(super) fn host_only(h: &str) -> String {
    let h = h.trim_ascii();
    // "[::1]:8443" -> "[::1]", "example.com:8443" -> "example.com"
    let name = match h.find(']') {
        Some(end) => &h[..=end],
        None => match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => h,
        },
    };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        name.to_ascii_lowercase()
    } else {
        name.to_owned()
    }
}

/// Lower-cases a Host value and drops its port, for route matching.
pub fn normalize_host(h: &str) -> String {
    host_only(h)
}
