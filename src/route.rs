//! The route table: longest-prefix match on the normalized path, then host, then methods.
//!
//! Prefixes match on segment boundaries: `/v1/` (or `/v1`) matches `/v1` and `/v1/...` but not
//! `/v1beta`, so a route can never swallow a sibling that merely shares its first letters. At
//! equal length a route with a `host` beats one without.

use http::Method;

use crate::config::runtime::Route;

pub enum Match<'a> {
    Found(&'a Route),
    MethodNotAllowed(&'a Route),
    NoRoute,
}

/// True when `path` lies under `prefix` (`prefix` has no trailing `/`; `""` is the root).
pub fn under(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Finds the route for `path` (already normalized) and `host` (lower-case, no port).
pub fn find<'a>(routes: &'a [Route], host: Option<&str>, method: &Method, path: &str) -> Match<'a> {
    let mut best: Option<&Route> = None;
    for r in routes {
        if let Some(h) = &r.host
            && host != Some(h.as_str())
        {
            continue;
        }
        if !under(&r.prefix, path) {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                r.prefix.len() > b.prefix.len()
                    || (r.prefix.len() == b.prefix.len() && r.host.is_some() && b.host.is_none())
            }
        };
        if better {
            best = Some(r);
        }
    }
    match best {
        None => Match::NoRoute,
        Some(r) if !r.methods.is_empty() && !r.methods.contains(method) => {
            Match::MethodNotAllowed(r)
        }
        Some(r) => Match::Found(r),
    }
}

/// The path the upstream receives: the upstream URL's base path, then the request path with the
/// route prefix removed when `strip_prefix` is set.
pub fn upstream_path(route: &Route, path: &str) -> String {
    let rest = if route.strip_prefix {
        let r = &path[route.prefix.len().min(path.len())..];
        if r.is_empty() { "/" } else { r }
    } else {
        path
    };
    let mut out = String::with_capacity(route.upstream.base_path.len() + rest.len());
    out.push_str(&route.upstream.base_path);
    out.push_str(rest);
    out
}

/// The request target the upstream receives, in origin form (the upstream's authority travels
/// apart, to the connection pool or the WebSocket connect): the normalized path (see
/// [`upstream_path`]) and the query as the client sent it, minus `auth.query_param` (a key in
/// the query is the gateway's, never the upstream's).
pub fn upstream_uri(
    route: &Route,
    path: &str,
    query: Option<&str>,
    key_param: Option<&str>,
) -> Result<http::Uri, crate::error::GatewayError> {
    let mut target = upstream_path(route, path);
    let query = match (query, key_param) {
        (Some(q), Some(p)) => crate::auth::strip_query_param(q, p),
        (q, _) => q.map(str::to_owned),
    };
    if let Some(q) = query {
        target.push('?');
        target.push_str(&q);
    }
    http::uri::PathAndQuery::try_from(target)
        .map(http::Uri::from)
        .map_err(|_| crate::error::GatewayError::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_boundaries() {
        assert!(under("/v1", "/v1"));
        assert!(under("/v1", "/v1/chat"));
        assert!(!under("/v1", "/v1beta"));
        assert!(!under("/v1", "/v"));
        assert!(under("", "/anything"));
    }
}
