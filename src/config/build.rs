//! Building the runtime [`Config`] from the TOML shape ([`RawConfig`]): one function per
//! section, each checking what its section's types cannot say (ranges, uniqueness, references
//! between sections) and resolving `${NAME}` in value strings. Errors carry the key path
//! (`routes[1].upstream`) so `mod.rs` can point at the line.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http::header::HeaderValue;
use secrecy::ExposeSecret;

use super::parse::*;
use super::runtime::*;
use super::schema::{RawAuthMode, RawConfig, RawRoute};
use super::secret::{self, Env};

impl Config {
    pub fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Config, Invalid> {
        let (server, tls) = server(&raw, env)?;
        let admin = admin(&raw, env)?;
        let audit = audit(&raw, env)?;
        let auth = auth(&raw, env)?;
        let cors = cors(&raw, env)?;
        let limits = limits(&raw)?;
        let mut routes = routes(&raw, &server, &auth, env)?;
        let issuers = issuers(&raw, env)?;
        route_issuers(&raw, &mut routes, &issuers)?;
        let tokens = tokens(&raw, env)?;
        if tokens.is_some() {
            for (i, r) in routes.iter().enumerate() {
                if r.name == TOKEN_ROUTE {
                    return Err(invalid(
                        format!("routes[{i}].name"),
                        format!("{TOKEN_ROUTE:?} is the route [tokens] adds; choose another name"),
                    ));
                }
                if r.prefix == TOKEN_PATH || r.prefix.starts_with(&format!("{TOKEN_PATH}/")) {
                    return Err(invalid(
                        format!("routes[{i}].path"),
                        format!("{TOKEN_PATH} is where [tokens] mints tokens"),
                    ));
                }
            }
            routes.push(token_route(routes.len(), &server)?);
        }
        let keys = keys(&raw, &routes, env)?;
        let usage = usage(&raw, env)?;
        let cluster = cluster(&raw, env)?;

        // A budget needs the ledger: without it, a restart would quietly reset every budget.
        let budgets: Arc<[_]> = match &raw.budgets {
            None => Arc::from([]),
            Some(b) => caps(b, "budgets")?.into(),
        };
        let has_ledger = usage.as_ref().is_some_and(|u| u.database.is_some());
        let budgeted = (!budgets.is_empty())
            .then(|| "budgets".to_owned())
            .or_else(|| {
                keys.iter().enumerate().find_map(|(i, k)| {
                    if !k.budget.is_empty() {
                        Some(format!("keys[{i}].budget"))
                    } else if !k.user_budget.is_empty() {
                        Some(format!("keys[{i}].user_budget"))
                    } else {
                        None
                    }
                })
            })
            .or_else(|| {
                issuers
                    .iter()
                    .position(|i| !i.budget.is_empty())
                    .map(|i| format!("issuers[{i}].budget"))
            });
        if let Some(path) = budgeted
            && !has_ledger
        {
            return Err(invalid(
                path,
                "budgets need [usage] with a database (the ledger that keeps spend across restarts)",
            ));
        }
        check_caps_against_usage(&budgets, &keys, &issuers, usage.as_ref())?;

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
            tokens,
            issuers,
            cluster,
        })
    }
}

