//! SIGTERM: /readyz turns 503, stop accepting, let in-flight streams finish, exit 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::sync::watch;

/// An SSE upstream of `total` events that sends the first `first` at once, then holds the rest
/// until `release` turns true (then one every 20 ms). `sent` counts the events it has sent.
async fn gated_sse_upstream(
    total: usize,
    first: usize,
    release: watch::Receiver<bool>,
    sent: Arc<watch::Sender<usize>>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let release = release.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let release = release.clone();
                    let sent = sent.clone();
                    async move {
                        let events = futures_util::stream::unfold(0usize, move |i| {
                            let mut release = release.clone();
                            let sent = sent.clone();
                            async move {
                                if i >= total {
                                    return None;
                                }
                                if i >= first {
                                    release.wait_for(|r| *r).await.unwrap();
                                    // The pace of the upstream, not synchronisation.
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                sent.send_replace(i + 1);
                                let ev = format!("id: {i}\ndata: {{\"i\":{i}}}\n\n");
                                Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(ev))), i + 1))
                            }
                        });
                        let resp = http::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(StreamBody::new(events))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn in_flight_sse_stream_completes_after_sigterm_and_exit_code_is_0() {
    const TOTAL: usize = 20;
    const FIRST: usize = 5;
    let (release, release_rx) = watch::channel(false);
    let sent = Arc::new(watch::Sender::new(0usize));
    let up = gated_sse_upstream(TOTAL, FIRST, release_rx, sent.clone()).await;
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"http://{up}\"\nauth = \"none\"\n",
        server_section(""),
    );
    let mut gw = Gateway::start(&config).await;
    // 20 events: the first 5 now, the other 15 only once the test releases them.
    let resp = client().get(gw.url("/sse")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while !buf.windows(2).any(|w| w == b"\n\n") {
        buf.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
    // The upstream is holding the rest of the stream.
    tokio::time::timeout(WAIT, sent.subscribe().wait_for(|n| *n == FIRST))
        .await
        .expect("the upstream did not send its first events")
        .unwrap();
    let readyz = format!("http://{}/readyz", gw.admin_addr());
    assert_eq!(client().get(&readyz).send().await.unwrap().status(), 200);
    gw.signal("TERM");
    // While the stream drains, readiness is withdrawn (the admin listener keeps answering).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = client().get(&readyz).send().await.unwrap().status();
        if s == 503 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never turned 503"
        );
        tokio::task::yield_now().await;
    }
    // ... and the client listener is closed: new connections are refused during the drain. Each
    // attempt is a real connect; one that the kernel still completed (the listener not yet
    // dropped) is closed and the next attempt made.
    let deadline = std::time::Instant::now() + WAIT;
    let mut accepted = 0;
    loop {
        match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(gw.addr))
            .await
            .expect("connect hung")
        {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("connect failed with {e}, not connection refused"),
            Ok(s) => {
                drop(s);
                accepted += 1;
                assert!(
                    std::time::Instant::now() < deadline,
                    "still accepting connections during the drain ({accepted} connects after /readyz turned 503)"
                );
                tokio::task::yield_now().await;
            }
        }
    }
    // ... while the stream is still in flight, with events to come.
    assert_eq!(
        *sent.borrow(),
        FIRST,
        "the upstream was released before the listener closed"
    );
    let got = String::from_utf8_lossy(&buf).matches("\n\n").count();
    assert!(
        got < TOTAL,
        "the stream was complete ({got} events) before the listener closed"
    );
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "the gateway exited before the stream finished"
    );
    release.send_replace(true);
    while let Some(c) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream stalled")
    {
        buf.extend_from_slice(&c.unwrap());
    }
    let text = String::from_utf8(buf).unwrap();
    assert_eq!(
        text.matches("\n\n").count(),
        TOTAL,
        "the stream was cut: {text}"
    );
    assert_eq!(gw.wait_exit().await, 0);
    let out = gw.stdout.text();
    assert!(out.contains("\"event\":\"shutdown\""), "{out}");
    let recs = gw.requests();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["status"], 200);
}

#[tokio::test]
async fn a_stream_still_running_when_shutdown_grace_ends_is_cut_and_recorded() {
    let up = upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section("").replace("shutdown_grace = \"10s\"", "shutdown_grace = \"500ms\""),
        up.url()
    );
    let mut gw = Gateway::start(&config).await;
    // 100 events, 200 ms apart: 20 s of stream, far beyond the grace.
    let resp = client()
        .get(gw.url("/sse?n=100&gap_ms=200"))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"id: 0"), "{first:?}");
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);
    gw.wait_events("shutdown", 1).await;
    // The cut stream is recorded (SPEC §4: "cut by shutdown"), before the shutdown event.
    let lines: Vec<serde_json::Value> = gw
        .stdout
        .all()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let events: Vec<&str> = lines.iter().filter_map(|v| v["event"].as_str()).collect();
    assert_eq!(events, ["startup", "request", "shutdown"], "{lines:?}");
    let rec = &lines[1];
    assert_eq!(rec["outcome"], "overloaded", "{rec}");
    assert_eq!(rec["status"], 200, "{rec}");
    assert!(rec["bytes_out"].as_u64().unwrap() > 0, "{rec}");
}
