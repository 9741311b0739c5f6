//! SPEC §7 budgets and reservations against a real SQLite ledger: a key's token budget with its
//! 80 % / 100 % events and `Retry-After`, the gateway-wide budget, restart and reload, 50
//! parallel streams against a budget that fits 10, the reservation charged when an upstream
//! reports no usage, and traffic that goes on while the ledger cannot be written.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::sync::Arc;

use portcullis::llm::budget::Period;
use support::*;

const PHONE: &str = "pcx_budget-phone-0123456789abcdefghijklmnopqrs";
const OTHER: &str = "pcx_budget-other-0123456789abcdefghijklmnopqrs";

/// A chat request asking for at most `max_tokens`: it reserves ceil(len / 4) + `max_tokens`.
fn chat(max_tokens: u64, stream: bool) -> String {
    serde_json::json!({"model": "m", "messages": [], "stream": stream, "max_tokens": max_tokens})
        .to_string()
}

fn reservation(body: &str, max_tokens: u64) -> u64 {
    body.len().div_ceil(4) as u64 + max_tokens
}

fn config(up: &Upstream, db: &std::path::Path, budgets: &str, phone_budget: &str) -> String {
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nper_ip = \"off\"\nper_key = \"off\"\n\
         [usage]\ndatabase = \"{}\"\n{budgets}\n{}{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        db.display(),
        key_block("phone", PHONE, phone_budget),
        key_block("other", OTHER, ""),
        up.url()
    )
}