/// `[cluster]`: a `redis://` or `rediss://` URL the redis crate can use, a short printable
/// prefix, a timeout between 1 ms and 10 s.
fn cluster(raw: &RawConfig, env: &dyn Env) -> Result<Option<Cluster>, Invalid> {
    let Some(c) = &raw.cluster else {
        return Ok(None);
    };
    let url = secret::resolve(&c.redis, env).map_err(|m| invalid("cluster.redis", m))?;
    let lenient_placeholder =
        env.lenient() && url.expose_secret().contains(secret::Lenient::PLACEHOLDER);
    if !lenient_placeholder {
        let u = url.expose_secret();
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            return Err(invalid(
                "cluster.redis",
                "must be a redis:// or rediss:// URL (e.g. redis://127.0.0.1:6379/0)",
            ));
        }
        // The crate's own parser, so a URL accepted here is one it can connect to. Its message
        // never repeats the URL (which may hold a password).
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u) {
            return Err(invalid(
                "cluster.redis",
                format!("not a usable Redis URL: {e}"),
            ));
        }
    }
    if c.prefix.len() > 64 || c.prefix.chars().any(|ch| ch.is_control() || ch == ' ') {
        return Err(invalid(
            "cluster.prefix",
            "at most 64 characters, no spaces or control characters",
        ));
    }
    let timeout = c.timeout.0;
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(10) {
        return Err(invalid("cluster.timeout", "must be between 1ms and 10s"));
    }
    Ok(Some(Cluster {
        redis: url,
        prefix: c.prefix.clone(),
        timeout,
        on_error: c.on_error,
    }))
}

/// `[[issuers]]`: names unique, algorithms from the four SPEC §10 names, HS256 with a `secret`
/// and the others with a JWKS: the JWKS file read and parsed now, or a `jwks_url` checked (it is
/// fetched by the running gateway, never here: `portcullis check` stays off the network).
fn issuers(raw: &RawConfig, env: &dyn Env) -> Result<Vec<Arc<crate::jwt::Issuer>>, Invalid> {
    let mut out: Vec<Arc<crate::jwt::Issuer>> = Vec::new();
    for (i, r) in raw.issuers.iter().enumerate() {
        let p = |f: &str| format!("issuers[{i}].{f}");
        check_id(r.name.trim(), &p("name"))?;
        if out.iter().any(|o| o.name == r.name.trim()) {
            return Err(invalid(
                p("name"),
                format!("duplicate issuer name {:?}", r.name),
            ));
        }
        if r.issuer.trim().is_empty() {
            return Err(invalid(
                p("issuer"),
                "the required `iss` value must not be empty",
            ));
        }
        let mut algorithms = Vec::new();
        for (j, a) in r.algorithms.iter().enumerate() {
            let Some((_, alg)) = crate::jwt::ALGORITHMS.iter().find(|(n, _)| n == a) else {
                return Err(invalid(
                    format!("issuers[{i}].algorithms[{j}]"),
                    format!("{a:?} is not one of RS256, ES256, EdDSA, HS256"),
                ));
            };
            algorithms.push(*alg);
        }
        if algorithms.is_empty() {
            return Err(invalid(p("algorithms"), "list at least one algorithm"));
        }
        let hmac = algorithms.contains(&jsonwebtoken::Algorithm::HS256);
        let public = algorithms
            .iter()
            .any(|a| *a != jsonwebtoken::Algorithm::HS256);
        let secret = match &r.secret {
            None if hmac => {
                return Err(invalid(p("secret"), "HS256 needs a secret"));
            }
            None => None,
            Some(_) if !hmac => {
                return Err(invalid(
                    p("secret"),
                    "a secret is for HS256 only; list HS256",
                ));
            }
            Some(s) => Some(hmac_secret(s, &p("secret"), env)?),
        };
        if r.jwks_url.is_none() {
            for (key, set) in [
                ("jwks_refresh", r.jwks_refresh.is_some()),
                ("jwks_ca_file", r.jwks_ca_file.is_some()),
            ] {
                if set {
                    return Err(invalid(p(key), "goes with jwks_url, which is not set"));
                }
            }
        }
        let jwks = match (&r.jwks_file, &r.jwks_url, public) {
            (Some(_), Some(_), _) => {
                return Err(invalid(
                    p("jwks_url"),
                    "set jwks_url or jwks_file, not both",
                ));
            }
            (None, None, true) => {
                return Err(invalid(
                    p("jwks_file"),
                    "RS256, ES256 and EdDSA need the issuer's public keys: set jwks_url or jwks_file",
                ));
            }
            (Some(_), None, false) | (None, Some(_), false) => {
                let key = if r.jwks_url.is_some() {
                    "jwks_url"
                } else {
                    "jwks_file"
                };
                return Err(invalid(p(key), "a JWKS is not used for HS256 alone"));
            }
            (None, None, false) | (None, Some(_), true) => None,
            (Some(f), None, true) => {
                let path = plain(f, &p("jwks_file"), env)?;
                Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| invalid(p("jwks_file"), format!("{path}: {e}")))?,
                )
            }
        };
        let mut required = serde_json::Map::new();
        for (k, v) in &r.required_claims {
            let v = serde_json::to_value(v)
                .map_err(|e| invalid(format!("issuers[{i}].required_claims.{k}"), e.to_string()))?;
            required.insert(k.clone(), v);
        }
        let issuer = crate::jwt::Issuer::new(
            r.name.trim().to_owned(),
            r.issuer.trim().to_owned(),
            r.audiences.clone(),
            algorithms,
            jwks.as_deref(),
            secret.as_ref().map(|s| s.expose_secret().as_bytes()),
            r.leeway.0,
            required,
        )
        .map_err(|e| invalid(p("jwks_file"), e))?;
        let mut issuer = issuer;
        if let Some(u) = &r.jwks_url {
            issuer.remote = jwks_remote(r, u, &issuer.algorithms, &p, env)?.map(Arc::new);
        }
        if let Some(b) = &r.budget {
            issuer.budget = caps(b, &p("budget"))?.into();
        }
        out.push(Arc::new(issuer));
    }
    Ok(out)
}

