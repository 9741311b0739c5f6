//! Every request accounted (SPEC §4 one `request` record per request, §7 "how each ending is
//! charged"): a client that hangs up before the head (499) or mid-stream, an upstream that cuts a
//! stream or times out, and an answer without usage each leave exactly one record and one ledger
//! row charged the request's reservation (ceil(body bytes / 4) plus its largest limit field, else
//! 1024, times `n` or `best_of`), so abandoned requests spend a budget; 50 parallel requests, half
//! abandoned, are charged exactly what the table says. The gateway's own refusals and requests
//! the upstream never received charge nothing; limit fields that are not non-negative integers
//! are 400. Usage that is negative, not finite or huge is `invalid` and charged like none, usage
//! on a GET is ignored (a negative cost cannot refund a budget). Cost caps price unknown models at
//! the fallback price, and `check` refuses a cost cap without prices and a retention shorter than
//! a budget period.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;

const KEY: &str = "pcx_accounting-phone-0123456789abcdefghijklm";
/// A token budget no test here comes near: reservations are made, nothing is refused.
const BIG: &str = "budget = { tokens_per_day = 100000000 }";
/// What the test upstream's answers use: 11 + 5 tokens (JSON), 21 + 3 (SSE with usage).
const JSON_USAGE: u64 = 16;
const SSE_USAGE: u64 = 24;

/// A chat request asking for at most `max_tokens`.
fn chat(max_tokens: u64, stream: bool) -> String {
    json!({"model": "m", "messages": [], "stream": stream, "max_tokens": max_tokens}).to_string()
}

/// What `body` reserves when its completion part (limit field × `n`) is `completion`.
fn reservation(body: &str, completion: u64) -> u64 {
    body.len().div_ceil(4) as u64 + completion
}

// ---------------------------------------------------------------- the gateway under test

/// How a test's gateway is configured; the default is the phone key with a `BIG` budget.
struct Setup<'a> {
    /// The phone key's `budget = …` line.
    budget: &'a str,
    /// Extra lines of the `bridge` route.
    route: &'a str,
    /// Extra lines of `[usage]` (may open `[usage.prices."…"]`).
    usage: &'a str,
    /// The route points at an address nothing listens on.
    dead_upstream: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            budget: BIG,
            route: "",
            usage: "",
            dead_upstream: false,
        }
    }
}

/// A gateway with an `llm` route to the test upstream and a ledger in a temporary directory.
/// The upstream's gate is never opened here, so its `held` count is every request that reached
/// it with `?hold=1`.
struct Bench {
    up: Upstream,
    gw: Gateway,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bench {
    async fn start(s: Setup<'_>) -> Bench {
        let up = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("usage.db");
        let url = if s.dead_upstream {
            format!("http://{}", dead_addr().await)
        } else {
            up.url()
        };
        let config = format!(
            "{}[limits]\nper_ip = \"off\"\nper_key = \"off\"\n[usage]\ndatabase = \"{}\"\n{}\n{}\
             [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{url}\"\nllm = true\n{}\n",
            server_section(""),
            db.display(),
            s.usage,
            key_block("phone", KEY, s.budget),
            s.route
        );
        let gw = Gateway::start(&config).await;
        Bench {
            up,
            gw,
            db,
            _dir: dir,
        }
    }

    fn post(&self, query: &str, body: &str) -> reqwest::RequestBuilder {
        client()
            .post(self.gw.url(&format!("/v1/chat/completions{query}")))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body.to_owned())
    }

    /// POSTs `body` and reads the answer: (status, request id, body text).
    async fn ask(&self, query: &str, body: &str) -> (u16, String, String) {
        answer(self.post(query, body)).await
    }

