//! SPEC §8 "Realtime sessions": on an `llm` WebSocket route the upstream's `response.done`
//! events (OpenAI Realtime) are charged as they pass — a ledger row per response, sharing the
//! session's `request_id`, and the totals on the session's `request` record at close — with every
//! frame passed on unchanged; a cap spent during a session closes it with 1008
//! `budget_exceeded` right after the `response.done` that spent it; a message over 1 MiB passes
//! unscanned and uncharged; a fragmented `response.done` is read; a `response.done` without
//! believable usage is charged the handshake's reservation; a response begun and never done is
//! charged the reservation when the session ends; a metered handshake negotiates no compression
//! (the client's offer is removed; an upstream that picks an extension anyway is refused with
//! 502); a non-`llm` WebSocket route is not metered; with `[cluster]`, sessions on two instances
//! share one cap (a session learns from Redis that another spent it). The gateway is the real binary, the upstream a tungstenite server
//! (`support::realtime_upstream`), the ledger a SQLite file in a tempdir.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const KEY: &str = "pcx_realtime-voice-0123456789abcdefghijklmnopq";
const MODEL: &str = "gpt-realtime";
/// What a handshake reserves (`default_completion_reservation`): small, so that the handshake
/// is admitted under the caps below, and distinct from every response's usage.
const RESERVATION: u64 = 10;
/// USD per million tokens for `MODEL`.
const PRICE_IN: f64 = 4.0;
const PRICE_OUT: f64 = 16.0;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A gateway with one key, `voice` (`key_extra` added to it, e.g. its `budget`), the ledger at
/// `db`, a price for `MODEL`, and one WebSocket route, `realtime`, on `/v1/` to `rt`, with `llm`
/// as given.
fn config(rt: &Realtime, db: &Path, key_extra: &str, llm: bool) -> String {
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nper_ip = \"off\"\nper_key = \"off\"\n\
         [usage]\ndatabase = \"{}\"\ndefault_completion_reservation = {RESERVATION}\n\
         prices = {{ \"{MODEL}\" = {{ input = {PRICE_IN:?}, output = {PRICE_OUT:?} }} }}\n{}\
         [[routes]]\nname = \"realtime\"\npath = \"/v1/\"\nupstream = \"{}\"\nwebsocket = true\nllm = {llm}\n",
        server_section(""),
        db.display(),
        key_block("voice", KEY, key_extra),
        rt.url()
    )
}

/// The realtime upstream, and a directory for the ledger (kept as long as the test holds it).
async fn fixture() -> (Realtime, tempfile::TempDir, std::path::PathBuf) {
    let rt = realtime_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    (rt, dir, db)
}