/// An issuer's `jwks_url` with its `jwks_refresh` and `jwks_ca_file`, checked; nothing fetched.
/// `None` for a URL from an unset `${NAME}` in a lenient read (`keys`, `usage`: never fetched).
fn jwks_remote(
    r: &super::schema::RawIssuer,
    url: &str,
    algorithms: &[jsonwebtoken::Algorithm],
    p: &dyn Fn(&str) -> String,
    env: &dyn Env,
) -> Result<Option<crate::jwks::Remote>, Invalid> {
    use crate::jwks;
    let url = plain(url, &p("jwks_url"), env)?;
    if env.lenient() && url.contains(secret::Lenient::PLACEHOLDER) {
        return Ok(None);
    }
    let url = jwks::parse_url(url.trim()).map_err(|m| invalid(p("jwks_url"), m))?;
    let refresh = r
        .jwks_refresh
        .as_ref()
        .map_or(jwks::DEFAULT_REFRESH, |d| d.0);
    if !(jwks::MIN_REFRESH..=jwks::MAX_REFRESH).contains(&refresh) {
        return Err(invalid(p("jwks_refresh"), "must be between 1s and 24h"));
    }
    let roots = match &r.jwks_ca_file {
        None => None,
        Some(_) if url.scheme_str() != Some("https") => {
            return Err(invalid(p("jwks_ca_file"), "is for an https:// jwks_url"));
        }
        Some(f) => {
            let path = plain(f, &p("jwks_ca_file"), env)?;
            let roots = jwks::roots_from_file(&path).map_err(|m| invalid(p("jwks_ca_file"), m))?;
            Some(roots)
        }
    };
    let settings = jwks::Settings::new(refresh, algorithms.to_vec(), roots)
        .map_err(|m| invalid(p("jwks_ca_file"), m))?;
    let name = r.name.trim().to_owned();
    Ok(Some(jwks::Remote::new(name, url, settings)))
}

