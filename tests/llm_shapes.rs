//! SPEC §7 usage from every API shape an `llm` route bridges, recognized from the body and not
//! the path: OpenAI Responses (JSON, and the `response.completed` event of a stream), Anthropic
//! Messages (JSON with cache tokens counted as prompt, and a stream's `message_start` plus its
//! cumulative `message_delta`) and OpenAI embeddings. The test upstream serves the recorded
//! answers in `tests/fixtures/usage/`; for each, the client gets the recorded bytes exactly (as a
//! direct request to the upstream does), the upstream gets the client's body unchanged (no
//! `stream_options` is added to a Responses or Messages request), and the ledger row and the
//! audit record carry the recorded usage. A streamed chat request still gets
//! `stream_options.include_usage` added.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;

const KEY: &str = "pcx_llm-shapes-phone-0123456789abcdefghijklm";

// ---------------------------------------------------------------- the gateway under test

/// A gateway with an `llm` route on `/v1/` to the test upstream, one key, no rate limits, and a
/// ledger in a temporary directory.
struct Bench {
    up: Upstream,
    gw: Gateway,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bench {
    async fn start() -> Bench {
        let up = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("usage.db");
        let config = format!(
            "{}[limits]\nper_ip = \"off\"\nper_key = \"off\"\n[usage]\ndatabase = \"{}\"\n{}\
             [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
            server_section(""),
            db.display(),
            key_block("phone", KEY, ""),
            up.url()
        );
        let gw = Gateway::start(&config).await;
        Bench {
            up,
            gw,
            db,
            _dir: dir,
        }
    }
}

/// One answer, read to its end.
struct Answer {
    status: u16,
    request_id: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
    /// How many pieces the body arrived in.
    pieces: usize,
}

/// POSTs `body` (JSON) to `url`, with `headers` ("name", "value") and `key` as bearer if any.
async fn post(url: &str, key: Option<&str>, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let r = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("an answer")
        .unwrap();
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    let (status, request_id, content_type) = (
        r.status().as_u16(),
        header("x-request-id"),
        header("content-type"),
    );
    let (mut body, mut pieces) = (Vec::new(), 0);
    let mut stream = r.bytes_stream();
    while let Some(piece) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the whole body")
    {
        body.extend_from_slice(&piece.unwrap());
        pieces += 1;
    }
    Answer {
        status,
        request_id,
        content_type,
        body,
        pieces,
    }
}

/// What the upstream saw of the request the gateway forwarded with `x-request-id: id`.
fn forwarded(up: &Upstream, id: &str) -> Seen {
    let seen = up.seen();
    seen.iter()
        .find(|s| s.header("x-request-id") == Some(id))
        .cloned()
        .unwrap_or_else(|| panic!("the upstream never saw {id}: {:?}", up.targets()))
}

/// Waits for the audit `request` record of request `id`.
async fn record(gw: &Gateway, id: &str) -> Value {
    gw.stdout
        .wait_until(|lines| {
            lines.iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["event"] == "request" && v["request_id"] == id).then_some(v)
            })
        })
        .await
}

// ---------------------------------------------------------------- the ledger

/// One ledger row, as the `usage` table holds it.
#[derive(Debug)]
struct Row {
    model: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    usage_source: String,
    charged_tokens: Option<i64>,
}

