//! Real upstream servers for the gateway to forward to: an HTTP/1.1 + HTTP/2 hyper app that
//! records what it saw (with a [`Gate`] to hold requests) and serves the recorded LLM answers in
//! `tests/fixtures/usage/`, a WebSocket echo, an OpenAI Realtime-style WebSocket server
//! ([`realtime_upstream`]), a dead address.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// The request body, as received: filled only by the endpoints that read it as JSON
    /// (`chat/completions`, `responses`, `messages`, `embeddings`); empty for the others.
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub gate: Arc<Gate>,
}

/// Holds chat requests sent with `?hold=1` before they are answered, until [`Gate::open`].
pub struct Gate {
    held: tokio::sync::watch::Sender<usize>,
    open: tokio::sync::watch::Sender<bool>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            held: tokio::sync::watch::Sender::new(0),
            open: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Gate {
    /// How many requests are waiting at the gate now.
    pub fn held(&self) -> usize {
        *self.held.borrow()
    }
    /// Notified whenever a request arrives at the gate or leaves it.
    pub fn watch_held(&self) -> tokio::sync::watch::Receiver<usize> {
        self.held.subscribe()
    }
    pub fn open(&self) {
        self.open.send_replace(true);
    }
    async fn pass(&self) {
        self.held.send_modify(|n| *n += 1);
        let _ = self.open.subscribe().wait_for(|o| *o).await;
        self.held.send_modify(|n| *n -= 1);
    }
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn targets(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.target).collect()
    }
}

type UpBody = BoxBody<Bytes, std::io::Error>;