/// The handshake request for a session with `MODEL`, with the key.
fn handshake(gw: &Gateway) -> http::Request<()> {
    let mut req = format!("ws://{}/v1/realtime?model={MODEL}", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    req
}

/// Opens a realtime session through the gateway (bounded).
async fn connect(gw: &Gateway) -> Ws {
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(handshake(gw)))
        .await
        .expect("the handshake timed out")
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// The next message from the gateway other than a ping or pong (bounded); `None` at the end of
/// the stream (or an error after a close).
async fn next(ws: &mut Ws) -> Option<Result<Message, WsError>> {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a message from the gateway");
        match m {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}

/// The next message, which must be text.
async fn next_text(ws: &mut Ws) -> String {
    match next(ws).await {
        Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The `type` of a (small) JSON message.
fn kind(text: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    v["type"].as_str().unwrap_or_default().to_owned()
}

/// Sends `msg` (a JSON text message) to the upstream through the gateway.
async fn say(ws: &mut Ws, msg: serde_json::Value) {
    ws.send(Message::text(msg.to_string())).await.unwrap();
}

/// Asks for one response with `input` + `output` tokens; returns the messages received up to
/// and including its `response.done`.
async fn respond(ws: &mut Ws, input: u64, output: u64) -> Vec<String> {
    say(
        ws,
        serde_json::json!({"type": "response.create", "input_tokens": input, "output_tokens": output}),
    )
    .await;
    until_done(ws).await
}

/// Reads text messages up to and including the next `response.done`.
async fn until_done(ws: &mut Ws) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let t = next_text(ws).await;
        let done = kind(&t) == "response.done";
        got.push(t);
        if done {
            return got;
        }
    }
}

/// Closes the session from the client's side and reads to its end.
async fn close(mut ws: Ws) {
    ws.close(None).await.unwrap();
    loop {
        match next(&mut ws).await {
            Some(Ok(Message::Close(_))) => {}
            Some(Ok(m)) => panic!("a message after the close: {m:?}"),
            None | Some(Err(_)) => return,
        }
    }
}

/// What a response of `input` + `output` tokens of `MODEL` costs.
fn cost(input: u64, output: u64) -> f64 {
    (input as f64 * PRICE_IN + output as f64 * PRICE_OUT) / 1e6
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-12, "{what}: {got}, want {want}");
}

/// A WebSocket client on a bare TCP connection: it sends only what the test asks for (no close
/// reply, no pong), and sees the gateway's frames exactly as they come.
struct RawWs {
    tcp: tokio::net::TcpStream,
    /// Bytes read and not yet taken.
    buf: Vec<u8>,
}

impl RawWs {
    /// Sends the handshake for a session with `MODEL`, with the key; expects the 101.
    async fn connect(gw: &Gateway) -> RawWs {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!(
            "GET /v1/realtime?model={MODEL} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {KEY}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut ws = RawWs {
            tcp,
            buf: Vec::new(),
        };
        let head = loop {
            if let Some(end) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = ws.buf.drain(..end + 4).collect();
                break String::from_utf8(head).unwrap();
            }
            ws.fill().await;
        };
        assert_eq!(status_of(&head), 101, "{head}");
        ws
    }

    /// Reads more bytes (bounded); panics at the end of the stream.
    async fn fill(&mut self) {
        // On the heap: an array this size inside the future overflows a test thread's stack.
        let mut chunk = vec![0u8; 64 << 10];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("timed out reading from the gateway")
            .unwrap();
        assert!(n > 0, "the gateway closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill().await;
        }
        self.buf.drain(..n).collect()
    }

    /// The next frame, exactly as it came: its bytes, and its first byte and payload (a server's
    /// frames are not masked).
    async fn frame(&mut self) -> (Vec<u8>, u8, Vec<u8>) {
        let mut raw = self.take(2).await;
        assert_eq!(raw[1] & 0x80, 0, "a masked frame from the gateway");
        let len = match raw[1] & 0x7f {
            126 => {
                let ext = self.take(2).await;
                raw.extend_from_slice(&ext);
                u64::from(u16::from_be_bytes([ext[0], ext[1]]))
            }
            127 => {
                let ext = self.take(8).await;
                raw.extend_from_slice(&ext);
                u64::from_be_bytes(ext.try_into().unwrap())
            }
            n => u64::from(n),
        };
        let payload = self.take(usize::try_from(len).unwrap()).await;
        raw.extend_from_slice(&payload);
        let b0 = raw[0];
        (raw, b0, payload)
    }

    /// The next frame, which must be a whole text message; its text.
    async fn text(&mut self) -> String {
        let (_, b0, payload) = self.frame().await;
        assert_eq!(b0, 0x81, "not a whole text frame: {b0:#x}");
        String::from_utf8(payload).unwrap()
    }

    /// Sends a text message (masked, as a client must).
    async fn send(&mut self, msg: serde_json::Value) {
        let payload = msg.to_string().into_bytes();
        let mask = [0x5a, 0x13, 0xc7, 0x2e];
        let mut f = vec![0x81];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&f).await.unwrap();
    }

    /// Asks for one response of `input` + `output` tokens; returns the messages up to and
    /// including its `response.done`.
    async fn respond(&mut self, input: u64, output: u64) -> Vec<String> {
        self.send(serde_json::json!({"type": "response.create", "input_tokens": input, "output_tokens": output}))
            .await;
        let mut got = Vec::new();
        loop {
            let t = self.text().await;
            let done = kind(&t) == "response.done";
            got.push(t);
            if done {
                return got;
            }
        }
    }
}

/// One row of the ledger.
#[derive(Debug)]
struct Row {
    request_id: String,
    key_id: Option<String>,
    route: String,
    model: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    cost_usd: Option<f64>,
    usage_source: String,
    charged_tokens: i64,
}

