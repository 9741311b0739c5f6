//! The end of a request (SPEC §4: exactly one `request` record for every request that reached
//! step 2, however it ended; §7: its charge).
//!
//! A [`Record`] is created when a request enters the pipeline and owns both its audit record
//! and, on `llm` routes, its charge. It writes them exactly once, whichever way the request ends
//! — tower-http's trace layer gives each exit a callback (`on_response`, `on_eos`, `on_failure`);
//! here each exit is an [`Ending`]:
//!
//! | how it ended | outcome | status |
//! |---|---|---|
//! | the response body ended (or was bodiless) | `forwarded` or the gateway's error code | as sent |
//! | the client went away first (the request future or the body dropped) | `client_closed` | as sent, 499 if nothing was |
//! | the upstream cut the body mid-way | `upstream_unavailable` | as sent |
//! | the body went silent for `stream_idle_timeout` | `upstream_timeout` | as sent |
//! | the client took no byte for `send_timeout` | `client_stalled` | as sent |
//! | cut when `shutdown_grace` ran out | `overloaded` | as sent, 503 if nothing was |
//!
//! Dropped without an explicit ending, a record writes itself as `client_closed`: that is what
//! hyper does to a request whose client hung up (HTTP/1.1 EOF, HTTP/2 RST_STREAM) — it drops the
//! request's future, or the response body. Nothing below this module (the audit writer, the
//! ledger) knows about outcomes or budgets.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::audit::Audit;
use crate::live::Live;
use crate::llm::budget::Amount;
use crate::llm::ledger::{Ledger, Row};
use crate::llm::meter::{Exchange, Meter};
use crate::llm::usage::{LlmRecord, Reading};
use crate::metrics::RouteMetrics;
use crate::proxy::frames::Flow;

/// SPEC §3.4 "Bounded records": a client cannot make one record arbitrarily large.
const MAX_USER_AGENT: usize = 512;
const MAX_PATH: usize = 2048;

/// Set when `shutdown_grace` has run out and the remaining requests are being cut: their
/// records say `overloaded` (the gateway, not the client, ended them).
static CUT_BY_SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// From now on, requests that end without their response are being cut by shutdown.
pub fn cutting_for_shutdown() {
    CUT_BY_SHUTDOWN.store(true, Ordering::Relaxed);
}

/// The `request` record (SPEC §4).
#[derive(Serialize)]
pub struct RequestRecord {
    pub ts: String,
    pub event: &'static str,
    pub request_id: String,
    pub client_ip: IpAddr,
    pub method: std::borrow::Cow<'static, str>,
    pub path: String,
    pub route: Option<String>,
    pub key_id: Option<String>,
    /// The key's user, from its `user_header` (SPEC §8); absent when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub status: u16,
    pub outcome: &'static str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
    pub user_agent: Option<String>,
    /// SPEC §7: model, tokens, cost and their sources, on `llm` routes only.
    #[serde(flatten)]
    pub llm: Option<LlmRecord>,
}

impl RequestRecord {
    /// The record as one line of JSON, byte for byte what the derived `Serialize` writes (the
    /// `write_json_is_the_derived_serialization` test checks it). Written field by field:
    /// `#[serde(flatten)]` sends the derived code through serde's map machinery, a tenth of a
    /// proxied request's instructions.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        fn field<T: Serialize + ?Sized>(
            out: &mut Vec<u8>,
            key: &str,
            value: &T,
        ) -> serde_json::Result<()> {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            serde_json::to_writer(&mut *out, value)
        }
        out.extend_from_slice(b"{\"ts\":");
        serde_json::to_writer(&mut *out, &self.ts)?;
        field(out, "event", self.event)?;
        field(out, "request_id", &self.request_id)?;
        field(out, "client_ip", &self.client_ip)?;
        field(out, "method", &*self.method)?;
        field(out, "path", &self.path)?;
        field(out, "route", &self.route)?;
        field(out, "key_id", &self.key_id)?;
        if let Some(user) = &self.user {
            field(out, "user", user)?;
        }
        field(out, "status", &self.status)?;
        field(out, "outcome", self.outcome)?;
        field(out, "bytes_in", &self.bytes_in)?;
        field(out, "bytes_out", &self.bytes_out)?;
        field(out, "duration_ms", &self.duration_ms)?;
        field(out, "upstream_ms", &self.upstream_ms)?;
        field(out, "user_agent", &self.user_agent)?;
        if let Some(llm) = &self.llm {
            // Flattened: the llm object's fields continue this one's.
            let start = out.len();
            serde_json::to_writer(&mut *out, llm)?;
            if out.len() - start <= 2 {
                out.truncate(start);
            } else {
                out[start] = b',';
                out.pop();
            }
        }
        out.push(b'}');
        Ok(())
    }
}

