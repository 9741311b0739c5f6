//! The SPEC §3 order, pinned: 404 before everything; a denied IP is 403 before the key is even
//! looked at; the per-IP limit comes before CORS and the key (a keyless flood is limited, and
//! preflights count); a preflight needs no key; a missing key is 401 before the per-key 429.
//! A lockout (step 5) answers before CORS (step 6); the per-key 429 (step 8) before the body
//! cap's 413 (step 9); on `llm` routes the model allow-list and the budget come last (step 9,
//! after the key, its limit and the body cap), the allow-list before the budget.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const KEY: &str = "pcx_order-key-0123456789abcdefghijklmnopqrstuv";

/// A raw POST of `body` as JSON, with its exact `Content-Length` and `Connection: close`;
/// `headers` are "Name: value" lines.
async fn post(
    addr: std::net::SocketAddr,
    target: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    let mut r = format!(
        "POST {target} HTTP/1.1\r\nHost: gw.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("Connection: close\r\n\r\n");
    r.push_str(body);
    let resp = raw(addr, r.as_bytes()).await;
    (status_of(&resp), resp)
}

/// A chat request for `model` whose one message is `pad` bytes long.
fn chat(model: &str, pad: usize) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "x".repeat(pad)}],
    })
    .to_string()
}

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

#[tokio::test]
async fn a_lockout_answers_before_cors() {
    let up = upstream().await;
    let config = format!(
        "{}[auth]\nlockout_failures = 2\n[cors]\nallowed_origins = [\"https://app.example\"]\n{}\
         [[routes]]\nname = \"a\"\npath = \"/a/\"\nupstream = \"{}\"\n",
        server_section(""),
        key_block("k", KEY, ""),
        up.url(),
    );
    let gw = Gateway::start(&config).await;
    let evil = "Origin: https://evil.example";
    let key = format!("Authorization: Bearer {KEY}");
    // Not locked out yet: the foreign origin is refused by CORS (step 6).
    let (s, r) = send(gw.addr, "GET", "/a/x", &[evil, &key]).await;
    assert_eq!(
        (s, code_of(&r).as_str()),
        (403, "origin_not_allowed"),
        "{r}"
    );
    // Two invalid keys reach lockout_failures = 2.
    for bad in ["pcx_wrong-1", "pcx_wrong-2"] {
        let (s, r) = send(
            gw.addr,
            "GET",
            "/a/x",
            &[&format!("Authorization: Bearer {bad}")],
        )
        .await;
        assert_eq!((s, code_of(&r).as_str()), (401, "invalid_api_key"), "{r}");
    }
    // The lockout (step 5) answers before CORS (step 6) looks at the foreign origin, with or
    // without a valid key.
    for headers in [&[evil][..], &[evil, key.as_str()][..]] {
        let (s, r) = send(gw.addr, "GET", "/a/x", headers).await;
        assert_eq!(
            (s, code_of(&r).as_str()),
            (429, "locked_out"),
            "{headers:?}: {r}"
        );
    }
    assert!(up.seen().is_empty(), "{:?}", up.targets());
}

#[tokio::test]
async fn the_per_key_limit_answers_before_the_body_cap() {
    let up = upstream().await;
    let config = format!(
        "{}{}[[routes]]\nname = \"a\"\npath = \"/a/\"\nupstream = \"{}\"\nper_key = \"1/min\"\nmax_body = \"1KiB\"\n",
        server_section(""),
        key_block("k", KEY, ""),
        up.url(),
    );
    let gw = Gateway::start(&config).await;
    let key = format!("Authorization: Bearer {KEY}");
    let big = "b".repeat(2048);
    // Within the per-key limit (its one request), over max_body: 413 (step 9).
    let (s, r) = post(gw.addr, "/a/count", &[&key], &big).await;
    assert_eq!((s, code_of(&r).as_str()), (413, "payload_too_large"), "{r}");
    // Over the per-key limit and over max_body: the limit (step 8) answers first.
    let (s, r) = post(gw.addr, "/a/count", &[&key], &big).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "rate_limited"), "{r}");
    assert_eq!(
        header_of(&r, "ratelimit-policy").as_deref(),
        Some("1;w=60"),
        "the per-key limit answered: {r}"
    );
    assert!(up.seen().is_empty(), "{:?}", up.targets());
}

#[tokio::test]
async fn the_model_check_comes_after_the_key_its_limit_and_the_body_cap() {
    let up = upstream().await;
    let config = format!(
        "{}{}[[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\nmax_body = \"1KiB\"\n",
        server_section(""),
        key_block(
            "k",
            KEY,
            "models = [\"allowed-model\"]\nper_key = \"2/min\""
        ),
        up.url(),
    );
    let gw = Gateway::start(&config).await;
    let key = format!("Authorization: Bearer {KEY}");
    let path = "/v1/chat/completions";
    let forbidden = chat("forbidden-model", 10);
    // No key (step 7) before the model: 401.
    let (s, r) = post(gw.addr, path, &[], &forbidden).await;
    assert_eq!((s, code_of(&r).as_str()), (401, "missing_api_key"), "{r}");
    // The body cap before the body is read for its model: 413 (the key's first request).
    let (s, r) = post(gw.addr, path, &[&key], &chat("forbidden-model", 2048)).await;
    assert_eq!((s, code_of(&r).as_str()), (413, "payload_too_large"), "{r}");
    // A valid key within its limit (its second request): the allow-list refuses the model.
    let (s, r) = post(gw.addr, path, &[&key], &forbidden).await;
    assert_eq!((s, code_of(&r).as_str()), (403, "model_not_allowed"), "{r}");
    // Over its limit (step 8): 429 before the model is looked at.
    let (s, r) = post(gw.addr, path, &[&key], &forbidden).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "rate_limited"), "{r}");
    assert_eq!(
        header_of(&r, "ratelimit-policy").as_deref(),
        Some("2;w=60"),
        "the per-key limit answered: {r}"
    );
    assert!(up.seen().is_empty(), "{:?}", up.targets());
}

#[tokio::test]
async fn the_model_allow_list_comes_before_the_budget() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}[usage]\ndatabase = \"{}\"\n{}[[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        dir.path().join("usage.db").display(),
        // Any request's reservation (a default of 1024 completion tokens) exceeds this cap.
        key_block(
            "k",
            KEY,
            "models = [\"allowed-model\"]\nbudget = { tokens_per_day = 1 }"
        ),
        up.url(),
    );
    let gw = Gateway::start(&config).await;
    let key = format!("Authorization: Bearer {KEY}");
    let path = "/v1/chat/completions";
    let (s, r) = post(gw.addr, path, &[&key], &chat("forbidden-model", 10)).await;
    assert_eq!((s, code_of(&r).as_str()), (403, "model_not_allowed"), "{r}");
    let (s, r) = post(gw.addr, path, &[&key], &chat("allowed-model", 10)).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "budget_exceeded"), "{r}");
    assert!(up.seen().is_empty(), "{:?}", up.targets());
}
