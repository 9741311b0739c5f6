//! SPEC §3.4 "Slow readers": a client that stops reading — an HTTP/1.1 client whose socket
//! buffer is full, an HTTP/2 client that keeps its window at zero — is cut at `send_timeout`
//! with one `client_stalled` record, and the gateway serves others meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(up: &Upstream) -> String {
    format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section("send_timeout = \"1s\""),
        up.url()
    )
}

/// Waits for the one `client_stalled` record, checks that others are served meanwhile.
async fn stalled_record(gw: &Gateway, started: Instant) -> serde_json::Value {
    let other = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(other.status(), 200, "another client was not served");
    let recs = gw
        .stdout
        .wait_until(|lines| {
            let recs: Vec<serde_json::Value> = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["event"] == "request" && v["outcome"] == "client_stalled")
                .collect();
            (!recs.is_empty()).then_some(recs)
        })
        .await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut after {took:?}");
    recs[0].clone()
}

#[tokio::test]
async fn an_http1_client_that_stops_reading_is_cut_at_send_timeout() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // 1 GiB that the client never reads: the socket buffers fill, then nothing moves.
    s.write_all(b"GET /bytes?n=1073741824 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let rec = stalled_record(&gw, started).await;
    assert_eq!(rec["status"], 200);
    let sent = rec["bytes_out"].as_u64().unwrap();
    assert!(sent > 0 && sent < 1 << 30, "{rec}");
    // The connection is closed: what the client reads now ends (after the buffered bytes).
    let mut sink = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut sink))
        .await
        .expect("connection still open")
        .ok();
}

#[tokio::test]
async fn an_http2_client_with_a_zero_window_is_cut_at_send_timeout() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .adaptive_window(false)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/sse?n=1000&gap_ms=1", gw.addr))
        .body(Empty::new())
        .unwrap();
    // The head arrives (HEADERS are not flow-controlled); no DATA can.
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let rec = stalled_record(&gw, started).await;
    assert_eq!(rec["status"], 200);
    // At most what hyper took into its buffer before it waited for window.
    assert!(rec["bytes_out"].as_u64().unwrap() < 4096, "{rec}");
    tokio::time::timeout(WAIT, driver)
        .await
        .expect("HTTP/2 connection still open")
        .unwrap()
        .ok();
    drop(resp);
}
