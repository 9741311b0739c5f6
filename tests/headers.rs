//! SPEC §3.2 header rules: client keys stay at the gateway, upstream_headers are injected,
//! `Connection` cannot strip gateway headers, underscore headers and untrusted X-Forwarded-For
//! are dropped, and no secret reaches the gateway's own output.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const UPSTREAM_SECRET: &str = "sk-upstream-secret-7f3a9c";
const CLIENT_KEY: &str = "pcx_client-key-should-stay-at-the-gateway";

fn config(up: &Upstream, trusted: &str) -> String {
    format!(
        "{}[[keys]]\nid = \"phone\"\nhash = \"{}\"\n[[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\n[routes.upstream_headers]\nauthorization = \"Bearer ${{UP_SECRET}}\"\nx-extra = \"set-by-gateway\"\n",
        server_section(&format!("trusted_proxies = [{trusted}]")),
        portcullis::keys::hash_string(CLIENT_KEY),
        up.url()
    )
}

fn get(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {CLIENT_KEY}\r\n{extra}Connection: close\r\n\r\n"
    )
}

#[tokio::test]
async fn client_key_is_replaced_by_the_upstream_secret_and_gateway_headers_cannot_be_stripped() {
    let up = upstream().await;
    let gw = Gateway::start_with_env(&config(&up, ""), &[("UP_SECRET", UPSTREAM_SECRET)]).await;
    let req = format!(
        "GET /v1/models?api_key=query-secret HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {CLIENT_KEY}\r\n\
         X-API-Key: {CLIENT_KEY}\r\nX-Extra: from-client\r\nConnection: close, X-Forwarded-For, X-Real-IP, X-Request-Id, Authorization\r\n\
         X-Forwarded-For: 6.6.6.6\r\nX_Forwarded_For: 7.7.7.7\r\nX_Api_Key: {CLIENT_KEY}\r\nCookie: session=abc\r\n\
         Forwarded: for=10.9.9.9;host=evil.example\r\nX-Forwarded-Host: evil.example\r\nTrue-Client-IP: 10.9.9.9\r\nX-Original-URL: /admin\r\n\r\n"
    );
    let resp = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(lower.contains("x-content-type-options: nosniff"), "{resp}");
    assert!(lower.contains("referrer-policy: no-referrer"), "{resp}");
    assert!(lower.contains("x-request-id: "), "{resp}");
    assert!(
        !lower.contains("strict-transport-security"),
        "no HSTS on plain HTTP: {resp}"
    );

    let seen = &up.seen()[0];
    assert_eq!(
        seen.header_all("authorization"),
        [format!("Bearer {UPSTREAM_SECRET}")]
    );
    assert_eq!(seen.header_all("x-extra"), ["set-by-gateway"]);
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("x_api_key"), None);
    assert_eq!(seen.header("x_forwarded_for"), None);
    // Untrusted peer: its X-Forwarded-For is replaced, not appended to.
    assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("gw.test"));
    assert_eq!(seen.header("host"), Some("gw.test"));
    assert!(seen.header("x-request-id").is_some_and(|v| v.len() == 26));
    assert_eq!(seen.header("connection"), None);
    for claim in ["forwarded", "true-client-ip", "x-original-url"] {
        assert_eq!(seen.header(claim), None, "{claim} was forwarded");
    }
    assert_eq!(seen.header_all("x-forwarded-host"), ["gw.test"]);
    // The query string is forwarded as received (query_param stripping is opt-in, issue 3).
    assert_eq!(seen.target, "/v1/models?api_key=query-secret");

    let rec = &gw.wait_requests(1).await[0];
    assert_eq!(rec["client_ip"], "127.0.0.1");
    assert_eq!(rec["path"], "/v1/models");
    assert_eq!(rec["outcome"], "forwarded");
    assert_eq!(rec["route"], "bridge");
    assert_eq!(rec["key_id"], "phone");
    assert_eq!(rec["status"], 200);

    // Nothing secret in anything the gateway printed.
    let out = format!("{}\n{}", gw.stdout.text(), gw.stderr.text());
    for secret in [UPSTREAM_SECRET, CLIENT_KEY, "query-secret", "session=abc"] {
        assert!(
            !out.contains(secret),
            "{secret} leaked into the gateway's output"
        );
    }
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_is_honoured_and_appended() {
    let up = upstream().await;
    let gw = Gateway::start_with_env(&config(&up, "\"127.0.0.1/32\""), &[("UP_SECRET", "x")]).await;
    let req = get(
        "/v1/x",
        "X-Forwarded-For: 203.0.113.7\r\nX-Request-Id: proxy-id.42\r\n",
    );
    let resp = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let seen = &up.seen()[0];
    assert_eq!(
        seen.header_all("x-forwarded-for"),
        ["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(seen.header("x-real-ip"), Some("203.0.113.7"));
    assert_eq!(seen.header("x-request-id"), Some("proxy-id.42"));
    let rec = &gw.wait_requests(1).await[0];
    assert_eq!(rec["client_ip"], "203.0.113.7");
    assert_eq!(rec["request_id"], "proxy-id.42");
}

#[tokio::test]
async fn request_id_from_an_untrusted_client_is_replaced() {
    let up = upstream().await;
    let gw = Gateway::start_with_env(&config(&up, ""), &[("UP_SECRET", "x")]).await;
    let req = get("/v1/x", "X-Request-Id: forged\r\n");
    let resp = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let id = up.seen()[0].header("x-request-id").unwrap().to_owned();
    assert_ne!(id, "forged");
    assert!(resp.contains(&id), "response carries the same id: {resp}");
}

#[tokio::test]
async fn a_configured_key_header_and_expect_never_reach_the_upstream() {
    let up = upstream().await;
    let cfg = config(&up, "").replacen(
        "[[keys]]",
        "[auth]\nheaders = [\"x-portcullis-key\"]\n[[keys]]",
        1,
    );
    let gw = Gateway::start_with_env(&cfg, &[("UP_SECRET", UPSTREAM_SECRET)]).await;
    let req = format!(
        "POST /v1/chat HTTP/1.1\r\nHost: gw.test\r\nX-Portcullis-Key: {CLIENT_KEY}\r\n\
         Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let resp = raw(gw.addr, req.as_bytes()).await;
    assert!(resp.contains("HTTP/1.1 200"), "{resp}");
    let seen = &up.seen()[0];
    assert_eq!(seen.header("x-portcullis-key"), None);
    assert_eq!(seen.header("expect"), None);
    assert_eq!(
        seen.header_all("authorization"),
        [format!("Bearer {UPSTREAM_SECRET}")]
    );
}
