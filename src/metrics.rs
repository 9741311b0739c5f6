//! Prometheus metrics (SPEC §5), recorded with the `metrics` facade and rendered by
//! metrics-exporter-prometheus on the admin listener. Labels are bounded: routes and outcomes
//! come from the config and the SPEC's code table, never from a client's input.

use std::time::Duration;

use std::sync::OnceLock;

use metrics::{Counter, Gauge, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Handles to the series with fixed labels that are touched per request or per connection,
/// registered once by [`install`]: the `counter!` macros hash the name and labels and look them
/// up in the registry on every call (1 % of a refused request's CPU time in the wrong-key flood).
struct Fixed {
    auth_failures: [Counter; AUTH_FAILURES.len()],
    active: Gauge,
    parked: Gauge,
}

static FIXED: OnceLock<Fixed> = OnceLock::new();

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

const CLUSTER_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Installs the global recorder. Fails only if one is already installed.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| e.to_string())?
        // A Redis round trip on a LAN is a fraction of a millisecond.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                "portcullis_cluster_duration_seconds".to_owned(),
            ),
            CLUSTER_BUCKETS,
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    gauge!("portcullis_build_info", "version" => crate::VERSION).set(1.0);
    // SPEC §5: every counter whose labels are known at startup exists from the first scrape, so
    // an `increase()` alert fires on the first failed reload too.
    for result in ["ok", "failed"] {
        counter!("portcullis_config_reloads_total", "result" => result).absolute(0);
    }
    let fixed = Fixed {
        auth_failures: AUTH_FAILURES
            .map(|reason| counter!("portcullis_auth_failures_total", "reason" => reason)),
        active: gauge!("portcullis_active_connections"),
        parked: gauge!("portcullis_parked_connections"),
    };
    for c in &fixed.auth_failures {
        c.absolute(0);
    }
    fixed.active.set(0.0);
    fixed.parked.set(0.0);
    // A second install fails above (the recorder is set once), so this is the first.
    let _ = FIXED.set(fixed);
    counter!("portcullis_connections_refused_total", "reason" => "per_ip").absolute(0);
    counter!("portcullis_audit_waits_total").absolute(0);
    // Histograms are aggregated lazily; keep memory flat between scrapes.
    let h = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            h.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("portcullis_requests_total", "Requests by route and outcome");
    describe_histogram!(
        "portcullis_request_duration_seconds",
        "Whole request duration, body included"
    );
    describe_histogram!(
        "portcullis_upstream_duration_seconds",
        "Time to the upstream's response head"
    );
    describe_gauge!("portcullis_active_connections", "Open client connections");
    describe_gauge!(
        "portcullis_parked_connections",
        "Idle HTTP/1.1 keep-alive connections holding no HTTP buffers (part of the open ones)"
    );
    describe_counter!(
        "portcullis_rate_limited_total",
        "Requests refused by a rate limit, by scope (ip, key)"
    );
    describe_counter!(
        "portcullis_auth_failures_total",
        "Failed API key checks by reason"
    );
    describe_counter!(
        "portcullis_config_reloads_total",
        "Config reloads by result"
    );
    describe_gauge!("portcullis_build_info", "Build information");
    describe_counter!(
        "portcullis_cluster_errors_total",
        "[cluster] steps Redis did not answer (failed, timed out, or skipped during an outage), by operation; each fell back per on_error"
    );
    describe_histogram!(
        "portcullis_cluster_duration_seconds",
        "Redis round trips ([cluster]) that got an answer"
    );
    describe_counter!(
        "portcullis_audit_waits_total",
        "Requests that waited for room in a full audit queue"
    );
    describe_counter!(
        "portcullis_connections_refused_total",
        "Client connections closed at accept, by reason (per_ip)"
    );
    describe_counter!(
        "portcullis_jwks_refresh_errors_total",
        "Failed fetches of an issuer's jwks_url (the last good key set is kept)"
    );
    describe_counter!(
        "portcullis_llm_tokens_total",
        "Tokens reported by upstreams, by route, key, model and kind"
    );
    describe_gauge!(
        "portcullis_budget_remaining",
        "What is left of each budget cap in its current period, by key (\"*\": the gateway), period and unit"
    );
    describe_counter!(
        "portcullis_llm_cost_usd_total",
        "Cost reported by upstreams, USD, by key"
    );
}

