//! Body caps (SPEC §3 step 9): Content-Length over the cap is 413 before the upstream is
//! contacted; a chunked body crossing the cap is cut; a body too slow to arrive is 408.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(up: &Upstream) -> String {
    format!(
        "{}[[routes]]\nname = \"up\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\nmax_body = \"1KiB\"\n",
        server_section("stream_idle_timeout = \"1s\""),
        up.url()
    )
}

fn post_len(n: usize) -> Vec<u8> {
    let mut r = format!(
        "POST /count HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    r.extend(std::iter::repeat_n(b'b', n));
    r
}

fn post_chunked(n: usize) -> Vec<u8> {
    let mut r = b"POST /count HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    // 100-byte chunks, as a streaming client would send them.
    let mut left = n;
    while left > 0 {
        let c = left.min(100);
        r.extend(format!("{c:x}\r\n").into_bytes());
        r.extend(std::iter::repeat_n(b'b', c));
        r.extend(b"\r\n");
        left -= c;
    }
    r.extend(b"0\r\n\r\n");
    r
}

#[tokio::test]
async fn content_length_at_the_cap_passes_and_one_over_is_413_up_front() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let r = raw(gw.addr, &post_len(1024)).await;
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(r.ends_with("{\"bytes\":1024}"), "{r}");
    let r = raw(gw.addr, &post_len(1025)).await;
    assert_eq!(
        (status_of(&r), code_of(&r).as_str()),
        (413, "payload_too_large"),
        "{r}"
    );
    assert_eq!(
        up.targets().len(),
        1,
        "the oversized request never reached the upstream"
    );
}

#[tokio::test]
async fn chunked_body_at_the_cap_passes_and_one_over_is_cut() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let r = raw(gw.addr, &post_chunked(1024)).await;
    assert_eq!(status_of(&r), 200, "{r}");
    assert!(r.ends_with("{\"bytes\":1024}"), "{r}");
    let r = raw(gw.addr, &post_chunked(1025)).await;
    assert_eq!(
        (status_of(&r), code_of(&r).as_str()),
        (413, "payload_too_large"),
        "{r}"
    );
    let recs = gw.wait_requests(2).await;
    assert!(recs.iter().any(|r| r["outcome"] == "payload_too_large"));
}

/// Sends 10 of 100 promised body bytes, then stalls; returns the gateway's answer.
async fn stalled_upload(gw: &Gateway) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /count HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_body_that_stalls_gets_408() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await; // stream_idle_timeout = 1s
    let r = stalled_upload(&gw).await;
    assert_eq!(
        (status_of(&r), code_of(&r).as_str()),
        (408, "request_timeout"),
        "{r}"
    );
}

#[tokio::test]
async fn a_body_slower_than_the_route_timeout_is_408_not_504() {
    let up = upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"up\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\ntimeout = \"1s\"\n",
        server_section(""),
        up.url()
    );
    let gw = Gateway::start(&config).await; // stream_idle_timeout = 5m: the route timeout fires
    let r = stalled_upload(&gw).await;
    assert_eq!(
        (status_of(&r), code_of(&r).as_str()),
        (408, "request_timeout"),
        "{r}"
    );
}

/// A chat request of about `n` bytes: a JSON body padded with a long message.
fn chat_of(n: usize) -> String {
    let pad = "x".repeat(n.saturating_sub(40));
    format!("{{\"model\":\"m\",\"messages\":[{{\"content\":\"{pad}\"}}]}}")
}

#[tokio::test]
async fn bodies_held_in_memory_are_bounded_gateway_wide_then_recover() {
    let up = upstream().await;
    let config = format!(
        "{}[limits]\nmax_buffered_bytes = \"1KiB\"\n\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nauth = \"none\"\nllm = true\n",
        server_section(""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let url = gw.url("/v1/chat/completions");
    // The first body (700 bytes) is held until the upstream answers; the upstream holds it.
    let first = tokio::spawn(
        client()
            .post(format!("{url}?hold=1"))
            .body(chat_of(700))
            .send(),
    );
    let mut held = up.gate.watch_held();
    tokio::time::timeout(WAIT, held.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    // A second one, declared or chunked, would pass 1 KiB: 503 overloaded, nothing forwarded.
    let declared = client().post(&url).body(chat_of(700)).send().await.unwrap();
    let chunks = futures_util::stream::iter(
        chat_of(700)
            .into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let chunked = client()
        .post(&url)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    for r in [declared, chunked] {
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "overloaded");
    }
    assert_eq!(up.seen().len(), 1, "an overloaded request was forwarded");
    // The first finishes, its share is released, and the same request now passes.
    up.gate.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let again = client().post(&url).body(chat_of(700)).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let recs = gw.wait_requests(4).await;
    let outcomes: Vec<&str> = recs.iter().filter_map(|r| r["outcome"].as_str()).collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "overloaded").count(),
        2,
        "{outcomes:?}"
    );
}
