//! WebSocket tunnels and connection limits: an open tunnel holds its connection's slot, so it
//! counts towards `max_connections` until it closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