pub fn request(route: Option<&str>, outcome: &'static str, duration: Duration) {
    let route = route.unwrap_or("none").to_owned();
    counter!("portcullis_requests_total", "route" => route.clone(), "outcome" => outcome)
        .increment(1);
    histogram!("portcullis_request_duration_seconds", "route" => route)
        .record(duration.as_secs_f64());
}

/// Every `outcome` a request record can carry (SPEC §4): `forwarded`, the error codes of §3.3 and
/// §7, and the two endings of a request whose client left or stalled.
pub const OUTCOMES: [&str; 25] = [
    "forwarded",
    "preflight",
    "token_minted",
    "client_closed",
    "client_stalled",
    "missing_api_key",
    "invalid_api_key",
    "expired_api_key",
    "invalid_token",
    "key_not_allowed",
    "model_not_allowed",
    "ip_denied",
    "origin_not_allowed",
    "locked_out",
    "rate_limited",
    "budget_exceeded",
    "payload_too_large",
    "request_timeout",
    "no_route",
    "method_not_allowed",
    "bad_request",
    "headers_too_large",
    "upstream_timeout",
    "upstream_unavailable",
    "overloaded",
];

/// The reasons of `portcullis_auth_failures_total`: the codes of a failed key check.
pub const AUTH_FAILURES: [&str; 4] = [
    "missing_api_key",
    "invalid_api_key",
    "expired_api_key",
    "key_not_allowed",
];

/// A route's per-request series, registered once per config (not looked up by label on every
/// request: that cost several allocations and a registry lookup each time), every outcome at 0
/// from the start (SPEC §5).
pub struct RouteMetrics {
    /// By the index of [`OUTCOMES`].
    outcomes: Vec<metrics::Counter>,
    duration: metrics::Histogram,
    upstream: metrics::Histogram,
}

impl RouteMetrics {
    pub fn new(route: &str) -> RouteMetrics {
        let outcomes = OUTCOMES
            .iter()
            .map(|o| {
                let c = counter!("portcullis_requests_total", "route" => route.to_owned(), "outcome" => *o);
                c.increment(0);
                c
            })
            .collect();
        for scope in ["ip", "key"] {
            counter!("portcullis_rate_limited_total", "route" => route.to_owned(), "scope" => scope)
                .increment(0);
        }
        RouteMetrics {
            outcomes,
            duration: histogram!("portcullis_request_duration_seconds", "route" => route.to_owned()),
            upstream: histogram!("portcullis_upstream_duration_seconds", "route" => route.to_owned()),
        }
    }

    /// [`request`] for this route.
    pub fn request(&self, route: &str, outcome: &'static str, duration: Duration) {
        let known = OUTCOMES.iter().position(|o| *o == outcome);
        match known.and_then(|i| self.outcomes.get(i)) {
            Some(c) => c.increment(1),
            None => counter!("portcullis_requests_total", "route" => route.to_owned(), "outcome" => outcome)
                .increment(1),
        }
        self.duration.record(duration.as_secs_f64());
    }

    /// [`upstream`] for this route.
    pub fn upstream(&self, duration: Duration) {
        self.upstream.record(duration.as_secs_f64());
    }
}

pub fn upstream(route: &str, duration: Duration) {
    histogram!("portcullis_upstream_duration_seconds", "route" => route.to_owned())
        .record(duration.as_secs_f64());
}

pub fn connection_opened() {
    if let Some(f) = FIXED.get() {
        f.active.increment(1.0);
    }
}

pub fn connection_closed() {
    if let Some(f) = FIXED.get() {
        f.active.decrement(1.0);
    }
}

/// An idle HTTP/1.1 connection parked (its HTTP buffers released) or woken.
pub fn connection_parked(parked: bool) {
    if let Some(f) = FIXED.get() {
        if parked {
            f.parked.increment(1.0);
        } else {
            f.parked.decrement(1.0);
        }
    }
}

pub fn rate_limited(route: &str, scope: &'static str) {
    counter!("portcullis_rate_limited_total", "route" => route.to_owned(), "scope" => scope)
        .increment(1);
}

pub fn auth_failure(reason: &'static str) {
    let fixed = FIXED.get().and_then(|f| {
        let i = AUTH_FAILURES.iter().position(|r| *r == reason)?;
        f.auth_failures.get(i)
    });
    match fixed {
        Some(c) => c.increment(1),
        // Not one of the reasons registered at startup (or no recorder): the registry's lookup.
        None => counter!("portcullis_auth_failures_total", "reason" => reason).increment(1),
    }
}

