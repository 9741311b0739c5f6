//! The SPEC §3 order, pinned: a preflight passes without a key; a missing key is 401 before any
//! 429; a denied IP is 403 before the key is even looked at; 404 before everything.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const KEY: &str = "pcx_order-key-0123456789abcdefghijklmnopqrstuv";

#[tokio::test]
async fn steps_run_in_spec_order() {
    let up = upstream().await;
    let config = format!(
        "{}[cors]\nallowed_origins = [\"https://app.example\"]\n{}\
         [[routes]]\nname = \"a\"\npath = \"/a/\"\nupstream = \"{}\"\nper_ip = \"1/min\"\n\
         [[routes]]\nname = \"denied\"\npath = \"/denied/\"\nupstream = \"{}\"\ndeny_ips = [\"127.0.0.1\"]\n",
        server_section(""),
        key_block("k", KEY, ""),
        up.url(),
        up.url(),
    );
    let gw = Gateway::start(&config).await;
    let key = format!("Authorization: Bearer {KEY}");
    // Use up the per-IP budget.
    assert_eq!(send(gw.addr, "GET", "/a/x", &[&key]).await.0, 200);
    assert_eq!(send(gw.addr, "GET", "/a/x", &[&key]).await.0, 429);
    // Missing key: 401 (step 7) comes before the exhausted limit (step 8).
    let (s, r) = send(gw.addr, "GET", "/a/x", &[]).await;
    assert_eq!((s, code_of(&r).as_str()), (401, "missing_api_key"));
    // Preflight (step 6) needs no key and is not rate limited.
    let (s, _) = send(
        gw.addr,
        "OPTIONS",
        "/a/x",
        &[
            "Origin: https://app.example",
            "Access-Control-Request-Method: GET",
        ],
    )
    .await;
    assert_eq!(s, 204);
    // Foreign origin (step 6) before the key (step 7).
    let (s, r) = send(gw.addr, "GET", "/a/x", &["Origin: https://evil.example"]).await;
    assert_eq!((s, code_of(&r).as_str()), (403, "origin_not_allowed"));
    // IP lists (step 5) before CORS and the key.
    let (s, r) = send(
        gw.addr,
        "GET",
        "/denied/x",
        &["Origin: https://evil.example"],
    )
    .await;
    assert_eq!((s, code_of(&r).as_str()), (403, "ip_denied"));
    // No route (step 4) before all of them.
    let (s, r) = send(
        gw.addr,
        "GET",
        "/nowhere",
        &["Origin: https://evil.example"],
    )
    .await;
    assert_eq!((s, code_of(&r).as_str()), (404, "no_route"));
    assert_eq!(up.targets().len(), 1);
}
