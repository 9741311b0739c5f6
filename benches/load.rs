//! End-to-end load benchmark: the gateway against a direct upstream, side by side (issue 5).
//!
//! Run: `cargo bench --bench load` (about 2 minutes; installs Debian's `wrk` if it is missing).
//! The upstream and the load generators are pinned to core 0, the gateway to core 1 (taskset),
//! and gateway and direct runs alternate so that drift hits both alike. The gateway does its
//! full work: key check, limiter, audit log to a file, and TLS where the row says so.
//! `PORTCULLIS_BIN=path` runs another build of the gateway (an A/B against an older commit).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const KEY: &str = "pcx_bench-key-0123456789abcdefghijklmnopqrstuv";
const JSON: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}"#;

// ------------------------------------------------------------------ the upstream (own process)

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An SSE response streaming `s`.
fn event_stream<S>(s: S) -> http::Response<UpBody>
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static,
{
    http::Response::builder()
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(s)))
        .unwrap()
}

async fn upstream_svc(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    // `?n=N`, the only parameter the paths below take.
    let n: u64 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("n="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if path.ends_with("/sse") {
        let s = futures_util::stream::unfold(0u32, |i| async move {
            if i >= 20 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some((
                // Stamped with the wall clock at sending (both processes read the same clock),
                // so the reader measures each event's own transit time.
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                    "data: {}\n\n",
                    unix_micros()
                )))),
                i + 1,
            ))
        });
        return Ok(event_stream(s));
    }
    if path.ends_with("/chat_stream") {
        // An OpenAI-style stream as fast as the upstream can send it: n chunk events, one per
        // frame, then the usage event and [DONE].
        let s = futures_util::stream::iter((0..=n + 1).map(move |i| {
            let ev = if i < n {
                format!(
                    "data: {{\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"model\":\"openai/gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}},\"finish_reason\":null}}]}}\n\n"
                )
            } else if i == n {
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}\n\n".to_owned()
            } else {
                "data: [DONE]\n\n".to_owned()
            };
            Ok::<_, Infallible>(Frame::data(Bytes::from(ev)))
        }));
        return Ok(event_stream(s));
    }
    if path.ends_with("/responses_stream") || path.ends_with("/messages_stream") {
        // The Responses API's and Anthropic Messages' stream shapes (SPEC §8): n delta events,
        // then the event that carries the usage.
        let responses = path.ends_with("/responses_stream");
        let s = futures_util::stream::iter((0..=n).map(move |i| {
            let ev = match (responses, i < n) {
                (true, true) => format!(
                    "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"msg_abc123\",\"output_index\":0,\"content_index\":0,\"delta\":\"token {i} \"}}\n\n"
                ),
                (true, false) => "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_abc123\",\"status\":\"completed\",\"usage\":{\"input_tokens\":12,\"output_tokens\":3,\"total_tokens\":15}}}\n\n".to_owned(),
                (false, true) => format!(
                    "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"token {i} \"}}}}\n\n"
                ),
                (false, false) => "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n".to_owned(),
            };
            Ok::<_, Infallible>(Frame::data(Bytes::from(ev)))
        }));
        return Ok(event_stream(s));
    }
    if path.ends_with("/bytes") {
        let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
        let s = futures_util::stream::unfold(0u64, move |sent| {
            let chunk = chunk.clone();
            async move {
                if sent >= n {
                    return None;
                }
                let take = (n - sent).min(chunk.len() as u64) as usize;
                Some((
                    Ok::<_, Infallible>(Frame::data(chunk.slice(..take))),
                    sent + take as u64,
                ))
            }
        });
        return Ok(http::Response::new(BodyExt::boxed(StreamBody::new(s))));
    }
    Ok(http::Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(JSON)).boxed())
        .unwrap())
}

fn run_upstream() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap());
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), service_fn(upstream_svc))
                    .await;
            });
        }
    });
}

// ------------------------------------------------------------------ processes

use common::Proc;

