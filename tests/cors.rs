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

/// A gateway whose routes can refuse in each step before CORS: a tight per-IP route, a POST-only
/// route, a denied route, a route that locks out after one bad key, a small body cap, a dead
/// upstream.
async fn refusing_gateway() -> (Gateway, Upstream) {
    let up = upstream().await;
    let dead = dead_addr().await;
    let config = format!(
        "{}[auth]\nlockout_failures = 1\n[cors]\nallowed_origins = [\"https://app.example\"]\n{}\
         [[routes]]\nname = \"tight\"\npath = \"/tight/\"\nupstream = \"{up}\"\nauth = \"none\"\nper_ip = \"1/min\"\n\
         [[routes]]\nname = \"post\"\npath = \"/post/\"\nupstream = \"{up}\"\nauth = \"none\"\nmethods = [\"POST\"]\n\
         [[routes]]\nname = \"denied\"\npath = \"/denied/\"\nupstream = \"{up}\"\nauth = \"none\"\ndeny_ips = [\"127.0.0.1\"]\n\
         [[routes]]\nname = \"small\"\npath = \"/small/\"\nupstream = \"{up}\"\nauth = \"none\"\nmax_body = \"10\"\n\
         [[routes]]\nname = \"dead\"\npath = \"/dead/\"\nupstream = \"http://{dead}\"\nauth = \"none\"\n\
         [[routes]]\nname = \"keyed\"\npath = \"/keyed/\"\nupstream = \"{up}\"\n",
        server_section(""),
        key_block("k", KEY, ""),
        up = up.url(),
    );
    (Gateway::start(&config).await, up)
}

#[tokio::test]
async fn every_answer_to_an_allowed_origin_is_readable_by_the_page() {
    let (gw, _up) = refusing_gateway().await;
    let origin = "Origin: https://app.example";
    let readable = |r: &str, what: &str| {
        assert_eq!(
            header_of(r, "access-control-allow-origin").as_deref(),
            Some("https://app.example"),
            "{what}: {r}"
        );
        let expose = header_of(r, "access-control-expose-headers").unwrap_or_default();
        for h in ["x-request-id", "retry-after", "ratelimit"] {
            assert!(expose.contains(h), "{what}: {h} not exposed in {expose:?}");
        }
    };
    // A 200, then each step's refusal, in the order of the pipeline.
    let (s, r) = send(gw.addr, "GET", "/tight/x", &[origin]).await;
    assert_eq!(s, 200);
    readable(&r, "200");
    assert!(header_of(&r, "x-request-id").is_some());
    let (s, r) = send(gw.addr, "GET", "/nowhere", &[origin]).await;
    assert_eq!((s, code_of(&r).as_str()), (404, "no_route"));
    readable(&r, "404");
    let (s, r) = send(gw.addr, "GET", "/post/x", &[origin]).await;
    assert_eq!((s, code_of(&r).as_str()), (405, "method_not_allowed"));
    readable(&r, "405");
    let (s, r) = send(gw.addr, "GET", "/denied/x", &[origin]).await;
    assert_eq!((s, code_of(&r).as_str()), (403, "ip_denied"));
    readable(&r, "403 ip_denied");
    let (s, r) = send(gw.addr, "GET", "/tight/x", &[origin]).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "rate_limited"));
    readable(&r, "429 rate_limited");
    assert!(header_of(&r, "retry-after").is_some());
    let r = raw(
        gw.addr,
        b"POST /small/x HTTP/1.1\r\nHost: gw.test\r\nOrigin: https://app.example\r\n\
          Content-Length: 11\r\nConnection: close\r\n\r\nhello world",
    )
    .await;
    assert_eq!(status_of(&r), 413, "{r}");
    readable(&r, "413");
    let (s, r) = send(gw.addr, "GET", "/dead/x", &[origin]).await;
    assert_eq!((s, code_of(&r).as_str()), (502, "upstream_unavailable"));
    readable(&r, "502");
    // One bad key locks this client out (lockout_failures = 1): 401, then 429 locked_out.
    let (s, r) = send(
        gw.addr,
        "GET",
        "/keyed/x",
        &[origin, "Authorization: Bearer pcx_wrong-key"],
    )
    .await;
    assert_eq!(s, 401, "{r}");
    readable(&r, "401");
    let (s, r) = send(gw.addr, "GET", "/keyed/x", &[origin]).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "locked_out"));
    readable(&r, "429 locked_out");
    // A foreign origin is still refused, and gets no CORS headers.
    let (s, r) = send(
        gw.addr,
        "GET",
        "/nowhere",
        &["Origin: https://evil.example"],
    )
    .await;
    assert_eq!(s, 404, "routing comes first: {r}");
    assert!(
        header_of(&r, "access-control-allow-origin").is_none(),
        "{r}"
    );
}

