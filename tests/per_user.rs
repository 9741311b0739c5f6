//! SPEC §8 users behind a shared key: a key's `user_header` (OpenWebUI's
//! `x-openwebui-user-id`) names the request's user in the audit record and the ledger
//! (`portcullis usage --by user`), `user_budget` holds each user of the key to caps of their
//! own, a malformed or repeated header is 400 with nothing forwarded, the header reaches the
//! upstream unchanged, a schema-2 ledger is upgraded in place, and users are never a metrics
//! label.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::path::Path;
use std::process::Command;

use portcullis::llm::budget::Period;
use support::*;

const KEY: &str = "pcx_per-user-webui-0123456789abcdefghijklmnopq";
const USER_HEADER: &str = "x-openwebui-user-id";

/// A gateway with one key, `webui`, whose users are named by `USER_HEADER`; `key_extra` is
/// added to the key (its `user_budget`, its `budget`); one `llm` route, `bridge`, on `/v1/`.
fn config(up: &Upstream, db: &Path, key_extra: &str) -> String {
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nper_ip = \"off\"\nper_key = \"off\"\n\
         [usage]\ndatabase = \"{}\"\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        db.display(),
        key_block(
            "webui",
            KEY,
            &format!("user_header = \"{USER_HEADER}\"\n{key_extra}")
        ),
        up.url()
    )
}

/// The test upstream, and a directory for the ledger (kept as long as the test holds it).
async fn fixture() -> (Upstream, tempfile::TempDir, std::path::PathBuf) {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    (up, dir, db)
}

/// A non-streamed chat request: the upstream answers it with 11 prompt + 5 completion tokens.
/// Without `max_tokens` it reserves 1,024 completion tokens: caps meant to let it through are
/// far above that.
const CHAT: &str = r#"{"model":"m","messages":[]}"#;
/// A streamed chat request asking for usage: 21 prompt + 3 completion tokens, $0.00042.
const CHAT_STREAM: &str =
    r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;

/// What the gateway answered.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: String,
}

