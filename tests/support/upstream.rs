//! Real upstream servers for the gateway to forward to: an HTTP/1.1 + HTTP/2 hyper app that
//! records what it saw (with a [`Gate`] to hold requests) and serves the recorded LLM answers in
//! `tests/fixtures/usage/`, a WebSocket echo, a dead address.

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

/// An address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}