fn full(s: impl Into<Bytes>) -> UpBody {
    http_body_util::Full::new(s.into())
        .map_err(|never| match never {})
        .boxed()
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn stream_body<S>(s: S) -> UpBody
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static,
{
    BodyExt::boxed(StreamBody::new(s))
}

/// One step of a scripted SSE answer.
enum Step {
    Event(String),
    /// Raw bytes, sent as one frame (a recorded event, byte for byte).
    Chunk(Bytes),
    Pause(Duration),
    /// Fails the body: the upstream's connection is cut.
    Cut,
}

fn scripted(steps: Vec<Step>) -> UpBody {
    let s = futures_util::stream::unfold(steps.into_iter(), |mut steps| async move {
        loop {
            match steps.next()? {
                Step::Event(e) => return Some((Ok(Frame::data(Bytes::from(e))), steps)),
                Step::Chunk(b) => return Some((Ok(Frame::data(b)), steps)),
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Cut => return Some((Err(std::io::Error::other("upstream cut")), steps)),
            }
        }
    });
    stream_body(s)
}

/// Decodes `%XX` escapes (anything else is kept as it is).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match hex {
            Some(byte) if b[i] == b'%' => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes every byte but ASCII letters and digits as `%XX` (for a query parameter's value).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The bytes of `tests/fixtures/usage/<name>`, read from disk on each request.
pub fn usage_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/usage")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A recorded answer, `name` in `tests/fixtures/usage/`, served exactly as recorded: JSON in
/// one piece, or SSE as one frame per event (split after each blank line), a short pause between
/// frames so that the gateway really receives a stream.
fn fixture_answer(name: &str, sse: bool) -> Response<UpBody> {
    let bytes = Bytes::from(usage_fixture(name));
    if !sse {
        return Response::builder()
            .header("content-type", "application/json")
            .body(full(bytes))
            .unwrap();
    }
    let mut steps = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end =
            memchr::memmem::find(&bytes[start..], b"\n\n").map_or(bytes.len(), |i| start + i + 2);
        if !steps.is_empty() {
            steps.push(Step::Pause(Duration::from_millis(5)));
        }
        steps.push(Step::Chunk(bytes.slice(start..end)));
        start = end;
    }
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(scripted(steps))
        .unwrap()
}

/// The test upstream. Paths (after any prefix):
/// - `.../chat/completions`: OpenAI-style, JSON or SSE (`"stream": true`) with usage (JSON: 11
///   prompt + 5 completion tokens; SSE, when `stream_options.include_usage` is set, a usage-only
///   event with 21 + 3 and a `cost`). Query parameters:
///   - `no_usage=1` leaves usage out
///   - `hold=1` waits at the [`Gate`] before answering
///   - `delay_ms=M` waits M ms before sending the response head (JSON and SSE)
///   - `stall_ms=M` (SSE) sends the head and the first content event, then waits M ms before the
///     rest
///   - `cut=1` (SSE) sends the first two content events, then cuts the connection (no usage)
///   - `usage=<percent-encoded text>` puts the decoded text verbatim as the `usage` value (JSON
///     answer and SSE usage-only event), so that negative, huge or invalid (`NaN`) figures can be
///     sent
/// - `.../responses` (OpenAI Responses), `.../messages` (Anthropic Messages): the recorded
///   answer `responses.json`/`messages.json`, or with `"stream": true` in the request body
///   `responses.sse`/`messages.sse` (one frame per event), from `tests/fixtures/usage/`
/// - `.../embeddings`: the recorded answer `embeddings.json`
/// - `.../sse?n=N&gap_ms=G`: N SSE events, G ms apart
/// - `.../bytes?n=N`: N bytes streamed in 64 KiB chunks
/// - `.../count`: reads the request body, answers `{"bytes":N}`
/// - `.../slow?ms=M`: answers after M ms
/// - `.../reset`: sends part of a body, then aborts the connection
/// - anything else: `{"method":..,"target":..}`
async fn upstream_service(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<Gate>,
) -> Result<Response<UpBody>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let seen_index = {
        let mut seen = seen.lock().unwrap();
        seen.push(Seen {
            method: req.method().to_string(),
            target: target.clone(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: Vec::new(),
        });
        seen.len() - 1
    };
    // Reads the whole request body and keeps a copy in this request's `Seen`.
    let read_body = |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            seen.lock().unwrap()[seen_index].body = body.to_vec();
            body
        }
    };
    let path = req.uri().path().to_owned();
    let q = query(&req);
    let num = |k: &str, d: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let resp = if path.ends_with("/chat/completions") {
        // An OpenAI/OpenRouter-style chat endpoint: JSON with usage, or SSE chunks and, when
        // `stream_options.include_usage` is set, a final usage-only event before [DONE].
        let body = read_body(req).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let model = serde_json::Value::from(v["model"].as_str().unwrap_or("unknown")).to_string();
        let with_usage = num("no_usage", 0) == 0;
        let usage = |default: &str| {
            q.get("usage")
                .map_or_else(|| default.to_owned(), |u| percent_decode(u))
        };
        if num("hold", 0) == 1 {
            gate.pass().await;
        }
        if let Some(ms) = q.get("delay_ms").and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if v["stream"].as_bool() == Some(true) {
            let event = |word: &str| {
                Step::Event(format!(
                    "data: {{\"id\":\"c1\",\"model\":{model},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n"
                ))
            };
            let mut steps = vec![event("Hel")];
            if let Some(ms) = q.get("stall_ms").and_then(|v| v.parse().ok()) {
                steps.push(Step::Pause(Duration::from_millis(ms)));
            }
            steps.push(event("lo"));
            if num("cut", 0) == 1 {
                // A pause first, so that what was sent is flushed with the head before the cut.
                steps.push(Step::Pause(Duration::from_millis(100)));
                steps.push(Step::Cut);
            } else {
                steps.push(event("!"));
                if with_usage && v["stream_options"]["include_usage"].as_bool() == Some(true) {
                    let u = usage(
                        r#"{"prompt_tokens":21,"completion_tokens":3,"total_tokens":24,"cost":0.00042}"#,
                    );
                    steps.push(Step::Event(format!(
                        "data: {{\"id\":\"c1\",\"model\":{model},\"choices\":[],\"usage\":{u}}}\n\n"
                    )));
                }
                steps.push(Step::Event("data: [DONE]\n\n".to_owned()));
            }
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(scripted(steps))
                .unwrap()
        } else {
            // Built as text, so that the usage can be anything, even invalid JSON.
            let usage = if with_usage {
                let u = usage(r#"{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}"#);
                format!(",\"usage\":{u}")
            } else {
                String::new()
            };
            let out = format!(
                "{{\"id\":\"c1\",\"object\":\"chat.completion\",\"model\":{model},\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"Hello!\"}}}}]{usage}}}"
            );
            Response::builder()
                .header("content-type", "application/json")
                .body(full(out))
                .unwrap()
        }
    } else if path.ends_with("/responses") || path.ends_with("/messages") {
        let body = read_body(req).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let api = if path.ends_with("/responses") {
            "responses"
        } else {
            "messages"
        };
        let sse = v["stream"].as_bool() == Some(true);
        fixture_answer(&format!("{api}.{}", if sse { "sse" } else { "json" }), sse)
    } else if path.ends_with("/embeddings") {
        read_body(req).await;
        fixture_answer("embeddings.json", false)
    } else if path.ends_with("/sse") {
        let n = num("n", 10);
        let gap = Duration::from_millis(num("gap_ms", 1));
        let s = futures_util::stream::unfold(0u64, move |i| async move {
            if i >= n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            let ev = format!("id: {i}\ndata: {{\"i\":{i}}}\n\n");
            Some((Ok(Frame::data(Bytes::from(ev))), i + 1))
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(stream_body(s))
            .unwrap()
    } else if path.ends_with("/bytes") {
        let n = num("n", 1024);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let s = futures_util::stream::unfold(0u64, move |sent| {
            let chunk = chunk.clone();
            async move {
                if sent >= n {
                    return None;
                }
                let take = (n - sent).min(chunk.len() as u64) as usize;
                Some((Ok(Frame::data(chunk.slice(..take))), sent + take as u64))
            }
        });
        Response::new(stream_body(s))
    } else if path.ends_with("/count") {
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => total += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                Err(_) => break,
            }
        }
        Response::new(full(format!("{{\"bytes\":{total}}}")))
    } else if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_millis(num("ms", 5000))).await;
        Response::new(full("slow"))
    } else if path.ends_with("/reset") {
        // The first event, a pause (so it is flushed with the head), then the connection dies.
        let s = futures_util::stream::unfold(0u8, |i| async move {
            match i {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Err(std::io::Error::other("upstream reset")), 2))
                }
                _ => None,
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(stream_body(s))
            .unwrap()
    } else {
        let v = serde_json::json!({"method": req.method().as_str(), "target": target});
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(full(v.to_string()))
            .unwrap()
    };
    Ok(resp)
}