fn rss_kib(pid: u32) -> u64 {
    common::vm_rss_kib(pid)
}

fn start_upstream() -> (Proc, SocketAddr) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(exe)
        .arg("--upstream")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc(child), line.trim().parse().unwrap())
}

struct Gw {
    proc: Proc,
    addr: SocketAddr,
}

fn start_gateway(
    dir: &std::path::Path,
    upstream: SocketAddr,
    tls: Option<&(String, String)>,
    workers: Option<usize>,
) -> Gw {
    let tls_section = match tls {
        None => String::new(),
        Some((cert, key)) => {
            std::fs::write(dir.join("cert.pem"), cert).unwrap();
            std::fs::write(dir.join("key.pem"), key).unwrap();
            format!(
                "[tls]\ncert = \"{}/cert.pem\"\nkey = \"{}/key.pem\"\n",
                dir.display(),
                dir.display()
            )
        }
    };
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4096\n{tls_section}[audit]\noutput = \"{}/audit.jsonl\"\n\
         [limits]\nper_ip = \"1000000/s\"\nper_key = \"1000000/s\"\nmax_connections_per_ip = 100000\n[[keys]]\nid = \"bench\"\nhash = \"{}\"\n\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"http://{upstream}\"\ntimeout = \"60s\"\n\
         [routes.upstream_headers]\nauthorization = \"Bearer sk-upstream\"\n\
         [[routes]]\nname = \"llm\"\npath = \"/llm/\"\nupstream = \"http://{upstream}\"\ntimeout = \"60s\"\nllm = true\n",
        dir.display(),
        portcullis::keys::hash_string(KEY)
    );
    let path = dir.join(format!("gw-{}.toml", tls.is_some()));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"])
        .arg(common::gateway_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("PORTCULLIS_LOG", "warn,portcullis=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(w) = workers {
        cmd.env("PORTCULLIS_SERVER__WORKERS", w.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && let Some(l) = v["fields"]["listeners"].as_str()
        {
            addr = Some(l.trim_matches(['[', ']']).parse().unwrap());
            break;
        }
    }
    Gw {
        proc: Proc(child),
        addr: addr.expect("gateway did not start"),
    }
}

// ------------------------------------------------------------------ wrk

struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_ms(s: &str) -> f64 {
    common::latency_ms(s).unwrap_or(0.0)
}

fn wrk(url: &str, secs: u32) -> WrkResult {
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            "wrk",
            "-t1",
            "-c50",
            &format!("-d{secs}s"),
            "--latency",
            "-H",
            &format!("Authorization: Bearer {KEY}"),
            url,
        ])
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
            .unwrap_or_default()
    };
    WrkResult {
        rps: field("Requests/sec:").trim().parse().unwrap_or(0.0),
        p50_ms: parse_ms(&field("50%")),
        p99_ms: parse_ms(&field("99%")),
    }
}

fn ensure_wrk() -> bool {
    common::ensure("wrk", &["wrk"]).is_some()
}

// ------------------------------------------------------------------ open-loop latency

