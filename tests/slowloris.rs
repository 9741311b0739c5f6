//! Slow and idle clients (SPEC §3.4 "Timers really armed", §2 timeouts): a request head dribbled
//! byte by byte (HTTP/1.1) or never sent after the HTTP/2 preface is cut at `header_timeout`; idle
//! keep-alive connections (HTTP/2, and HTTP/1.1 with `idle_timeout` below `header_timeout`)
//! are closed at `idle_timeout`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use support::*;
// One keyless route `api` on `/` (support's `open_route_config`), as in every test here.
use support::open_route_config as config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn slowloris_connection_is_closed_at_header_timeout() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up.url(), "")).await; // header_timeout = 2s
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    // The attacker: one header byte a second, forever.
    let dribble = tokio::spawn(async move {
        for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .iter()
            .cycle()
        {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(8), rd.read_to_end(&mut buf)).await;
    let took = start.elapsed();
    dribble.abort();
    assert!(
        closed.is_ok(),
        "connection still open after 8s of dribbling"
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    assert!(up.targets().is_empty());
}

#[tokio::test]
async fn http2_connection_without_a_request_is_closed_at_header_timeout() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    // The HTTP/2 preface and an empty SETTINGS frame, then silence.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut buf)).await;
    let took = start.elapsed();
    assert!(closed.is_ok(), "idle h2 connection still open after 8s");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn idle_http2_connection_is_closed_at_idle_timeout() {
    let up = upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section("idle_timeout = \"1s\""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/x", gw.addr))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    // The client's library answers PINGs; only the gateway's idle timer can end this connection.
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(8), driver)
        .await
        .expect("h2 connection still open")
        .unwrap()
        .ok();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn an_idle_timeout_shorter_than_header_timeout_is_honoured() {
    let up = upstream().await;
    let server = server_section("idle_timeout = \"1s\"")
        .replace("header_timeout = \"2s\"", "header_timeout = \"8s\"");
    let config = format!(
        "{server}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await
        .unwrap();
    // Read the keep-alive response, then wait for the gateway to close the idle connection.
    let start = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(7), s.read_to_end(&mut got)).await;
    let took = start.elapsed();
    assert!(
        read.is_ok(),
        "still open after 7 s: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(
        took < Duration::from_secs(4),
        "closed after {took:?}, not near idle_timeout (1 s)"
    );
}