impl Answer {
    /// The JSON error code of the body, if any.
    fn code(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// POSTs `body` to the chat endpoint with the key and one `USER_HEADER` line per entry of
/// `users` (none: no header), and reads the whole answer.
async fn ask(gw: &Gateway, users: &[&str], query: &str, body: &str) -> Answer {
    let mut req = client()
        .post(gw.url(&format!("/v1/chat/completions{query}")))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for u in users {
        // `header` appends: two entries are two lines of the header.
        req = req.header(USER_HEADER, *u);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = r.text().await.unwrap();
    Answer {
        status,
        retry_after,
        body,
    }
}

/// `portcullis usage --json --by <by>` on the gateway's config: one object per row.
fn usage_json(config_path: &Path, by: &str) -> Vec<serde_json::Value> {
    String::from_utf8(usage_cli(config_path, &["--json", "--by", by]))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `portcullis usage --by <by>` as a table: its lines split on whitespace.
fn usage_table(config_path: &Path, by: &str) -> Vec<Vec<String>> {
    String::from_utf8(usage_cli(config_path, &["--by", by]))
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn usage_cli(config_path: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(bin())
        .arg("usage")
        .args(args)
        .arg("--config")
        .arg(config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Asserts one `usage --json` row: its group, requests, tokens and cost.
fn assert_row(
    row: &serde_json::Value,
    field: &str,
    group: &str,
    requests: u64,
    prompt: u64,
    completion: u64,
    cost: f64,
) {
    assert_eq!(row[field], group, "{row}");
    assert_eq!(row["requests"], requests, "{row}");
    assert_eq!(row["prompt_tokens"], prompt, "{row}");
    assert_eq!(row["completion_tokens"], completion, "{row}");
    let got = row["cost_usd"].as_f64().unwrap();
    assert!((got - cost).abs() < 1e-12, "{row}");
}

/// Seconds until `period` ends, as a client would be told.
fn until_end(period: Period) -> u64 {
    let t = portcullis::clock::now_secs();
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

/// Whether an audit record has a `user` field at all.
fn has_user(rec: &serde_json::Value) -> bool {
    rec.as_object().unwrap().contains_key("user")
}

#[tokio::test]
async fn two_openwebui_users_behind_one_key_have_their_own_rows_and_audit_field() {
    let (up, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(&up, &db, "")).await;
    // alice: two JSON answers; bob: one stream with usage; one request without the header.
    let sent: [(&[&str], &str); 4] = [
        (&["alice"], CHAT),
        (&["bob"], CHAT_STREAM),
        (&[], CHAT),
        (&["alice"], CHAT),
    ];
    for (i, (users, body)) in sent.iter().enumerate() {
        let a = ask(&gw, users, "", body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        gw.wait_requests(i + 1).await;
    }

    // The audit records carry the user; the one without the header has no `user` field.
    let recs = gw.wait_requests(4).await;
    for (rec, want) in recs
        .iter()
        .zip([Some("alice"), Some("bob"), None, Some("alice")])
    {
        assert_eq!(rec["key_id"], "webui", "{rec}");
        match want {
            Some(u) => assert_eq!(rec["user"], u, "{rec}"),
            None => assert!(!has_user(rec), "a user field without the header: {rec}"),
        }
    }

    // The ledger is complete once the gateway has stopped.
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);
    let by_user = usage_json(&gw.config_path, "user");
    assert_eq!(by_user.len(), 3, "{by_user:?}");
    assert_row(&by_user[0], "user", "-", 1, 11, 5, 0.0);
    assert_row(&by_user[1], "user", "alice", 2, 2 * 11, 2 * 5, 0.0);
    assert_row(&by_user[2], "user", "bob", 1, 21, 3, 0.00042);
    // The table says the same.
    let table = usage_table(&gw.config_path, "user");
    assert_eq!(table[0][0], "user", "{table:?}");
    let rows: Vec<Vec<&str>> = table[1..]
        .iter()
        .map(|r| r.iter().take(4).map(String::as_str).collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["-", "1", "11", "5"],
            ["alice", "2", "22", "10"],
            ["bob", "1", "21", "3"],
        ]
    );
    // All of it is the one key's.
    let by_key = usage_json(&gw.config_path, "key");
    assert_eq!(by_key.len(), 1, "{by_key:?}");
    assert_row(
        &by_key[0],
        "key_id",
        "webui",
        4,
        3 * 11 + 21,
        3 * 5 + 3,
        0.00042,
    );
}

#[tokio::test]
async fn a_user_budget_stops_one_user_and_not_the_others_of_the_key() {
    let (up, _dir, db) = fixture().await;
    // A short body asking for one completion token reserves ceil(28 / 4) + 1 = 8 tokens.
    let body = r#"{"model":"m","max_tokens":1}"#;
    assert_eq!(body.len().div_ceil(4) + 1, 8);
    // alice's first answer uses 16 tokens: her whole day.
    let gw = Gateway::start(&config(&up, &db, "user_budget = { tokens_per_day = 16 }")).await;
    assert_eq!(ask(&gw, &["alice"], "", body).await.status, 200);
    gw.wait_requests(1).await;
    // 0 -> 16 of 16 crossed 80 % and 100 % of alice's cap at once: both events, with her name.
    let events = gw.wait_events("budget", 2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for (e, threshold) in events.iter().zip([80, 100]) {
        assert_eq!(e["key_id"], "webui", "{e}");
        assert_eq!(e["user"], "alice", "{e}");
        assert_eq!(e["period"], "day", "{e}");
        assert_eq!(e["unit"], "tokens", "{e}");
        assert_eq!(e["spent"], 16.0, "{e}");
        assert_eq!(e["limit"], 16.0, "{e}");
        assert_eq!(e["threshold"], threshold, "{e}");
    }

    // bob's answers report 2 tokens each: four of them fit his own 16 (6 spent + 8 reserved).
    let small = format!(
        "?usage={}",
        percent_encode(r#"{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}"#)
    );
    let mut n = 1;
    for _ in 0..4 {
        let a = ask(&gw, &["alice"], "", body).await;
        assert_eq!(a.status, 429, "{}", a.body);
        assert_eq!(a.code(), "budget_exceeded", "{}", a.body);
        assert_retry_after(a.retry_after, Period::Day);
        let b = ask(&gw, &["bob"], &small, body).await;
        assert_eq!(b.status, 200, "{}", b.body);
        n += 2;
        gw.wait_requests(n).await;
    }
    // Nothing was forwarded for alice's refused requests.
    let seen = up.seen();
    assert_eq!(seen.len(), 1 + 4, "{seen:?}");
    assert_eq!(
        seen.iter()
            .filter(|s| s.header(USER_HEADER) == Some("alice"))
            .count(),
        1
    );
    let recs = gw.wait_requests(n).await;
    let refused = &recs[1];
    assert_eq!(refused["user"], "alice", "{refused}");
    assert_eq!(refused["status"], 429, "{refused}");
    assert_eq!(refused["outcome"], "budget_exceeded", "{refused}");
    // bob, at 8 of 16, crossed nothing: still only alice's two events.
    let events = gw.events("budget");
    assert_eq!(events.len(), 2, "{events:?}");
}

#[tokio::test]
async fn an_invalid_or_repeated_user_header_is_400_and_nothing_is_forwarded() {
    let (up, _dir, db) = fixture().await;
    let gw = Gateway::start(&config(&up, &db, "")).await;
    let long_129 = "a".repeat(129);
    let cases: [(&str, Vec<&str>); 6] = [
        ("a space", vec!["al ice"]),
        ("a slash", vec!["alice/bob"]),
        ("129 characters", vec![long_129.as_str()]),
        ("empty", vec![""]),
        ("repeated", vec!["alice", "bob"]),
        ("repeated, the same value", vec!["alice", "alice"]),
    ];
    for (i, (what, users)) in cases.iter().enumerate() {
        let a = ask(&gw, users, "", CHAT).await;
        assert_eq!(a.status, 400, "{what}: {}", a.body);
        assert_eq!(a.code(), "bad_request", "{what}: {}", a.body);
        let recs = gw.wait_requests(i + 1).await;
        assert_eq!(recs[i]["status"], 400, "{what}: {}", recs[i]);
        assert!(!has_user(&recs[i]), "{what}: {}", recs[i]);
    }
    assert!(up.seen().is_empty(), "forwarded: {:?}", up.seen());

    // 128 characters of every allowed kind is a user.
    let allowed = "AZaz09._@:-";
    let long_128: String = allowed.chars().cycle().take(128).collect();
    let a = ask(&gw, &[&long_128], "", CHAT).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let recs = gw.wait_requests(cases.len() + 1).await;
    assert_eq!(recs[cases.len()]["user"], long_128.as_str());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header(USER_HEADER), Some(long_128.as_str()));
}

#[tokio::test]
async fn the_user_header_reaches_the_upstream_unchanged() {
    let (up, _dir, db) = fixture().await;
    let gw = Gateway::start(&config(
        &up,
        &db,
        "user_budget = { tokens_per_day = 100000 }",
    ))
    .await;
    let user = "Alice.Smith_42@Example.org:team-A";
    let a = ask(&gw, &[user], "", CHAT).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_all(USER_HEADER), [user], "{:?}", seen[0]);
    let recs = gw.wait_requests(1).await;
    assert_eq!(recs[0]["user"], user);
}

#[test]
fn a_user_budget_without_a_user_header_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let route = "[[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:8000\"\nllm = true\n";
    let without = format!(
        "{}[usage]\ndatabase = \"{}\"\n{}{route}",
        server_section(""),
        db.display(),
        key_block("webui", KEY, "user_budget = { tokens_per_day = 100000 }"),
    );
    let (code, _, err) = check(&without, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("keys[0].user_budget"), "{err}");
    assert!(err.contains("user_header"), "{err}");
    // The same key with its user_header is fine.
    let with = without.replace(
        "user_budget =",
        &format!("user_header = \"{USER_HEADER}\"\nuser_budget ="),
    );
    let (code, _, err) = check(&with, &[]);
    assert_eq!(code, 0, "{err}");
}

#[tokio::test]
async fn a_schema_2_ledger_is_upgraded_in_place_and_its_rows_have_no_user() {
    let (up, _dir, db) = fixture().await;
    // A ledger as the second version wrote it, with two rows of `webui` a minute ago.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA application_id = 1346590805; PRAGMA user_version = 2;
         CREATE TABLE usage (
           ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL, key_id TEXT, route TEXT NOT NULL,
           model TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL,
           usage_source TEXT NOT NULL, charged_tokens INTEGER, charged_cost REAL);
         CREATE INDEX usage_ts ON usage (ts_ms);",
    )
    .unwrap();
    let then = (portcullis::clock::now_secs() - 60) * 1000;
    for (id, p, c) in [("old-1", 30, 10), ("old-2", 7, 3)] {
        conn.execute(
            "INSERT INTO usage VALUES (?1, ?2, 'webui', 'bridge', 'm', ?3, ?4, NULL, 'upstream', ?5, NULL)",
            rusqlite::params![then, id, p, c, p + c],
        )
        .unwrap();
    }
    drop(conn);
    // A user_budget, so that startup rebuilds the budget book from the upgraded file too.
    let mut gw = Gateway::start(&config(
        &up,
        &db,
        "user_budget = { tokens_per_day = 100000 }",
    ))
    .await;
    let a = ask(&gw, &["carol"], "", CHAT).await;
    assert_eq!(a.status, 200, "{}", a.body);
    gw.wait_requests(1).await;
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);

    // The old rows are kept, without a user; the new one has its user.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
    let mut stmt = conn
        .prepare("SELECT request_id, user, prompt_tokens FROM usage ORDER BY ts_ms")
        .unwrap();
    let rows: Vec<(String, Option<String>, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(
        rows[..2],
        [
            ("old-1".to_owned(), None, 30),
            ("old-2".to_owned(), None, 7)
        ]
    );
    assert_eq!((rows[2].1.as_deref(), rows[2].2), (Some("carol"), 11));
    drop(stmt);
    drop(conn);

    let by_user = usage_json(&gw.config_path, "user");
    assert_eq!(by_user.len(), 2, "{by_user:?}");
    assert_row(&by_user[0], "user", "-", 2, 37, 13, 0.0);
    assert_row(&by_user[1], "user", "carol", 1, 11, 5, 0.0);
}

#[tokio::test]
async fn users_are_never_a_metrics_label() {
    let (up, _dir, db) = fixture().await;
    // Caps for the key and for each user: budget gauges are published (for the key).
    let gw = Gateway::start(&config(
        &up,
        &db,
        "budget = { tokens_per_day = 1000000 }\nuser_budget = { tokens_per_day = 100000 }",
    ))
    .await;
    for i in 1..=3 {
        let body = if i == 2 { CHAT_STREAM } else { CHAT };
        let a = ask(&gw, &["alice"], "", body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        gw.wait_requests(i).await;
    }
    let text = gw.metrics_text().await;
    // The requests were counted, per key ...
    for needle in [
        "portcullis_budget_remaining{key_id=\"webui\",period=\"day\",unit=\"tokens\"}",
        "portcullis_llm_tokens_total{route=\"bridge\",key_id=\"webui\"",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // ... and never per user.
    assert!(!text.contains("alice"), "a user in the metrics:\n{text}");
}
