//! CORS (SPEC §3 step 6): preflights answered at the gateway without a key and without the
//! upstream; a foreign Origin is refused on every request, WebSocket handshakes included.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const KEY: &str = "pcx_cors-key-0123456789abcdefghijklmnopqrstuvw";

fn config(up: &Upstream, ws: std::net::SocketAddr) -> String {
    format!(
        "{}[cors]\nallowed_origins = [\"https://app.example\"]\nallow_credentials = true\nmax_age = \"10m\"\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nmethods = [\"POST\"]\nupstream = \"{}\"\n\
         [[routes]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"http://{ws}\"\nauth = \"none\"\nwebsocket = true\n",
        server_section(""),
        key_block("k", KEY, ""),
        up.url(),
    )
}

#[tokio::test]
async fn preflight_is_answered_without_a_key_and_never_forwarded() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, dead_addr().await)).await;
    let (s, r) = send(
        gw.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            "Origin: https://app.example",
            "Access-Control-Request-Method: POST",
            "Access-Control-Request-Headers: authorization",
        ],
    )
    .await;
    assert_eq!(s, 204, "{r}");
    assert_eq!(
        header_of(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        header_of(&r, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert_eq!(
        header_of(&r, "access-control-max-age").as_deref(),
        Some("600")
    );
    assert!(
        header_of(&r, "access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    assert!(
        header_of(&r, "access-control-allow-headers")
            .unwrap()
            .contains("authorization")
    );
    assert!(header_of(&r, "vary").unwrap().contains("Origin"));

    let (s, r) = send(
        gw.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            "Origin: https://evil.example",
            "Access-Control-Request-Method: POST",
        ],
    )
    .await;
    assert_eq!(
        (s, code_of(&r).as_str()),
        (403, "origin_not_allowed"),
        "{r}"
    );
    assert!(up.targets().is_empty());
}

#[tokio::test]
async fn foreign_origin_is_refused_even_with_a_valid_key() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, dead_addr().await)).await;
    let key = format!("Authorization: Bearer {KEY}");
    let (s, r) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[&key, "Origin: https://evil.example"],
    )
    .await;
    assert_eq!(
        (s, code_of(&r).as_str()),
        (403, "origin_not_allowed"),
        "{r}"
    );
    let (s, r) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[&key, "Origin: null"],
    )
    .await;
    assert_eq!(s, 403, "{r}");
    assert!(up.targets().is_empty());

    // Allowed origin: forwarded, with the CORS response headers.
    let (s, r) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[&key, "Origin: https://app.example"],
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        header_of(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    // No Origin (apps, scripts): allowed.
    assert_eq!(
        send(gw.addr, "POST", "/v1/chat/completions", &[&key])
            .await
            .0,
        200
    );
    // Same origin on an IP-literal host (a browser on http://<pi-address>:port): allowed.
    let own = format!("http://{}", gw.addr);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\n{key}\r\nOrigin: {own}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        gw.addr
    );
    assert_eq!(status_of(&raw(gw.addr, req.as_bytes()).await), 200);
    // "Same origin" by a host name nobody configured, over plain HTTP, is what DNS rebinding
    // looks like: refused.
    let (s, r) = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[&key, "Origin: http://gw.test"],
    )
    .await;
    assert_eq!(
        (s, code_of(&r).as_str()),
        (403, "origin_not_allowed"),
        "{r}"
    );
}

#[tokio::test]
async fn cross_site_websocket_handshake_is_refused() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, ws_echo_upstream().await)).await;
    let handshake = |origin: &str| {
        format!(
            "Origin: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
        )
    };
    let (s, r) = send(gw.addr, "GET", "/ws", &[&handshake("https://evil.example")]).await;
    assert_eq!(
        (s, code_of(&r).as_str()),
        (403, "origin_not_allowed"),
        "{r}"
    );
    // The same handshake from an allowed origin is switched.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: gw.test\r\n{}\r\n\r\n",
        handshake("https://app.example")
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, req.as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut stream, &mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}