/// Starts the HTTP/1.1 test upstream on an ephemeral loopback port.
pub async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen2 = seen.clone();
    let gate: Arc<Gate> = Arc::default();
    let gate2 = gate.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen2.clone();
            let gate = gate2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| upstream_service(req, seen.clone(), gate.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, seen, gate }
}

/// A WebSocket echo upstream (tungstenite). Returns its address.
pub async fn ws_echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// What the realtime upstream saw and did in one session (one WebSocket connection).
#[derive(Clone, Default)]
pub struct RealtimeSession {
    /// The handshake's request target (path and query), as received.
    pub target: String,
    /// The handshake's headers, as received.
    pub headers: Vec<(String, String)>,
    /// The client's text messages, in order.
    pub received: Vec<String>,
    /// Every text message the upstream sent, in order, whole (a fragmented one as the text its
    /// fragments make up); each is recorded before it is sent.
    pub sent: Vec<String>,
    /// How many `response.done` events were sent in answer to `response.create` (the big
    /// message of `test.big` is not one of them).
    pub responses: u64,
    /// The connection with the gateway has ended: how (`"close frame"`, `"dropped"`, or the
    /// read error).
    pub ended: Option<String>,
}

impl std::fmt::Debug for RealtimeSession {
    /// Short: the 2 MiB message would drown any assertion message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|m| {
                    if m.len() > 300 {
                        format!("{}… ({} bytes)", &m[..200], m.len())
                    } else {
                        m.clone()
                    }
                })
                .collect()
        };
        f.debug_struct("RealtimeSession")
            .field("target", &self.target)
            .field("received", &short(&self.received))
            .field("sent", &short(&self.sent))
            .field("ended", &self.ended)
            .finish()
    }
}

/// The realtime upstream: its address and what each session saw.
#[derive(Clone)]
pub struct Realtime {
    pub addr: SocketAddr,
    log: tokio::sync::watch::Sender<Vec<RealtimeSession>>,
}

impl Realtime {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Every session so far, in the order they were accepted.
    pub fn sessions(&self) -> Vec<RealtimeSession> {
        self.log.borrow().clone()
    }
    /// Waits (bounded by `WAIT`) until `pred` holds for the sessions; woken on every change.
    pub async fn wait_until<T>(&self, mut pred: impl FnMut(&[RealtimeSession]) -> Option<T>) -> T {
        let mut rx = self.log.subscribe();
        match super::wait_watch(&mut rx, super::WAIT, |s: &Vec<RealtimeSession>| pred(s)).await {
            Some(v) => v,
            None => panic!(
                "timed out waiting on the realtime upstream; sessions: {:#?}",
                self.sessions()
            ),
        }
    }
    /// Waits until session `i` has ended; returns it.
    pub async fn wait_ended(&self, i: usize) -> RealtimeSession {
        self.wait_until(|s| s.get(i).filter(|s| s.ended.is_some()).cloned())
            .await
    }
}

