//! Shared test support: the real gateway binary on an ephemeral port, real upstream servers
//! (hyper and tungstenite apps), certificates made with rcgen, and the audit log as JSON.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- lines from a child process

/// Lines a child wrote, collected by a reader thread; waiters are woken on each new line.
#[derive(Clone, Default)]
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    notify: Arc<Notify>,
    closed: Arc<Mutex<bool>>,
}

impl Lines {
    fn collect<R: std::io::Read + Send + 'static>(r: R) -> Lines {
        let l = Lines::default();
        let l2 = l.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                l2.lines.lock().unwrap().push(line);
                l2.notify.notify_waiters();
            }
            *l2.closed.lock().unwrap() = true;
            l2.notify.notify_waiters();
        });
        l
    }

    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// Waits until `pred` holds for the collected lines (bounded by `WAIT`).
    pub async fn wait_until<T>(&self, mut pred: impl FnMut(&[String]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = pred(&self.lines.lock().unwrap()) {
                return v;
            }
            if *self.closed.lock().unwrap() {
                // One last look: the closing line may have arrived with the close.
                if let Some(v) = pred(&self.lines.lock().unwrap()) {
                    return v;
                }
                panic!(
                    "stream closed before the awaited line; got:\n{}",
                    self.text()
                );
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for a line; got:\n{}", self.text());
            }
        }
    }
}

// ---------------------------------------------------------------- the gateway

pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub stdout: Lines,
    pub stderr: Lines,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_portcullis")
}

/// The `[server]` section with short, test-friendly timeouts; `extra` is appended inside it.
pub fn server_section(extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\nshutdown_grace = \"10s\"\n{extra}\n"
    )
}

impl Gateway {
    /// Starts the binary on `config` and waits for its `startup` event.
    pub async fn start(config: &str) -> Gateway {
        Self::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_full(config, env, false).await
    }

