//! The shape of `portcullis.toml` (SPEC §2), exactly as written by the operator.
//!
//! Every table denies unknown fields: a misspelt `per_ip` must be an error, never a silently
//! dropped limit. Units are parsed here (their errors carry the TOML span); cross-field rules and
//! `${NAME}` secrets are handled in `runtime.rs`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::units::{ByteSize, ConfDuration, Rate};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub tls: Option<RawTls>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub auth: RawAuth,
    pub cors: Option<RawCors>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    pub usage: Option<RawUsage>,
    pub budgets: Option<RawBudget>,
    pub tokens: Option<RawTokens>,
    #[serde(default)]
    pub issuers: Vec<RawIssuer>,
    pub cluster: Option<RawCluster>,
}

/// `[cluster]` (SPEC §9): limits, lockout and budgets shared through Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: String,
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
    #[serde(default = "default_cluster_timeout")]
    pub timeout: ConfDuration,
    #[serde(default)]
    pub on_error: RawOnError,
}

fn default_cluster_prefix() -> String {
    "portcullis:".to_owned()
}

fn default_cluster_timeout() -> ConfDuration {
    ConfDuration(std::time::Duration::from_millis(50))
}

/// `cluster.on_error`: what a request gets while Redis cannot answer.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawOnError {
    #[default]
    Local,
    Deny,
}

/// `[tokens]` (SPEC §10): short-lived tokens minted at `POST /.portcullis/token`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub secret: String,
    #[serde(default = "default_max_ttl")]
    pub max_ttl: ConfDuration,
}

fn default_max_ttl() -> ConfDuration {
    ConfDuration(std::time::Duration::from_secs(600))
}

/// `[budgets]` and a key's `budget` (SPEC §7): caps per UTC day, week and month.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub tokens_per_day: Option<u64>,
    pub tokens_per_week: Option<u64>,
    pub tokens_per_month: Option<u64>,
    pub cost_per_day: Option<f64>,
    pub cost_per_week: Option<f64>,
    pub cost_per_month: Option<f64>,
}

/// `[usage]` (SPEC §7).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    pub database: Option<String>,
    pub retention: Option<ConfDuration>,
    #[serde(default = "default_true")]
    pub inject_stream_usage: bool,
    pub default_completion_reservation: Option<u64>,
    #[serde(default)]
    pub prices: BTreeMap<String, RawPrice>,
    /// The price of a model the table does not name (default: its highest input and output).
    pub fallback_price: Option<RawPrice>,
}

fn default_true() -> bool {
    true
}

/// USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    pub output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: OneOrMany,
    pub trusted_proxies: Vec<String>,
    pub max_body: ByteSize,
    pub header_timeout: ConfDuration,
    pub request_timeout: ConfDuration,
    pub stream_idle_timeout: ConfDuration,
    pub idle_timeout: ConfDuration,
    pub send_timeout: ConfDuration,
    pub shutdown_grace: ConfDuration,
    pub max_connections: u32,
    pub max_header_bytes: ByteSize,
    pub http2_max_concurrent_streams: u32,
    pub allow_plaintext_public: bool,
    pub workers: u32,
}

