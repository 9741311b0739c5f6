//! Short-lived tokens minted by the gateway (SPEC §10): `POST /.portcullis/token` with a key
//! answers a `pct_` token that authenticates as that key, on one route, until it expires; it dies
//! with its key and with the secret, counts toward lockout when it fails, never goes upstream,
//! and neither it, the key nor the secret is ever written out. The gateway is the real binary,
//! the upstreams the servers of `tests/support/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const KEY: &str = "pcx_token-app-key-0123456789abcdefghijklmnopq";
const OTHER_KEY: &str = "pcx_token-other-key-0123456789abcdefghijklmno";
/// The `[tokens]` secret (at least 32 bytes), from `PORTCULLIS_TOKEN_SECRET`.
const SECRET: &str = "tok-secret-Zq81-0123456789abcdefghijklmnopqrstu";
/// Another secret, for the reload that changes it.
const SECRET_NEXT: &str = "tok-secret-next-Yw27-0123456789abcdefghijklmnopq";

fn env() -> [(&'static str, &'static str); 2] {
    [
        ("PORTCULLIS_TOKEN_SECRET", SECRET),
        ("PORTCULLIS_TOKEN_SECRET_NEXT", SECRET_NEXT),
    ]
}

/// A gateway config: `[auth]` (lockout high unless `auth` says otherwise), limits off (so that
/// only what a test exercises refuses), `[tokens]` with `tokens` lines, `keys`, and two keyed
/// routes to `up`: `realtime` on `/v1/` and `other` on `/other/`, then `more_routes`.
fn config(up: &Upstream, auth: &str, tokens: &str, keys: &str, more_routes: &str) -> String {
    let u = up.url();
    let auth = if auth.is_empty() {
        "lockout_failures = 1000"
    } else {
        auth
    };
    format!(
        "{}[auth]\n{auth}\n[limits]\nper_ip = \"off\"\nper_key = \"off\"\n\
         [tokens]\n{tokens}\n{keys}\
         [[routes]]\nname = \"realtime\"\npath = \"/v1/\"\nupstream = \"{u}\"\n\
         [[routes]]\nname = \"other\"\npath = \"/other/\"\nupstream = \"{u}\"\n{more_routes}",
        server_section(""),
    )
}

/// The usual `[tokens]` lines: the secret from the environment, the default `max_ttl`.
const TOKENS: &str = "secret = \"${PORTCULLIS_TOKEN_SECRET}\"";

fn bearer(k: &str) -> String {
    format!("Authorization: Bearer {k}")
}