/// How a request ended (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Complete,
    ClientGone,
    UpstreamCut,
    UpstreamIdle,
    /// The client stopped reading for `send_timeout` (SPEC §3.4 "Slow readers").
    ClientStalled,
}

/// One request's record and charge, written once (see the module doc).
pub struct Record {
    audit: Audit,
    ledger: Option<Ledger>,
    /// The config the request started under: prices and model labels for its charge.
    live: Arc<Live>,
    fields: RequestRecord,
    start: Instant,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
    /// The matched route's request series.
    pub metrics: Option<Arc<RouteMetrics>>,
    /// On `llm` routes: the request's metering.
    pub meter: Option<Meter>,
    /// How far the exchange with the upstream got (what the request is charged for).
    pub exchange: Exchange,
    /// The status of the response handed to the client, once there is one.
    sent: Option<u16>,
    outcome: &'static str,
    /// A bodiless response (HEAD, 204, 304, an empty body): hyper drops it unread, and that is
    /// its end, not the client's going away.
    dropped_means_complete: bool,
    written: bool,
    /// A realtime session's responses, charged one by one (SPEC §8).
    session: Option<Session>,
    /// For a JWT identity: its issuer's name, the only part metrics may carry.
    subject_label: Option<String>,
}

/// What a realtime session's responses added up to; its record carries the totals at close.
#[derive(Debug, Default)]
struct Session {
    responses: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: Option<f64>,
    cost_source: Option<&'static str>,
    /// The `usage_source` of responses without usage the gateway believes (charged the
    /// reservation instead): `invalid` once one was invalid, else `none`.
    unreported: Option<&'static str>,
    /// Responses begun (`response.created`) and not yet done: charged their reservation if the
    /// session ends first, so hanging up before `response.done` does not make a response free.
    open: u64,
}