async fn post(gw: &Gateway, key: &str, query: &str, body: &str) -> reqwest::Response {
    client()
        .post(gw.url(&format!("/v1/chat/completions{query}")))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// Sends one request and reads its body; returns the status and `Retry-After`.
async fn ask(gw: &Gateway, key: &str, query: &str, body: &str) -> (u16, Option<u64>) {
    let r = post(gw, key, query, body).await;
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let text = r.text().await.unwrap();
    if status == 429 {
        assert!(text.contains("\"budget_exceeded\""), "{text}");
    }
    (status, retry)
}

/// The value of one series on the admin listener's /metrics.
async fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    gw.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The test upstream, and a directory for the ledger (kept as long as the test holds it).
async fn fixture() -> (Upstream, tempfile::TempDir, std::path::PathBuf) {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    (up, dir, db)
}

/// The phone key's daily token cap.
const PHONE_DAY_TOKENS: &str =
    "portcullis_budget_remaining{key_id=\"phone\",period=\"day\",unit=\"tokens\"}";

fn now() -> i64 {
    portcullis::clock::now_secs()
}

/// Seconds until `period` ends, as a client would be told.
fn until_end(period: Period) -> u64 {
    let t = now();
    (period.bounds(t).1 - t) as u64
}

fn assert_retry_after(got: Option<u64>, period: Period) {
    let want = until_end(period);
    let got = got.expect("Retry-After");
    assert!(
        got.abs_diff(want) <= 2,
        "Retry-After {got}, period ends in {want}"
    );
}

#[tokio::test]
async fn a_key_hits_its_token_budget_survives_restart_and_reload_raises_it() {
    let (up, _dir, db) = fixture().await;
    let body = chat(1, false);
    let res = reservation(&body, 1);
    // Each JSON answer uses 16 tokens: the third brings the key to exactly 48.
    assert!(res <= 16, "the third request must fit: {res}");
    let cfg = config(&up, &db, "", "budget = { tokens_per_day = 48 }");
    let mut gw = Gateway::start(&cfg).await;
    for i in 1..=3 {
        assert_eq!(ask(&gw, PHONE, "", &body).await.0, 200);
        gw.wait_requests(i).await;
    }
    // 32 -> 48 of 48 crossed 80 % and 100 % at once: both events, once each.
    let events = gw.wait_events("budget", 2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for (e, threshold) in events.iter().zip([80, 100]) {
        assert_eq!(e["key_id"], "phone");
        assert_eq!(e["period"], "day");
        assert_eq!(e["unit"], "tokens");
        assert_eq!(e["spent"], 48.0);
        assert_eq!(e["limit"], 48.0);
        assert_eq!(e["threshold"], threshold);
    }
    let (status, retry) = ask(&gw, PHONE, "", &body).await;
    assert_eq!(status, 429);
    assert_retry_after(retry, Period::Day);
    // Nothing was forwarded for the refused request; the other key is not affected.
    assert_eq!(up.seen().len(), 3);
    assert_eq!(ask(&gw, OTHER, "", &body).await.0, 200);
    assert_eq!(metric(&gw, PHONE_DAY_TOKENS).await, Some(0.0));
    let recs = gw.wait_requests(5).await;
    assert_eq!(recs[3]["outcome"], "budget_exceeded");
    assert_eq!(recs[3]["status"], 429);

    // A restart rebuilds the spend from the ledger.
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);
    let gw = Gateway::start(&cfg).await;
    assert_eq!(metric(&gw, PHONE_DAY_TOKENS).await, Some(0.0));
    let (status, retry) = ask(&gw, PHONE, "", &body).await;
    assert_eq!(status, 429);
    assert_retry_after(retry, Period::Day);

    // A reload that raises the budget lets the key through; the spend is kept.
    gw.rewrite_config(&config(&up, &db, "", "budget = { tokens_per_day = 1000 }"));
    assert_eq!(gw.reload().await["result"], "ok");
    assert_eq!(ask(&gw, PHONE, "", &body).await.0, 200);
    gw.wait_requests(2).await;
    assert_eq!(metric(&gw, PHONE_DAY_TOKENS).await, Some(1000.0 - 64.0));
}

#[tokio::test]
async fn the_gateway_budget_stops_every_key() {
    let (up, _dir, db) = fixture().await;
    let body = chat(1, false);
    let gw = Gateway::start(&config(&up, &db, "[budgets]\ntokens_per_month = 16", "")).await;
    assert_eq!(ask(&gw, PHONE, "", &body).await.0, 200);
    gw.wait_requests(1).await;
    for key in [PHONE, OTHER] {
        let (status, retry) = ask(&gw, key, "", &body).await;
        assert_eq!(status, 429);
        assert_retry_after(retry, Period::Month);
    }
    let events = gw.wait_events("budget", 2).await;
    assert_eq!(events[0]["key_id"], serde_json::Value::Null);
    assert_eq!(events[0]["period"], "month");
    assert_eq!(
        metric(
            &gw,
            "portcullis_budget_remaining{key_id=\"*\",period=\"month\",unit=\"tokens\"}"
        )
        .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_streams_cannot_overspend_a_budget_that_fits_ten() {
    let (up, _dir, db) = fixture().await;
    let body = chat(100, true);
    let res = reservation(&body, 100);
    let cap = 10 * res;
    let gw = Arc::new(
        Gateway::start(&config(
            &up,
            &db,
            "",
            &format!("budget = {{ tokens_per_day = {cap} }}"),
        ))
        .await,
    );
    // The upstream holds every admitted request until all 50 are decided: wait for that on the
    // gate's count and the refusals' count, both watched.
    let refused = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (gw, refused, body) = (gw.clone(), refused.clone(), body.clone());
            tokio::spawn(async move {
                let r = post(&gw, PHONE, "?hold=1", &body).await;
                let status = r.status().as_u16();
                if status == 429 {
                    refused.send_modify(|n| *n += 1);
                }
                let text = r.text().await.unwrap();
                (status, text)
            })
        })
        .collect();
    let (mut held, mut no) = (up.gate.watch_held(), refused.subscribe());
    tokio::time::timeout(WAIT, async {
        while *held.borrow_and_update() + *no.borrow_and_update() < 50 {
            tokio::select! {
                r = held.changed() => r.unwrap(),
                r = no.changed() => r.unwrap(),
            }
        }
    })
    .await
    .expect("all 50 requests decided");
    assert_eq!(up.gate.held(), 10, "admitted while all were in flight");
    up.gate.open();
    let mut ok = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                // The client asked for no usage and sees none: the injected event was removed.
                assert!(!text.contains("\"usage\""), "{text}");
                assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            }
            429 => assert!(text.contains("budget_exceeded")),
            s => panic!("unexpected status {s}: {text}"),
        }
    }
    assert_eq!(ok, 10);
    // Settled by their real usage (24 tokens each), well within the cap.
    gw.wait_requests(50).await;
    assert_eq!(
        metric(&gw, PHONE_DAY_TOKENS).await,
        Some((cap - 10 * 24) as f64)
    );
}

