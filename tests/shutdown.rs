//! SIGTERM: /readyz turns 503, stop accepting, let in-flight streams finish, exit 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use futures_util::StreamExt;
use support::*;

#[tokio::test]
async fn in_flight_sse_stream_completes_after_sigterm_and_exit_code_is_0() {
    let up = upstream().await;
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        up.url()
    );
    let mut gw = Gateway::start(&config).await;
    // 20 events, 100 ms apart: about 2 s of stream.
    let resp = client()
        .get(gw.url("/sse?n=20&gap_ms=100"))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while !buf.windows(2).any(|w| w == b"\n\n") {
        buf.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
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
    while let Some(c) = stream.next().await {
        buf.extend_from_slice(&c.unwrap());
    }
    let text = String::from_utf8(buf).unwrap();
    assert_eq!(
        text.matches("\n\n").count(),
        20,
        "the stream was cut: {text}"
    );
    assert_eq!(gw.wait_exit().await, 0);
    let out = gw.stdout.text();
    assert!(out.contains("\"event\":\"shutdown\""), "{out}");
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "still accepting after shutdown"
    );
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