/// The size of the big text message the realtime upstream sends on `test.big`.
pub const REALTIME_BIG: usize = 2 << 20;

/// A `response.done` event (OpenAI Realtime) for response `n`, with `usage` as the value of
/// `response.usage` (left out when `None`).
fn realtime_done(n: u64, usage: Option<&serde_json::Value>) -> String {
    let mut response = serde_json::json!({
        "object": "realtime.response",
        "id": format!("resp_{n}"),
        "status": "completed",
        "output": [{"type": "message", "role": "assistant"}],
    });
    if let Some(u) = usage {
        response["usage"] = u.clone();
    }
    serde_json::json!({"type": "response.done", "event_id": format!("event_done_{n}"), "response": response})
        .to_string()
}

/// The realtime usage object OpenAI sends: `input` + `output` tokens.
fn realtime_usage(input: u64, output: u64) -> serde_json::Value {
    serde_json::json!({
        "total_tokens": input + output,
        "input_tokens": input,
        "output_tokens": output,
        "input_token_details": {"cached_tokens": 0, "text_tokens": input, "audio_tokens": 0},
        "output_token_details": {"text_tokens": output, "audio_tokens": 0},
    })
}

/// An OpenAI Realtime-style WebSocket upstream (tungstenite). It accepts a WebSocket at
/// `/v1/realtime` only (anything else: 404), sends `session.created` at once, and then answers
/// the client's text messages (JSON, by their `type`):
/// - `response.create`: a `response.created`, an audio transcript delta, two text deltas (one
///   whose text says `response.done`, a trap for a substring search), then `response.done` for
///   response N (`resp_1`, `resp_2`, …) with usage `input_tokens` I and `output_tokens` O: the
///   message's own `input_tokens`/`output_tokens` fields, else the handshake's `input`/`output`
///   query parameters, else 20 and 5. A `usage` field in the message is sent verbatim as
///   `response.usage` instead (any JSON, to send unbelievable figures), and `"no_usage": true`
///   leaves usage out. With `"fragmented": true` the `response.done` goes as a text frame and two
///   continuation frames, with a ping between the first two. With `"hold": true` only the
///   `response.created` and the audio transcript delta are sent: the response is begun and never
///   done (its `response.done` never comes; the session goes on).
/// - `test.big`: one text frame of exactly [`REALTIME_BIG`] bytes: a JSON `response.done` with
///   usage (1000 + 1000 tokens) padded by a `padding` string of varied characters — a message
///   over the gateway's scanning bound, which must pass intact and not be charged.
///
/// A handshake query parameter `extensions=V` makes the 101 carry `Sec-WebSocket-Extensions: V`,
/// offered or not (an upstream that picks an extension on its own; nothing is compressed).
///
/// Everything received and sent is recorded per session (see [`RealtimeSession`]).
pub async fn realtime_upstream() -> Realtime {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = tokio::sync::watch::Sender::new(Vec::<RealtimeSession>::new());
    let rt = Realtime {
        addr,
        log: log.clone(),
    };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(realtime_session(stream, log.clone()));
        }
    });
    rt
}