fn ledger_row(db: &Path, id: &str) -> rusqlite::Result<Option<Row>> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = rusqlite::Connection::open_with_flags(db, flags)?;
    let mut stmt = conn.prepare(
        "SELECT model, prompt_tokens, completion_tokens, usage_source, charged_tokens \
         FROM usage WHERE request_id = ?1",
    )?;
    let mut rows = stmt
        .query_map([id], |r| {
            Ok(Row {
                model: r.get(0)?,
                prompt_tokens: r.get(1)?,
                completion_tokens: r.get(2)?,
                usage_source: r.get(3)?,
                charged_tokens: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<Row>>>()?;
    assert!(
        rows.len() <= 1,
        "more than one ledger row for {id}: {rows:?}"
    );
    Ok(rows.pop())
}

/// Waits (bounded) for the ledger row of request `id`. The rows come from the gateway's
/// batching writer thread and SQLite has no change notification for another process, so the
/// file is re-read at a short interval.
async fn wait_ledger_row(db: &Path, id: &str) -> Row {
    let deadline = Instant::now() + WAIT;
    loop {
        match ledger_row(db, id) {
            Ok(Some(row)) => return row,
            other => assert!(
                Instant::now() < deadline,
                "the ledger row of {id} awaited: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- one shape each

/// One API shape: where it is posted, what is sent, what the upstream answers, what it used.
struct Shape<'a> {
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    /// The request body, as text: not in serde_json's own order and spacing, so that a body the
    /// gateway re-serialized would differ from it.
    body: String,
    fixture: &'a str,
    content_type: &'a str,
    usage: (i64, i64),
}

/// Sends the shape's request through the gateway and directly to the upstream, and checks the
/// bytes each way, the ledger row and the audit record.
async fn check_shape(s: Shape<'_>) {
    let b = Bench::start().await;
    let sent = s.body.clone().into_bytes();
    let model = serde_json::from_str::<Value>(&s.body).unwrap()["model"].clone();
    let fixture = usage_fixture(s.fixture);

    // The client gets the recorded answer byte for byte, as a direct request does.
    let via = post(&b.gw.url(s.path), Some(KEY), s.headers, &sent).await;
    assert_eq!(via.status, 200, "{}", String::from_utf8_lossy(&via.body));
    let direct = post(&format!("{}{}", b.up.url(), s.path), None, s.headers, &sent).await;
    assert_eq!(direct.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&direct.body),
        String::from_utf8_lossy(&fixture),
        "the upstream's own answer"
    );
    assert_eq!(direct.body, fixture);
    assert_eq!(
        String::from_utf8_lossy(&via.body),
        String::from_utf8_lossy(&direct.body),
        "through the gateway"
    );
    assert_eq!(via.body, direct.body);
    assert_eq!(via.content_type.as_deref(), Some(s.content_type));
    if s.content_type == "text/event-stream" {
        // The upstream sends one event at a time; the gateway passes them on as they come.
        assert!(direct.pieces > 1, "the upstream sent one piece");
        assert!(via.pieces > 1, "the gateway held the stream back");
    }

    // The upstream got the client's body as sent: nothing injected, nothing re-serialized.
    let id = via.request_id.expect("x-request-id");
    let seen = forwarded(&b.up, &id);
    assert_eq!(seen.method, "POST");
    assert_eq!(
        String::from_utf8_lossy(&seen.body),
        String::from_utf8_lossy(&sent),
        "the forwarded body"
    );
    assert_eq!(seen.body, sent);
    let got: Value = serde_json::from_slice(&seen.body).unwrap();
    assert!(got.get("stream_options").is_none(), "{got}");

    // The ledger row and the audit record carry the recorded usage and the request's model.
    let (prompt, completion) = s.usage;
    let row = wait_ledger_row(&b.db, &id).await;
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (Some(prompt), Some(completion)),
        "{row:?}"
    );
    assert_eq!(row.usage_source, "upstream", "{row:?}");
    assert_eq!(row.charged_tokens, Some(prompt + completion), "{row:?}");
    assert_eq!(row.model.as_deref(), model.as_str(), "{row:?}");
    let rec = record(&b.gw, &id).await;
    assert_eq!(
        (
            rec["prompt_tokens"].as_i64(),
            rec["completion_tokens"].as_i64()
        ),
        (Some(prompt), Some(completion)),
        "{rec}"
    );
    assert_eq!(rec["usage_source"], "upstream", "{rec}");
}

const ANTHROPIC: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

fn responses_request(stream: bool) -> String {
    format!(r#"{{"model": "gpt-4.1", "input": "hi", "stream": {stream}, "max_output_tokens": 50}}"#)
}

fn messages_request(stream: bool) -> String {
    format!(
        r#"{{"model": "claude-sonnet-4-20250514", "max_tokens": 64,
  "messages": [{{"role": "user", "content": "hi"}}], "stream": {stream}}}"#
    )
}

#[tokio::test]
async fn a_responses_json_answer_is_passed_on_as_recorded_and_its_usage_is_charged() {
    check_shape(Shape {
        path: "/v1/responses",
        headers: &[],
        body: responses_request(false),
        fixture: "responses.json",
        content_type: "application/json",
        usage: (36, 87),
    })
    .await;
}

#[tokio::test]
async fn a_responses_stream_is_passed_on_as_recorded_and_its_completed_usage_is_charged() {
    check_shape(Shape {
        path: "/v1/responses",
        headers: &[],
        body: responses_request(true),
        fixture: "responses.sse",
        content_type: "text/event-stream",
        usage: (37, 11),
    })
    .await;
}

#[tokio::test]
async fn a_messages_json_answer_is_passed_on_as_recorded_and_cache_tokens_count_as_prompt() {
    check_shape(Shape {
        path: "/v1/messages",
        headers: ANTHROPIC,
        body: messages_request(false),
        fixture: "messages.json",
        content_type: "application/json",
        usage: (2245, 503),
    })
    .await;
}

#[tokio::test]
async fn a_messages_stream_is_passed_on_as_recorded_and_its_last_delta_output_is_charged() {
    check_shape(Shape {
        path: "/v1/messages",
        headers: ANTHROPIC,
        body: messages_request(true),
        fixture: "messages.sse",
        content_type: "text/event-stream",
        usage: (35, 15),
    })
    .await;
}

#[tokio::test]
async fn an_embeddings_answer_is_passed_on_as_recorded_and_its_prompt_tokens_are_charged() {
    check_shape(Shape {
        path: "/v1/embeddings",
        headers: &[],
        body: r#"{"model": "text-embedding-3-small", "input": "hi"}"#.to_owned(),
        fixture: "embeddings.json",
        content_type: "application/json",
        usage: (8, 0),
    })
    .await;
}

#[tokio::test]
async fn a_streamed_chat_request_still_gets_include_usage_added() {
    let b = Bench::start().await;
    let sent = json!({"model": "m", "messages": [], "stream": true}).to_string();
    let via = post(
        &b.gw.url("/v1/chat/completions"),
        Some(KEY),
        &[],
        sent.as_bytes(),
    )
    .await;
    assert_eq!(via.status, 200);
    let id = via.request_id.expect("x-request-id");
    let seen = forwarded(&b.up, &id);
    let got: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(got["stream_options"]["include_usage"], true, "{got}");
    assert_eq!(got["model"], "m", "{got}");
    assert_eq!(got["stream"], true, "{got}");
    // The usage the gateway asked for is charged (the test upstream's 21 + 3).
    let row = wait_ledger_row(&b.db, &id).await;
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.charged_tokens),
        (Some(21), Some(3), Some(24)),
        "{row:?}"
    );
    assert_eq!(row.usage_source, "upstream", "{row:?}");
}
