//! Request framing and heads (SPEC §3.4 "Framing", "Targets"): conflicting or invalid
//! `Content-Length` / `Transfer-Encoding`, a missing or doubled `Host`, and a malformed chunk get
//! 400 and the connection is closed; a head over `max_header_bytes` gets 431.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;
// One keyless route `api` on `/` (support's `open_route_config`), as in every test here.
use support::open_route_config as config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