    /// Sends `body` to wait at the upstream's gate and hangs up once `held` requests are there
    /// (this one among them): the upstream received it, the client never got a head.
    async fn give_up_before_head(&self, body: &str, held: usize) {
        let mut at_gate = self.up.gate.watch_held();
        tokio::select! {
            r = self.post("?hold=1", body).send() => panic!("answered while held: {r:?}"),
            r = tokio::time::timeout(WAIT, at_gate.wait_for(|n| *n >= held)) => {
                r.expect("requests held at the gate").unwrap();
            }
        }
    }

    /// Sends a stream that stalls after its first event, reads that event and hangs up.
    async fn give_up_mid_stream(&self, body: &str) {
        let resp = self.post("?stall_ms=3000", body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut events = resp.bytes_stream();
        let first = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the first event")
            .unwrap()
            .unwrap();
        assert!(first.starts_with(b"data: "), "{first:?}");
    }

    /// Stops the gateway and returns every request record and ledger row: the `shutdown` event
    /// is written after the last request record and the ledger's final flush.
    async fn shut_down(&self) -> (Vec<Value>, Vec<Charge>) {
        self.gw.signal("TERM");
        self.gw.wait_events("shutdown", 1).await;
        (self.gw.requests(), ledger_rows(&self.db).unwrap())
    }

    /// Waits for the one request's record, shuts down, and checks that it is the only record
    /// and has the only ledger row.
    async fn only_record(&self) -> (Value, Charge) {
        self.gw.wait_requests(1).await;
        let (mut recs, mut rows) = self.shut_down().await;
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(rows.len(), 1, "{rows:?}");
        let (rec, row) = (recs.remove(0), rows.remove(0));
        assert_eq!(rec["request_id"].as_str(), Some(row.request_id.as_str()));
        (rec, row)
    }
}

/// Sends a request and reads the answer: (status, request id, body text).
async fn answer(req: reqwest::RequestBuilder) -> (u16, String, String) {
    let r = req.send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    (r.status().as_u16(), id, r.text().await.unwrap())
}

fn assert_ending(rec: &Value, outcome: &str, status: u16) {
    assert_eq!(rec["outcome"], outcome, "{rec}");
    assert_eq!(rec["status"], status, "{rec}");
}

fn assert_close(got: Option<f64>, want: f64) {
    let got = got.expect("a cost");
    assert!((got - want).abs() < 1e-12, "cost {got}, expected {want}");
}

// ---------------------------------------------------------------- the ledger

/// One ledger row: what it recorded and what it charged against budgets.
#[derive(Debug)]
struct Charge {
    request_id: String,
    usage_source: String,
    tokens: Option<u64>,
    cost: Option<f64>,
}

fn ledger_rows(db: &Path) -> rusqlite::Result<Vec<Charge>> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = rusqlite::Connection::open_with_flags(db, flags)?;
    let mut stmt = conn.prepare(
        "SELECT request_id, usage_source, charged_tokens, charged_cost FROM usage ORDER BY rowid",
    )?;
    stmt.query_map([], |r| {
        Ok(Charge {
            request_id: r.get(0)?,
            usage_source: r.get(1)?,
            tokens: r.get::<_, Option<i64>>(2)?.map(|t| t as u64),
            cost: r.get(3)?,
        })
    })?
    .collect()
}