#[tokio::test]
async fn a_response_without_usage_is_charged_its_reservation() {
    let (up, _dir, db) = fixture().await;
    let body = chat(100, false);
    let res = reservation(&body, 100);
    let cap = 3 * res;
    let gw = Gateway::start(&config(
        &up,
        &db,
        "",
        &format!("budget = {{ tokens_per_day = {cap} }}"),
    ))
    .await;
    assert_eq!(ask(&gw, PHONE, "?no_usage=1", &body).await.0, 200);
    let recs = gw.wait_requests(1).await;
    assert_eq!(recs[0]["usage_source"], "none");
    assert_eq!(
        metric(&gw, PHONE_DAY_TOKENS).await,
        Some((cap - res) as f64)
    );
    // Three such responses spend the budget: an upstream that stops reporting usage cannot
    // bypass it.
    for i in 2..=3 {
        assert_eq!(ask(&gw, PHONE, "?no_usage=1", &body).await.0, 200);
        gw.wait_requests(i).await;
    }
    assert_eq!(ask(&gw, PHONE, "?no_usage=1", &body).await.0, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_goes_on_and_budgets_hold_while_the_ledger_cannot_be_written() {
    let (up, _dir, db) = fixture().await;
    let body = chat(1, false);
    let gw = Gateway::start(&config(&up, &db, "", "budget = { tokens_per_day = 32 }")).await;
    // Another process takes the database's write lock and keeps it: every write of the
    // gateway's ledger thread fails once its busy timeout runs out. (Tests run as root, for
    // whom a read-only directory or file is no obstacle, so the lock is how the ledger is made
    // unwritable here.)
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for i in 1..=2 {
        assert_eq!(ask(&gw, PHONE, "", &body).await.0, 200);
        gw.wait_requests(i).await;
    }
    // The budget is enforced from memory all the same.
    assert_eq!(ask(&gw, PHONE, "", &body).await.0, 429);
    assert_eq!(ask(&gw, OTHER, "", &body).await.0, 200);
    // The failure is logged (once the busy timeout runs out) and counted.
    gw.stderr
        .wait_until(|lines| {
            lines
                .iter()
                .any(|l| l.contains("usage ledger write failed"))
                .then_some(())
        })
        .await;
    assert!(metric(&gw, "portcullis_ledger_errors_total").await >= Some(1.0));
    blocker.execute_batch("ROLLBACK").unwrap();
}

#[tokio::test]
async fn a_schema_1_ledger_is_upgraded_and_its_rows_count_at_startup() {
    let (up, _dir, db) = fixture().await;
    // A ledger as the first version wrote it, with 40 tokens spent by `phone` just now.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA application_id = 1346590805; PRAGMA user_version = 1;
         CREATE TABLE usage (
           ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL, key_id TEXT, route TEXT NOT NULL,
           model TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL,
           usage_source TEXT NOT NULL);
         CREATE INDEX usage_ts ON usage (ts_ms);",
    )
    .unwrap();
    conn.execute(
        "INSERT INTO usage VALUES (?1, 'r1', 'phone', 'bridge', 'm', 30, 10, NULL, 'upstream')",
        [now() * 1000],
    )
    .unwrap();
    drop(conn);
    let gw = Gateway::start(&config(&up, &db, "", "budget = { tokens_per_day = 40 }")).await;
    let (status, retry) = ask(&gw, PHONE, "", &chat(1, false)).await;
    assert_eq!(status, 429);
    assert_retry_after(retry, Period::Day);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    // Upgraded through schema 2 to the current one (3 adds the user column).
    assert_eq!(version, 3);
}

#[tokio::test]
async fn streamed_cost_is_charged_not_recorded_as_zero() {
    let (up, _dir, db) = fixture().await;
    // Each stream ends with a usage event carrying `"cost": 0.00042`, OpenRouter-style. A cost
    // cap needs a price for every model; this operator prices unlisted models at $0 on purpose,
    // so reservations hold no cost and only the real charges count.
    let cfg = config(&up, &db, "", "budget = { cost_per_day = 0.001 }").replace(
        "[usage]\n",
        "[usage]\nfallback_price = { input = 0.0, output = 0.0 }\n",
    );
    let gw = Gateway::start(&cfg).await;
    let body = chat(10, true);
    for i in 1..=3 {
        assert_eq!(ask(&gw, PHONE, "", &body).await.0, 200);
        gw.wait_requests(i).await;
    }
    // 3 × 0.00042 = 0.00126 >= 0.001: spent.
    let (status, retry) = ask(&gw, PHONE, "", &body).await;
    assert_eq!(status, 429);
    assert_retry_after(retry, Period::Day);
    let recs = gw.wait_requests(4).await;
    assert_eq!(recs[2]["cost_usd"], 0.00042);
    assert_eq!(recs[2]["cost_source"], "upstream");
    let events = gw.wait_events("budget", 2).await;
    let crossed: Vec<_> = events.iter().map(|e| e["threshold"].clone()).collect();
    assert_eq!(crossed, [80, 100]);
    assert_eq!(events[1]["unit"], "cost_usd");
    assert_eq!(events[1]["spent"], 0.00126);
    assert_eq!(
        metric(
            &gw,
            "portcullis_budget_remaining{key_id=\"phone\",period=\"day\",unit=\"cost_usd\"}"
        )
        .await,
        Some(0.0)
    );
}