/// `portcullis_key_expiry_timestamp_seconds{key_id}`, appended to a scrape from the live config
/// (not kept in the registry: a series there can never be removed, and a key removed or given no
/// `expires` by a reload must lose its series, or an expiry alert would fire on forever).
pub fn render_key_expiry<'a>(keys: impl Iterator<Item = (&'a str, f64)>) -> String {
    let mut out = String::new();
    for (i, (key_id, unix_seconds)) in keys.enumerate() {
        if i == 0 {
            out.push_str(
                "# HELP portcullis_key_expiry_timestamp_seconds When each key with `expires` stops working (Unix time)\n\
                 # TYPE portcullis_key_expiry_timestamp_seconds gauge\n",
            );
        }
        // Key ids are letters, digits, '-', '_' and '.': nothing to escape in a label value.
        out.push_str(&format!(
            "portcullis_key_expiry_timestamp_seconds{{key_id=\"{key_id}\"}} {unix_seconds}\n"
        ));
    }
    out
}

/// A client connection closed at accept (`per_ip`: `limits.max_connections_per_ip`).
pub fn connection_refused(reason: &'static str) {
    counter!("portcullis_connections_refused_total", "reason" => reason).increment(1);
}

/// A request waited for room in a full audit queue (the audit output is slower than traffic).
pub fn audit_backpressure() {
    counter!("portcullis_audit_waits_total").increment(1);
}

pub fn reload(result: &'static str) {
    counter!("portcullis_config_reloads_total", "result" => result).increment(1);
}

/// `model` must already be bounded: a name from a key's allow-list, or "other".
pub fn llm_usage(
    route: &str,
    key_id: &str,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost: Option<f64>,
) {
    for (kind, n) in [("prompt", prompt_tokens), ("completion", completion_tokens)] {
        counter!("portcullis_llm_tokens_total", "route" => route.to_owned(), "key_id" => key_id.to_owned(), "model" => model.clone(), "kind" => kind)
            .increment(n);
    }
    if let Some(c) = cost {
        // The `metrics` counters count integers; a monotonically increased gauge carries the
        // fractional dollar total (exported under the SPEC's name).
        gauge!("portcullis_llm_cost_usd_total", "key_id" => key_id.to_owned()).increment(c);
    }
}

/// `portcullis_jwks_refresh_errors_total{issuer}` at 0, when the issuer's `jwks_url` fetching
/// starts (so an `increase()` alert fires on the first failure too).
pub fn jwks_issuer(issuer: &str) {
    counter!("portcullis_jwks_refresh_errors_total", "issuer" => issuer.to_owned()).increment(0);
}

/// A fetch of an issuer's `jwks_url` failed.
pub fn jwks_refresh_error(issuer: &str) {
    counter!("portcullis_jwks_refresh_errors_total", "issuer" => issuer.to_owned()).increment(1);
}

pub fn ledger_error() {
    counter!("portcullis_ledger_errors_total").increment(1);
}

/// `portcullis_budget_remaining`: `key_id` is `*` for the gateway-wide `[budgets]` (no key id can
/// be `*`).
pub fn budget_remaining(key_id: Option<&str>, period: &'static str, unit: &'static str, left: f64) {
    gauge!(
        "portcullis_budget_remaining",
        "key_id" => key_id.unwrap_or("*").to_owned(),
        "period" => period,
        "unit" => unit
    )
    .set(left);
}

/// With `[cluster]`: its error counters exist from the first scrape.
pub fn cluster_configured() {
    for op in CLUSTER_OPS {
        counter!("portcullis_cluster_errors_total", "op" => op).absolute(0);
    }
}

/// What `[cluster]` asks Redis: `admit` (limits and lockout of a request), `reserve` and
/// `settle` (budgets).
pub const CLUSTER_OPS: [&str; 3] = ["admit", "reserve", "settle"];

/// A Redis round trip that failed or timed out (`op`: one of [`CLUSTER_OPS`]).
pub fn cluster_error(op: &'static str) {
    counter!("portcullis_cluster_errors_total", "op" => op).increment(1);
}

/// A Redis round trip that got an answer.
pub fn cluster_duration(d: Duration) {
    histogram!("portcullis_cluster_duration_seconds").record(d.as_secs_f64());
}