/// Waits (bounded) until the ledger holds `n` rows; returns them all. The rows come from the
/// gateway's batching writer thread and SQLite has no change notification for another process,
/// so the file is re-read at a short interval.
async fn wait_ledger_rows(db: &Path, n: usize) -> Vec<Charge> {
    let deadline = Instant::now() + WAIT;
    loop {
        match ledger_rows(db) {
            Ok(rows) if rows.len() >= n => return rows,
            other => assert!(Instant::now() < deadline, "{n} rows awaited: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ledger row of request `id`.
fn row<'a>(rows: &'a [Charge], id: &str) -> &'a Charge {
    rows.iter()
        .find(|r| r.request_id == id)
        .unwrap_or_else(|| panic!("no ledger row for {id}: {rows:?}"))
}

// ---------------------------------------------------------------- one ending each

#[tokio::test]
async fn a_client_gone_before_the_head_is_recorded_499_and_charged_its_reservation() {
    let b = Bench::start(Setup::default()).await;
    let body = chat(100, false);
    b.give_up_before_head(&body, 1).await;
    let (rec, row) = b.only_record().await;
    assert_ending(&rec, "client_closed", 499);
    assert_eq!(rec["bytes_out"], 0, "{rec}");
    assert_eq!(row.tokens, Some(reservation(&body, 100)));
}

#[tokio::test]
async fn a_client_gone_mid_stream_is_recorded_client_closed_and_charged_its_reservation() {
    let b = Bench::start(Setup::default()).await;
    // The client sends no `stream_options`: the gateway adds them, but reserves by what it got.
    let body = chat(100, true);
    b.give_up_mid_stream(&body).await;
    let (rec, row) = b.only_record().await;
    assert_ending(&rec, "client_closed", 200);
    assert!(rec["bytes_out"].as_u64() > Some(0), "{rec}");
    assert_eq!(row.tokens, Some(reservation(&body, 100)));
}

#[tokio::test]
async fn an_upstream_cut_mid_stream_is_recorded_unavailable_and_charged_its_reservation() {
    let b = Bench::start(Setup::default()).await;
    let body = chat(100, true);
    let resp = b.post("?cut=1", &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rest = tokio::time::timeout(WAIT, resp.bytes()).await.unwrap();
    assert!(rest.is_err(), "the client must see the stream break");
    let (rec, row) = b.only_record().await;
    assert_ending(&rec, "upstream_unavailable", 200);
    assert_eq!(row.tokens, Some(reservation(&body, 100)));
}

#[tokio::test]
async fn an_upstream_timeout_is_recorded_504_and_charged_its_reservation() {
    let b = Bench::start(Setup {
        route: "timeout = \"1s\"",
        ..Setup::default()
    })
    .await;
    let body = chat(100, false);
    let (status, _, text) = b.ask("?delay_ms=3000", &body).await;
    assert_eq!(status, 504, "{text}");
    assert!(text.contains("\"upstream_timeout\""), "{text}");
    let (rec, row) = b.only_record().await;
    assert_ending(&rec, "upstream_timeout", 504);
    assert_eq!(row.tokens, Some(reservation(&body, 100)));
}

#[tokio::test]
async fn a_request_the_upstream_never_received_is_charged_nothing() {
    let b = Bench::start(Setup {
        dead_upstream: true,
        ..Setup::default()
    })
    .await;
    let (status, _, text) = b.ask("", &chat(100, false)).await;
    assert_eq!(status, 502, "{text}");
    let (rec, row) = b.only_record().await;
    assert_ending(&rec, "upstream_unavailable", 502);
    assert_eq!(row.tokens, Some(0));
}

// ---------------------------------------------------------------- budgets and many requests

#[tokio::test]
async fn abandoned_requests_spend_a_budget_and_the_next_is_refused_with_its_model() {
    let body = chat(100, false);
    let res = reservation(&body, 100);
    // Three reservations fit exactly; a fourth would not.
    let budget = format!("budget = {{ tokens_per_day = {} }}", 3 * res);
    let b = Bench::start(Setup {
        budget: &budget,
        ..Setup::default()
    })
    .await;
    for i in 1..=3 {
        b.give_up_before_head(&body, i).await;
        b.gw.wait_requests(i).await;
    }
    let (status, _, text) = b.ask("", &body).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("\"budget_exceeded\""), "{text}");
    assert_eq!(b.up.seen().len(), 3, "the refused request was forwarded");
    let recs = b.gw.wait_requests(4).await;
    assert_ending(&recs[3], "budget_exceeded", 429);
    assert_eq!(recs[3]["model"], "m");
    let rows = wait_ledger_rows(&b.db, 3).await;
    let charged: u64 = rows.iter().filter_map(|r| r.tokens).sum();
    assert_eq!(charged, 3 * res, "{rows:?}");
}

/// How one of the parallel requests ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    GoneBeforeHead,
    GoneMidStream,
    Json,
    Sse,
}

/// `n` fates from a fixed-seed LCG: pseudo-random, the same on every run.
fn fates(n: usize) -> Vec<Fate> {
    let all = [
        Fate::GoneBeforeHead,
        Fate::GoneMidStream,
        Fate::Json,
        Fate::Sse,
    ];
    let mut x: u64 = 0x5eed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            all[(x >> 33) as usize % all.len()]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_requests_half_abandoned_leave_fifty_records_and_exact_charges() {
    let b = Bench::start(Setup::default()).await;
    let fates = fates(50);
    let count = |f: Fate| fates.iter().filter(|x| **x == f).count();
    for f in [
        Fate::GoneBeforeHead,
        Fate::GoneMidStream,
        Fate::Json,
        Fate::Sse,
    ] {
        assert!(count(f) > 0, "the seed gives no {f:?}");
    }
    let held = count(Fate::GoneBeforeHead);
    // Each request asks for a different completion, so each has its own reservation.
    let plan: Vec<(Fate, String, u64)> = fates
        .iter()
        .enumerate()
        .map(|(i, &fate)| {
            let max = 10 + i as u64;
            let body = chat(max, matches!(fate, Fate::GoneMidStream | Fate::Sse));
            let charge = match fate {
                Fate::GoneBeforeHead | Fate::GoneMidStream => reservation(&body, max),
                Fate::Json => JSON_USAGE,
                Fate::Sse => SSE_USAGE,
            };
            (fate, body, charge)
        })
        .collect();
    let runs = plan.iter().map(|(fate, body, _)| {
        let b = &b;
        async move {
            match fate {
                // Those before the head hang up together, once all of them are at the gate.
                Fate::GoneBeforeHead => b.give_up_before_head(body, held).await,
                Fate::GoneMidStream => b.give_up_mid_stream(body).await,
                Fate::Json | Fate::Sse => {
                    let (status, _, text) = b.ask("", body).await;
                    assert_eq!(status, 200, "{text}");
                }
            }
        }
    });
    futures_util::future::join_all(runs).await;

    b.gw.wait_requests(50).await;
    let (recs, rows) = b.shut_down().await;
    assert_eq!(recs.len(), 50);
    let closed = recs.iter().filter(|r| r["outcome"] == "client_closed");
    assert_eq!(closed.count(), held + count(Fate::GoneMidStream));
    assert_eq!(recs.iter().filter(|r| r["status"] == 499).count(), held);
    assert_eq!(rows.len(), 50);
    let charged: u64 = rows.iter().map(|r| r.tokens.expect("charged_tokens")).sum();
    let expected: u64 = plan.iter().map(|(_, _, charge)| charge).sum();
    assert_eq!(charged, expected);
}

// ---------------------------------------------------------------- reservations

#[tokio::test]
async fn a_reservation_holds_the_largest_limit_field_times_n_or_best_of() {
    let b = Bench::start(Setup::default()).await;
    // The answers carry no usage: each request is charged its reservation.
    let cases = [
        (json!({"model": "m", "n": 4, "max_tokens": 10}), 40),
        (
            json!({"model": "m", "max_tokens": 1, "max_completion_tokens": 16000}),
            16000,
        ),
        (
            json!({"model": "m", "best_of": 3, "max_output_tokens": 7}),
            21,
        ),
        (json!({"model": "m", "n": 2}), 2 * 1024),
    ];
    let mut expected = Vec::new();
    for (body, completion) in &cases {
        let body = body.to_string();
        let (status, id, text) = b.ask("?no_usage=1", &body).await;
        assert_eq!(status, 200, "{text}");
        let want = reservation(&body, *completion);
        expected.push((id, body, want));
    }
    let rows = wait_ledger_rows(&b.db, cases.len()).await;
    for (id, body, want) in expected {
        let r = row(&rows, &id);
        assert_eq!(r.tokens, Some(want), "{body}");
        assert_eq!(r.usage_source, "none", "{body}");
    }
}

#[tokio::test]
async fn a_limit_field_that_is_not_a_non_negative_integer_is_400_and_charges_nothing() {
    let b = Bench::start(Setup::default()).await;
    let bodies = [
        json!({"model": "m", "max_tokens": "16000"}),
        json!({"model": "m", "max_output_tokens": -1}),
        json!({"model": "m", "n": 1.5}),
    ];
    for body in &bodies {
        let (status, _, text) = b.ask("", &body.to_string()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains("\"bad_request\""), "{body}: {text}");
    }
    assert!(b.up.seen().is_empty(), "forwarded: {:?}", b.up.targets());
    b.gw.wait_requests(bodies.len()).await;
    let (recs, rows) = b.shut_down().await;
    assert_eq!(recs.len(), bodies.len());
    for rec in &recs {
        assert_ending(rec, "bad_request", 400);
    }
    assert!(rows.iter().all(|r| r.tokens == Some(0)), "{rows:?}");
}

// ---------------------------------------------------------------- cost

#[tokio::test]
async fn a_model_without_a_price_is_costed_at_the_fallback_price() {
    // Default fallback: the highest input and output prices of the table (1.0 and 2.0).
    for (fallback, want) in [
        ("", (11.0 * 1.0 + 5.0 * 2.0) / 1e6),
        (
            "fallback_price = { input = 3.0, output = 4.0 }\n",
            (11.0 * 3.0 + 5.0 * 4.0) / 1e6,
        ),
    ] {
        let usage = format!("{fallback}[usage.prices.\"known-model\"]\ninput = 1.0\noutput = 2.0");
        let b = Bench::start(Setup {
            budget: "budget = { cost_per_day = 1.0 }",
            usage: &usage,
            ..Setup::default()
        })
        .await;
        let body = json!({"model": "unknown-model", "max_tokens": 10}).to_string();
        let (status, _, text) = b.ask("", &body).await;
        assert_eq!(status, 200, "{text}");
        let rec = &b.gw.wait_requests(1).await[0];
        assert_eq!(rec["cost_source"], "fallback", "{fallback}: {rec}");
        assert_close(rec["cost_usd"].as_f64(), want);
        assert_close(wait_ledger_rows(&b.db, 1).await[0].cost, want);
    }
}

// ---------------------------------------------------------------- config rules

const ROUTE: &str = "[[routes]]\nname = \"api\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:8000\"\nllm = true\n";

/// `portcullis check` on `[usage]` (with a ledger and `usage`'s lines), `rest`, the phone key
/// with `key_extra`, and a route.
fn check_usage(usage: &str, rest: &str, key_extra: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let config = format!(
        "[usage]\ndatabase = \"{}\"\n{usage}\n{rest}\n{}{ROUTE}",
        db.display(),
        key_block("phone", KEY, key_extra)
    );
    let (code, _, err) = check(&config, &[]);
    (code, err)
}

/// True when `err` points into the config file at a line: `portcullis.toml:<line>:`.
fn names_a_line(err: &str) -> bool {
    err.split("portcullis.toml:").skip(1).any(|rest| {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(':')
    })
}

#[test]
fn a_cost_cap_without_any_price_is_a_config_error_at_its_line() {
    let key_cap = "budget = { cost_per_day = 1.0 }";
    for (rest, key_extra, path) in [
        ("", key_cap, "keys[0].budget"),
        ("[budgets]\ncost_per_day = 1.0", "", "budgets"),
    ] {
        let (code, err) = check_usage("", rest, key_extra);
        assert_eq!(code, 1, "a cost cap with no price was accepted: {err}");
        assert!(err.contains(path), "missing {path:?} in: {err}");
        assert!(names_a_line(&err), "no line in: {err}");
    }
    // A fallback price is enough to price it.
    let fallback = "fallback_price = { input = 1.0, output = 2.0 }";
    let (code, err) = check_usage(fallback, "", key_cap);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn usage_retention_must_cover_every_budgeted_period() {
    for (retention, cap, accepted) in [
        ("30d", "tokens_per_month", false),
        ("32d", "tokens_per_month", true),
        ("7d", "tokens_per_week", false),
        ("8d", "tokens_per_week", true),
    ] {
        let (code, err) = check_usage(
            &format!("retention = \"{retention}\""),
            &format!("[budgets]\n{cap} = 1000"),
            "",
        );
        let case = format!("retention {retention} with {cap}");
        if accepted {
            assert_eq!(code, 0, "{case}: {err}");
        } else {
            assert_eq!(code, 1, "{case} was accepted");
            assert!(err.contains("usage.retention"), "{case}: {err}");
        }
    }
}

// ---------------------------------------------------------------- untrusted usage

#[tokio::test]
async fn usage_that_is_negative_not_finite_or_huge_is_invalid_and_charged_the_reservation() {
    let b = Bench::start(Setup::default()).await;
    let body = chat(100, false);
    let mut ids = Vec::new();
    for usage in [
        r#"{"prompt_tokens":-5,"completion_tokens":3}"#,
        r#"{"prompt_tokens":NaN,"completion_tokens":3}"#,
        r#"{"prompt_tokens":2000000000,"completion_tokens":3}"#,
    ] {
        let (status, id, _) = b
            .ask(&format!("?usage={}", percent_encode(usage)), &body)
            .await;
        assert_eq!(status, 200, "{usage}");
        ids.push((id, usage));
    }
    let recs = b.gw.wait_requests(ids.len()).await;
    let rows = wait_ledger_rows(&b.db, ids.len()).await;
    for (id, usage) in ids {
        let rec = recs
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap();
        assert_eq!(rec["usage_source"], "invalid", "{usage}: {rec}");
        assert_eq!(
            row(&rows, &id).tokens,
            Some(reservation(&body, 100)),
            "{usage}"
        );
    }
}

#[tokio::test]
async fn usage_in_the_answer_to_a_get_is_ignored_and_cannot_refund_a_budget() {
    // 11 + 5 tokens of model "m" cost 21e-6; a request's reservation costs about 17e-6. With a
    // cap of 30e-6 one POST fits, and a second does not, unless something was refunded.
    let b = Bench::start(Setup {
        budget: "budget = { cost_per_day = 0.00003 }",
        usage: "[usage.prices.\"m\"]\ninput = 1.0\noutput = 2.0",
        ..Setup::default()
    })
    .await;
    let usage = r#"{"prompt_tokens":5,"completion_tokens":5,"cost":-1000000000}"#;
    let url = b.gw.url(&format!(
        "/v1/chat/completions?usage={}",
        percent_encode(usage)
    ));
    let (status, get_id, text) = answer(client().get(url).bearer_auth(KEY)).await;
    assert_eq!(status, 200, "{text}");
    let body = chat(1, false);
    let (status, post_id, text) = b.ask("", &body).await;
    assert_eq!(status, 200, "{text}");
    let (status, _, text) = b.ask("", &body).await;
    assert_eq!(status, 429, "a GET's usage refunded the budget: {text}");

    let recs = b.gw.wait_requests(3).await;
    let get_rec = recs.iter().find(|r| r["request_id"] == get_id.as_str());
    assert_eq!(get_rec.unwrap()["usage_source"], "none", "{get_rec:?}");
    let rows = wait_ledger_rows(&b.db, 2).await;
    let get = row(&rows, &get_id);
    assert_eq!(
        (get.tokens, get.cost, get.usage_source.as_str()),
        (Some(0), Some(0.0), "none")
    );
    assert_close(row(&rows, &post_id).cost, (11.0 * 1.0 + 5.0 * 2.0) / 1e6);
}