async fn realtime_session(
    stream: tokio::net::TcpStream,
    log: tokio::sync::watch::Sender<Vec<RealtimeSession>>,
) {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::{Bytes as WsBytes, Message};

    let mut seen = RealtimeSession::default();
    // tungstenite's callback type: its refusal is the large `http::Response` it sends.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        seen.target = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        seen.headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        if req.uri().path() == "/v1/realtime" {
            let chosen = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("extensions="));
            if let Some(v) = chosen {
                resp.headers_mut()
                    .insert(http::header::SEC_WEBSOCKET_EXTENSIONS, v.parse().unwrap());
            }
            Ok(resp)
        } else {
            let mut refused = ErrorResponse::new(Some("no such realtime endpoint".to_owned()));
            *refused.status_mut() = StatusCode::NOT_FOUND;
            Err(refused)
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    let q: HashMap<String, String> = seen
        .target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let num = |k: &str, d: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let (default_in, default_out) = (num("input", 20), num("output", 5));
    let mut index = 0;
    log.send_modify(|s| {
        index = s.len();
        s.push(seen);
    });
    let note = |f: &dyn Fn(&mut RealtimeSession)| log.send_modify(|s| f(&mut s[index]));
    // Records, then sends one text message (in one frame).
    macro_rules! say {
        ($text:expr) => {{
            let text: String = $text;
            note(&|s| s.sent.push(text.clone()));
            ws.send(Message::text(text)).await
        }};
    }
    let created = serde_json::json!({
        "type": "session.created",
        "event_id": "event_session",
        "session": {"id": "sess_1", "object": "realtime.session", "model": q.get("model")},
    });
    let mut ended = "dropped".to_owned();
    let mut responses = 0u64;
    let mut r = say!(created.to_string());
    while r.is_ok() {
        let msg = match ws.next().await {
            None => break,
            Some(Err(e)) => {
                ended = format!("read error: {e}");
                break;
            }
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Text(t) => t.as_str().to_owned(),
            Message::Close(_) => {
                ended = "close frame".to_owned();
                break;
            }
            _ => continue,
        };
        note(&|s| s.received.push(text.clone()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match v["type"].as_str() {
            Some("response.create") => {
                responses += 1;
                let n = responses;
                let rid = format!("resp_{n}");
                let usage = if v["no_usage"].as_bool() == Some(true) {
                    None
                } else if let Some(u) = v.get("usage") {
                    Some(u.clone())
                } else {
                    Some(realtime_usage(
                        v["input_tokens"].as_u64().unwrap_or(default_in),
                        v["output_tokens"].as_u64().unwrap_or(default_out),
                    ))
                };
                let deltas = [
                    serde_json::json!({"type": "response.created", "event_id": format!("event_{n}_0"), "response": {"id": rid, "status": "in_progress"}}),
                    serde_json::json!({"type": "response.audio_transcript.delta", "event_id": format!("event_{n}_1"), "response_id": rid, "delta": "Hello"}),
                    serde_json::json!({"type": "response.text.delta", "event_id": format!("event_{n}_2"), "response_id": rid, "delta": ", the word \"response.done\" "}),
                    serde_json::json!({"type": "response.text.delta", "event_id": format!("event_{n}_3"), "response_id": rid, "delta": "is not the end."}),
                ];
                let hold = v["hold"].as_bool() == Some(true);
                let begun = if hold { &deltas[..2] } else { &deltas[..] };
                for d in begun {
                    r = say!(d.to_string());
                    if r.is_err() {
                        break;
                    }
                }
                if r.is_err() {
                    break;
                }
                if hold {
                    continue;
                }
                let done = realtime_done(n, usage.as_ref());
                note(&|s| s.responses += 1);
                if v["fragmented"].as_bool() == Some(true) {
                    note(&|s| s.sent.push(done.clone()));
                    let b = done.as_bytes();
                    let (a, rest) = b.split_at(b.len() / 3);
                    let (m, z) = rest.split_at(rest.len() / 2);
                    let frames = [
                        Message::Frame(Frame::message(
                            WsBytes::copy_from_slice(a),
                            OpCode::Data(Data::Text),
                            false,
                        )),
                        Message::Ping(WsBytes::from_static(b"between fragments")),
                        Message::Frame(Frame::message(
                            WsBytes::copy_from_slice(m),
                            OpCode::Data(Data::Continue),
                            false,
                        )),
                        Message::Frame(Frame::message(
                            WsBytes::copy_from_slice(z),
                            OpCode::Data(Data::Continue),
                            true,
                        )),
                    ];
                    for f in frames {
                        r = ws.send(f).await;
                        if r.is_err() {
                            break;
                        }
                    }
                } else {
                    r = say!(done);
                }
            }
            Some("test.big") => {
                let head = realtime_done(0, Some(&realtime_usage(1000, 1000)));
                // `{…,"padding":"…"}`: the done event with a padding field, to the exact size.
                let open = format!("{},\"padding\":\"", &head[..head.len() - 1]);
                let pad_len = REALTIME_BIG - open.len() - 2;
                let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
                let mut big = open.into_bytes();
                big.extend((0..pad_len).map(|i| alphabet[(i * 7 + i / 1000) % alphabet.len()]));
                big.extend_from_slice(b"\"}");
                let big = String::from_utf8(big).unwrap();
                assert_eq!(big.len(), REALTIME_BIG);
                r = say!(big);
            }
            _ => {}
        }
    }
    if let Err(e) = &r {
        ended = format!("write error: {e}");
    }
    // Flushes the close reply, if the client sent a close frame.
    let _ = ws.close(None).await;
    note(&|s| s.ended = Some(ended.clone()));
}

/// An address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}
