//! The validated, runtime form of the config: what the gateway actually runs on.
//!
//! Built once from [`RawConfig`] at load (and at each reload). Types here cannot hold an invalid
//! value: addresses are `SocketAddr`, CIDRs are `IpNet`, header names are `HeaderName`, secrets are
//! `SecretString` or sensitive `HeaderValue`s. Errors carry the key path (`routes[1].upstream`)
//! so `mod.rs` can point at the line.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Uri};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};

use super::schema::{RawAuthMode, RawConfig, RawRoute};
use super::secret::{self, Env};
use super::units::Rate;
pub use crate::audit::{AuditOutput, AuditSettings};

#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub tls: Option<TlsFiles>,
    pub admin: Option<Admin>,
    pub audit: AuditSettings,
    pub auth: Auth,
    pub cors: Option<Cors>,
    pub limits: Limits,
    pub keys: Vec<Key>,
    pub routes: Vec<Route>,
    pub usage: Option<UsageSettings>,
    /// `[budgets]`: caps for all keys together.
    pub budgets: Arc<[crate::llm::budget::Cap]>,
}

/// `[usage]`: the ledger, stream-usage injection, reservations and prices.
#[derive(Debug, Clone)]
pub struct UsageSettings {
    pub database: Option<PathBuf>,
    pub retention: Duration,
    pub inject_stream_usage: bool,
    /// Completion tokens reserved for a request that names no `max_tokens`.
    pub default_completion_reservation: u64,
    /// Model -> (input, output) USD per million tokens.
    pub prices: std::collections::HashMap<String, (f64, f64)>,
    /// `usage.fallback_price`, else the highest input and output prices of the table; `None`
    /// only when there is no table either (and then no cost cap is allowed).
    pub fallback_price: Option<(f64, f64)>,
}

