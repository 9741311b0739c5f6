//! Upstream failures: an upstream that is down gets 502 (its address never revealed), one slower
//! than the route timeout 504, and one that resets mid-stream breaks the client's stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use support::*;
// One keyless route `api` on `/` (support's `open_route_config`), as in every test here.
use support::open_route_config as config;

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
