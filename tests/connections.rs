//! SPEC §3.4 "Connections per client": at most `limits.max_connections_per_ip` open connections
//! from one address (the next is closed at accept and counted), and at most 64 on the admin
//! listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A keep-alive HTTP/1.1 connection that has been served one `GET target` (so the gateway has
/// certainly accepted and counted it).
async fn served(addr: SocketAddr, target: &str) -> SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(target)
        .header("host", "gw.test")
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("served in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    sender
}

/// Connects, asks for `/x`, and reports whether the gateway closed the connection without
/// answering.
async fn closed_at_accept(addr: SocketAddr) -> bool {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = b"GET /x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return true;
    }
    let mut out = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => out.is_empty(),
        Ok(Err(_)) => true,
        Err(_) => panic!("neither answered nor closed"),
    }
}

#[tokio::test]
async fn the_129th_connection_from_one_address_is_closed_at_accept() {
    let (gw, _up) = gateway().await;
    let mut open = Vec::new();
    for _ in 0..128 {
        open.push(served(gw.addr, "/x").await);
    }
    assert!(closed_at_accept(gw.addr).await, "the 129th was served");
    assert!(
        gw.metrics_text()
            .await
            .contains("portcullis_connections_refused_total{reason=\"per_ip\"} 1")
    );
    // One closes; a new connection is served again (the gateway notices the close on its own
    // time, so each attempt is a fresh connection, bounded by WAIT).
    drop(open.pop());
    let deadline = std::time::Instant::now() + WAIT;
    while closed_at_accept(gw.addr).await {
        assert!(std::time::Instant::now() < deadline, "no slot came free");
    }
}

#[tokio::test]
async fn the_admin_listener_serves_at_most_64_connections_at_once() {
    let (gw, _up) = gateway().await;
    let admin = gw.admin_addr();
    let mut open = Vec::new();
    for _ in 0..64 {
        open.push(served(admin, "/healthz").await);
    }
    // The 65th waits in the backlog, unanswered, until one of the 64 goes.
    let waiting = tokio::spawn(served(admin, "/healthz"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a 65th admin connection was served");
    drop(open.pop());
    tokio::time::timeout(WAIT, waiting)
        .await
        .expect("served once a slot came free")
        .unwrap();
}

/// A gateway with an admin listener and one open route to the test upstream.
async fn gateway() -> (Gateway, Upstream) {
    let up = upstream().await;
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        up.url()
    );
    (Gateway::start(&config).await, up)
}
