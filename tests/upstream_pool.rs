//! The upstream connection pool: HTTP/1.1 keep-alive connections to an upstream are reused for
//! request after request (plain, chunked and bodiless responses, responses ending with trailer
//! fields, uploads, after a burst of concurrent requests, an upstream at an IPv6 literal), and
//! never reused when they cannot be: a connection the upstream closed (with or without
//! `Connection: close`, at once or after an idle timeout) costs the client nothing, one whose
//! response the client abandoned half read is not handed out again, and one whose response is
//! done while its request body is still being written (the upstream answered early) is not lent
//! to another request until the upload has ended.
//!
//! Each upstream here is a small raw HTTP/1.1 server that numbers the connections it accepts and
//! logs what it served on which, so the tests count the connections the gateway opened to the
//! upstream, not the client's own connections to the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Barrier, watch};

/// The bound on every wait in this file: a response, a body, an event from the upstream.
const WITHIN: Duration = Duration::from_secs(10);

/// How many requests the barrier upstream path (`/held`) holds until all have arrived.
const HELD: usize = 8;

/// The first event of the streamed response that `/stream` begins and never finishes.
const FIRST_EVENT: &str = "data: first\n\n";

/// The length the upstream announces in its answer to a HEAD request (and sends no body).
const HEAD_LENGTH: usize = 1234;

/// The trailer field that ends the chunked responses to `/trailers…`.
const TRAILER: &str = "x-checksum: 0123abcd";

/// The body of the upstream's answer to `POST /early…`, sent before it reads the request body.
const EARLY_ANSWER: &str = "answered early";

// ---------------------------------------------------------------- the upstream

/// What the upstream does with a connection once it has written a response.
#[derive(Clone, Copy, Debug)]
enum After {
    /// Keeps it open for the next request.
    KeepAlive,
    /// Shuts the socket down at once, without having said `Connection: close` (an upstream
    /// whose keep-alive timeout fires just as the response goes out).
    Shutdown,
    /// Says `Connection: close` in the response, then closes.
    ConnectionClose,
}

#[derive(Clone, Copy, Debug)]
struct Behaviour {
    after: After,
    /// Closes a connection that has served a request and then waited this long for the next
    /// one (uvicorn's `timeout_keep_alive`).
    idle_close: Option<Duration>,
}

const KEEP_ALIVE: Behaviour = Behaviour {
    after: After::KeepAlive,
    idle_close: None,
};

/// One request the upstream read whole and answered (or, for `/held`, began to).
#[derive(Clone, Debug)]
struct Served {
    /// The connection it came on: 1 for the first connection accepted, 2 for the next, ….
    conn: usize,
    method: String,
    target: String,
    /// The length of the request body as read.
    body_len: usize,
}

/// Everything the upstream saw, in order.
#[derive(Clone, Debug, Default)]
struct Log {
    served: Vec<Served>,
    /// Connections that have ended (either side closed it), by number.
    closed: Vec<usize>,
    /// Connections on which a `/stream` response was begun (its first event written).
    streaming: Vec<usize>,
    /// Connections on which more bytes (a request) arrived while a `/stream` response on them was
    /// still unfinished: a half-read connection handed out again.
    reused_unfinished: Vec<usize>,
}

impl Log {
    /// The connections the requests to targets starting with `prefix` were served on, in order.
    fn conns_of(&self, prefix: &str) -> Vec<usize> {
        self.served
            .iter()
            .filter(|s| s.target.starts_with(prefix))
            .map(|s| s.conn)
            .collect()
    }
}

struct Shared {
    behaviour: Behaviour,
    accepted: Arc<AtomicUsize>,
    log: watch::Sender<Log>,
    /// Holds `/held` requests until `HELD` of them have arrived.
    barrier: Barrier,
}