/// `s` cut to at most `max` bytes on a character boundary, with `…` marking the cut.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Record {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        audit: Audit,
        ledger: Option<Ledger>,
        live: Arc<Live>,
        start: Instant,
        request_id: String,
        client_ip: IpAddr,
        method: std::borrow::Cow<'static, str>,
        path: &str,
        user_agent: Option<String>,
    ) -> Record {
        Record {
            audit,
            ledger,
            live,
            fields: RequestRecord {
                ts: String::new(),
                event: "request",
                request_id,
                client_ip,
                method,
                path: bounded(path.to_owned(), MAX_PATH),
                route: None,
                key_id: None,
                user: None,
                status: 0,
                outcome: "forwarded",
                bytes_in: 0,
                bytes_out: 0,
                duration_ms: 0.0,
                upstream_ms: None,
                user_agent: user_agent.map(|u| bounded(u, MAX_USER_AGENT)),
                llm: None,
            },
            start,
            bytes_in: Arc::default(),
            bytes_out: Arc::default(),
            metrics: None,
            meter: None,
            exchange: Exchange::NotSent,
            sent: None,
            outcome: "forwarded",
            dropped_means_complete: false,
            written: false,
            session: None,
            subject_label: None,
        }
    }

    pub fn set_route(&mut self, name: &str, metrics: Arc<RouteMetrics>) {
        self.fields.route = Some(name.to_owned());
        self.metrics = Some(metrics);
    }

    pub fn set_key(&mut self, id: &str) {
        self.fields.key_id = Some(id.to_owned());
    }

    /// A JWT's identity (`<issuer name>:<sub>`), recorded as the request's `key_id`; metrics
    /// name only the issuer (subjects are unbounded).
    pub fn set_subject(&mut self, identity: &str, issuer: &str) {
        self.fields.key_id = Some(identity.to_owned());
        self.subject_label = Some(issuer.to_owned());
    }

    /// The JWT identity this request authenticated as and its issuer's name, if any.
    pub fn subject_with_issuer(&self) -> Option<(&str, &str)> {
        Some((
            self.fields.key_id.as_deref()?,
            self.subject_label.as_deref()?,
        ))
    }

    pub fn set_user(&mut self, user: &str) {
        self.fields.user = Some(user.to_owned());
    }

    /// The key's user, once authentication read it.
    pub fn user(&self) -> Option<&str> {
        self.fields.user.as_deref()
    }

    pub fn set_upstream_ms(&mut self, ms: f64) {
        self.fields.upstream_ms = Some(ms);
    }

    /// The response the client is handed: its status, and the outcome the record will carry if
    /// the response ends as meant. `bodiless`: nothing will be read of its body.
    pub fn responded(&mut self, status: u16, outcome: &'static str, bodiless: bool) {
        self.sent = Some(status);
        self.outcome = outcome;
        self.dropped_means_complete = bodiless;
    }

    /// Writes the record and the charge. Called once; later calls (and the drop) do nothing.
    pub fn end(&mut self, ending: Ending) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let shutdown = CUT_BY_SHUTDOWN.load(Ordering::Relaxed);
        let (outcome, unsent) = match ending {
            Ending::Complete => (self.outcome, 499),
            Ending::ClientGone if shutdown => ("overloaded", 503),
            Ending::ClientGone => ("client_closed", 499),
            Ending::UpstreamCut => ("upstream_unavailable", 502),
            Ending::UpstreamIdle => ("upstream_timeout", 504),
            Ending::ClientStalled => ("client_stalled", 499),
        };
        let f = &mut self.fields;
        f.outcome = outcome;
        f.status = self.sent.unwrap_or(unsent);
        f.ts = crate::clock::now_rfc3339();
        f.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        f.bytes_out = self.bytes_out.load(Ordering::Relaxed);
        if let Some(meter) = self.meter.take() {
            self.settle(meter);
        }
        let f = &mut self.fields;
        let elapsed = self.start.elapsed();
        f.duration_ms = crate::clock::ms(elapsed);
        match (&self.metrics, &f.route) {
            (Some(m), Some(route)) => m.request(route, f.outcome, elapsed),
            _ => crate::metrics::request(f.route.as_deref(), f.outcome, elapsed),
        }
        // Sized for a typical record up front: growing from empty costs half a dozen reallocs.
        let mut line = Vec::with_capacity(512);
        match self.fields.write_json(&mut line) {
            Ok(()) => {
                line.push(b'\n');
                self.audit.emit_line(line);
            }
            Err(e) => tracing::error!(error = %e, "request record could not be serialized"),
        }
    }

    /// Whether this request is an admitted `llm` WebSocket session, whose upstream messages are
    /// to be shown to [`Record::realtime_message`].
    pub fn meters_realtime(&self) -> bool {
        self.meter.as_ref().is_some_and(|m| m.admitted)
    }

    /// One server-to-client text message of a realtime session (SPEC §8): a `response.done` is
    /// charged at once (its usage; without usage the gateway believes, the handshake's
    /// reservation), gets its ledger row and metrics, and adds to the session's totals.
    /// [`Flow::Stop`] when a cap is now spent: the session is to be closed.
    pub fn realtime_message(&mut self, message: &[u8]) -> Flow {
        use crate::llm::usage::RealtimeEvent;
        let reading = match crate::llm::usage::realtime_event(message) {
            None => return Flow::Continue,
            Some(RealtimeEvent::Created) => {
                self.session.get_or_insert_with(Session::default).open += 1;
                return Flow::Continue;
            }
            Some(RealtimeEvent::Done(r)) => r,
        };
        let Some(meter) = &self.meter else {
            return Flow::Continue;
        };
        let usage = self.live.config.usage.as_ref();
        let price = usage.and_then(|u| u.price(meter.model.as_deref(), None));
        let rec = LlmRecord::new(meter.model.clone(), reading, price);
        let reservation = meter.reservation.as_ref();
        let charged = match reading {
            Reading::Valid(u) => Amount {
                tokens: u.tokens() as f64,
                cost: rec.cost_usd.unwrap_or(0.0),
            },
            _ => reservation.map(|r| r.amount()).unwrap_or_default(),
        };
        let spent = self.charge_response(reservation, &rec, charged);
        let s = self.session.get_or_insert_with(Session::default);
        s.responses += 1;
        s.open = s.open.saturating_sub(1);
        match (rec.prompt_tokens, rec.completion_tokens) {
            (Some(p), Some(c)) => {
                s.prompt_tokens += p;
                s.completion_tokens += c;
                if let Some(cost) = rec.cost_usd {
                    s.cost_usd = Some(s.cost_usd.unwrap_or(0.0) + cost);
                    s.cost_source = s.cost_source.or(rec.cost_source);
                }
            }
            _ if s.unreported == Some("invalid") => {}
            _ => s.unreported = Some(rec.usage_source),
        }
        if spent { Flow::Stop } else { Flow::Continue }
    }

    /// Charges one realtime response on top of the session's reservation, with its `budget`
    /// events, metrics and ledger row; true when a cap is now spent.
    fn charge_response(
        &self,
        reservation: Option<&crate::llm::budget::Reservation>,
        rec: &LlmRecord,
        charged: Amount,
    ) -> bool {
        let (events, spent) = match reservation {
            Some(r) => r.charge(charged, crate::clock::now_secs()),
            None => (Vec::new(), false),
        };
        for e in &events {
            self.audit.emit(e);
        }
        self.account(rec, charged);
        spent
    }

    /// The metrics and the ledger row of one charge: a request's, or a realtime response's.
    fn account(&self, rec: &LlmRecord, charged: Amount) {
        self.usage_metrics(rec);
        let f = &self.fields;
        if let (Some(ledger), Some(route)) = (&self.ledger, &f.route) {
            ledger.record(Row {
                ts_ms: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
                request_id: f.request_id.clone(),
                key_id: f.key_id.clone(),
                user: f.user.clone(),
                route: route.clone(),
                model: rec.model.clone(),
                prompt_tokens: rec.prompt_tokens,
                completion_tokens: rec.completion_tokens,
                cost_usd: rec.cost_usd,
                usage_source: rec.usage_source,
                charged_tokens: charged.tokens as u64,
                charged_cost: charged.cost,
            });
        }
    }

    /// The charge (SPEC §7's table), its budget events, metrics and ledger row.
    fn settle(&mut self, meter: Meter) {
        // A realtime session that ends with responses begun and not done (the client hung up,
        // the upstream cut it): each is charged the handshake's reservation, as a request the
        // upstream received without reporting usage would be.
        if let Some(mut s) = self.session.take() {
            let amount = meter.reservation.as_ref().map(|r| r.amount());
            for _ in 0..std::mem::take(&mut s.open) {
                let rec = LlmRecord::new(meter.model.clone(), Reading::Absent, None);
                let charged = amount.unwrap_or_default();
                self.charge_response(meter.reservation.as_ref(), &rec, charged);
                s.responses += 1;
                s.unreported = s.unreported.or(Some("none"));
            }
            self.session = Some(s);
        }
        let usage = self.live.config.usage.as_ref();
        let settled = meter.settle(self.exchange, |req, resp| usage?.price(req, resp));
        for e in &settled.events {
            self.audit.emit(e);
        }
        if let Some(s) = self.session.take() {
            // A realtime session: each response was charged and written as it came; its record
            // carries the totals (the handshake's reservation is released, charging nothing).
            let mut rec = settled.record;
            rec.prompt_tokens = Some(s.prompt_tokens);
            rec.completion_tokens = Some(s.completion_tokens);
            rec.cost_usd = s.cost_usd;
            rec.cost_source = s.cost_source;
            rec.usage_source = s.unreported.unwrap_or("upstream");
            self.fields.llm = Some(rec);
            return;
        }
        let rec = settled.record;
        if settled.admitted {
            self.account(&rec, settled.charged);
        } else {
            self.usage_metrics(&rec);
        }
        self.fields.llm = Some(rec);
    }

    /// The token and cost counters of a charge that reported usage. A JWT identity is labelled
    /// by its issuer only (subjects are unbounded).
    fn usage_metrics(&self, rec: &LlmRecord) {
        let f = &self.fields;
        if let (Some(p), Some(c)) = (rec.prompt_tokens, rec.completion_tokens) {
            crate::metrics::llm_usage(
                f.route.as_deref().unwrap_or("none"),
                self.subject_label
                    .as_deref()
                    .or(f.key_id.as_deref())
                    .unwrap_or("none"),
                self.live.model_label(rec.model.as_deref()),
                p,
                c,
                rec.cost_usd,
            );
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let ending = if self.dropped_means_complete {
            Ending::Complete
        } else {
            Ending::ClientGone
        };
        self.end(ending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_json_is_the_derived_serialization() {
        let mut rec = RequestRecord {
            ts: "2026-12-01T14:13:38.123Z".to_owned(),
            event: "request",
            request_id: "01JDZ0000000000000000000".to_owned(),
            client_ip: "2001:db8::1".parse().unwrap(),
            method: "PROPFIND".to_owned().into(),
            path: "/v1/\"quoted\"\\back\u{1}\u{7f}é\u{2028}".to_owned(),
            route: Some("r\n".to_owned()),
            key_id: None,
            user: Some("alice \"a\"".to_owned()),
            status: 499,
            outcome: "client_closed",
            bytes_in: u64::MAX,
            bytes_out: 0,
            duration_ms: 12.3,
            upstream_ms: None,
            user_agent: Some("\t<ua>\u{0}".to_owned()),
            llm: None,
        };
        let check = |rec: &RequestRecord| {
            let mut ours = Vec::new();
            rec.write_json(&mut ours).unwrap();
            let derived = serde_json::to_vec(rec).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&derived)
            );
        };
        check(&rec);
        rec.user = None;
        rec.client_ip = "192.0.2.7".parse().unwrap();
        rec.upstream_ms = Some(0.1);
        rec.duration_ms = f64::NAN;
        rec.llm = Some(LlmRecord::default());
        check(&rec);
        rec.duration_ms = 1e21;
        rec.llm = Some(LlmRecord {
            model: Some("openai/gpt-4o-mini".to_owned()),
            prompt_tokens: Some(12),
            completion_tokens: Some(3),
            cost_usd: Some(0.000_012_5),
            usage_source: "upstream",
            cost_source: Some("prices"),
        });
        check(&rec);
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("short".into(), 10), "short");
        let cut = bounded("é".repeat(600), MAX_USER_AGENT);
        assert!(
            cut.len() <= MAX_USER_AGENT && cut.ends_with('…'),
            "{}",
            cut.len()
        );
        let cut = bounded("a".repeat(5000), MAX_PATH);
        assert_eq!(cut.len(), MAX_PATH);
    }
}
