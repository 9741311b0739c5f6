//! The validated, runtime form of the config: what the gateway actually runs on.
//!
//! Built once from the TOML shape at load (and at each reload) by `build.rs`. Types here cannot hold an invalid
//! value: addresses are `SocketAddr`, CIDRs are `IpNet`, header names are `HeaderName`, secrets are
//! `SecretString` or sensitive `HeaderValue`s. A failed check is an [`Invalid`] with the key path
//! (`routes[1].upstream`), so `mod.rs` can point at the line.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use ipnet::IpNet;
use secrecy::SecretString;

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
    /// `[tokens]`: minting and accepting short-lived tokens.
    pub tokens: Option<Tokens>,
    /// `[[issuers]]`: identity providers whose JWTs routes accept.
    pub issuers: Vec<Arc<crate::jwt::Issuer>>,
    /// `[budgets]`: caps for all keys together.
    pub budgets: Arc<[crate::llm::budget::Cap]>,
    /// `[cluster]`: limits and lockout shared with other instances through Redis.
    pub cluster: Option<Cluster>,
}

/// `[cluster]` (SPEC §9). The URL and prefix are read once at startup (a reload that changes
/// them is refused: it needs a restart); `timeout` and `on_error` follow reloads.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `redis://` or `rediss://`, `${NAME}` resolved; it may hold a password.
    pub redis: secrecy::SecretString,
    pub prefix: String,
    /// The longest one round trip may take before it counts as an error.
    pub timeout: Duration,
    pub on_error: OnError,
}

/// `cluster.on_error`.
pub use super::schema::RawOnError as OnError;

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
    /// Worker threads serving connections, one runtime each; 0 for one per usable CPU.
    pub workers: usize,
}

impl Server {
    /// `workers`, with 0 resolved to the CPUs this process may run on (its affinity mask, as
    /// `taskset` or systemd's `CPUAffinity=` set it).
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
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
    pub allowed_headers: Vec<HeaderPattern>,
    /// `Access-Control-Expose-Headers`, joined once (none when the list is empty).
    pub expose_headers: Option<HeaderValue>,
    pub allow_credentials: bool,
    pub max_age: Duration,
}

/// An allowed request header: a name, or a prefix written with a trailing `*` (`x-stainless-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPattern {
    Exact(HeaderName),
    Prefix(String),
}

impl HeaderPattern {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HeaderPattern::Exact(n) => n.as_str().eq_ignore_ascii_case(name),
            HeaderPattern::Prefix(p) => name
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
        }
    }
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
    pub hash: crate::keys::KeyHash,
    /// `None`: every route with `auth = "key"`.
    pub routes: Option<Vec<String>>,
    pub per_key: Option<Rate>,
    pub expires: Option<SystemTime>,
    pub disabled: bool,
    /// `None`: any model. On `llm` routes a request naming another model gets 403.
    pub models: Option<Vec<crate::llm::request::ModelPattern>>,
    /// The key's own caps (SPEC §7 `budget`).
    pub budget: Arc<[crate::llm::budget::Cap]>,
    /// The request header naming the key's user (SPEC §8), e.g. OpenWebUI's
    /// `x-openwebui-user-id`.
    pub user_header: Option<http::HeaderName>,
    /// Caps for each user of the key separately, on top of `budget`.
    pub user_budget: Arc<[crate::llm::budget::Cap]>,
}

impl Key {
    /// Whether this key may use the route named `route` (its `routes`, or every route).
    pub fn allows(&self, route: &str) -> bool {
        self.routes
            .as_ref()
            .is_none_or(|rs| rs.iter().any(|r| r == route))
    }
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
    /// A JWT of one of the route's issuers (SPEC §10).
    Jwt,
    /// An API key, or a JWT of one of the route's issuers.
    KeyOrJwt,
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

/// `[tokens]` (SPEC §10).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The HMAC-SHA256 key (at least 32 bytes); changing it ends every token minted with it.
    pub secret: SecretString,
    pub max_ttl: Duration,
}

/// The name of the route `[tokens]` adds for `POST /.portcullis/token`.
pub const TOKEN_ROUTE: &str = "portcullis-token";
/// Its path.
pub const TOKEN_PATH: &str = "/.portcullis/token";

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
    /// The query parameter a key may come in on this route: the route's `query_param`, else
    /// `auth.query_param`; `None`: keys only in headers here.
    pub query_param: Option<String>,
    /// The route `[tokens]` adds: the gateway answers it (mints a token), nothing is forwarded.
    pub mint: bool,
    /// `auth = "jwt"` / `"key_or_jwt"`: the issuers accepted (indexes into `Config::issuers`).
    pub issuers: Vec<usize>,
}

/// A validation failure: the key path it concerns and what is wrong.
#[derive(Debug)]
pub struct Invalid {
    pub path: String,
    pub message: String,
}