/// A raw HTTP/1.1 upstream (on 127.0.0.1, or where [`PoolUpstream::start_on`] binds it). It
/// answers by method and path:
/// - `HEAD` anything: 200 with `Content-Length: HEAD_LENGTH` and no body;
/// - `POST /early…`: 200, `EARLY_ANSWER` with a Content-Length, as soon as the request head is
///   in; only then is the request body read (to its end, and logged), and nothing more is sent;
/// - `POST` anything else: 200, the body `received N bytes, fnv H` (the request body's length
///   and FNV-1a hash; Content-Length or chunked request bodies);
/// - `/no-content`: 204, no body;
/// - `/chunked…`: 200, chunked, `reply to <target>` in three chunks;
/// - `/trailers…`: as `/chunked…`, the last chunk followed by the trailer field `TRAILER`
///   (announced in a `Trailer` header);
/// - `/stream`: 200, chunked, the chunk `FIRST_EVENT`, then nothing more: the response is never
///   finished, and the connection ends when the gateway closes it;
/// - `/held…`: as any other GET once `HELD` requests to `/held…` have arrived;
/// - anything else: 200, `reply to <target>` with a Content-Length.
struct PoolUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    log: watch::Sender<Log>,
}

impl PoolUpstream {
    /// On 127.0.0.1.
    async fn start(behaviour: Behaviour) -> PoolUpstream {
        PoolUpstream::start_on("127.0.0.1:0", behaviour)
            .await
            .expect("an upstream on 127.0.0.1")
    }

    /// On `bind`; `None` when it cannot be bound there (an address this host does not have).
    async fn start_on(bind: &str, behaviour: Behaviour) -> Option<PoolUpstream> {
        let listener = TcpListener::bind(bind).await.ok()?;
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let log = watch::Sender::new(Log::default());
        let shared = Arc::new(Shared {
            behaviour,
            accepted: accepted.clone(),
            log: log.clone(),
            barrier: Barrier::new(HELD),
        });
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let conn = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve_connection(stream, conn, shared.clone()));
            }
        });
        Some(PoolUpstream {
            addr,
            accepted,
            log,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn log(&self) -> Log {
        self.log.borrow().clone()
    }

    /// Waits (bounded by `WITHIN`) until `pred` holds for the log; woken on every change.
    async fn wait_until<T>(&self, what: &str, mut pred: impl FnMut(&Log) -> Option<T>) -> T {
        let mut rx = self.log.subscribe();
        match wait_watch(&mut rx, WITHIN, |l| pred(l)).await {
            Some(v) => v,
            None => panic!(
                "timed out waiting until {what}; upstream log: {:#?}",
                self.log()
            ),
        }
    }

    /// Waits until connection `conn` has ended.
    async fn wait_closed(&self, conn: usize) {
        self.wait_until(&format!("connection {conn} has ended"), |l| {
            l.closed.contains(&conn).then_some(())
        })
        .await;
    }
}

/// Serves one connection: request after request until either side ends it.
async fn serve_connection(mut s: TcpStream, conn: usize, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    let mut served_one = false;
    loop {
        // The idle timeout runs between requests, not before the first one (a slow gateway's
        // first request is not an idle connection).
        let idle = shared.behaviour.idle_close.filter(|_| served_one);
        let Some(head) = read_head(&mut s, &mut buf, idle).await else {
            break;
        };
        let mut request_line = head.lines().next().unwrap_or("").split(' ');
        let method = request_line.next().unwrap_or("").to_owned();
        let target = request_line.next().unwrap_or("").to_owned();
        let close = matches!(shared.behaviour.after, After::ConnectionClose);
        let connection = if close { "Connection: close\r\n" } else { "" };
        // Answered before its body is read: the gateway may still be writing it.
        let early = method == "POST" && target.starts_with("/early");
        if early {
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{EARLY_ANSWER}",
                EARLY_ANSWER.len()
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                break;
            }
        }
        let Some(body) = read_body(&mut s, &mut buf, &head).await else {
            break;
        };
        shared.log.send_modify(|l| {
            l.served.push(Served {
                conn,
                method: method.clone(),
                target: target.clone(),
                body_len: body.len(),
            });
        });
        served_one = true;

        if target == "/stream" {
            let begun = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{FIRST_EVENT}\r\n",
                FIRST_EVENT.len()
            );
            if s.write_all(begun.as_bytes()).await.is_err() {
                break;
            }
            shared.log.send_modify(|l| l.streaming.push(conn));
            // The rest never comes: wait for the gateway to close the connection. Anything it
            // sends instead is a request on a connection whose response is unfinished.
            let mut byte = [0u8; 1];
            if matches!(s.read(&mut byte).await, Ok(n) if n > 0) {
                shared.log.send_modify(|l| l.reused_unfinished.push(conn));
            }
            break;
        }
        if target.starts_with("/held") {
            shared.barrier.wait().await;
        }

        let answer = if early {
            // Already answered.
            String::new()
        } else if method == "HEAD" {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {HEAD_LENGTH}\r\n{connection}\r\n"
            )
        } else if method == "POST" {
            let text = format!("received {} bytes, fnv {:016x}", body.len(), fnv1a(&body));
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{text}",
                text.len()
            )
        } else if target == "/no-content" {
            format!("HTTP/1.1 204 No Content\r\n{connection}\r\n")
        } else if target.starts_with("/chunked") || target.starts_with("/trailers") {
            let trailers = target.starts_with("/trailers");
            let mut announced = String::new();
            if trailers {
                let (name, _) = TRAILER.split_once(':').unwrap();
                write!(announced, "Trailer: {name}\r\n").unwrap();
            }
            let mut a = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n{announced}{connection}\r\n"
            );
            for chunk in ["reply ", "to ", target.as_str()] {
                write!(a, "{:x}\r\n{chunk}\r\n", chunk.len()).unwrap();
            }
            a.push_str("0\r\n");
            if trailers {
                write!(a, "{TRAILER}\r\n").unwrap();
            }
            a.push_str("\r\n");
            a
        } else {
            let text = format!("reply to {target}");
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{text}",
                text.len()
            )
        };
        if s.write_all(answer.as_bytes()).await.is_err() {
            break;
        }
        if !matches!(shared.behaviour.after, After::KeepAlive) {
            break;
        }
    }
    let _ = s.shutdown().await;
    drop(s);
    shared.log.send_modify(|l| l.closed.push(conn));
}

