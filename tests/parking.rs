//! Idle HTTP/1.1 keep-alive connections are parked: after 250 ms without a request the
//! gateway keeps only the socket (hyper's buffers are freed), and the next request on it is
//! served as if nothing happened, even one whose head had begun to arrive, or that was pipelined
//! behind the last one, before the park. `portcullis_parked_connections` counts them; a parked
//! connection still closes at `header_timeout` after its last request and at shutdown, and
//! HTTP/2 connections are never parked.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longer than the gateway's park delay (250 ms), with room to spare: a client pausing this long
/// is parked.
const PAUSE: Duration = Duration::from_millis(1500);

fn config(up: &Upstream, tls: &str) -> String {
    format!(
        "{}{tls}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        up.url()
    )
}

fn parked_in(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_parked_connections "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Waits until `portcullis_parked_connections` is `n`.
async fn wait_parked(gw: &Gateway, n: u64) {
    let start = Instant::now();
    loop {
        let now = parked_in(&gw.metrics_text().await);
        if now == Some(n) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "parked connections stayed at {now:?}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body) from `s`.
async fn response<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("a response in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed mid-response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = header_of(&head, "content-length")
        .expect("a content-length")
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .expect("a body in time")
        .unwrap();
    head + &String::from_utf8_lossy(&body)
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    response(s).await
}

fn assert_served(resp: &str, path: &str) {
    assert_eq!(status_of(resp), 200, "{resp}");
    assert!(
        resp.contains(&format!("\"target\":\"{path}\"")),
        "not the answer to {path}: {resp}"
    );
}

#[tokio::test]
async fn an_idle_connection_is_parked_and_serves_its_next_request() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await;
    wait_parked(&gw, 0).await;
    let mut conns = Vec::new();
    for i in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        assert_served(
            &get(&mut s, &format!("/first/{i}")).await,
            &format!("/first/{i}"),
        );
        conns.push(s);
    }
    wait_parked(&gw, 3).await;
    for (i, s) in conns.iter_mut().enumerate() {
        assert_served(
            &get(s, &format!("/again/{i}")).await,
            &format!("/again/{i}"),
        );
    }
    // Woken, then parked again after their next quiet second.
    wait_parked(&gw, 3).await;
    assert_served(&get(&mut conns[0], "/third").await, "/third");
    assert_eq!(
        up.seen().len(),
        7,
        "every request reached the upstream once"
    );
}

#[tokio::test]
async fn a_head_begun_before_the_park_is_served_whole() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_served(&get(&mut s, "/one").await, "/one");
    // The next head starts at once and stops halfway for longer than the park delay (a client
    // on a lossy network): the bytes the gateway had read must not be lost.
    s.write_all(b"GET /two HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(PAUSE).await;
    s.write_all(b"st: gw.test\r\n\r\n").await.unwrap();
    assert_served(&response(&mut s).await, "/two");
    // Parked after that request, and served again.
    wait_parked(&gw, 1).await;
    assert_served(&get(&mut s, "/three").await, "/three");
}

#[tokio::test]
async fn a_pipelined_request_split_across_the_park_is_served() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: gw.test\r\n\r\nGET /b HTTP/1.1\r\nHo")
        .await
        .unwrap();
    assert_served(&response(&mut s).await, "/a");
    tokio::time::sleep(PAUSE).await;
    s.write_all(b"st: gw.test\r\n\r\n").await.unwrap();
    assert_served(&response(&mut s).await, "/b");
}