/// Each route's `issuers`: needed by `auth = "jwt"` and `"key_or_jwt"`, refused elsewhere, and
/// each must name an `[[issuers]]` entry.
fn route_issuers(
    raw: &RawConfig,
    routes: &mut [Route],
    issuers: &[Arc<crate::jwt::Issuer>],
) -> Result<(), Invalid> {
    for (i, r) in raw.routes.iter().enumerate() {
        let jwt = matches!(r.auth, RawAuthMode::Jwt | RawAuthMode::KeyOrJwt);
        if jwt && r.issuers.is_empty() {
            return Err(invalid(
                format!("routes[{i}].issuers"),
                "auth = \"jwt\" or \"key_or_jwt\" needs the issuers it accepts",
            ));
        }
        if !jwt && !r.issuers.is_empty() {
            return Err(invalid(
                format!("routes[{i}].issuers"),
                "issuers apply to auth = \"jwt\" or \"key_or_jwt\" only",
            ));
        }
        for (j, name) in r.issuers.iter().enumerate() {
            let Some(at) = issuers.iter().position(|x| x.name == *name) else {
                return Err(invalid(
                    format!("routes[{i}].issuers[{j}]"),
                    format!("no [[issuers]] entry named {name:?}"),
                ));
            };
            routes[i].issuers.push(at);
        }
    }
    Ok(())
}

/// `[tokens]`: the secret (at least 32 bytes) and the longest lifetime a token may ask for.
fn tokens(raw: &RawConfig, env: &dyn Env) -> Result<Option<Tokens>, Invalid> {
    let Some(t) = &raw.tokens else {
        return Ok(None);
    };
    let secret = hmac_secret(&t.secret, "tokens.secret", env)?;
    if t.max_ttl.0.is_zero() || t.max_ttl.0 > std::time::Duration::from_secs(86_400) {
        return Err(invalid("tokens.max_ttl", "must be between 1s and 24h"));
    }
    Ok(Some(Tokens {
        secret,
        max_ttl: t.max_ttl.0,
    }))
}

/// An HMAC key (`[tokens] secret`, an issuer's HS256 `secret`): resolved, and at least 32 bytes.
/// `usage` and `keys` read the config leniently, and an unset secret is a placeholder there.
fn hmac_secret(raw: &str, path: &str, env: &dyn Env) -> Result<secrecy::SecretString, Invalid> {
    let secret = secret::resolve(raw, env).map_err(|m| invalid(path, m))?;
    let s = secret.expose_secret();
    if s.len() < 32 && !(env.lenient() && s == secret::Lenient::PLACEHOLDER) {
        return Err(invalid(
            path,
            "must be at least 32 bytes (e.g. `openssl rand -base64 48`)",
        ));
    }
    Ok(secret)
}

/// The route `[tokens]` adds for `POST /.portcullis/token`: key authentication, the default
/// per-IP and per-key limits, a small body, nothing forwarded (its upstream is never used).
fn token_route(index: usize, server: &Server) -> Result<Route, Invalid> {
    let upstream = parse_upstream("http://127.0.0.1:9", "tokens")?;
    Ok(Route {
        index,
        name: TOKEN_ROUTE.to_owned(),
        prefix: TOKEN_PATH.to_owned(),
        host: None,
        methods: vec![http::Method::POST],
        upstream,
        strip_prefix: false,
        auth: AuthMode::Key,
        per_ip: None,
        per_key: None,
        max_body: 4096,
        timeout: server.request_timeout,
        allow_ips: Vec::new(),
        deny_ips: Vec::new(),
        websocket: false,
        llm: false,
        upstream_headers: Vec::new(),
        query_param: None,
        mint: true,
        issuers: Vec::new(),
    })
}

