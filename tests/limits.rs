//! Rate limits (SPEC §3 step 8): exact counts, Retry-After, independence, keys shared across
//! IPs, X-Forwarded-For only from trusted proxies.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const KEY: &str = "pcx_limits-key-0123456789abcdefghijklmnopqrstu";

fn config(up: &Upstream, server_extra: &str, route_extra: &str, key_extra: &str) -> String {
    let u = up.url();
    format!(
        "{}{}[[routes]]\nname = \"a\"\npath = \"/a/\"\nupstream = \"{u}\"\n{route_extra}\n\
         [[routes]]\nname = \"b\"\npath = \"/b/\"\nupstream = \"{u}\"\n{route_extra}\n",
        server_section(server_extra),
        key_block("k", KEY, key_extra),
    )
}

fn auth() -> String {
    format!("Authorization: Bearer {KEY}")
}

#[tokio::test]
async fn exactly_n_requests_pass_then_429_with_retry_after() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "", "per_ip = \"3/min\"", "")).await;
    for i in 0..3 {
        let (s, r) = send(gw.addr, "GET", "/a/x", &[&auth()]).await;
        assert_eq!(s, 200, "request {i}: {r}");
        assert_eq!(header_of(&r, "ratelimit-policy").as_deref(), Some("3;w=60"));
    }
    let (s, r) = send(gw.addr, "GET", "/a/x", &[&auth()]).await;
    assert_eq!(s, 429, "{r}");
    assert_eq!(code_of(&r), "rate_limited");
    // 3/min: one cell every 20 s; the first was used just now.
    let retry: u64 = header_of(&r, "retry-after").unwrap().parse().unwrap();
    assert!((19..=20).contains(&retry), "Retry-After {retry}");
    assert!(header_of(&r, "ratelimit").unwrap().contains("remaining=0"));
    assert_eq!(up.targets().len(), 3);
    // Route b has its own budget.
    let (s, _) = send(gw.addr, "GET", "/b/x", &[&auth()]).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn per_key_limit_is_shared_across_client_ips() {
    let up = upstream().await;
    let gw = Gateway::start(&config(
        &up,
        "trusted_proxies = [\"127.0.0.1\"]",
        "",
        "per_key = \"2/min\"",
    ))
    .await;
    for ip in ["198.51.100.1", "198.51.100.2"] {
        let (s, r) = send(
            gw.addr,
            "GET",
            "/a/x",
            &[&auth(), &format!("X-Forwarded-For: {ip}")],
        )
        .await;
        assert_eq!(s, 200, "{r}");
    }
    // A third client, a different route: the key's own limit still applies.
    let (s, r) = send(
        gw.addr,
        "GET",
        "/b/x",
        &[&auth(), "X-Forwarded-For: 198.51.100.3"],
    )
    .await;
    assert_eq!(s, 429, "{r}");
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_does_not_evade_per_ip_limits() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "", "per_ip = \"2/min\"", "")).await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let (s, _) = send(
            gw.addr,
            "GET",
            "/a/x",
            &[&auth(), &format!("X-Forwarded-For: 203.0.113.{i}")],
        )
        .await;
        statuses.push(s);
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_is_the_per_ip_identity() {
    let up = upstream().await;
    let gw = Gateway::start(&config(
        &up,
        "trusted_proxies = [\"127.0.0.0/8\"]",
        "per_ip = \"2/min\"",
        "",
    ))
    .await;
    let from = |ip: &str| format!("X-Forwarded-For: {ip}");
    let mut statuses = Vec::new();
    for ip in ["203.0.113.5", "203.0.113.5", "203.0.113.5", "203.0.113.6"] {
        statuses.push(send(gw.addr, "GET", "/a/x", &[&auth(), &from(ip)]).await.0);
    }
    assert_eq!(statuses, [200, 200, 429, 200]);
    // IPv6 clients count by /64: a new address in the same /64 is the same client.
    statuses.clear();
    for ip in [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2:ffff::3",
        "2001:db8:1:3::1",
    ] {
        statuses.push(send(gw.addr, "GET", "/a/x", &[&auth(), &from(ip)]).await.0);
    }
    assert_eq!(statuses, [200, 200, 429, 200]);
}

#[tokio::test]
async fn off_disables_a_limit() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, "", "per_ip = \"off\"\nper_key = \"off\"", "")).await;
    for _ in 0..20 {
        assert_eq!(send(gw.addr, "GET", "/a/x", &[&auth()]).await.0, 200);
    }
}