#[tokio::test]
async fn tls_connections_are_parked_and_http2_ones_are_not() {
    let up = upstream().await;
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&up, &p.tls_section(dir.path()))).await;
    // HTTP/2 first, so that it has been idle longer than the HTTP/1.1 connection when that one
    // is parked: were HTTP/2 connections parked, the count would reach 2.
    let h2_tls = tokio_rustls::TlsConnector::from(p.rustls_client(&[b"h2"]))
        .connect(
            ServerName::try_from("localhost").unwrap(),
            tokio::net::TcpStream::connect(gw.addr).await.unwrap(),
        )
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(h2_tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let h2_get = |path: &'static str| {
        http::Request::get(format!("https://localhost{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = h2.send_request(h2_get("/h2/one")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut h1 = tokio_rustls::TlsConnector::from(p.rustls_client(&[b"http/1.1"]))
        .connect(
            ServerName::try_from("localhost").unwrap(),
            tokio::net::TcpStream::connect(gw.addr).await.unwrap(),
        )
        .await
        .unwrap();
    assert_served(&get(&mut h1, "/h1/one").await, "/h1/one");
    wait_parked(&gw, 1).await;
    assert_served(&get(&mut h1, "/h1/two").await, "/h1/two");
    let resp = h2.send_request(h2_get("/h2/two")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("/h2/two"));
}

#[tokio::test]
async fn a_parked_connection_closes_at_header_timeout_after_its_last_request() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "")).await; // header_timeout = 2s, idle_timeout 60s
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_served(&get(&mut s, "/x").await, "/x");
    let served = Instant::now();
    wait_parked(&gw, 1).await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap();
    let after = served.elapsed();
    assert_eq!(n, 0, "closed without a byte: {rest:?}");
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
        "closed {after:?} after the request (header_timeout 2 s)"
    );
    wait_parked(&gw, 0).await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let up = upstream().await;
    // header_timeout 30 s: only the shutdown can close the parked connection within the test.
    let config = config(&up, "").replace("header_timeout = \"2s\"", "header_timeout = \"30s\"");
    let mut gw = Gateway::start(&config).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_served(&get(&mut s, "/x").await, "/x");
    wait_parked(&gw, 1).await;
    let start = Instant::now();
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a parked connection held the drain for {:?}",
        start.elapsed()
    );
}

/// `config` with `header_timeout` set to `secs` seconds.
fn with_header_timeout(config: &str, secs: u32) -> String {
    config.replace(
        "header_timeout = \"2s\"",
        &format!("header_timeout = \"{secs}s\""),
    )
}

#[tokio::test]
async fn a_woken_connection_whose_head_is_slow_is_served_and_kept_alive() {
    let up = upstream().await;
    let gw = Gateway::start(&with_header_timeout(&config(&up, ""), 10)).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_served(&get(&mut s, "/one").await, "/one");
    wait_parked(&gw, 1).await;
    // The first bytes wake it; the rest of the head comes after more than the park delay.
    s.write_all(b"GET /two HTTP/1.1\r\nHo").await.unwrap();
    wait_parked(&gw, 0).await;
    tokio::time::sleep(PAUSE).await;
    s.write_all(b"st: gw.test\r\n\r\n").await.unwrap();
    let resp = response(&mut s).await;
    assert_served(&resp, "/two");
    assert_eq!(
        header_of(&resp, "connection"),
        None,
        "the connection was closed under the request: {resp}"
    );
    wait_parked(&gw, 1).await;
    assert_served(&get(&mut s, "/three").await, "/three");
}

#[tokio::test]
async fn a_connection_that_asked_for_an_upgrade_is_not_parked_and_stays_open() {
    let up = upstream().await;
    let gw = Gateway::start(&with_header_timeout(&config(&up, ""), 10)).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // curl --http2 on http:// asks for h2c this way; the gateway answers in HTTP/1.1.
    s.write_all(
        b"GET /one HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    assert_served(&response(&mut s).await, "/one");
    // Another connection parks meanwhile; this one must still serve its next request.
    let mut other = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_served(&get(&mut other, "/other").await, "/other");
    wait_parked(&gw, 1).await;
    tokio::time::sleep(PAUSE).await;
    assert_served(&get(&mut s, "/two").await, "/two");
}

#[tokio::test]
async fn a_woken_connection_keeps_the_head_deadline_of_its_last_request() {
    let up = upstream().await;
    let gw = Gateway::start(&with_header_timeout(&config(&up, ""), 3)).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_served(&get(&mut s, "/one").await, "/one");
    let served = Instant::now();
    wait_parked(&gw, 1).await;
    // One byte wakes it, and nothing more comes: the head was due 3 s after the last request,
    // not 3 s after the wake.
    s.write_all(b"G").await.unwrap();
    wait_parked(&gw, 0).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    let after = served.elapsed();
    assert!(
        after >= Duration::from_millis(2900) && after < Duration::from_millis(4200),
        "closed {after:?} after the last request (header_timeout 3 s)"
    );
}