/// Reads up to the end of a request head (`\r\n\r\n`) and returns the head; what follows stays
/// in `buf`. `None` when the connection ends first, or when `idle` passes with no byte of a
/// request.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>, idle: Option<Duration>) -> Option<String> {
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..i + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        let mut chunk = [0u8; 16 * 1024];
        let read = s.read(&mut chunk);
        let n = match idle {
            Some(d) if buf.is_empty() => tokio::time::timeout(d, read).await.ok()?,
            _ => read.await,
        };
        match n {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads the body the head announces (Content-Length or chunked; none otherwise).
async fn read_body(s: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Option<Vec<u8>> {
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = read_line(s, buf).await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(s, buf).await?.is_empty() {}
                return Some(body);
            }
            fill(s, buf, size + 2).await?;
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    }
    let len: usize = header("content-length").map_or(Some(0), |v| v.parse().ok())?;
    fill(s, buf, len).await?;
    Some(buf.drain(..len).collect())
}

/// Reads one CRLF-terminated line (without its CRLF).
async fn read_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = find(buf, b"\r\n") {
            let line: Vec<u8> = buf.drain(..i + 2).collect();
            return Some(String::from_utf8_lossy(&line[..i]).into_owned());
        }
        read_more(s, buf).await?;
    }
}

/// Reads until `buf` holds at least `n` bytes.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<()> {
    while buf.len() < n {
        read_more(s, buf).await?;
    }
    Some(())
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// FNV-1a, 64 bits: the upstream's fingerprint of a body it received.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------- the gateway and its client

/// One keyless route `api` on `/` to `upstream`, without the per-IP rate limit (the tests send
/// many requests from one address), on ONE worker: the pool may be kept per worker thread, and
/// a client connection may land on any worker, so with several a new upstream connection could
/// be another worker's pool at work, not a failure to reuse (nor a success to refuse reuse).
fn config(upstream: &str) -> String {
    format!(
        "{}[limits]\nper_ip = \"off\"\n[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{upstream}\"\nauth = \"none\"\n",
        server_section("workers = 1")
    )
}