/// Every row of the ledger, in the order written. Read once the gateway has stopped (its
/// shutdown flushes the ledger), so that a row that is not there will not come later.
fn ledger(db: &Path) -> Vec<Row> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT request_id, key_id, route, model, prompt_tokens, completion_tokens, cost_usd,
             usage_source, charged_tokens FROM usage ORDER BY rowid",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            request_id: r.get(0)?,
            key_id: r.get(1)?,
            route: r.get(2)?,
            model: r.get(3)?,
            prompt_tokens: r.get(4)?,
            completion_tokens: r.get(5)?,
            cost_usd: r.get(6)?,
            usage_source: r.get(7)?,
            charged_tokens: r.get(8)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Stops the gateway (SIGTERM; it exits 0 once its ledger is flushed) and reads the ledger.
async fn stop_and_read_ledger(gw: &mut Gateway, db: &Path) -> Vec<Row> {
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);
    ledger(db)
}

/// Asserts a ledger row of the session `request_id` for a response of `input` + `output`.
fn assert_response_row(row: &Row, request_id: &str, input: u64, output: u64) {
    assert_eq!(row.request_id, request_id, "{row:?}");
    assert_eq!(row.key_id.as_deref(), Some("voice"), "{row:?}");
    assert_eq!(row.route, "realtime", "{row:?}");
    assert_eq!(row.model.as_deref(), Some(MODEL), "{row:?}");
    assert_eq!(row.prompt_tokens, Some(input as i64), "{row:?}");
    assert_eq!(row.completion_tokens, Some(output as i64), "{row:?}");
    assert_eq!(row.usage_source, "upstream", "{row:?}");
    assert_eq!(row.charged_tokens, (input + output) as i64, "{row:?}");
    assert_close(row.cost_usd.unwrap(), cost(input, output), "row cost");
}

/// The one `request` record of a realtime session: 101, forwarded, the key's, `MODEL`'s.
fn assert_session_record(rec: &serde_json::Value) {
    assert_eq!(rec["status"], 101, "{rec}");
    assert_eq!(rec["outcome"], "forwarded", "{rec}");
    assert_eq!(rec["route"], "realtime", "{rec}");
    assert_eq!(rec["key_id"], "voice", "{rec}");
    assert_eq!(rec["model"], MODEL, "{rec}");
}

