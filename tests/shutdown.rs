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