/// What the mint endpoint answered.
struct Answer {
    status: u16,
    cache_control: Option<String>,
    body: serde_json::Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// `POST /.portcullis/token` with `body`, the credential (if any) as `Authorization: Bearer`.
async fn post_mint(gw: &Gateway, cred: Option<&str>, body: &str) -> Answer {
    let mut req = client()
        .post(gw.url("/.portcullis/token"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(c) = cred {
        req = req.bearer_auth(c);
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("the mint request timed out")
        .unwrap();
    let status = resp.status().as_u16();
    let cache_control = resp
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Answer {
        status,
        cache_control,
        body,
    }
}

/// Mints a token for `route` with `key` (200 asserted); returns it and its `expires_at`.
async fn mint(gw: &Gateway, key: &str, route: &str, ttl: Option<&str>) -> (String, SystemTime) {
    let body = match ttl {
        Some(t) => serde_json::json!({"route": route, "ttl": t}),
        None => serde_json::json!({"route": route}),
    };
    let a = post_mint(gw, Some(key), &body.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let token = a.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("pct_"), "{token}");
    let expires_at = humantime::parse_rfc3339(a.body["expires_at"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("expires_at does not parse: {e}: {}", a.body));
    (token, expires_at)
}

/// `GET target` with `token` as the bearer credential; (status, error code, raw answer).
async fn use_token(gw: &Gateway, target: &str, token: &str) -> (u16, String, String) {
    let (s, r) = send(gw.addr, "GET", target, &[&bearer(token)]).await;
    (s, code_of(&r), r)
}

/// `token` with the character at `i` replaced by another base64url character.
fn flip(token: &str, i: usize) -> String {
    let mut b = token.as_bytes().to_vec();
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

/// The (payload, tag) parts of a token: `pct_` + payload + `.` + tag.
fn parts(token: &str) -> (&str, &str) {
    token.strip_prefix("pct_").unwrap().split_once('.').unwrap()
}

#[tokio::test]
async fn a_minted_token_works_on_its_route_only_and_the_mint_is_recorded() {
    let up = upstream().await;
    let keys = format!(
        "{}{}",
        key_block("app", KEY, ""),
        key_block("b", OTHER_KEY, "")
    );
    let gw = Gateway::start_with_env(&config(&up, "", TOKENS, &keys, ""), &env()).await;

    let before = SystemTime::now();
    let a = post_mint(
        &gw,
        Some(KEY),
        &serde_json::json!({"route": "realtime", "ttl": "60s"}).to_string(),
    )
    .await;
    let after = SystemTime::now();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.cache_control.as_deref(), Some("no-store"), "{}", a.body);
    let token = a.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("pct_"), "{token}");
    // `expires_at` is RFC 3339 (whole seconds, rounded up), ttl from the moment of minting.
    let expires_at = humantime::parse_rfc3339(a.body["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        expires_at >= before + Duration::from_secs(60)
            && expires_at <= after + Duration::from_secs(61),
        "expires_at {} is not 60 s from now",
        a.body["expires_at"]
    );
    // Minting forwards nothing.
    assert!(up.seen().is_empty(), "{:?}", up.targets());

    // On its route: accepted, in either configured header, as the key.
    let (s, _, r) = use_token(&gw, "/v1/x", &token).await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = send(gw.addr, "GET", "/v1/y", &[&format!("X-API-Key: {token}")]).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(up.targets(), ["/v1/x", "/v1/y"]);
    // The upstream sees neither the token nor the headers it came in (as for a key).
    for seen in up.seen() {
        assert_eq!(seen.header("authorization"), None, "{seen:?}");
        assert_eq!(seen.header("x-api-key"), None, "{seen:?}");
        assert!(
            seen.headers.iter().all(|(_, v)| !v.contains(&token)),
            "{seen:?}"
        );
    }

    // On another route the key could use: refused, nothing forwarded.
    let (s, code, r) = use_token(&gw, "/other/x", &token).await;
    assert_eq!((s, code.as_str()), (401, "invalid_token"), "{r}");
    assert_eq!(
        header_of(&r, "www-authenticate").as_deref(),
        Some("Bearer realm=\"portcullis\"")
    );
    assert_eq!(up.seen().len(), 2, "{:?}", up.targets());
    // The key itself still goes there.
    assert_eq!(
        send(gw.addr, "GET", "/other/x", &[&bearer(KEY)]).await.0,
        200
    );

    let recs = gw.wait_requests(5).await;
    let minted = &recs[0];
    assert_eq!(minted["outcome"], "token_minted", "{minted}");
    assert_eq!(minted["status"], 200, "{minted}");
    assert_eq!(minted["route"], "portcullis-token", "{minted}");
    assert_eq!(minted["path"], "/.portcullis/token", "{minted}");
    assert_eq!(minted["key_id"], "app", "{minted}");
    for rec in &recs[1..3] {
        assert_eq!(rec["outcome"], "forwarded", "{rec}");
        assert_eq!(rec["route"], "realtime", "{rec}");
        assert_eq!(rec["key_id"], "app", "{rec}");
    }
    assert_eq!(recs[3]["outcome"], "invalid_token", "{}", recs[3]);
    assert_eq!(recs[3]["status"], 401, "{}", recs[3]);
    assert_eq!(recs[3]["route"], "other", "{}", recs[3]);
}

#[tokio::test]
async fn the_mint_record_counts_the_request_body_in_bytes_in() {
    let up = upstream().await;
    let gw = Gateway::start_with_env(
        &config(&up, "", TOKENS, &key_block("app", KEY, ""), ""),
        &env(),
    )
    .await;
    let body = serde_json::json!({"route": "realtime", "ttl": "60s"}).to_string();
    let a = post_mint(&gw, Some(KEY), &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let rec = &gw.wait_requests(1).await[0];
    assert_eq!(rec["outcome"], "token_minted", "{rec}");
    // docs/operations.md: `bytes_in` is the body bytes from the client; the gateway read them.
    assert_eq!(rec["bytes_in"], body.len(), "{rec}");
}

#[tokio::test]
async fn a_sub_second_ttl_never_answers_a_dead_token() {
    let up = upstream().await;
    let gw = Gateway::start_with_env(
        &config(&up, "", TOKENS, &key_block("app", KEY, ""), ""),
        &env(),
    )
    .await;
    // `ttl = "500ms"` is neither zero nor over max_ttl: either it is refused, or the token lives
    // when it is answered. Minted over a little more than a second, so that every fraction of a
    // second is tried (the expiry has whole seconds).
    let start = tokio::time::Instant::now();
    let mut attempts = 0;
    while start.elapsed() < Duration::from_millis(1100) {
        let sent_at = SystemTime::now();
        let a = post_mint(
            &gw,
            Some(KEY),
            &serde_json::json!({"route": "realtime", "ttl": "500ms"}).to_string(),
        )
        .await;
        attempts += 1;
        if a.status == 200 {
            let expires_at =
                humantime::parse_rfc3339(a.body["expires_at"].as_str().unwrap()).unwrap();
            assert!(
                expires_at > sent_at,
                "a token that had expired before it was asked for: sent at {}, {}",
                humantime::format_rfc3339_millis(sent_at),
                a.body
            );
        } else {
            assert_eq!((a.status, a.code()), (400, "bad_request"), "{}", a.body);
        }
        // Samples across the second: a short interval, bounded by the loop's 1.1 s.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(attempts >= 10, "only {attempts} mints in 1.1 s");
}

/// Mints a token with `ttl = "1s"`. The gateway's expiry has whole seconds (`expires_at`),
/// rounded up, so a 1 s token lives between 1 and 2 s; the mint is retried (bounded) until one
/// has at least 800 ms left when it arrives here.
async fn mint_one_second_token(gw: &Gateway) -> (String, SystemTime) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (token, expires_at) = mint(gw, KEY, "realtime", Some("1s")).await;
        let now = SystemTime::now();
        assert!(
            expires_at <= now + Duration::from_secs(2),
            "a 1 s token lives longer than 2 s"
        );
        if expires_at
            .duration_since(now)
            .is_ok_and(|left| left >= Duration::from_millis(800))
        {
            return (token, expires_at);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 1 s token with 800 ms left was minted"
        );
        // Polling for the start of a second: a short interval, bounded by the deadline.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_token_is_refused_once_it_expires() {
    let up = upstream().await;
    let gw = Gateway::start_with_env(
        &config(&up, "", TOKENS, &key_block("app", KEY, ""), ""),
        &env(),
    )
    .await;
    let (token, expires_at) = mint_one_second_token(&gw).await;
    let (s, _, r) = use_token(&gw, "/v1/at-once", &token).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(up.targets(), ["/v1/at-once"]);

    // Poll (bounded) until it is refused; it must be accepted only before `expires_at` and
    // refused only after it.
    let deadline = expires_at + WAIT;
    loop {
        let sent_at = SystemTime::now();
        let (s, code, r) = use_token(&gw, "/v1/poll", &token).await;
        let answered_at = SystemTime::now();
        if s == 200 {
            assert!(
                sent_at < expires_at,
                "accepted after its expires_at: {:?} past",
                sent_at.duration_since(expires_at)
            );
        } else {
            assert_eq!((s, code.as_str()), (401, "invalid_token"), "{r}");
            assert!(
                answered_at >= expires_at,
                "refused {:?} before its expires_at",
                expires_at.duration_since(answered_at)
            );
            break;
        }
        assert!(
            SystemTime::now() < deadline,
            "the token was still accepted long after it expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And it stays refused; the key itself is unaffected.
    let (s, code, r) = use_token(&gw, "/v1/later", &token).await;
    assert_eq!((s, code.as_str()), (401, "invalid_token"), "{r}");
    assert_eq!(
        send(gw.addr, "GET", "/v1/key", &[&bearer(KEY)]).await.0,
        200
    );
    assert!(!up.targets().iter().any(|t| t == "/v1/later"));
}

#[tokio::test]
async fn a_token_dies_when_its_key_is_removed_disabled_replaced_or_expired_by_a_reload() {
    let up = upstream().await;
    const GONE: &str = "pcx_token-gone-key-0123456789abcdefghijklmnop";
    const OFF: &str = "pcx_token-off-key-0123456789abcdefghijklmnopq";
    const SWAPPED: &str = "pcx_token-swap-key-0123456789abcdefghijklmnop";
    const SWAPPED_NEW: &str = "pcx_token-swap-new-0123456789abcdefghijklmnop";
    const STAY: &str = "pcx_token-stay-key-0123456789abcdefghijklmnop";
    const LAPSED: &str = "pcx_token-lapsed-key-0123456789abcdefghijklmn";
    let keys = |after: bool| {
        if after {
            format!(
                "{}{}{}{}",
                key_block("off", OFF, "disabled = true"),
                key_block("swapped", SWAPPED_NEW, ""),
                key_block("lapsed", LAPSED, "expires = \"2020-01-01T00:00:00Z\""),
                key_block("stay", STAY, "")
            )
        } else {
            format!(
                "{}{}{}{}{}",
                key_block("gone", GONE, ""),
                key_block("off", OFF, ""),
                key_block("swapped", SWAPPED, ""),
                key_block("lapsed", LAPSED, ""),
                key_block("stay", STAY, "")
            )
        }
    };
    let gw = Gateway::start_with_env(&config(&up, "", TOKENS, &keys(false), ""), &env()).await;
    let mut tokens = Vec::new();
    for (id, key) in [
        ("gone", GONE),
        ("off", OFF),
        ("swapped", SWAPPED),
        ("lapsed", LAPSED),
        ("stay", STAY),
    ] {
        let (t, _) = mint(&gw, key, "realtime", Some("5m")).await;
        let (s, _, r) = use_token(&gw, "/v1/before", &t).await;
        assert_eq!(s, 200, "{id}'s token before the reload: {r}");
        tokens.push((id, t));
    }

    gw.rewrite_config(&config(&up, "", TOKENS, &keys(true), ""));
    let ev = gw.reload().await;
    assert_eq!(
        (ev["result"].as_str(), ev["key_count"].as_u64()),
        (Some("ok"), Some(4)),
        "{ev}"
    );
    let forwarded = up.seen().len();
    for (id, t) in &tokens {
        let (s, code, r) = use_token(&gw, "/v1/after", t).await;
        if *id == "stay" {
            assert_eq!(
                s, 200,
                "a token whose key is unchanged died in the reload: {r}"
            );
        } else {
            assert_eq!(
                (s, code.as_str()),
                (401, "invalid_token"),
                "{id}'s token after the reload: {r}"
            );
        }
    }
    // Only the `stay` token's request went upstream.
    assert_eq!(up.seen().len(), forwarded + 1, "{:?}", up.targets());
    // The replacement key is a key like any other.
    assert_eq!(
        send(gw.addr, "GET", "/v1/new", &[&bearer(SWAPPED_NEW)])
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_new_secret_by_reload_ends_the_old_tokens_and_mints_working_ones() {
    let up = upstream().await;
    let keys = key_block("app", KEY, "");
    let gw = Gateway::start_with_env(&config(&up, "", TOKENS, &keys, ""), &env()).await;
    let (old, _) = mint(&gw, KEY, "realtime", None).await;
    assert_eq!(use_token(&gw, "/v1/old", &old).await.0, 200);

    gw.rewrite_config(&config(
        &up,
        "",
        "secret = \"${PORTCULLIS_TOKEN_SECRET_NEXT}\"",
        &keys,
        "",
    ));
    let ev = gw.reload().await;
    assert_eq!(ev["result"], "ok", "{ev}");
    let (s, code, r) = use_token(&gw, "/v1/old-again", &old).await;
    assert_eq!((s, code.as_str()), (401, "invalid_token"), "{r}");

    let (fresh, _) = mint(&gw, KEY, "realtime", None).await;
    assert_ne!(fresh, old);
    let (s, _, r) = use_token(&gw, "/v1/fresh", &fresh).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(up.targets(), ["/v1/old", "/v1/fresh"]);
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Closes a WebSocket and reads (bounded) until the gateway ends it, so that the tunnel ends and
/// its record is written.
async fn close(mut ws: Ws) {
    ws.close(None).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the tunnel did not end after a close")
        {
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return,
        }
    }
}

#[tokio::test]
async fn a_token_in_the_query_parameter_opens_a_websocket_and_is_not_forwarded() {
    let up = upstream().await;
    let echo = ws_echo_upstream().await;
    let rt = realtime_upstream().await;
    let routes = format!(
        "[[routes]]\nname = \"echo\"\npath = \"/ws\"\nupstream = \"http://{echo}\"\nwebsocket = true\nquery_param = \"api_key\"\n\
         [[routes]]\nname = \"voice\"\npath = \"/v1/realtime\"\nupstream = \"{}\"\nwebsocket = true\nquery_param = \"api_key\"\n",
        rt.url()
    );
    let gw = Gateway::start_with_env(
        &config(&up, "", TOKENS, &key_block("app", KEY, ""), &routes),
        &env(),
    )
    .await;
    let (echo_token, _) = mint(&gw, KEY, "echo", None).await;
    let (voice_token, _) = mint(&gw, KEY, "voice", None).await;

    // The echo route: the handshake passes with the token in the query, and the tunnel works.
    let (mut ws, resp) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/ws?api_key={echo_token}", gw.addr)),
    )
    .await
    .expect("the handshake timed out")
    .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("through a token")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no echo")
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "through a token");
    close(ws).await;

    // The realtime upstream records the handshake: no `api_key` in its target, no token anywhere.
    let url = format!(
        "ws://{}/v1/realtime?model=gpt-realtime&api_key={voice_token}",
        gw.addr
    );
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("the handshake timed out")
        .unwrap();
    assert_eq!(resp.status(), 101);
    let first = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no session.created")
        .unwrap()
        .unwrap();
    assert!(
        first.into_text().unwrap().contains("session.created"),
        "the upstream did not greet"
    );
    close(ws).await;
    let session = rt.wait_ended(0).await;
    assert_eq!(session.target, "/v1/realtime?model=gpt-realtime");
    assert!(!session.target.contains("api_key"), "{session:?}");
    assert!(
        session
            .headers
            .iter()
            .all(|(_, v)| !v.contains(&voice_token)),
        "the token went upstream: {:?}",
        session.headers
    );

    // The echo route's token does not open the voice route.
    let wrong = format!(
        "ws://{}/v1/realtime?model=gpt-realtime&api_key={echo_token}",
        gw.addr
    );
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(wrong))
        .await
        .expect("the refused handshake timed out")
    {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "invalid_token", "{body}");
        }
        other => panic!("another route's token opened a WebSocket: {other:?}"),
    }
    assert_eq!(rt.sessions().len(), 1);

    let recs = gw.wait_requests(5).await;
    let tunnels: Vec<_> = recs.iter().filter(|r| r["status"] == 101).collect();
    assert_eq!(tunnels.len(), 2, "{recs:?}");
    assert!(tunnels.iter().all(|r| r["key_id"] == "app"), "{tunnels:?}");
}

#[tokio::test]
async fn mint_errors_get_their_spec_answers() {
    let up = upstream().await;
    let keys = format!(
        "{}{}",
        key_block("app", KEY, "routes = [\"realtime\"]"),
        key_block("b", OTHER_KEY, "")
    );
    let more = format!(
        "[[routes]]\nname = \"open\"\npath = \"/open/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        up.url()
    );
    let gw = Gateway::start_with_env(&config(&up, "", TOKENS, &keys, &more), &env()).await;
    let (token, _) = mint(&gw, KEY, "realtime", Some("10m")).await;

    let j = |v: serde_json::Value| v.to_string();
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        (
            "ttl over max_ttl",
            Some(KEY),
            j(serde_json::json!({"route": "realtime", "ttl": "11m"})),
            400,
            "bad_request",
        ),
        (
            "ttl zero",
            Some(KEY),
            j(serde_json::json!({"route": "realtime", "ttl": "0s"})),
            400,
            "bad_request",
        ),
        (
            "ttl unparsable",
            Some(KEY),
            j(serde_json::json!({"route": "realtime", "ttl": "soon"})),
            400,
            "bad_request",
        ),
        (
            "unknown route",
            Some(OTHER_KEY),
            j(serde_json::json!({"route": "nowhere"})),
            400,
            "bad_request",
        ),
        (
            "not JSON",
            Some(KEY),
            "route=realtime".to_owned(),
            400,
            "bad_request",
        ),
        ("empty body", Some(KEY), String::new(), 400, "bad_request"),
        (
            "no route field",
            Some(KEY),
            j(serde_json::json!({"ttl": "60s"})),
            400,
            "bad_request",
        ),
        (
            "an unknown field",
            Some(KEY),
            j(serde_json::json!({"route": "realtime", "scope": "all"})),
            400,
            "bad_request",
        ),
        (
            "key not allowed on the route",
            Some(KEY),
            j(serde_json::json!({"route": "other"})),
            403,
            "key_not_allowed",
        ),
        (
            "a token to mint",
            Some(&token),
            j(serde_json::json!({"route": "realtime"})),
            401,
            "invalid_api_key",
        ),
        (
            "no key",
            None,
            j(serde_json::json!({"route": "realtime"})),
            401,
            "missing_api_key",
        ),
    ];
    for (what, cred, body, status, code) in &cases {
        let a = post_mint(&gw, *cred, body).await;
        assert_eq!((a.status, a.code()), (*status, *code), "{what}: {}", a.body);
        assert!(a.body.get("token").is_none(), "{what}: {}", a.body);
    }
    // The unscoped key may have the route the scoped one may not.
    let (t, _) = mint(&gw, OTHER_KEY, "other", None).await;
    assert_eq!(use_token(&gw, "/other/x", &t).await.0, 200);

    // No mint went upstream (the one request seen is the token's use), each has its record.
    assert_eq!(up.targets(), ["/other/x"]);
    let recs = gw.wait_requests(cases.len() + 3).await;
    let mints: Vec<_> = recs
        .iter()
        .filter(|r| r["route"] == "portcullis-token")
        .collect();
    assert_eq!(mints.len(), cases.len() + 2, "{recs:?}");
    for (rec, (what, _, _, status, code)) in mints[1..].iter().zip(&cases) {
        assert_eq!(
            (rec["status"].as_u64(), rec["outcome"].as_str()),
            (Some(u64::from(*status)), Some(*code)),
            "{what}: {rec}"
        );
    }
}

#[tokio::test]
async fn the_ttl_defaults_to_60s_and_is_capped_by_max_ttl_and_the_keys_expiry() {
    let up = upstream().await;
    let key_expires = SystemTime::now() + Duration::from_secs(120);
    let key_expires_text = humantime::format_rfc3339_seconds(key_expires).to_string();
    let key_expires = humantime::parse_rfc3339(&key_expires_text).unwrap();
    let keys = format!(
        "{}{}",
        key_block("app", KEY, ""),
        key_block(
            "brief",
            OTHER_KEY,
            &format!("expires = \"{key_expires_text}\"")
        )
    );
    let gw = Gateway::start_with_env(&config(&up, "", TOKENS, &keys, ""), &env()).await;
    // Expiry has whole seconds, rounded up: at least `ttl`, less than a second more.
    let within = |expires_at: SystemTime, before: SystemTime, ttl: u64| {
        let after = SystemTime::now();
        expires_at >= before + Duration::from_secs(ttl)
            && expires_at <= after + Duration::from_secs(ttl + 1)
    };
    let before = SystemTime::now();
    let (_, expires_at) = mint(&gw, KEY, "realtime", None).await;
    assert!(within(expires_at, before, 60), "no ttl: not 60 s");
    // A 10 min token of a key that expires in 2 min ends with the key.
    let (t, expires_at) = mint(&gw, OTHER_KEY, "realtime", Some("10m")).await;
    assert_eq!(expires_at, key_expires);
    assert_eq!(use_token(&gw, "/v1/x", &t).await.0, 200);
    drop(gw);

    // With max_ttl = 30s, the default is 30 s and 31 s is too long.
    let gw = Gateway::start_with_env(
        &config(&up, "", &format!("{TOKENS}\nmax_ttl = \"30s\""), &keys, ""),
        &env(),
    )
    .await;
    let before = SystemTime::now();
    let (_, expires_at) = mint(&gw, KEY, "realtime", None).await;
    assert!(within(expires_at, before, 30), "no ttl: not capped at 30 s");
    let a = post_mint(
        &gw,
        Some(KEY),
        &serde_json::json!({"route": "realtime", "ttl": "31s"}).to_string(),
    )
    .await;
    assert_eq!((a.status, a.code()), (400, "bad_request"), "{}", a.body);
}

#[tokio::test]
async fn tampered_tokens_are_refused_and_count_toward_lockout() {
    let up = upstream().await;
    let gw = Gateway::start_with_env(
        &config(
            &up,
            "lockout_failures = 3\nlockout_window = \"1m\"\nlockout_duration = \"1m\"",
            TOKENS,
            &key_block("app", KEY, ""),
            "",
        ),
        &env(),
    )
    .await;
    let (token, _) = mint(&gw, KEY, "realtime", None).await;
    assert_eq!(use_token(&gw, "/v1/ok", &token).await.0, 200);
    let (payload, tag) = parts(&token);
    let payload_at = "pct_".len() + payload.len() / 2;
    let tag_at = "pct_".len() + payload.len() + 1 + tag.len() / 2;
    let bad_tag = flip(&token, tag_at);
    let bad_payload = flip(&token, payload_at);
    assert_ne!(bad_tag, token);
    assert_ne!(bad_payload, token);

    // Two failures: refused, not yet locked out.
    for (what, t) in [("tag", &bad_tag), ("payload", &bad_payload)] {
        let (s, code, r) = use_token(&gw, "/v1/forged", t).await;
        assert_eq!(
            (s, code.as_str()),
            (401, "invalid_token"),
            "a changed {what}: {r}"
        );
    }
    let (s, _, r) = use_token(&gw, "/v1/ok", &token).await;
    assert_eq!(s, 200, "locked out after 2 failures of 3: {r}");
    // The third locks the IP out: even the good token, and the key, then get 429.
    let (s, code, r) = use_token(&gw, "/v1/forged", &flip(&token, tag_at + 1)).await;
    assert_eq!((s, code.as_str()), (401, "invalid_token"), "{r}");
    let (s, code, r) = use_token(&gw, "/v1/ok", &token).await;
    assert_eq!((s, code.as_str()), (429, "locked_out"), "{r}");
    let (s, r) = send(gw.addr, "GET", "/v1/ok", &[&bearer(KEY)]).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "locked_out"), "{r}");
    let lock = gw.wait_events("lockout", 1).await;
    assert_eq!(lock[0]["failures"], 3, "{}", lock[0]);
    assert!(!up.targets().iter().any(|t| t == "/v1/forged"));
    assert_eq!(up.targets(), ["/v1/ok", "/v1/ok"]);
}

#[tokio::test]
async fn neither_the_key_the_token_nor_the_secret_is_ever_written_out() {
    let up = upstream().await;
    let echo = ws_echo_upstream().await;
    let routes = format!(
        "[[routes]]\nname = \"echo\"\npath = \"/ws\"\nupstream = \"http://{echo}\"\nwebsocket = true\nquery_param = \"api_key\"\n"
    );
    let keys = key_block("app", KEY, "");
    let cfg = config(&up, "", TOKENS, &keys, &routes);
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let (token, _) = mint(&gw, KEY, "realtime", None).await;
    let (ws_token, _) = mint(&gw, KEY, "echo", None).await;
    // The token's payload names the key by id, never the key itself.
    let payload = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        parts(&token).0,
    )
    .unwrap();
    let payload = String::from_utf8(payload).unwrap();
    assert!(
        payload.contains("app") && payload.contains("realtime"),
        "{payload}"
    );
    assert!(
        !payload.contains(KEY) && !payload.contains(SECRET),
        "{payload}"
    );

    // Every path a token takes: accepted, refused elsewhere, forged, used to mint, in a query.
    let forged = flip(&token, token.len() - 5);
    assert_eq!(use_token(&gw, "/v1/x", &token).await.0, 200);
    assert_eq!(use_token(&gw, "/other/x", &token).await.0, 401);
    assert_eq!(use_token(&gw, "/v1/x", &forged).await.0, 401);
    let a = post_mint(&gw, Some(&token), "{\"route\":\"realtime\"}").await;
    assert_eq!(a.status, 401);
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/ws?api_key={ws_token}", gw.addr)),
    )
    .await
    .expect("the handshake timed out")
    .unwrap();
    close(ws).await;
    // A reload re-reads the secret.
    assert_eq!(gw.reload().await["result"], "ok");
    let recs = gw.wait_requests(7).await;
    assert!(recs.iter().any(|r| r["outcome"] == "token_minted"));