/// A response read whole: status, headers, body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` and reads its response whole, each bounded by `WITHIN`.
async fn exchange(req: reqwest::RequestBuilder, what: &str) -> Answer {
    let resp = tokio::time::timeout(WITHIN, req.send())
        .await
        .unwrap_or_else(|_| panic!("{what}: no response in {WITHIN:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(WITHIN, resp.bytes())
        .await
        .unwrap_or_else(|_| panic!("{what}: body not whole in {WITHIN:?}"))
        .unwrap_or_else(|e| panic!("{what}: body: {e}"))
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

/// `GET path` through the gateway, answered 200 with the upstream's `reply to <path>`.
async fn get_ok(client: &reqwest::Client, gw: &Gateway, up: &PoolUpstream, path: &str) {
    let a = exchange(client.get(gw.url(path)), &format!("GET {path}")).await;
    assert_eq!(
        (a.status, a.text()),
        (200, format!("reply to {path}")),
        "GET {path}; upstream log: {:#?}",
        up.log()
    );
}

// ---------------------------------------------------------------- the tests

/// `n` GETs of `prefix/{i}` from a keep-alive upstream, one after another, each answered whole,
/// all on one upstream connection.
async fn all_on_one_connection(prefix: &str, n: usize) {
    let up = PoolUpstream::start(KEEP_ALIVE).await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 0..n {
        get_ok(&client, &gw, &up, &format!("{prefix}/{i}")).await;
    }
    assert_eq!(up.accepted(), 1, "{:#?}", up.log());
    assert_eq!(up.log().conns_of(prefix), vec![1; n]);
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    all_on_one_connection("/plain", 20).await;
}

#[tokio::test]
async fn an_upstream_closing_after_each_response_without_saying_so_costs_no_request() {
    let up = PoolUpstream::start(Behaviour {
        after: After::Shutdown,
        idle_close: None,
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 0..20 {
        // 200, never 502: a pooled connection the upstream has closed is not used.
        get_ok(&client, &gw, &up, &format!("/plain/{i}")).await;
    }
    assert_eq!(up.accepted(), 20, "{:#?}", up.log());
    assert_eq!(
        up.log().conns_of("/plain"),
        (1..=20).collect::<Vec<_>>(),
        "one request per connection"
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closed_when_idle_is_not_reused() {
    let up = PoolUpstream::start(Behaviour {
        after: After::KeepAlive,
        idle_close: Some(Duration::from_millis(100)),
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 1..=6 {
        get_ok(&client, &gw, &up, &format!("/plain/{i}")).await;
        assert_eq!(up.log().conns_of(&format!("/plain/{i}")), vec![i]);
        // The upstream's keep-alive timeout fires; only then the next request.
        up.wait_closed(i).await;
    }
    assert_eq!(up.accepted(), 6, "{:#?}", up.log());
}

#[tokio::test]
async fn an_upstream_saying_connection_close_gets_a_new_connection_each_time() {
    let up = PoolUpstream::start(Behaviour {
        after: After::ConnectionClose,
        idle_close: None,
    })
    .await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 0..10 {
        get_ok(&client, &gw, &up, &format!("/plain/{i}")).await;
    }
    assert_eq!(up.accepted(), 10, "{:#?}", up.log());
    assert_eq!(up.log().conns_of("/plain"), (1..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn no_content_responses_reuse_one_upstream_connection() {
    let up = PoolUpstream::start(KEEP_ALIVE).await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 0..10 {
        let a = exchange(
            client.get(gw.url("/no-content")),
            &format!("GET /no-content #{i}"),
        )
        .await;
        assert_eq!(a.status, 204, "#{i}: {}", a.text());
        assert!(a.body.is_empty(), "#{i}: {}", a.text());
    }
    assert_eq!(up.accepted(), 1, "{:#?}", up.log());
    assert_eq!(up.log().conns_of("/no-content"), vec![1; 10]);
}

#[tokio::test]
async fn head_responses_with_a_length_and_no_body_reuse_one_upstream_connection() {
    let up = PoolUpstream::start(KEEP_ALIVE).await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 0..10 {
        let path = format!("/file/{i}");
        let a = exchange(client.head(gw.url(&path)), &format!("HEAD {path}")).await;
        assert_eq!(a.status, 200, "HEAD {path}");
        assert_eq!(
            a.headers
                .get("content-length")
                .and_then(|v| v.to_str().ok()),
            Some(HEAD_LENGTH.to_string().as_str()),
            "HEAD {path}: the upstream's length is passed on"
        );
        assert!(a.body.is_empty(), "HEAD {path}: {}", a.text());
    }
    let log = up.log();
    assert!(log.served.iter().all(|s| s.method == "HEAD"), "{log:#?}");
    assert_eq!(up.accepted(), 1, "{log:#?}");
    assert_eq!(log.conns_of("/file"), vec![1; 10]);
}

#[tokio::test]
async fn chunked_responses_reuse_one_upstream_connection() {
    all_on_one_connection("/chunked", 10).await;
}

#[tokio::test]
async fn responses_with_trailers_reuse_one_upstream_connection() {
    all_on_one_connection("/trailers", 10).await;
}

#[tokio::test]
async fn a_connection_whose_response_the_client_abandoned_is_closed_not_reused() {
    let up = PoolUpstream::start(KEEP_ALIVE).await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();

    // A streamed response: its first event arrives, the rest never does.
    let mut resp = tokio::time::timeout(WITHIN, client.get(gw.url("/stream")).send())
        .await
        .expect("the stream's head in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    while got.len() < FIRST_EVENT.len() {
        let chunk = tokio::time::timeout(WITHIN, resp.chunk())
            .await
            .expect("the first event in time")
            .unwrap()
            .expect("the stream goes on");
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, FIRST_EVENT.as_bytes());
    assert_eq!(up.log().streaming, vec![1]);
    // The client goes away mid-stream; the gateway ends the exchange (its audit record).
    drop(resp);
    let rec = gw.wait_requests(1).await.remove(0);
    assert_eq!(rec["outcome"], "client_closed", "{rec}");

    // The next request is answered whole, on a new upstream connection: the half-read one,
    // with the rest of a response still to come, is not handed out again.
    get_ok(&client, &gw, &up, "/plain/after").await;
    let log = up.log();
    assert!(log.reused_unfinished.is_empty(), "{log:#?}");
    assert_eq!(log.conns_of("/plain/after"), vec![2], "{log:#?}");
    assert_eq!(up.accepted(), 2, "{log:#?}");
    // And it is closed, not kept: the upstream sees it end.
    up.wait_closed(1).await;
    assert!(up.log().reused_unfinished.is_empty(), "{:#?}", up.log());
}

#[tokio::test]
async fn connections_opened_for_concurrent_requests_are_all_reused_afterwards() {
    let up = PoolUpstream::start(KEEP_ALIVE).await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();

    // HELD requests at once; the upstream answers none until all have arrived, so each needs a
    // connection of its own.
    let held: Vec<_> = (0..HELD)
        .map(|i| {
            let req = client.get(gw.url(&format!("/held/{i}")));
            tokio::spawn(async move { exchange(req, &format!("GET /held/{i}")).await })
        })
        .collect();
    for (i, task) in held.into_iter().enumerate() {
        let a = task.await.unwrap();
        assert_eq!(
            (a.status, a.text()),
            (200, format!("reply to /held/{i}")),
            "{:#?}",
            up.log()
        );
    }
    assert_eq!(up.accepted(), HELD, "{:#?}", up.log());
    let mut conns = up.log().conns_of("/held");
    conns.sort_unstable();
    assert_eq!(conns, (1..=HELD).collect::<Vec<_>>());

    // Then requests one at a time: all served on those connections, none opened.
    for i in 0..HELD {
        get_ok(&client, &gw, &up, &format!("/plain/{i}")).await;
    }
    let log = up.log();
    assert_eq!(up.accepted(), HELD, "{log:#?}");
    assert!(
        log.conns_of("/plain")
            .iter()
            .all(|c| (1..=HELD).contains(c)),
        "{log:#?}"
    );
}

#[tokio::test]
async fn uploads_arrive_whole_and_reuse_one_upstream_connection() {
    let up = PoolUpstream::start(KEEP_ALIVE).await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 0..10u8 {
        let body: Vec<u8> = (0..64 * 1024usize)
            .map(|j| (j.wrapping_mul(31) as u8) ^ i)
            .collect();
        let expected = format!("received {} bytes, fnv {:016x}", body.len(), fnv1a(&body));
        let path = format!("/upload/{i}");
        let a = exchange(
            client.post(gw.url(&path)).body(body),
            &format!("POST {path}"),
        )
        .await;
        assert_eq!(
            (a.status, a.text()),
            (200, expected),
            "POST {path}; upstream log: {:#?}",
            up.log()
        );
    }
    let log = up.log();
    assert!(
        log.served
            .iter()
            .all(|s| s.method == "POST" && s.body_len == 64 * 1024),
        "{log:#?}"
    );
    assert_eq!(up.accepted(), 1, "{log:#?}");
    assert_eq!(log.conns_of("/upload"), vec![1; 10]);
}

#[tokio::test]
async fn an_early_answer_does_not_lend_a_connection_still_uploading() {
    let up = PoolUpstream::start(KEEP_ALIVE).await;
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();

    // A chunked upload: its first chunk now, the rest only when this test sends it.
    let mut upload = TcpStream::connect(gw.addr).await.unwrap();
    upload
        .write_all(
            b"POST /early HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    // The upstream's early answer arrives whole while the upload is open.
    let mut got = Vec::new();
    tokio::time::timeout(WITHIN, async {
        while find(&got, EARLY_ANSWER.as_bytes()).is_none() {
            let mut b = [0u8; 4096];
            let n = upload.read(&mut b).await.unwrap();
            assert!(
                n > 0,
                "the gateway closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&b[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no early answer in {WITHIN:?}; upstream log: {:#?}",
            up.log()
        )
    });
    assert_eq!(status_of(&String::from_utf8_lossy(&got)), 200);
    // Its audit record is written when its response body has ended: by then the gateway has
    // given upstream connection 1 back to its pool, still writing the upload on it.
    let rec = gw.wait_requests(1).await.remove(0);
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["outcome"], "forwarded", "{rec}");
    assert!(
        up.log().served.is_empty(),
        "the upload has not ended: {:#?}",
        up.log()
    );

    // A request meanwhile is not lent connection 1: it goes on a new one.
    get_ok(&client, &gw, &up, "/during").await;
    assert_eq!(up.log().conns_of("/during"), vec![2], "{:#?}", up.log());
    assert_eq!(up.accepted(), 2, "{:#?}", up.log());

    // The upload ends on connection 1, whole: nothing of another request went into it.
    upload.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let early = up
        .wait_until("the upload has arrived", |l| {
            l.served.iter().find(|s| s.target == "/early").cloned()
        })
        .await;
    assert_eq!((early.conn, early.body_len), (1, 11), "{:#?}", up.log());
    // And the gateway goes on with the connections it has.
    for i in 0..4 {
        get_ok(&client, &gw, &up, &format!("/after/{i}")).await;
    }
    assert_eq!(up.accepted(), 2, "{:#?}", up.log());
}

#[tokio::test]
async fn an_ipv6_literal_upstream_is_reached_and_reused() {
    let Some(up) = PoolUpstream::start_on("[::1]:0", KEEP_ALIVE).await else {
        eprintln!("no IPv6 loopback (::1) here; skipped");
        return;
    };
    assert!(up.url().starts_with("http://[::1]:"), "{}", up.url());
    let gw = Gateway::start(&config(&up.url())).await;
    let client = client();
    for i in 0..5 {
        get_ok(&client, &gw, &up, &format!("/v6/{i}")).await;
    }
    assert_eq!(up.accepted(), 1, "{:#?}", up.log());
    assert_eq!(up.log().conns_of("/v6"), vec![1; 5]);
}