    /// `addr_from_stderr`: find the bound address in the diagnostic log (for runs whose audit
    /// log, and so the `startup` event, goes to a file).
    pub async fn start_full(config: &str, env: &[(&str, &str)], addr_from_stderr: bool) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("portcullis.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env("PORTCULLIS_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn gateway");
        let stdout = Lines::collect(child.stdout.take().unwrap());
        let stderr = Lines::collect(child.stderr.take().unwrap());
        let addr = if addr_from_stderr {
            stderr
                .wait_until(|lines| {
                    lines.iter().find_map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).ok()?;
                        let list = v["fields"]["listeners"].as_str()?;
                        list.trim_matches(|c| c == '[' || c == ']')
                            .split(',')
                            .next()?
                            .trim()
                            .parse()
                            .ok()
                    })
                })
                .await
        } else {
            stdout
                .wait_until(|lines| {
                    lines.iter().find_map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).ok()?;
                        (v["event"] == "startup")
                            .then(|| v["listeners"][0].as_str().unwrap().parse().unwrap())
                    })
                })
                .await
        };
        Gateway {
            child,
            addr,
            stdout,
            stderr,
            dir,
            config_path,
        }
    }

    /// The admin listener's address, from the `startup` event.
    pub fn admin_addr(&self) -> SocketAddr {
        self.events("startup")[0]["admin"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The admin listener's /metrics text (no token).
    pub async fn metrics_text(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin_addr()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Audit records of one event type, from stdout.
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.stdout
            .all()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits until `n` audit events of type `event` have been written.
    pub async fn wait_events(&self, event: &str, n: usize) -> Vec<serde_json::Value> {
        self.stdout
            .wait_until(|lines| {
                let found: Vec<serde_json::Value> = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["event"] == event)
                    .collect();
                (found.len() >= n).then_some(found)
            })
            .await
    }

    /// Replaces the config file (the next SIGHUP loads it).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    /// SIGHUP, then waits for the `reload` event it produces; returns that event.
    pub async fn reload(&self) -> serde_json::Value {
        let before = self.events("reload").len();
        self.signal("HUP");
        self.wait_events("reload", before + 1).await.pop().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub async fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(std::time::Instant::now() < deadline, "gateway did not exit");
            // Process exit has no async notification in std; poll at a short interval.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Audit records with `event == "request"`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.stdout
            .all()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "request")
            .collect()
    }

    /// Waits for `n` request records.
    pub async fn wait_requests(&self, n: usize) -> Vec<serde_json::Value> {
        self.stdout
            .wait_until(|lines| {
                let recs: Vec<serde_json::Value> = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["event"] == "request")
                    .collect();
                (recs.len() >= n).then_some(recs)
            })
            .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `portcullis check` on a config text; returns (exit code, stdout, stderr).
pub fn check(config: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("check")
        .arg("--config")
        .arg(&path)
        .current_dir(dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------- an HTTP upstream

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
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
    Pause(Duration),
    /// Fails the body: the upstream's connection is cut.
    Cut,
}

fn scripted(steps: Vec<Step>) -> UpBody {
    let s = futures_util::stream::unfold(steps.into_iter(), |mut steps| async move {
        loop {
            match steps.next()? {
                Step::Event(e) => return Some((Ok(Frame::data(Bytes::from(e))), steps)),
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
    seen.lock().unwrap().push(Seen {
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
    });
    let path = req.uri().path().to_owned();
    let q = query(&req);
    let num = |k: &str, d: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let resp = if path.ends_with("/chat/completions") {
        // An OpenAI/OpenRouter-style chat endpoint: JSON with usage, or SSE chunks and, when
        // `stream_options.include_usage` is set, a final usage-only event before [DONE].
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
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

// ---------------------------------------------------------------- raw HTTP/1.1

/// Sends raw bytes and reads until the server closes or `WAIT` passes; returns the text.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of the first response in a raw answer.
pub fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `GET target` on a fresh connection with `Connection: close`; returns the status.
pub async fn raw_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n");
    let r = raw(addr, req.as_bytes()).await;
    (status_of(&r), r)
}

// ---------------------------------------------------------------- TLS

pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// A client certificate signed by the same CA (for mTLS).
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

/// A CA and a `localhost`/`127.0.0.1` server certificate signed by it.
pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["phone.client".to_owned()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

impl Pki {
    /// Writes cert and key into `dir`; returns the `[tls]` section.
    pub fn tls_section(&self, dir: &std::path::Path) -> String {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        )
    }

    pub fn reqwest(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    pub fn rustls_client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

// ---------------------------------------------------------------- keys and requests

/// A `[[keys]]` block for `key` (hashed as the config stores it) plus `extra` lines.
pub fn key_block(id: &str, key: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nhash = \"{}\"\n{extra}\n",
        portcullis::keys::hash_string(key)
    )
}

/// A raw HTTP/1.1 request with `Connection: close`; `headers` are "Name: value" lines.
pub async fn send(addr: SocketAddr, method: &str, target: &str, headers: &[&str]) -> (u16, String) {
    let mut r = format!("{method} {target} HTTP/1.1\r\nHost: gw.test\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if method == "POST" || method == "PUT" {
        r.push_str("Content-Length: 0\r\n");
    }
    r.push_str("Connection: close\r\n\r\n");
    let resp = raw(addr, r.as_bytes()).await;
    (status_of(&resp), resp)
}

/// The value of header `name` in a raw response (case-insensitive), if present.
pub fn header_of(resp: &str, name: &str) -> Option<String> {
    let head = resp.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// The JSON error code in a raw response body.
pub fn code_of(resp: &str) -> String {
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Waits (bounded) until the audit file at `path` holds `n` request records; returns them.
/// A file has no change notification in std, so it is re-read at a short interval.
pub async fn wait_file_records(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "request")
            .collect();
        if recs.len() >= n {
            return recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} records in {}:\n{text}",
            recs.len(),
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