#[tokio::test]
async fn each_response_done_is_charged_and_the_session_record_carries_the_totals() {
    let (rt, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(&rt, &db, "", true)).await;
    let mut ws = connect(&gw).await;
    let mut got = vec![next_text(&mut ws).await];
    assert_eq!(kind(&got[0]), "session.created");
    let responses = [(30, 10), (25, 7), (12, 3)];
    for (input, output) in responses {
        got.extend(respond(&mut ws, input, output).await);
    }
    close(ws).await;

    // The client received every message the upstream sent, byte for byte, in order.
    let session = rt.wait_ended(0).await;
    assert_eq!(session.target, format!("/v1/realtime?model={MODEL}"));
    assert_eq!(session.responses, 3);
    assert_eq!(got.len(), 1 + 3 * 5, "{session:?}");
    assert_eq!(got, session.sent);

    // The session's record, at close, carries the totals.
    let recs = gw.wait_requests(1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_session_record(rec);
    assert_eq!(rec["prompt_tokens"], 30 + 25 + 12, "{rec}");
    assert_eq!(rec["completion_tokens"], 10 + 7 + 3, "{rec}");
    assert_eq!(rec["usage_source"], "upstream", "{rec}");
    let total: f64 = responses.iter().map(|&(i, o)| cost(i, o)).sum();
    assert_close(rec["cost_usd"].as_f64().unwrap(), total, "record cost");
    let request_id = rec["request_id"].as_str().unwrap().to_owned();

    // One ledger row per response, each with its own tokens and the session's request_id.
    let rows = stop_and_read_ledger(&mut gw, &db).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (row, (input, output)) in rows.iter().zip(responses) {
        assert_response_row(row, &request_id, input, output);
    }
}

#[tokio::test]
async fn a_cap_spent_mid_session_closes_it_with_1008_budget_exceeded() {
    let (rt, _dir, db) = fixture().await;
    // Each response uses 30 + 10 = 40 tokens: the first two fit (80 of 100, the 80 % line),
    // the third spends the cap (120 >= 100).
    let mut gw = Gateway::start(&config(&rt, &db, "budget = { tokens_per_day = 100 }", true)).await;
    // A bare client: whatever ends the upstream's connection below, it is not this client (it
    // never sends a close frame).
    let mut ws = RawWs::connect(&gw).await;
    let mut got = vec![ws.text().await];
    got.extend(ws.respond(30, 10).await);
    got.extend(ws.respond(30, 10).await);
    // 40 -> 80 of 100: the 80 % event, at the second response.
    let events = gw.wait_events("budget", 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["threshold"], 80, "{events:?}");
    assert_eq!(events[0]["spent"], 80.0, "{events:?}");

    // The third response: its messages up to its response.done, then at once the close frame:
    // 1008 (policy violation), reason `budget_exceeded`.
    got.extend(ws.respond(30, 10).await);
    let (close, _, _) = ws.frame().await;
    assert_eq!(
        close,
        [&[0x88, 17, 0x03, 0xf0][..], b"budget_exceeded"].concat(),
        "{:?}",
        String::from_utf8_lossy(&close)
    );
    // The gateway closed the upstream's connection; the client got everything it sent.
    let session = rt.wait_ended(0).await;
    assert_eq!(session.responses, 3, "{session:?}");
    assert_eq!(session.received.len(), 3, "{session:?}");
    assert_eq!(got, session.sent);

    // The 100 % event, with the key; the record says what the session used.
    let events = gw.wait_events("budget", 2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for (e, (threshold, spent)) in events.iter().zip([(80, 80.0), (100, 120.0)]) {
        assert_eq!(e["key_id"], "voice", "{e}");
        assert_eq!(e["period"], "day", "{e}");
        assert_eq!(e["unit"], "tokens", "{e}");
        assert_eq!(e["limit"], 100.0, "{e}");
        assert_eq!(e["threshold"], threshold, "{e}");
        assert_eq!(e["spent"], spent, "{e}");
    }
    let recs = gw.wait_requests(1).await;
    assert_session_record(&recs[0]);
    assert_eq!(recs[0]["prompt_tokens"], 90, "{}", recs[0]);
    assert_eq!(recs[0]["completion_tokens"], 30, "{}", recs[0]);
    let request_id = recs[0]["request_id"].as_str().unwrap().to_owned();

    // A new session is refused at the handshake: 429 budget_exceeded, nothing forwarded.
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(handshake(&gw)))
        .await
        .expect("the refused handshake timed out")
    {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("\"budget_exceeded\""), "{body}");
        }
        Ok(_) => panic!("a handshake was admitted with the cap spent"),
        Err(e) => panic!("the refused handshake failed otherwise: {e}"),
    }
    let recs = gw.wait_requests(2).await;
    assert_eq!(recs[1]["status"], 429, "{}", recs[1]);
    assert_eq!(recs[1]["outcome"], "budget_exceeded", "{}", recs[1]);
    assert_eq!(rt.sessions().len(), 1);

    let rows = stop_and_read_ledger(&mut gw, &db).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in &rows {
        assert_response_row(row, &request_id, 30, 10);
    }
}