impl UsageSettings {
    /// What a request is priced at (SPEC §7): its own model's entry, else the response's model's,
    /// else the fallback — so no cost cap silently counts $0 for an unpriced model.
    pub fn price(
        &self,
        request_model: Option<&str>,
        response_model: Option<&str>,
    ) -> Option<crate::llm::usage::Price> {
        use crate::llm::usage::Price;
        let listed = |m: Option<&str>| self.prices.get(m?).copied();
        match listed(request_model).or_else(|| listed(response_model)) {
            Some((input, output)) => Some(Price {
                input,
                output,
                source: "prices",
            }),
            None => self.fallback_price.map(|(input, output)| Price {
                input,
                output,
                source: "fallback",
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: Vec<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    pub max_body: u64,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub idle_timeout: Duration,
    /// A response that cannot hand a byte to the client this long is abandoned.
    pub send_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub http2_max_concurrent_streams: u32,
    pub allow_plaintext_public: bool,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

pub struct Admin {
    pub listen: SocketAddr,
    pub token: Option<SecretString>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub headers: Vec<HeaderName>,
    pub query_param: Option<String>,
    pub lockout_failures: u32,
    pub lockout_window: Duration,
    pub lockout_duration: Duration,
}

#[derive(Debug, Clone)]
pub struct Cors {
    pub allowed_origins: Vec<String>,
    pub any_origin: bool,
    pub allowed_methods: Vec<Method>,
    pub allowed_headers: Vec<HeaderName>,
    pub allow_credentials: bool,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub per_ip: Rate,
    pub per_key: Rate,
    pub max_tracked_clients: usize,
    /// Open client connections of one address (IPv6: its /64).
    pub max_connections_per_ip: usize,
    /// Request bodies held in memory at once, gateway-wide (`llm` routes).
    pub max_buffered_bytes: u64,
}

/// A client API key as the gateway stores it: its SHA-256 digest, never the key.
#[derive(Clone)]
pub struct Key {
    pub id: String,
    pub hash: [u8; 32],
    /// `None`: every route with `auth = "key"`.
    pub routes: Option<Vec<String>>,
    pub per_key: Option<Rate>,
    pub expires: Option<SystemTime>,
    pub disabled: bool,
    /// `None`: any model. On `llm` routes a request naming another model gets 403.
    pub models: Option<Vec<crate::llm::request::ModelPattern>>,
    /// The key's own caps (SPEC §7 `budget`).
    pub budget: Arc<[crate::llm::budget::Cap]>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("routes", &self.routes)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Key,
    None,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the upstream URL without its trailing `/` (`""` for none).
    pub base_path: String,
}

/// A header the gateway sets on every forwarded request. Its value is usually a secret, so it is
/// marked sensitive (HPACK never indexes it) and this type never prints it.
#[derive(Clone)]
pub struct UpstreamHeader {
    pub name: HeaderName,
    pub value: HeaderValue,
}

impl fmt::Debug for UpstreamHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: [redacted]", self.name)
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Position in `Config::routes`, for per-route state indexed alongside.
    pub index: usize,
    pub name: String,
    /// The configured prefix without a trailing `/` (`""` for the root route).
    pub prefix: String,
    pub host: Option<String>,
    pub methods: Vec<Method>,
    pub upstream: Upstream,
    pub strip_prefix: bool,
    pub auth: AuthMode,
    pub per_ip: Option<Rate>,
    pub per_key: Option<Rate>,
    pub max_body: u64,
    pub timeout: Duration,
    pub allow_ips: Vec<IpNet>,
    pub deny_ips: Vec<IpNet>,
    pub websocket: bool,
    /// OpenAI-style API: JSON request bodies are read for the model (SPEC §7).
    pub llm: bool,
    pub upstream_headers: Vec<UpstreamHeader>,
}

/// A validation failure: the key path it concerns and what is wrong.
#[derive(Debug)]
pub struct Invalid {
    pub path: String,
    pub message: String,
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// Resolves `${NAME}` in a non-secret string (paths, addresses, URLs).
fn plain(s: &str, path: &str, env: &dyn Env) -> Result<String, Invalid> {
    if !secret::has_reference(s) {
        return Ok(s.to_owned());
    }
    secret::resolve(s, env)
        .map(|v| v.expose_secret().to_owned())
        .map_err(|m| invalid(path, m))
}

fn cidrs(list: &[String], path: &str, env: &dyn Env) -> Result<Vec<IpNet>, Invalid> {
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

fn parse_listen(s: &str, path: &str) -> Result<SocketAddr, Invalid> {
    s.trim().parse::<SocketAddr>().map_err(|_| {
        invalid(
            path,
            format!("invalid listen address {s:?}: expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8443\""),
        )
    })
}

fn parse_upstream(s: &str, path: &str) -> Result<Upstream, Invalid> {
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

fn parse_methods(list: &[String], path: &str) -> Result<Vec<Method>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let upper = m.trim().to_ascii_uppercase();
            Method::from_bytes(upper.as_bytes())
                .map_err(|_| invalid(format!("{path}[{i}]"), format!("invalid method {m:?}")))
        })
        .collect()
}

fn parse_header_name(s: &str, path: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(s.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| invalid(path, format!("invalid header name {s:?}")))
}

fn parse_hash(s: &str, path: &str) -> Result<[u8; 32], Invalid> {
    let bad = || {
        invalid(
            path,
            "expected \"sha256:<64 hex digits>\" (the output of `portcullis keygen` or `portcullis hash-key`)",
        )
    };
    let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let txt = std::str::from_utf8(chunk).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(txt, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn host_only(h: &str) -> String {
    let h = h.trim().to_ascii_lowercase();
    // "[::1]:8443" -> "[::1]", "example.com:8443" -> "example.com"
    if let Some(end) = h.find(']') {
        return h[..=end].to_owned();
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => h,
    }
}

impl Config {
    pub fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Config, Invalid> {
        let s = &raw.server;
        let mut listen = Vec::new();
        for (i, a) in s.listen.0.iter().enumerate() {
            let p = if s.listen.0.len() == 1 {
                "server.listen".to_owned()
            } else {
                format!("server.listen[{i}]")
            };
            listen.push(parse_listen(&plain(a, &p, env)?, &p)?);
        }
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if s.http2_max_concurrent_streams == 0 {
            return Err(invalid(
                "server.http2_max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if s.max_header_bytes.0 < 1024 || s.max_header_bytes.0 > (1 << 20) {
            return Err(invalid(
                "server.max_header_bytes",
                "must be between 1KiB and 1MiB",
            ));
        }
        for (name, d) in [
            ("header_timeout", s.header_timeout.0),
            ("request_timeout", s.request_timeout.0),
            ("stream_idle_timeout", s.stream_idle_timeout.0),
            ("idle_timeout", s.idle_timeout.0),
            ("send_timeout", s.send_timeout.0),
        ] {
            if d.is_zero() {
                return Err(invalid(format!("server.{name}"), "must be greater than 0"));
            }
        }

        let tls = match &raw.tls {
            None => None,
            Some(t) => {
                let ca = plain(&t.client_ca, "tls.client_ca", env)?;
                Some(TlsFiles {
                    cert: PathBuf::from(plain(&t.cert, "tls.cert", env)?),
                    key: PathBuf::from(plain(&t.key, "tls.key", env)?),
                    client_ca: (!ca.trim().is_empty()).then(|| PathBuf::from(ca)),
                })
            }
        };

        if tls.is_none() && !s.allow_plaintext_public {
            for (i, a) in listen.iter().enumerate() {
                if a.ip().is_unspecified() {
                    let p = if listen.len() == 1 {
                        "server.listen".to_owned()
                    } else {
                        format!("server.listen[{i}]")
                    };
                    return Err(invalid(
                        p,
                        format!(
                            "{a} listens on every interface without [tls]: add a [tls] section, listen on a specific address, or set server.allow_plaintext_public = true"
                        ),
                    ));
                }
            }
        }

        let server = Server {
            listen,
            trusted_proxies: cidrs(&s.trusted_proxies, "server.trusted_proxies", env)?,
            max_body: s.max_body.0,
            header_timeout: s.header_timeout.0,
            request_timeout: s.request_timeout.0,
            stream_idle_timeout: s.stream_idle_timeout.0,
            idle_timeout: s.idle_timeout.0,
            send_timeout: s.send_timeout.0,
            shutdown_grace: s.shutdown_grace.0,
            max_connections: s.max_connections as usize,
            max_header_bytes: s.max_header_bytes.0 as usize,
            http2_max_concurrent_streams: s.http2_max_concurrent_streams,
            allow_plaintext_public: s.allow_plaintext_public,
        };

        let admin = match &raw.admin {
            None => None,
            Some(a) => {
                let l = plain(&a.listen, "admin.listen", env)?;
                let token = if a.token.trim().is_empty() {
                    None
                } else {
                    let t =
                        secret::resolve(&a.token, env).map_err(|m| invalid("admin.token", m))?;
                    if t.expose_secret().trim().is_empty() {
                        return Err(invalid(
                            "admin.token",
                            "resolved to an empty string; remove admin.token to serve /metrics without a token",
                        ));
                    }
                    Some(t)
                };
                Some(Admin {
                    listen: parse_listen(&l, "admin.listen")?,
                    token,
                })
            }
        };

        let out = plain(&raw.audit.output, "audit.output", env)?;
        let output = match out.trim() {
            "stdout" | "" => AuditOutput::Stdout,
            p => AuditOutput::File(PathBuf::from(p)),
        };
        if !(16..=1 << 20).contains(&raw.audit.queue) {
            return Err(invalid("audit.queue", "must be between 16 and 1048576"));
        }
        let audit = AuditSettings {
            output,
            queue: raw.audit.queue as usize,
        };

        let a = &raw.auth;
        let mut headers = Vec::new();
        for (i, h) in a.headers.iter().enumerate() {
            headers.push(parse_header_name(h, &format!("auth.headers[{i}]"))?);
        }
        let query_param = plain(&a.query_param, "auth.query_param", env)?;
        let query_param = query_param.trim();
        if query_param.contains(['&', '=', '#', ' ']) {
            return Err(invalid(
                "auth.query_param",
                "must be a plain parameter name",
            ));
        }
        if a.lockout_failures == 0 {
            return Err(invalid(
                "auth.lockout_failures",
                "must be at least 1 (a lockout after 0 failures would lock out everyone)",
            ));
        }
        let auth = Auth {
            headers,
            query_param: (!query_param.is_empty()).then(|| query_param.to_owned()),
            lockout_failures: a.lockout_failures,
            lockout_window: a.lockout_window.0,
            lockout_duration: a.lockout_duration.0,
        };

        let cors = match &raw.cors {
            None => None,
            Some(c) => {
                let any_origin = c.allowed_origins.iter().any(|o| o.trim() == "*");
                if any_origin && c.allow_credentials {
                    return Err(invalid(
                        "cors.allowed_origins",
                        "\"*\" cannot be combined with allow_credentials = true (browsers refuse it, and it would let any site act as the user)",
                    ));
                }
                let mut origins = Vec::new();
                for (i, o) in c.allowed_origins.iter().enumerate() {
                    let o = plain(o, &format!("cors.allowed_origins[{i}]"), env)?;
                    let o = o.trim();
                    if o == "*" {
                        continue;
                    }
                    let uri: Uri = o.parse().map_err(|_| {
                        invalid(
                            format!("cors.allowed_origins[{i}]"),
                            format!("invalid origin {o:?}"),
                        )
                    })?;
                    if uri.scheme().is_none()
                        || uri.authority().is_none()
                        || !matches!(uri.path(), "" | "/")
                        || o.ends_with('/')
                    {
                        return Err(invalid(
                            format!("cors.allowed_origins[{i}]"),
                            format!(
                                "invalid origin {o:?}: expected scheme://host[:port] with no path"
                            ),
                        ));
                    }
                    origins.push(o.to_ascii_lowercase());
                }
                let mut hdrs = Vec::new();
                for (i, h) in c.allowed_headers.iter().enumerate() {
                    hdrs.push(parse_header_name(h, &format!("cors.allowed_headers[{i}]"))?);
                }
                Some(Cors {
                    allowed_origins: origins,
                    any_origin,
                    allowed_methods: parse_methods(&c.allowed_methods, "cors.allowed_methods")?,
                    allowed_headers: hdrs,
                    allow_credentials: c.allow_credentials,
                    max_age: c.max_age.0,
                })
            }
        };

        if raw.limits.max_tracked_clients == 0 {
            return Err(invalid("limits.max_tracked_clients", "must be at least 1"));
        }
        if raw.limits.max_connections_per_ip == 0 {
            return Err(invalid(
                "limits.max_connections_per_ip",
                "must be at least 1",
            ));
        }
        // tokio's semaphore counts at most usize::MAX >> 3 permits (one per byte here).
        if raw.limits.max_buffered_bytes.0 == 0 || raw.limits.max_buffered_bytes.0 > 1 << 40 {
            return Err(invalid(
                "limits.max_buffered_bytes",
                "must be between 1 byte and 1TiB",
            ));
        }
        let limits = Limits {
            per_ip: raw.limits.per_ip,
            per_key: raw.limits.per_key,
            max_tracked_clients: raw.limits.max_tracked_clients as usize,
            max_connections_per_ip: raw.limits.max_connections_per_ip as usize,
            max_buffered_bytes: raw.limits.max_buffered_bytes.0,
        };

        let mut routes = Vec::new();
        let mut names = HashSet::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let route = build_route(r, i, &server, env)?;
            if !names.insert(route.name.clone()) {
                return Err(invalid(
                    format!("routes[{i}].name"),
                    format!("duplicate route name {:?}", route.name),
                ));
            }
            routes.push(route);
        }
        if routes.is_empty() {
            return Err(invalid("routes", "at least one [[routes]] entry is needed"));
        }

        let mut keys = Vec::new();
        let mut ids = HashSet::new();
        let mut hashes = HashSet::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let p = |f: &str| format!("keys[{i}].{f}");
            let id = k.id.trim();
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(invalid(
                    p("id"),
                    "must be non-empty: letters, digits, '-', '_' or '.'",
                ));
            }
            if !ids.insert(id.to_owned()) {
                return Err(invalid(p("id"), format!("duplicate key id {id:?}")));
            }
            // A hash is no secret (the key has 256 bits), but it may come from a file all the same.
            let hash = parse_hash(plain(&k.hash, &p("hash"), env)?.trim(), &p("hash"))?;
            if !hashes.insert(hash) {
                return Err(invalid(p("hash"), "the same key hash appears twice"));
            }
            if let Some(rs) = &k.routes {
                for (j, r) in rs.iter().enumerate() {
                    if !names.contains(r) {
                        return Err(invalid(
                            format!("keys[{i}].routes[{j}]"),
                            format!("no route named {r:?}"),
                        ));
                    }
                }
            }
            let expires = match &k.expires {
                None => None,
                Some(e) => Some(
                    humantime::parse_rfc3339(plain(e, &p("expires"), env)?.trim()).map_err(
                        |_| {
                            invalid(
                                p("expires"),
                                format!(
                                    "invalid RFC 3339 time {e:?}, e.g. \"2027-01-01T00:00:00Z\""
                                ),
                            )
                        },
                    )?,
                ),
            };
            let models = match &k.models {
                None => None,
                Some(list) => {
                    let mut out = Vec::new();
                    for (j, m) in list.iter().enumerate() {
                        out.push(
                            crate::llm::request::ModelPattern::parse(m)
                                .map_err(|e| invalid(format!("keys[{i}].models[{j}]"), e))?,
                        );
                    }
                    Some(out)
                }
            };
            let budget = match &k.budget {
                None => Arc::from([]),
                Some(b) => caps(b, &p("budget"))?.into(),
            };
            keys.push(Key {
                budget,
                models,
                id: id.to_owned(),
                hash,
                routes: k.routes.clone(),
                per_key: k.per_key,
                expires,
                disabled: k.disabled,
            });
        }

        let usage = match &raw.usage {
            None => None,
            Some(u) => {
                let price = |p: &super::schema::RawPrice, at: String| {
                    if p.input.is_finite()
                        && p.output.is_finite()
                        && p.input >= 0.0
                        && p.output >= 0.0
                    {
                        Ok((p.input, p.output))
                    } else {
                        Err(invalid(
                            at,
                            "prices must be non-negative numbers (USD per million tokens)",
                        ))
                    }
                };
                let mut prices = std::collections::HashMap::new();
                for (model, p) in &u.prices {
                    prices.insert(model.clone(), price(p, format!("usage.prices.{model}"))?);
                }
                let fallback_price = match &u.fallback_price {
                    Some(p) => Some(price(p, "usage.fallback_price".into())?),
                    None => prices
                        .values()
                        .copied()
                        .reduce(|(i, o), (i2, o2)| (i.max(i2), o.max(o2))),
                };
                let database = match &u.database {
                    None => None,
                    Some(d) => Some(PathBuf::from(plain(d, "usage.database", env)?)),
                };
                Some(UsageSettings {
                    database,
                    retention: u
                        .retention
                        .map(|r| r.0)
                        .unwrap_or(Duration::from_secs(90 * 86400)),
                    inject_stream_usage: u.inject_stream_usage,
                    default_completion_reservation: u
                        .default_completion_reservation
                        .unwrap_or(1024),
                    prices,
                    fallback_price,
                })
            }
        };

        // A budget needs the ledger: without it, a restart would quietly reset every budget.
        let budgets: Arc<[_]> = match &raw.budgets {
            None => Arc::from([]),
            Some(b) => caps(b, "budgets")?.into(),
        };
        let has_ledger = usage.as_ref().is_some_and(|u| u.database.is_some());
        let budgeted = (!budgets.is_empty())
            .then(|| "budgets".to_owned())
            .or_else(|| {
                keys.iter()
                    .position(|k| !k.budget.is_empty())
                    .map(|i| format!("keys[{i}].budget"))
            });
        if let Some(path) = budgeted
            && !has_ledger
        {
            return Err(invalid(
                path,
                "budgets need [usage] with a database (the ledger that keeps spend across restarts)",
            ));
        }
        check_caps_against_usage(&budgets, &keys, usage.as_ref())?;

        Ok(Config {
            budgets,
            usage,
            server,
            tls,
            admin,
            audit,
            auth,
            cors,
            limits,
            keys,
            routes,
        })
    }
}

/// SPEC §7: a cost cap needs a price for every model (a table, or `fallback_price`), so that it
/// never counts $0; and the ledger must keep rows for the longest budgeted period, since spend
/// is rebuilt from it at startup.
fn check_caps_against_usage(
    gateway: &[crate::llm::budget::Cap],
    keys: &[Key],
    usage: Option<&UsageSettings>,
) -> Result<(), Invalid> {
    use crate::llm::budget::{Period, Unit};
    let scopes = std::iter::once(("budgets".to_owned(), gateway)).chain(
        keys.iter()
            .enumerate()
            .map(|(i, k)| (format!("keys[{i}].budget"), &*k.budget)),
    );
    let Some(usage) = usage else { return Ok(()) };
    for (at, caps) in scopes {
        for cap in caps {
            if cap.unit == Unit::Cost && usage.fallback_price.is_none() {
                return Err(invalid(
                    at,
                    format!(
                        "{cap}: a cost cap needs [usage.prices] or usage.fallback_price, \
                         else a model without a price would count $0"
                    ),
                ));
            }
            let (need, days) = match cap.period {
                Period::Month => ("32d", 32),
                Period::Week => ("8d", 8),
                Period::Day => ("1d", 1),
            };
            if usage.retention < Duration::from_secs(days * 86_400) {
                return Err(invalid(
                    "usage.retention",
                    format!(
                        "must be at least {need} with a {} cap ({at}: {cap}): spend is rebuilt \
                         from the ledger at startup",
                        cap.period.name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The caps of a `[budgets]` table or a key's `budget`, checked: whole tokens, USD as a
/// non-negative finite number.
fn caps(b: &super::schema::RawBudget, at: &str) -> Result<Vec<crate::llm::budget::Cap>, Invalid> {
    use crate::llm::budget::{Cap, Period, Unit};
    let mut out = Vec::new();
    let tokens = [
        ("tokens_per_day", b.tokens_per_day, Period::Day),
        ("tokens_per_week", b.tokens_per_week, Period::Week),
        ("tokens_per_month", b.tokens_per_month, Period::Month),
    ];
    for (_, v, period) in tokens {
        if let Some(v) = v {
            out.push(Cap {
                period,
                unit: Unit::Tokens,
                limit: v as f64,
            });
        }
    }
    let costs = [
        ("cost_per_day", b.cost_per_day, Period::Day),
        ("cost_per_week", b.cost_per_week, Period::Week),
        ("cost_per_month", b.cost_per_month, Period::Month),
    ];
    for (name, v, period) in costs {
        if let Some(v) = v {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(
                    format!("{at}.{name}"),
                    "must be a non-negative number of USD",
                ));
            }
            out.push(Cap {
                period,
                unit: Unit::Cost,
                limit: v,
            });
        }
    }
    Ok(out)
}

fn build_route(r: &RawRoute, i: usize, server: &Server, env: &dyn Env) -> Result<Route, Invalid> {
    let p = |f: &str| format!("routes[{i}].{f}");
    let name = r.name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            p("name"),
            "must be non-empty: letters, digits, '-', '_' or '.'",
        ));
    }
    if !r.path.starts_with('/') {
        return Err(invalid(
            p("path"),
            format!("{:?} must start with '/'", r.path),
        ));
    }
    match crate::path::normalize(&r.path) {
        Ok(n) if n == r.path => {}
        _ => {
            return Err(invalid(
                p("path"),
                format!(
                    "{:?} is not a normalized path (no dot segments, '//', '%' escapes or '\\')",
                    r.path
                ),
            ));
        }
    }
    // Errors quote the upstream as written, never as resolved: `${NAME}` may hold credentials.
    let upstream = parse_upstream(&plain(&r.upstream, &p("upstream"), env)?, &p("upstream"))
        .map_err(|mut e| {
            if secret::has_reference(&r.upstream) {
                e.message = format!("invalid URL {:?} (after resolving ${{...}})", r.upstream);
            }
            e
        })?;
    let host = plain(&r.host, &p("host"), env)?;
    let host = host.trim();
    let mut upstream_headers = Vec::new();
    for (hname, hval) in &r.upstream_headers {
        let path = format!("routes[{i}].upstream_headers.{hname}");
        let name = parse_header_name(hname, &path)?;
        if crate::proxy::headers::is_hop_by_hop(&name) || name == http::header::HOST {
            return Err(invalid(
                path,
                format!("{name} cannot be set by upstream_headers"),
            ));
        }
        let v = secret::resolve(hval, env).map_err(|m| invalid(&path, m))?;
        let mut value = HeaderValue::from_str(v.expose_secret()).map_err(|_| {
            invalid(
                &path,
                "the value is not a valid header value (control characters or newlines?)",
            )
        })?;
        value.set_sensitive(true);
        upstream_headers.push(UpstreamHeader { name, value });
    }
    let timeout = r.timeout.map(|d| d.0).unwrap_or(server.request_timeout);
    if timeout.is_zero() {
        return Err(invalid(p("timeout"), "must be greater than 0"));
    }
    Ok(Route {
        index: i,
        name: name.to_owned(),
        prefix: r.path.trim_end_matches('/').to_owned(),
        host: (!host.is_empty()).then(|| host_only(host)),
        methods: parse_methods(&r.methods, &p("methods"))?,
        upstream,
        strip_prefix: r.strip_prefix,
        auth: match r.auth {
            RawAuthMode::Key => AuthMode::Key,
            RawAuthMode::None => AuthMode::None,
        },
        per_ip: r.per_ip,
        per_key: r.per_key,
        max_body: r.max_body.map(|b| b.0).unwrap_or(server.max_body),
        timeout,
        allow_ips: cidrs(&r.allow_ips, &p("allow_ips"), env)?,
        deny_ips: cidrs(&r.deny_ips, &p("deny_ips"), env)?,
        websocket: r.websocket,
        llm: r.llm,
        upstream_headers,
    })
}

/// Lower-cases a Host value and drops its port, for route matching.
pub fn normalize_host(h: &str) -> String {
    host_only(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_canonical() {
        assert_eq!(parse_cidr("10.0.0.1/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("::ffff:203.0.113.0/120").unwrap().to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            parse_cidr("::ffff:203.0.113.9").unwrap().to_string(),
            "203.0.113.9/32"
        );
        assert_eq!(
            parse_cidr("2001:db8::1/64").unwrap().to_string(),
            "2001:db8::/64"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope").is_err());
    }
}