/// `[server]` and `[tls]` (a plain-HTTP listener on every interface needs `[tls]` or the explicit opt-out).
fn server(raw: &RawConfig, env: &dyn Env) -> Result<(Server, Option<TlsFiles>), Invalid> {
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
    if s.workers > 1024 {
        return Err(invalid(
            "server.workers",
            "must be between 0 (one per CPU) and 1024",
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
        workers: s.workers as usize,
    };
    Ok((server, tls))
}

/// `[admin]`.
fn admin(raw: &RawConfig, env: &dyn Env) -> Result<Option<Admin>, Invalid> {
    let admin = match &raw.admin {
        None => None,
        Some(a) => {
            let l = plain(&a.listen, "admin.listen", env)?;
            let token = if a.token.trim().is_empty() {
                None
            } else {
                let t = secret::resolve(&a.token, env).map_err(|m| invalid("admin.token", m))?;
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
    Ok(admin)
}

/// `[audit]`.
fn audit(raw: &RawConfig, env: &dyn Env) -> Result<AuditSettings, Invalid> {
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
    Ok(audit)
}

/// `[auth]`.
fn auth(raw: &RawConfig, env: &dyn Env) -> Result<Auth, Invalid> {
    let a = &raw.auth;
    let mut headers = Vec::new();
    for (i, h) in a.headers.iter().enumerate() {
        headers.push(parse_header_name(h, &format!("auth.headers[{i}]"))?);
    }
    let query_param = query_param(&a.query_param, "auth.query_param", env)?;
    if a.lockout_failures == 0 {
        return Err(invalid(
            "auth.lockout_failures",
            "must be at least 1 (a lockout after 0 failures would lock out everyone)",
        ));
    }
    let auth = Auth {
        headers,
        query_param,
        lockout_failures: a.lockout_failures,
        lockout_window: a.lockout_window.0,
        lockout_duration: a.lockout_duration.0,
    };
    Ok(auth)
}

/// A query parameter name for keys (`""`: none).
fn query_param(raw: &str, at: &str, env: &dyn Env) -> Result<Option<String>, Invalid> {
    let q = plain(raw, at, env)?;
    let q = q.trim();
    if q.contains(['&', '=', '#', ' ']) {
        return Err(invalid(at, "must be a plain parameter name"));
    }
    Ok((!q.is_empty()).then(|| q.to_owned()))
}

/// `[cors]`.
fn cors(raw: &RawConfig, env: &dyn Env) -> Result<Option<Cors>, Invalid> {
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
                        format!("invalid origin {o:?}: expected scheme://host[:port] with no path"),
                    ));
                }
                origins.push(o.to_ascii_lowercase());
            }
            let mut hdrs = Vec::new();
            for (i, h) in c.allowed_headers.iter().enumerate() {
                let at = format!("cors.allowed_headers[{i}]");
                hdrs.push(match h.trim().strip_suffix('*') {
                    Some(prefix) => {
                        let prefix = prefix.to_ascii_lowercase();
                        parse_header_name(&format!("{prefix}x"), &at)?;
                        HeaderPattern::Prefix(prefix)
                    }
                    None => HeaderPattern::Exact(parse_header_name(h, &at)?),
                });
            }
            let mut expose = Vec::new();
            for (i, h) in c.expose_headers.iter().enumerate() {
                expose.push(parse_header_name(h, &format!("cors.expose_headers[{i}]"))?);
            }
            let expose: Vec<&str> = expose.iter().map(|h| h.as_str()).collect();
            let expose_headers = (!expose.is_empty())
                .then(|| HeaderValue::from_str(&expose.join(", ")).ok())
                .flatten();
            Some(Cors {
                allowed_origins: origins,
                any_origin,
                allowed_methods: parse_methods(&c.allowed_methods, "cors.allowed_methods")?,
                allowed_headers: hdrs,
                expose_headers,
                allow_credentials: c.allow_credentials,
                max_age: c.max_age.0,
            })
        }
    };
    Ok(cors)
}

/// `[limits]`.
fn limits(raw: &RawConfig) -> Result<Limits, Invalid> {
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
    Ok(limits)
}