#[tokio::test]
async fn a_2_mib_message_passes_intact_and_uncharged_and_the_session_goes_on() {
    let (rt, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(&rt, &db, "", true)).await;
    let mut ws = connect(&gw).await;
    let mut got = vec![next_text(&mut ws).await];
    got.extend(respond(&mut ws, 20, 5).await);
    // A 2 MiB text message, itself a `response.done` with usage: over the 1 MiB scanning bound.
    say(&mut ws, serde_json::json!({"type": "test.big"})).await;
    let big = next_text(&mut ws).await;
    assert_eq!(big.len(), REALTIME_BIG);
    got.push(big);
    // The session goes on, and a later response is charged.
    got.extend(respond(&mut ws, 11, 4).await);
    close(ws).await;

    let session = rt.wait_ended(0).await;
    assert_eq!(got.len(), session.sent.len());
    for (i, (g, s)) in got.iter().zip(&session.sent).enumerate() {
        // Compared one by one: a failure should not print 2 MiB.
        assert!(
            g == s,
            "message {i} differs ({} vs {} bytes)",
            g.len(),
            s.len()
        );
    }
    assert_eq!(
        kind(&got[6]),
        "response.done",
        "the trap is a response.done"
    );

    let recs = gw.wait_requests(1).await;
    assert_session_record(&recs[0]);
    assert_eq!(recs[0]["prompt_tokens"], 20 + 11, "{}", recs[0]);
    assert_eq!(recs[0]["completion_tokens"], 5 + 4, "{}", recs[0]);
    assert_close(
        recs[0]["cost_usd"].as_f64().unwrap(),
        cost(20, 5) + cost(11, 4),
        "record cost",
    );
    let request_id = recs[0]["request_id"].as_str().unwrap().to_owned();
    let rows = stop_and_read_ledger(&mut gw, &db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_response_row(&rows[0], &request_id, 20, 5);
    assert_response_row(&rows[1], &request_id, 11, 4);
}

#[tokio::test]
async fn a_fragmented_response_done_is_read_and_charged_once() {
    let (rt, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(&rt, &db, "", true)).await;
    let mut ws = connect(&gw).await;
    let mut got = vec![next_text(&mut ws).await];
    // The response.done comes as a text frame and two continuations, a ping between.
    say(
        &mut ws,
        serde_json::json!({"type": "response.create", "input_tokens": 17, "output_tokens": 6, "fragmented": true}),
    )
    .await;
    got.extend(until_done(&mut ws).await);
    got.extend(respond(&mut ws, 9, 2).await);
    close(ws).await;

    let session = rt.wait_ended(0).await;
    assert_eq!(session.responses, 2);
    assert_eq!(got, session.sent);

    let recs = gw.wait_requests(1).await;
    assert_session_record(&recs[0]);
    assert_eq!(recs[0]["prompt_tokens"], 17 + 9, "{}", recs[0]);
    assert_eq!(recs[0]["completion_tokens"], 6 + 2, "{}", recs[0]);
    let request_id = recs[0]["request_id"].as_str().unwrap().to_owned();
    let rows = stop_and_read_ledger(&mut gw, &db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_response_row(&rows[0], &request_id, 17, 6);
    assert_response_row(&rows[1], &request_id, 9, 2);
}

#[tokio::test]
async fn a_response_done_without_believable_usage_is_charged_the_reservation() {
    let (rt, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(
        &rt,
        &db,
        "budget = { tokens_per_day = 1000 }",
        true,
    ))
    .await;
    let mut ws = connect(&gw).await;
    let mut got = vec![next_text(&mut ws).await];
    // No usage at all; then usage with a negative count.
    say(
        &mut ws,
        serde_json::json!({"type": "response.create", "no_usage": true}),
    )
    .await;
    got.extend(until_done(&mut ws).await);
    say(
        &mut ws,
        serde_json::json!({"type": "response.create", "usage": {"total_tokens": 5, "input_tokens": -50, "output_tokens": 55}}),
    )
    .await;
    got.extend(until_done(&mut ws).await);
    got.extend(respond(&mut ws, 8, 4).await);
    close(ws).await;
    let session = rt.wait_ended(0).await;
    assert_eq!(got, session.sent);

    let recs = gw.wait_requests(1).await;
    assert_session_record(&recs[0]);
    let request_id = recs[0]["request_id"].as_str().unwrap().to_owned();
    let rows = stop_and_read_ledger(&mut gw, &db).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (row, source) in rows.iter().zip(["none", "invalid"]) {
        assert_eq!(row.request_id, request_id, "{row:?}");
        assert_eq!(row.prompt_tokens, None, "{row:?}");
        assert_eq!(row.completion_tokens, None, "{row:?}");
        assert_eq!(row.usage_source, source, "{row:?}");
        // Charged what the handshake reserved.
        assert_eq!(row.charged_tokens, RESERVATION as i64, "{row:?}");
    }
    assert_response_row(&rows[2], &request_id, 8, 4);
}

#[tokio::test]
async fn a_websocket_route_without_llm_is_not_metered() {
    let (rt, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(&rt, &db, "", false)).await;
    let mut ws = connect(&gw).await;
    let mut got = vec![next_text(&mut ws).await];
    got.extend(respond(&mut ws, 30, 10).await);
    got.extend(respond(&mut ws, 25, 7).await);
    close(ws).await;
    // The messages pass all the same.
    let session = rt.wait_ended(0).await;
    assert_eq!(session.responses, 2);
    assert_eq!(got, session.sent);

    let recs = gw.wait_requests(1).await;
    let rec = &recs[0];
    assert_eq!(rec["status"], 101, "{rec}");
    assert_eq!(rec["outcome"], "forwarded", "{rec}");
    assert_eq!(rec["key_id"], "voice", "{rec}");
    for field in [
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "usage_source",
    ] {
        assert!(
            rec.get(field).is_none(),
            "{field} on a non-llm record: {rec}"
        );
    }
    let rows = stop_and_read_ledger(&mut gw, &db).await;
    assert!(rows.is_empty(), "{rows:?}");
}

#[tokio::test]
async fn a_response_begun_and_never_done_is_charged_the_reservation_when_the_session_ends() {
    let (rt, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(&rt, &db, "", true)).await;
    let mut ws = connect(&gw).await;
    let mut got = vec![next_text(&mut ws).await];
    got.extend(respond(&mut ws, 30, 10).await);
    // The second response is begun (`response.created`, then a delta) and its `response.done`
    // never comes: the client hangs up once the delta is there.
    say(
        &mut ws,
        serde_json::json!({"type": "response.create", "input_tokens": 40, "output_tokens": 12, "hold": true}),
    )
    .await;
    let created = next_text(&mut ws).await;
    assert_eq!(kind(&created), "response.created", "{created}");
    got.push(created);
    let delta = next_text(&mut ws).await;
    assert_eq!(kind(&delta), "response.audio_transcript.delta", "{delta}");
    got.push(delta);
    close(ws).await;

    let session = rt.wait_ended(0).await;
    assert_eq!(session.ended.as_deref(), Some("close frame"), "{session:?}");
    assert_eq!(session.received.len(), 2, "{session:?}");
    assert_eq!(session.responses, 1, "{session:?}");
    assert_eq!(got, session.sent);

    // The record: the reported response's totals, and a response without usage.
    let recs = gw.wait_requests(1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_session_record(rec);
    assert_eq!(rec["prompt_tokens"], 30, "{rec}");
    assert_eq!(rec["completion_tokens"], 10, "{rec}");
    assert_eq!(rec["usage_source"], "none", "{rec}");
    let request_id = rec["request_id"].as_str().unwrap().to_owned();

    // The done response keeps its row; the abandoned one is charged the handshake's reservation
    // at close, without token counts.
    let rows = stop_and_read_ledger(&mut gw, &db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_response_row(&rows[0], &request_id, 30, 10);
    let held = &rows[1];
    assert_eq!(held.request_id, request_id, "{held:?}");
    assert_eq!(held.key_id.as_deref(), Some("voice"), "{held:?}");
    assert_eq!(held.route, "realtime", "{held:?}");
    assert_eq!(held.prompt_tokens, None, "{held:?}");
    assert_eq!(held.completion_tokens, None, "{held:?}");
    assert_eq!(held.usage_source, "none", "{held:?}");
    assert_eq!(held.charged_tokens, RESERVATION as i64, "{held:?}");
}

#[tokio::test]
async fn a_metered_session_negotiates_no_compression() {
    const OFFER: &str = "permessage-deflate; client_max_window_bits";
    let has_extensions =
        |headers: &[(String, String)]| headers.iter().any(|(n, _)| n == "sec-websocket-extensions");
    let (rt, _dir, db) = fixture().await;
    let mut gw = Gateway::start(&config(&rt, &db, "", true)).await;

    // The client offers compression; the upstream never sees the offer, and the session is
    // metered.
    let mut req = handshake(&gw);
    req.headers_mut()
        .insert("sec-websocket-extensions", OFFER.parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("the handshake timed out")
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert!(
        resp.headers().get("sec-websocket-extensions").is_none(),
        "{resp:?}"
    );
    let mut got = vec![next_text(&mut ws).await];
    got.extend(respond(&mut ws, 30, 10).await);
    close(ws).await;
    let session = rt.wait_ended(0).await;
    assert!(
        session
            .headers
            .iter()
            .any(|(n, _)| n == "sec-websocket-key"),
        "{:?}",
        session.headers
    );
    assert!(!has_extensions(&session.headers), "{:?}", session.headers);
    assert_eq!(session.responses, 1, "{session:?}");
    assert_eq!(got, session.sent);
    let recs = gw.wait_requests(1).await;
    assert_session_record(&recs[0]);
    assert_eq!(recs[0]["prompt_tokens"], 30, "{}", recs[0]);
    assert_eq!(recs[0]["completion_tokens"], 10, "{}", recs[0]);
    assert_eq!(recs[0]["usage_source"], "upstream", "{}", recs[0]);
    let request_id = recs[0]["request_id"].as_str().unwrap().to_owned();

    // An upstream that picks an extension anyway (it was not offered one): the client is
    // answered 502 upstream_unavailable, and no tunnel opens.
    let mut req = handshake(&gw);
    *req.uri_mut() = format!(
        "ws://{}/v1/realtime?model={MODEL}&extensions=permessage-deflate",
        gw.addr
    )
    .parse()
    .unwrap();
    req.headers_mut()
        .insert("sec-websocket-extensions", OFFER.parse().unwrap());
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("the refused handshake timed out")
    {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 502);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("\"upstream_unavailable\""), "{body}");
        }
        Ok(_) => panic!("a tunnel opened behind an extension nobody offered"),
        Err(e) => panic!("the refused handshake failed otherwise: {e}"),
    }
    let refused = rt.wait_ended(1).await;
    assert!(!has_extensions(&refused.headers), "{:?}", refused.headers);
    assert!(refused.received.is_empty(), "{refused:?}");
    let recs = gw.wait_requests(2).await;
    assert_eq!(recs[1]["status"], 502, "{}", recs[1]);
    assert_eq!(recs[1]["outcome"], "upstream_unavailable", "{}", recs[1]);

    let rows = stop_and_read_ledger(&mut gw, &db).await;
    let session_rows: Vec<&Row> = rows.iter().filter(|r| r.request_id == request_id).collect();
    assert_eq!(session_rows.len(), 1, "{rows:?}");
    assert_response_row(session_rows[0], &request_id, 30, 10);
    // The refused handshake opened no session: it is charged nothing.
    let refused_id = recs[1]["request_id"].as_str().unwrap();
    for row in rows.iter().filter(|r| r.request_id != request_id) {
        assert_eq!(row.request_id, refused_id, "{rows:?}");
        assert_eq!(row.charged_tokens, 0, "{row:?}");
    }
}

#[tokio::test]
async fn with_cluster_sessions_on_two_instances_share_one_cap() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let rt = realtime_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = |db: &str| {
        format!(
            "{}[cluster]\nredis = \"{}\"\nprefix = \"pcx-test:\"\n",
            config(
                &rt,
                &dir.path().join(db),
                "budget = { tokens_per_day = 100 }",
                true
            ),
            redis.url()
        )
    };
    let a = Gateway::start(&cfg("a.db")).await;
    let b = Gateway::start(&cfg("b.db")).await;
    // On b: two responses of 40 tokens, 80 of the key's 100; b's session ends normally.
    let mut ws = RawWs::connect(&b).await;
    ws.text().await;
    ws.respond(30, 10).await;
    ws.respond(30, 10).await;
    redis.wait_day_tokens("k:voice", 80.0).await;
    // On a, whose own share is nothing yet: the handshake is admitted (80 + its reservation of
    // 10 fit), and its first response takes the key to 120. a learns that from Redis when the
    // charge settles there, so its session is closed right after its next response.done.
    let mut ws = RawWs::connect(&a).await;
    ws.text().await;
    ws.respond(30, 10).await;
    redis.wait_day_tokens("k:voice", 120.0).await;
    ws.respond(30, 10).await;
    let (close, _, _) = ws.frame().await;
    assert_eq!(
        close,
        [&[0x88, 17, 0x03, 0xf0][..], b"budget_exceeded"].concat(),
        "{:?}",
        String::from_utf8_lossy(&close)
    );
    redis.wait_day_tokens("k:voice", 160.0).await;
    // Spent for both: b refuses a new session at the handshake.
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(handshake(&b)))
        .await
        .expect("the refused handshake timed out")
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 429),
        Ok(_) => panic!("a handshake was admitted with the cap spent"),
        Err(e) => panic!("the refused handshake failed otherwise: {e}"),
    }
    // The 100 % line was crossed by a's first charge (80 -> 120), on a, once.
    let events = a.wait_events("budget", 1).await;
    assert_eq!(events[0]["threshold"], 100, "{events:?}");
    assert_eq!(events[0]["spent"], 120.0, "{events:?}");
    // b crossed 80 % with its second charge.
    let events = b.wait_events("budget", 1).await;
    assert_eq!(events[0]["threshold"], 80, "{events:?}");
}