impl Default for RawServer {
    fn default() -> Self {
        use std::time::Duration;
        RawServer {
            listen: OneOrMany(vec!["127.0.0.1:8080".to_owned()]),
            trusted_proxies: Vec::new(),
            max_body: ByteSize(10 << 20),
            header_timeout: ConfDuration(Duration::from_secs(10)),
            request_timeout: ConfDuration(Duration::from_secs(30)),
            stream_idle_timeout: ConfDuration(Duration::from_secs(300)),
            idle_timeout: ConfDuration(Duration::from_secs(60)),
            send_timeout: ConfDuration(Duration::from_secs(60)),
            shutdown_grace: ConfDuration(Duration::from_secs(30)),
            max_connections: 1024,
            max_header_bytes: ByteSize(32 << 10),
            http2_max_concurrent_streams: 100,
            allow_plaintext_public: false,
            workers: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub client_ca: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    #[serde(default)]
    pub token: String,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    pub output: String,
    pub queue: u32,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            output: "stdout".to_owned(),
            queue: 16 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub headers: Vec<String>,
    pub query_param: String,
    pub lockout_failures: u32,
    pub lockout_window: ConfDuration,
    pub lockout_duration: ConfDuration,
}

impl Default for RawAuth {
    fn default() -> Self {
        use std::time::Duration;
        RawAuth {
            headers: vec!["authorization".to_owned(), "x-api-key".to_owned()],
            query_param: String::new(),
            lockout_failures: 10,
            lockout_window: ConfDuration(Duration::from_secs(60)),
            lockout_duration: ConfDuration(Duration::from_secs(15 * 60)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCors {
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    pub max_age: ConfDuration,
}

impl Default for RawCors {
    fn default() -> Self {
        RawCors {
            allowed_origins: Vec::new(),
            allowed_methods: vec!["GET".into(), "POST".into(), "OPTIONS".into()],
            // What the OpenAI and Anthropic browser SDKs send, besides the key and the body type.
            allowed_headers: [
                "authorization",
                "content-type",
                "x-api-key",
                "openai-*",
                "anthropic-*",
                "x-stainless-*",
            ]
            .map(String::from)
            .to_vec(),
            expose_headers: [
                "x-request-id",
                "retry-after",
                "ratelimit",
                "ratelimit-policy",
            ]
            .map(String::from)
            .to_vec(),
            allow_credentials: false,
            max_age: ConfDuration(std::time::Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub per_ip: Rate,
    pub per_key: Rate,
    pub max_tracked_clients: u32,
    pub max_connections_per_ip: u32,
    pub max_buffered_bytes: ByteSize,
}

impl Default for RawLimits {
    fn default() -> Self {
        let per_min = |n| Rate::parse(&format!("{n}/min")).unwrap_or(Rate::Off);
        RawLimits {
            per_ip: per_min(600),
            per_key: per_min(600),
            max_tracked_clients: 100_000,
            max_connections_per_ip: 128,
            max_buffered_bytes: ByteSize(64 << 20),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub hash: String,
    pub routes: Option<Vec<String>>,
    pub per_key: Option<Rate>,
    pub expires: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    pub models: Option<Vec<String>>,
    pub budget: Option<RawBudget>,
    pub user_header: Option<String>,
    pub user_budget: Option<RawBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub methods: Vec<String>,
    pub upstream: String,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub auth: RawAuthMode,
    pub per_ip: Option<Rate>,
    pub per_key: Option<Rate>,
    pub max_body: Option<ByteSize>,
    pub timeout: Option<ConfDuration>,
    #[serde(default)]
    pub allow_ips: Vec<String>,
    #[serde(default)]
    pub deny_ips: Vec<String>,
    #[serde(default)]
    pub websocket: bool,
    #[serde(default)]
    pub llm: bool,
    #[serde(default)]
    pub upstream_headers: BTreeMap<String, String>,
    /// Overrides `auth.query_param` on this route (`""`: no key in the query here).
    pub query_param: Option<String>,
    /// The `[[issuers]]` whose JWTs this route accepts (`auth = "jwt"` or `"key_or_jwt"`).
    #[serde(default)]
    pub issuers: Vec<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawAuthMode {
    #[default]
    Key,
    None,
    Jwt,
    KeyOrJwt,
}

/// `[[issuers]]` (SPEC §10): an identity provider whose JWTs routes may accept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    pub name: String,
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    pub jwks_refresh: Option<ConfDuration>,
    pub jwks_ca_file: Option<String>,
    pub secret: Option<String>,
    #[serde(default = "default_leeway")]
    pub leeway: ConfDuration,
    #[serde(default)]
    pub required_claims: BTreeMap<String, toml::Value>,
    pub budget: Option<RawBudget>,
}

fn default_leeway() -> ConfDuration {
    ConfDuration(std::time::Duration::from_secs(30))
}

/// `listen = "addr"` or `listen = ["addr", "addr"]`.
#[derive(Debug)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address string or a list of address strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                if out.is_empty() {
                    return Err(de::Error::custom("at least one listen address is needed"));
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}
