//! Streaming: SSE event by event, 100 MiB each way with flat RSS, WebSocket (plain and TLS), h2.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn config(up: &Upstream, ws: std::net::SocketAddr, tls: &str) -> String {
    format!(
        "{}{tls}[[routes]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"http://{ws}\"\nauth = \"none\"\nwebsocket = true\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\nmax_body = \"200MiB\"\n",
        server_section(""),
        up.url()
    )
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_as_the_upstream_emits_them() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, dead_addr().await, "")).await;
    let start = Instant::now();
    let resp = client()
        .get(gw.url("/v1/sse?n=1000&gap_ms=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut first_event = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        if first_event.is_none() && buf.windows(2).any(|w| w == b"\n\n") {
            first_event = Some(start.elapsed());
        }
    }
    let total = start.elapsed();
    let first = first_event.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 1000);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(*e, format!("id: {i}\ndata: {{\"i\":{i}}}"));
    }
    println!("SSE: first event after {first:?}, 1000 events in {total:?}");
    // The upstream needs >= 2 s for 1000 events 2 ms apart; the first must not wait for them.
    assert!(total >= Duration::from_secs(2));
    assert!(
        first < total / 10,
        "first event after {first:?} of {total:?}"
    );
}

/// Samples the gateway's RSS until `stop`; returns the largest value seen (KiB).
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let max = AtomicU64::new(0);
        while !stop.load(Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(v) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                max.fetch_max(v, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        max.load(Ordering::Relaxed)
    })
}

#[tokio::test]
async fn hundred_mib_each_way_streams_with_flat_rss() {
    const N: u64 = 100 * 1024 * 1024;
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, dead_addr().await, "")).await;
    // Warm up the connection pools and allocator.
    assert_eq!(
        client()
            .get(gw.url("/v1/warm"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let base = gw.rss_kib();

    // Up: 100 MiB in 1 MiB chunks, counted by the upstream.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(gw.pid(), stop.clone());
    let chunk = bytes::Bytes::from(vec![b'u'; 1024 * 1024]);
    let body =
        futures_util::stream::iter((0..100).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let t = Instant::now();
    let resp = client()
        .post(gw.url("/v1/count"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), format!("{{\"bytes\":{N}}}"));
    let up_time = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let up_peak = sampler.await.unwrap();

    // Down: 100 MiB from the upstream, read as it comes.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(gw.pid(), stop.clone());
    let t = Instant::now();
    let resp = client()
        .get(gw.url(&format!("/v1/bytes?n={N}")))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut got = 0u64;
    while let Some(c) = stream.next().await {
        got += c.unwrap().len() as u64;
    }
    let down_time = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let down_peak = sampler.await.unwrap();
    assert_eq!(got, N);

    println!(
        "RSS: base {base} KiB, peak {up_peak} KiB uploading 100 MiB ({up_time:?}), peak {down_peak} KiB downloading 100 MiB ({down_time:?})"
    );
    // Flat: the 100 MiB must not be held. 32 MiB of slack covers allocator and pool growth.
    assert!(
        up_peak < base + 32 * 1024,
        "upload RSS peak {up_peak} KiB vs base {base} KiB"
    );
    assert!(
        down_peak < base + 32 * 1024,
        "download RSS peak {down_peak} KiB vs base {base} KiB"
    );

    let recs = gw.wait_requests(3).await;
    let up_rec = recs.iter().find(|r| r["path"] == "/v1/count").unwrap();
    assert_eq!(up_rec["bytes_in"], N);
    let down_rec = recs.iter().find(|r| r["path"] == "/v1/bytes").unwrap();
    assert_eq!(down_rec["bytes_out"], N);
}

async fn echo_roundtrip<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..5 {
        let msg = format!("hello {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let back = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_echo_over_plain_http() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, ws_echo_upstream().await, "")).await;
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    echo_roundtrip(ws).await;
    // One record, written when the tunnel closed, with the bytes that crossed it.
    let rec = &gw.wait_requests(1).await[0];
    assert_eq!(rec["status"], 101);
    assert_eq!(rec["route"], "ws");
    assert!(
        rec["bytes_in"].as_u64().unwrap() > 0 && rec["bytes_out"].as_u64().unwrap() > 0,
        "{rec}"
    );
}

#[tokio::test]
async fn websocket_upgrade_refused_by_upstream_is_passed_back() {
    // The HTTP upstream does not speak WebSocket: its plain answer reaches the client, no tunnel.
    let up = upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"ws\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\nwebsocket = true\n",
        server_section(""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 200),
        other => panic!("expected an HTTP answer, got {other:?}"),
    }
    let seen = &up.seen()[0];
    assert_eq!(seen.header("upgrade"), Some("websocket"));
}

#[tokio::test]
async fn websocket_echo_and_http2_over_tls() {
    let up = upstream().await;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(
        &up,
        ws_echo_upstream().await,
        &pki.tls_section(dir.path()),
    ))
    .await;

    // h2 negotiated by ALPN; HSTS added on TLS listeners.
    let resp = pki
        .reqwest()
        .get(format!("https://localhost:{}/v1/models", gw.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    assert_eq!(up.seen()[0].header("x-forwarded-proto"), Some("https"));

    // SSE over h2 as well.
    let body = pki
        .reqwest()
        .get(format!(
            "https://localhost:{}/v1/sse?n=20&gap_ms=1",
            gw.addr.port()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body.matches("\n\n").count(), 20);

    // wss: TLS with ALPN http/1.1, then the WebSocket handshake.
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki.rustls_client(&[b"http/1.1"]));
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (ws, resp) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", gw.addr.port()), tls)
            .await
            .unwrap();
    assert_eq!(resp.status(), 101);
    echo_roundtrip(ws).await;
}