/// `[[routes]]`: names unique, at least one.
fn routes(
    raw: &RawConfig,
    server: &Server,
    auth: &Auth,
    env: &dyn Env,
) -> Result<Vec<Route>, Invalid> {
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let mut route = build_route(r, i, server, env)?;
        // SPEC §2: a route's own `query_param` overrides `auth.query_param` ("" = off there),
        // so keys in URLs can be allowed for a WebSocket route and refused on the JSON API.
        route.query_param = match &r.query_param {
            None => auth.query_param.clone(),
            Some(q) => query_param(q, &format!("routes[{i}].query_param"), env)?,
        };
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
    Ok(routes)
}

/// `[[keys]]`: ids and hashes unique, routes that exist.
fn keys(raw: &RawConfig, routes: &[Route], env: &dyn Env) -> Result<Vec<Key>, Invalid> {
    let mut keys = Vec::new();
    let mut ids = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, k) in raw.keys.iter().enumerate() {
        let p = |f: &str| format!("keys[{i}].{f}");
        let id = k.id.trim();
        check_id(id, &p("id"))?;
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
                if !routes.iter().any(|route| &route.name == r) {
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
                humantime::parse_rfc3339(plain(e, &p("expires"), env)?.trim()).map_err(|_| {
                    invalid(
                        p("expires"),
                        format!("invalid RFC 3339 time {e:?}, e.g. \"2027-01-01T00:00:00Z\""),
                    )
                })?,
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
        let user_header =
            match k.user_header.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(h) => Some(http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    invalid(p("user_header"), format!("{h:?} is not a header name"))
                })?),
            };
        let user_budget: Arc<[_]> = match &k.user_budget {
            None => Arc::from([]),
            Some(b) => caps(b, &p("user_budget"))?.into(),
        };
        if !user_budget.is_empty() && user_header.is_none() {
            return Err(invalid(
                p("user_budget"),
                "needs user_header: the request header that names the user",
            ));
        }
        keys.push(Key {
            budget,
            user_header,
            user_budget,
            models,
            id: id.to_owned(),
            hash,
            routes: k.routes.clone(),
            per_key: k.per_key,
            expires,
            disabled: k.disabled,
        });
    }
    Ok(keys)
}

/// `[usage]`: prices, the fallback price, the ledger.
fn usage(raw: &RawConfig, env: &dyn Env) -> Result<Option<UsageSettings>, Invalid> {
    let usage = match &raw.usage {
        None => None,
        Some(u) => {
            let price = |p: &super::schema::RawPrice, at: String| {
                if p.input.is_finite() && p.output.is_finite() && p.input >= 0.0 && p.output >= 0.0
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
                    .unwrap_or(crate::llm::DEFAULT_COMPLETION_RESERVATION),
                prices,
                fallback_price,
            })
        }
    };
    Ok(usage)
}

/// SPEC §7: a cost cap needs a price for every model (a table, or `fallback_price`), so that it
/// never counts $0; and the ledger must keep rows for the longest budgeted period, since spend
/// is rebuilt from it at startup.
fn check_caps_against_usage(
    gateway: &[crate::llm::budget::Cap],
    keys: &[Key],
    issuers: &[Arc<crate::jwt::Issuer>],
    usage: Option<&UsageSettings>,
) -> Result<(), Invalid> {
    use crate::llm::budget::{Period, Unit};
    let scopes = std::iter::once(("budgets".to_owned(), gateway)).chain(
        keys.iter()
            .enumerate()
            .flat_map(|(i, k)| {
                [
                    (format!("keys[{i}].budget"), &*k.budget),
                    (format!("keys[{i}].user_budget"), &*k.user_budget),
                ]
            })
            .chain(
                issuers
                    .iter()
                    .enumerate()
                    .map(|(i, x)| (format!("issuers[{i}].budget"), &*x.budget)),
            ),
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
    check_id(name, &p("name"))?;
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
            RawAuthMode::Jwt => AuthMode::Jwt,
            RawAuthMode::KeyOrJwt => AuthMode::KeyOrJwt,
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
        query_param: None,
        mint: false,
        issuers: Vec::new(),
    })
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
