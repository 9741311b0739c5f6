//! The SPEC §3 order, pinned: 404 before everything; a denied IP is 403 before the key is even
//! looked at; the per-IP limit comes before CORS and the key (a keyless flood is limited, and
//! preflights count); a preflight needs no key; a missing key is 401 before the per-key 429.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const KEY: &str = "pcx_order-key-0123456789abcdefghijklmnopqrstuv";

#[tokio::test]
async fn steps_run_in_spec_order() {
    let up = upstream().await;
    let config = format!(
        "{}[cors]\nallowed_origins = [\"https://app.example\"]\n{}\
         [[routes]]\nname = \"a\"\npath = \"/a/\"\nupstream = \"{}\"\nper_ip = \"5/min\"\nper_key = \"1/min\"\n\
         [[routes]]\nname = \"denied\"\npath = \"/denied/\"\nupstream = \"{}\"\ndeny_ips = [\"127.0.0.1\"]\n",
        server_section(""),
        key_block("k", KEY, ""),
        up.url(),
        up.url(),
    );
    let gw = Gateway::start(&config).await;
    let key = format!("Authorization: Bearer {KEY}");
    let policy = |r: &str| header_of(r, "ratelimit-policy").unwrap_or_default();
    // No route (step 4) before all of them.
    let (s, r) = send(
        gw.addr,
        "GET",
        "/nowhere",
        &["Origin: https://evil.example"],
    )
    .await;
    assert_eq!((s, code_of(&r).as_str()), (404, "no_route"));
    // IP lists (step 5) before CORS and the key.
    let (s, r) = send(
        gw.addr,
        "GET",
        "/denied/x",
        &["Origin: https://evil.example"],
    )
    .await;
    assert_eq!((s, code_of(&r).as_str()), (403, "ip_denied"));
    // Foreign origin (step 6) before the key (step 7). Per-IP use: 1 of 5.
    let (s, r) = send(gw.addr, "GET", "/a/x", &["Origin: https://evil.example"]).await;
    assert_eq!((s, code_of(&r).as_str()), (403, "origin_not_allowed"));
    // A preflight (step 6) needs no key, and counts against the per-IP limit: 2 of 5.
    let preflight = [
        "Origin: https://app.example",
        "Access-Control-Request-Method: GET",
    ];
    let (s, r) = send(gw.addr, "OPTIONS", "/a/x", &preflight).await;
    assert_eq!(s, 204);
    assert_eq!(policy(&r), "5;w=60");
    // 3 of 5, and the key's one request.
    assert_eq!(send(gw.addr, "GET", "/a/x", &[&key]).await.0, 200);
    // The key's limit (step 8): 4 of 5.
    let (s, r) = send(gw.addr, "GET", "/a/x", &[&key]).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "rate_limited"));
    assert_eq!(policy(&r), "1;w=60", "the per-key limit answered");
    // A missing key (step 7) is 401 before the spent per-key limit (step 8): 5 of 5.
    let (s, r) = send(gw.addr, "GET", "/a/x", &[]).await;
    assert_eq!((s, code_of(&r).as_str()), (401, "missing_api_key"));
    // The per-IP limit (step 5) now refuses before the key is looked at, preflights included.
    for (method, headers) in [
        ("GET", &[][..]),
        ("OPTIONS", &preflight[..]),
        ("GET", &[key.as_str()][..]),
    ] {
        let (s, r) = send(gw.addr, method, "/a/x", headers).await;
        assert_eq!(
            (s, code_of(&r).as_str()),
            (429, "rate_limited"),
            "{method} {headers:?}"
        );
        assert_eq!(policy(&r), "5;w=60", "the per-IP limit answered");
    }
    assert_eq!(up.targets().len(), 1);
}