    // The forged token's refusal is in the debug log: the log is captured, and at debug level.
    gw.stderr
        .wait_until(|lines| {
            lines
                .iter()
                .any(|l| l.contains("token refused"))
                .then_some(())
        })
        .await;
    let everything = format!("{}\n{}", gw.stdout.text(), gw.stderr.text());
    let (_, tag) = parts(&token);
    for (what, secret) in [
        ("the key", KEY),
        ("the token", token.as_str()),
        ("the token's tag", tag),
        ("the websocket token", ws_token.as_str()),
        ("the forged token", forged.as_str()),
        ("the token secret", SECRET),
    ] {
        assert!(!everything.contains(secret), "{what} leaked: {secret}");
    }
}

#[test]
fn token_config_errors_name_their_key_path() {
    let route = |name: &str, path: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstream = \"http://127.0.0.1:8000\"\n"
        )
    };
    let api = route("api", "/v1/");
    let tokens = "[tokens]\nsecret = \"${PORTCULLIS_TOKEN_SECRET}\"\n";
    let short = "0123456789abcdef0123456789abcde"; // 31 bytes
    assert_eq!(short.len(), 31);

    // A good config passes.
    let (code, _, err) = check(&format!("{tokens}{api}"), &env());
    assert_eq!(code, 0, "{err}");

    let refused = |config: String, env: &[(&str, &str)], fragment: &str| {
        let (code, out, err) = check(&config, env);
        assert_eq!(code, 1, "accepted:\n{config}\nstdout: {out}");
        assert!(err.contains(fragment), "missing {fragment:?} in: {err}");
        err
    };
    let err = refused(
        format!("{tokens}{api}"),
        &[("PORTCULLIS_TOKEN_SECRET", short)],
        "tokens.secret",
    );
    assert!(!err.contains(short), "the short secret was printed: {err}");
    refused(
        format!("{tokens}{api}{}", route("portcullis-token", "/mine/")),
        &env(),
        "routes[1].name",
    );
    refused(
        format!("{tokens}{}{api}", route("mine", "/.portcullis/token/x")),
        &env(),
        "routes[0].path",
    );
    refused(
        format!("{tokens}{}{api}", route("mine", "/.portcullis/token")),
        &env(),
        "routes[0].path",
    );
    // Without [tokens], the name and the path are anyone's.
    let (code, _, err) = check(
        &format!("{api}{}", route("portcullis-token", "/.portcullis/token")),
        &[],
    );
    assert_eq!(code, 0, "{err}");
}
