//! Failure handling: upstream down (502), slow (504), reset mid-stream, slowloris, huge heads.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(upstream_url: &str, extra_route: &str) -> String {
    format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{upstream_url}\"\nauth = \"none\"\n{extra_route}",
        server_section("")
    )
}

#[tokio::test]
async fn upstream_down_gets_502_without_revealing_its_address() {
    let dead = dead_addr().await;
    let gw = Gateway::start(&config(&format!("http://{dead}"), "")).await;
    let resp = client().get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body = resp.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    assert_eq!(v["error"]["type"], "gateway_error");
    assert!(
        !body.contains("127.0.0.1") && !body.contains(&dead.port().to_string()),
        "{body}"
    );
    let rec = &gw.wait_requests(1).await[0];
    assert_eq!(rec["outcome"], "upstream_unavailable");
    assert_eq!(rec["status"], 502);
}

#[tokio::test]
async fn slow_upstream_gets_504_at_the_route_timeout() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up.url(), "timeout = \"500ms\"\n")).await;
    let t = Instant::now();
    let resp = client().get(gw.url("/slow?ms=5000")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(resp.status(), 504);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(4),
        "took {took:?}"
    );
}

#[tokio::test]
async fn upstream_reset_mid_stream_ends_the_client_stream() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up.url(), "")).await;
    let resp = client().get(gw.url("/reset")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut errored = false;
    while let Some(chunk) = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut stream))
        .await
        .unwrap()
    {
        match chunk {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    assert_eq!(got, b"data: first\n\n");
    assert!(
        errored,
        "the client must see the stream break, not a clean end"
    );
}

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
async fn headers_over_max_header_bytes_get_431() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up.url(), "")).await; // max_header_bytes = 32KiB
    let big = "a".repeat(33 * 1024);
    let req =
        format!("GET / HTTP/1.1\r\nHost: gw.test\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let resp = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{}", &resp[..resp.len().min(300)]);
    assert!(resp.contains("\"code\":\"headers_too_large\""), "{resp}");
    // Just under the cap passes.
    let ok = "a".repeat(30 * 1024);
    let req =
        format!("GET / HTTP/1.1\r\nHost: gw.test\r\nX-Big: {ok}\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&raw(gw.addr, req.as_bytes()).await), 200);
    assert_eq!(up.targets().len(), 1);
}

/// What became of a connection after the gateway's first answer on it.
struct AfterAnswer {
    /// The first response, whole (head and Content-Length body).
    first: String,
    /// Anything the gateway sent after it (an answer to the follow-up request, if it was served).
    rest: String,
    /// Whether the connection ended (EOF, or a reset) within `WAIT`.
    closed: bool,
}

/// Sends `bytes` (a request that does not ask for a close) and reads the first response whole;
/// then sends a valid follow-up request on the same connection and reads on until the
/// connection ends or `WAIT` passes.
async fn answer_then_follow_up(addr: std::net::SocketAddr, bytes: &[u8]) -> AfterAnswer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let first_len = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                let body: usize = header_of(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + body {
                    return Some(end + 4 + body);
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("no complete response");
    let Some(first_len) = first_len else {
        // The connection ended before a whole response came.
        return AfterAnswer {
            first: String::from_utf8_lossy(&buf).into_owned(),
            rest: String::new(),
            closed: true,
        };
    };
    // A write to a connection the gateway has closed may fail: that is fine, it was closed.
    let _ = s
        .write_all(b"GET /follow-up HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await;
    let mut rest = buf.split_off(first_len);
    let closed = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    AfterAnswer {
        first: String::from_utf8_lossy(&buf).into_owned(),
        rest: String::from_utf8_lossy(&rest).into_owned(),
        closed,
    }
}

/// The 400 closes the connection: the follow-up request on it is not served, and the
/// connection ends (the timers are far beyond `WAIT`, so no timeout closes it instead).
fn assert_closed_after_400(case: &str, a: &AfterAnswer) {
    assert_eq!(status_of(&a.first), 400, "{case}: {}", a.first);
    assert!(
        a.rest.is_empty(),
        "{case}: the connection was reused after the 400: {}",
        a.rest
    );
    assert!(
        a.closed,
        "{case}: connection still open {WAIT:?} after the 400: {}",
        a.first
    );
}

#[tokio::test]
async fn conflicting_framing_and_missing_host_are_refused() {
    let up = upstream().await;
    // header_timeout and idle_timeout (60 s) far beyond WAIT: a connection that ends within WAIT
    // was closed because of the 400, not by a timer.
    let config = format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section("idle_timeout = \"60s\"")
            .replace("header_timeout = \"2s\"", "header_timeout = \"60s\""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    // None asks for `Connection: close`: after a 400 for its framing or its Host, the gateway
    // cannot trust where the next request would begin, so it must close the connection itself.
    let cases: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    ];
    for c in cases {
        let a = answer_then_follow_up(gw.addr, c).await;
        assert_closed_after_400(&String::from_utf8_lossy(c), &a);
    }
    assert!(up.targets().is_empty(), "{:?}", up.targets());

    // A malformed chunk is only seen once the body streams, after the head went upstream (as
    // with any streaming proxy); the client still gets 400 and the connection is closed.
    let a = answer_then_follow_up(
        gw.addr,
        b"POST / HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_closed_after_400("malformed chunk", &a);
    assert!(
        a.first.to_ascii_lowercase().contains("connection: close"),
        "{}",
        a.first
    );
    assert!(
        !up.targets().iter().any(|t| t == "/follow-up"),
        "{:?}",
        up.targets()
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

#[tokio::test]
async fn websocket_tunnels_count_towards_max_connections() {
    let up = upstream().await;
    let ws = ws_echo_upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"http://{ws}\"\nauth = \"none\"\nwebsocket = true\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section("max_connections = 1"),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let (mut tunnel, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    // The only slot is held by the tunnel: a new client waits in the backlog. Its connect (which
    // the kernel completes) and its request are done before the window below starts.
    let mut second = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    second
        .write_all(b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut waiting = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = second.read_to_end(&mut out).await;
        status_of(&String::from_utf8_lossy(&out))
    });
    // The answer must not come while the tunnel is open: await it, for a bounded time (a served
    // request takes milliseconds; this is the window of the negative check, not synchronisation).
    let early = tokio::time::timeout(Duration::from_millis(1500), &mut waiting).await;
    assert!(
        early.is_err(),
        "a second connection was served while the tunnel held the only slot: {early:?}"
    );
    assert!(up.targets().is_empty(), "{:?}", up.targets());
    // The tunnel itself still works (the gateway is serving, just not the second client).
    futures_util::SinkExt::send(
        &mut tunnel,
        tokio_tungstenite::tungstenite::Message::text("ping"),
    )
    .await
    .unwrap();
    let echo = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut tunnel))
        .await
        .expect("no echo through the tunnel")
        .unwrap()
        .unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "ping");
    futures_util::SinkExt::close(&mut tunnel).await.unwrap();
    drop(tunnel);
    let status = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting client was not served after the tunnel closed")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(up.targets(), ["/x"]);
}