/// Requests at a fixed `rate` over 50 keep-alive connections for `secs`; latency is measured from
/// each request's *scheduled* time, so a stall is not hidden (coordinated omission corrected).
async fn fixed_rate(addr: SocketAddr, rate: u32, secs: u64) -> Vec<f64> {
    let conns = 50;
    let per_conn_interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = tcp.set_nodelay(true);
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::new();
            let offset = per_conn_interval.mul_f64(c as f64 / conns as f64);
            let mut i = 0u32;
            loop {
                let scheduled = start + offset + per_conn_interval * i;
                if scheduled > start + Duration::from_secs(secs) {
                    break;
                }
                tokio::time::sleep_until(scheduled).await;
                let req = http::Request::get("/v1/x")
                    .header("host", addr.to_string())
                    .header("authorization", format!("Bearer {KEY}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if sender.ready().await.is_err() {
                    break;
                }
                let Ok(resp) = sender.send_request(req).await else {
                    break;
                };
                let _ = resp.into_body().collect().await;
                lat.push((tokio::time::Instant::now() - scheduled).as_secs_f64() * 1000.0);
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(|a, b| a.total_cmp(b));
    all
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A GET of `target` with the bench key on a new HTTP/1.1 connection: the response body, and
/// when the request was sent.
async fn get_body(addr: SocketAddr, target: &str) -> (hyper::body::Incoming, Instant) {
    request_body(addr, http::Method::GET, target, Bytes::new()).await
}

/// The same with `method` and a body: usage is read only from answers to POST requests, so the
/// scanning rows POST a streaming chat request.
async fn request_body(
    addr: SocketAddr,
    method: http::Method,
    target: &str,
    body: Bytes,
) -> (hyper::body::Incoming, Instant) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let t0 = Instant::now();
    let req = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    (sender.send_request(req).await.unwrap().into_body(), t0)
}

/// Microseconds since the Unix epoch, by the wall clock.
fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Transit time (ms, from the upstream's send to its arrival here) of each of the 20 SSE events.
async fn sse_transits(addr: SocketAddr) -> Vec<f64> {
    let (mut body, _) = get_body(addr, "/v1/sse").await;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            let now = unix_micros();
            buf.extend_from_slice(&d);
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let event = String::from_utf8_lossy(&buf[..pos]).into_owned();
                buf.drain(..pos + 2);
                let sent: u128 = event.trim_start_matches("data: ").parse().unwrap();
                out.push(now.saturating_sub(sent) as f64 / 1000.0);
            }
        }
    }
    assert_eq!(out.len(), 20, "SSE events");
    out
}