#[tokio::test]
async fn the_openai_and_anthropic_sdk_headers_pass_the_preflight_and_it_is_recorded_as_such() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, dead_addr().await)).await;
    // The headers the OpenAI JavaScript SDK sends from a browser (and Anthropic's).
    let sdk = "authorization, content-type, x-stainless-os, x-stainless-lang, \
               x-stainless-package-version, x-stainless-runtime, x-stainless-arch, \
               x-stainless-retry-count, x-stainless-timeout, openai-organization, \
               anthropic-version, anthropic-dangerous-direct-browser-access";
    let (s, r) = send(
        gw.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            "Origin: https://app.example",
            "Access-Control-Request-Method: POST",
            &format!("Access-Control-Request-Headers: {sdk}"),
        ],
    )
    .await;
    assert_eq!(s, 204, "{r}");
    let allowed = header_of(&r, "access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    for h in sdk.split(',').map(str::trim) {
        assert!(
            allowed.split(',').any(|a| a.trim() == h),
            "{h} not allowed: {allowed}"
        );
    }
    // A header outside the allowed names and prefixes is not listed.
    let (_, r) = send(
        gw.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            "Origin: https://app.example",
            "Access-Control-Request-Method: POST",
            "Access-Control-Request-Headers: x-custom-thing",
        ],
    )
    .await;
    let allowed = header_of(&r, "access-control-allow-headers").unwrap_or_default();
    assert!(!allowed.contains("x-custom-thing"), "{allowed}");
    let recs = gw.wait_requests(2).await;
    assert!(
        recs.iter()
            .all(|r| r["outcome"] == "preflight" && r["status"] == 204),
        "{recs:?}"
    );
    assert!(up.seen().is_empty(), "a preflight reached the upstream");
}

#[tokio::test]
async fn a_route_can_turn_keys_in_the_query_off_or_on() {
    let up = upstream().await;
    // Keys in the query are on globally, off on the JSON API, and on for the WebSocket route
    // only where the global setting is off.
    let config = format!(
        "{}[auth]\nquery_param = \"api_key\"\n{}\
         [[routes]]\nname = \"api\"\npath = \"/v1/\"\nupstream = \"{}\"\nquery_param = \"\"\n\
         [[routes]]\nname = \"events\"\npath = \"/events/\"\nupstream = \"{}\"\n",
        server_section(""),
        key_block("k", KEY, ""),
        up.url(),
        up.url(),
    );
    let gw = Gateway::start(&config).await;
    let (s, r) = send(gw.addr, "GET", &format!("/v1/x?api_key={KEY}"), &[]).await;
    assert_eq!((s, code_of(&r).as_str()), (401, "missing_api_key"), "{r}");
    let (s, _) = send(gw.addr, "GET", &format!("/events/x?api_key={KEY}&a=1"), &[]).await;
    assert_eq!(s, 200);
    // The key is consumed there, never forwarded; on the API route the query is the client's.
    let targets = up.targets();
    assert_eq!(targets, ["/events/x?a=1"], "{targets:?}");
    let header = format!("Authorization: Bearer {KEY}");
    let (s, _) = send(gw.addr, "GET", "/v1/x?api_key=other", &[&header]).await;
    assert_eq!(s, 200);
    assert_eq!(up.targets()[1], "/v1/x?api_key=other");
}