/// Seconds to receive a whole `chat_stream` of `n` events from `path`.
async fn stream_secs(addr: SocketAddr, path: &str, n: u32) -> f64 {
    let chat = Bytes::from_static(br#"{"model":"openai/gpt-4o-mini","stream":true}"#);
    let (mut body, t0) =
        request_body(addr, http::Method::POST, &format!("{path}?n={n}"), chat).await;
    let mut got = 0usize;
    while let Some(f) = body.frame().await {
        got += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert!(got > n as usize * 100);
    t0.elapsed().as_secs_f64()
}

/// Runs wrk against the gateway and the direct upstream, alternately, twice each; adds the
/// throughput and latency rows and returns the mean req/s (gateway, direct).
fn compare(
    row: &mut impl FnMut(&str, String, String, String),
    what: &str,
    gateway_url: &str,
    direct_url: &str,
) -> (f64, f64) {
    let (mut g, mut d) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        d.push(wrk(direct_url, 5));
        g.push(wrk(gateway_url, 5));
    }
    let avg =
        |v: &[WrkResult], f: fn(&WrkResult) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let lat =
        |v: &[WrkResult]| format!("{:.2} / {:.2}", avg(v, |r| r.p50_ms), avg(v, |r| r.p99_ms));
    let (gr, dr) = (avg(&g, |r| r.rps), avg(&d, |r| r.rps));
    row(
        &format!("h1 keep-alive req/s ({what})"),
        format!("{gr:.0}"),
        format!("{dr:.0}"),
        format!("{:.2}", gr / dr),
    );
    row(
        &format!("  p50 / p99 ms ({what}, 50 conns)"),
        lat(&g),
        lat(&d),
        String::new(),
    );
    (gr, dr)
}

fn main() {
    if std::env::args().any(|a| a == "--upstream") {
        run_upstream();
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("load: benchmark");
        return;
    }
    // Pin this process (the fixed-rate generator and TLS clients) next to the upstream.
    let _ = Command::new("taskset")
        .args(["-p", "-c", "0", &std::process::id().to_string()])
        .output();
    let have_wrk = ensure_wrk();
    let dir = tempfile::tempdir().unwrap();
    let (_up, up_addr) = start_upstream();
    let ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let mut row = |name: &str, gw: String, direct: String, ratio: String| {
        rows.push((name.to_owned(), gw, direct, ratio))
    };

    let gw = start_gateway(dir.path(), up_addr, None, None);
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_kib(gw.proc.0.id());

    if have_wrk {
        let direct_url = format!("http://{up_addr}/v1/x");
        let (gr, dr) = compare(
            &mut row,
            "plain",
            &format!("http://{}/v1/x", gw.addr),
            &direct_url,
        );

        // Worker threads (`server.workers`): one per CPU the process may run on, so pinned to
        // one core the gateway above ran 1 worker; here the same with 2 on that core.
        let gw2 = start_gateway(dir.path(), up_addr, None, Some(2));
        let r2 = wrk(&format!("http://{}/v1/x", gw2.addr), 5);
        drop(gw2);
        row(
            "h1 req/s with 1 (default on one core) / 2 worker threads",
            format!("{gr:.0} / {:.0}", r2.rps),
            format!("{dr:.0}"),
            String::new(),
        );

        let gws = start_gateway(dir.path(), up_addr, Some(&ca), None);
        compare(
            &mut row,
            "gateway TLS",
            &format!("https://localhost:{}/v1/x", gws.addr.port()),
            &direct_url,
        );

        // 1,000 idle keep-alive TLS connections.
        let before = rss_kib(gws.proc.0.id());
        let tls_port = gws.addr.port();
        let held = rt.block_on(async move {
            let cfg = common::tls_client(&ca.0);
            let mut held = Vec::new();
            for _ in 0..1000 {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
                    .await
                    .unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(
                        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                        tcp,
                    )
                    .await
                    .unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                        .await
                        .unwrap();
                let driver = tokio::spawn(conn);
                let req = http::Request::get("/v1/x")
                    .header("host", "localhost")
                    .header("authorization", format!("Bearer {KEY}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let _ = sender
                    .send_request(req)
                    .await
                    .unwrap()
                    .into_body()
                    .collect()
                    .await;
                held.push((sender, driver));
            }
            held
        });
        // Held idle for 5 s: the gateway parks an HTTP/1.1 connection (frees its buffers)
        // after 250 ms without a request, and the allocator returns the pages a second later.
        std::thread::sleep(std::time::Duration::from_secs(5));
        let with_conns = rss_kib(gws.proc.0.id());
        drop(held);
        row(
            "RSS KiB: after TLS load / +1,000 idle TLS conns",
            format!("{before} / {with_conns}"),
            String::new(),
            String::new(),
        );
    } else {
        row(
            "wrk unavailable: throughput rows skipped",
            String::new(),
            String::new(),
            String::new(),
        );
    }

    // Fixed 2,000 req/s, latency corrected.
    let (mut gl, mut dl) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        dl.extend(rt.block_on(fixed_rate(up_addr, 2000, 5)));
        gl.extend(rt.block_on(fixed_rate(gw.addr, 2000, 5)));
    }
    gl.sort_by(|a, b| a.total_cmp(b));
    dl.sort_by(|a, b| a.total_cmp(b));
    row(
        "2,000 req/s p50 / p99 / p99.9 ms",
        format!(
            "{:.2} / {:.2} / {:.2}",
            pct(&gl, 0.5),
            pct(&gl, 0.99),
            pct(&gl, 0.999)
        ),
        format!(
            "{:.2} / {:.2} / {:.2}",
            pct(&dl, 0.5),
            pct(&dl, 0.99),
            pct(&dl, 0.999)
        ),
        format!("+{:.2} ms at p99", pct(&gl, 0.99) - pct(&dl, 0.99)),
    );

    // SSE: added delay per event, each event's transit through the gateway against the same
    // upstream's events read directly (alternating runs, 60 events each way).
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        direct.extend(rt.block_on(sse_transits(up_addr)));
        via.extend(rt.block_on(sse_transits(gw.addr)));
    }
    via.sort_by(|a, b| a.total_cmp(b));
    direct.sort_by(|a, b| a.total_cmp(b));
    row(
        "SSE added delay per event ms (median / p99)",
        format!(
            "{:.3} / {:.3}",
            pct(&via, 0.5) - pct(&direct, 0.5),
            pct(&via, 0.99) - pct(&direct, 0.99)
        ),
        format!(
            "transit {:.3} / {:.3}",
            pct(&direct, 0.5),
            pct(&direct, 0.99)
        ),
        String::new(),
    );

    // SSE usage scanning (SPEC §7): the same fast stream through a plain route and an `llm`
    // route, alternately; the median of five rounds each.
    let n = 20_000u32;
    let (mut plain, mut llm, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        direct.push(rt.block_on(stream_secs(up_addr, "/v1/chat_stream", n)));
        plain.push(rt.block_on(stream_secs(gw.addr, "/v1/chat_stream", n)));
        llm.push(rt.block_on(stream_secs(gw.addr, "/llm/chat_stream", n)));
    }
    for v in [&mut plain, &mut llm, &mut direct] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let (p, l, d) = (pct(&plain, 0.5), pct(&llm, 0.5), pct(&direct, 0.5));
    row(
        "SSE events/s, usage scanning off (plain route)",
        format!("{:.0}", n as f64 / p),
        format!("{:.0}", n as f64 / d),
        format!("{:.2}", d / p),
    );
    row(
        "SSE events/s, usage scanning on (llm route)",
        format!("{:.0}", n as f64 / l),
        format!("{:.0}", n as f64 / d),
        format!(
            "{:.2}; scanning costs {:.1} % and {:.2} µs per event",
            d / l,
            (1.0 - p / l) * 100.0,
            (l - p) / n as f64 * 1e6
        ),
    );

    // The same for the Responses API's and Anthropic Messages' stream shapes (SPEC §8).
    for (shape, path) in [
        ("Responses", "responses_stream"),
        ("Messages", "messages_stream"),
    ] {
        let (mut plain, mut llm) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            plain.push(rt.block_on(stream_secs(gw.addr, &format!("/v1/{path}"), n)));
            llm.push(rt.block_on(stream_secs(gw.addr, &format!("/llm/{path}"), n)));
        }
        plain.sort_by(|a, b| a.total_cmp(b));
        llm.sort_by(|a, b| a.total_cmp(b));
        let (p, l) = (pct(&plain, 0.5), pct(&llm, 0.5));
        row(
            &format!("SSE events/s, {shape} shape, scanning off / on"),
            format!("{:.0} / {:.0}", n as f64 / p, n as f64 / l),
            String::new(),
            format!(
                "scanning costs {:.1} % and {:.2} µs per event",
                (1.0 - p / l) * 100.0,
                (l - p) / n as f64 * 1e6
            ),
        );
    }

    let rss_after = rss_kib(gw.proc.0.id());
    // 1 GiB streamed down through the gateway: peak RSS.
    let pid = gw.proc.0.id();
    let addr = gw.addr;
    let peak = rt.block_on(async move {
        let max = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = max.clone();
        let sampler = tokio::spawn(async move {
            loop {
                m.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!("/v1/bytes?n={}", 1u64 << 30))
            .header("host", "gw")
            .header("authorization", format!("Bearer {KEY}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut body = sender.send_request(req).await.unwrap().into_body();
        let mut got = 0u64;
        while let Some(f) = body.frame().await {
            got += f.unwrap().into_data().map(|d| d.len() as u64).unwrap_or(0);
        }
        assert_eq!(got, 1 << 30);
        sampler.abort();
        max.load(std::sync::atomic::Ordering::Relaxed)
    });
    row(
        "RSS KiB: idle / after load / peak during 1 GiB stream",
        format!("{rss_idle} / {rss_after} / {peak}"),
        String::new(),
        String::new(),
    );

    println!("\n| measurement | gateway | direct | gateway vs direct |\n|---|---|---|---|");
    for (n, g, d, r) in &rows {
        println!("| {n} | {g} | {d} | {r} |");
    }
}
