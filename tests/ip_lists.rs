//! IP allow/deny lists per route (SPEC §3 step 5): deny wins, 403 `ip_denied`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

#[tokio::test]
async fn allow_and_deny_lists_with_deny_winning() {
    let up = upstream().await;
    let u = up.url();
    let config = format!(
        "{}[[routes]]\nname = \"lan\"\npath = \"/lan/\"\nupstream = \"{u}\"\nauth = \"none\"\nallow_ips = [\"10.0.0.0/8\"]\n\
         [[routes]]\nname = \"both\"\npath = \"/both/\"\nupstream = \"{u}\"\nauth = \"none\"\nallow_ips = [\"10.0.0.0/8\"]\ndeny_ips = [\"10.6.6.0/24\"]\n",
        server_section("trusted_proxies = [\"127.0.0.1\"]"),
    );
    let gw = Gateway::start(&config).await;
    let from = |ip: &str| format!("X-Forwarded-For: {ip}");
    let cases = [
        ("/lan/x", "10.1.2.3", 200),
        ("/lan/x", "192.0.2.1", 403),
        ("/both/x", "10.1.2.3", 200),
        ("/both/x", "10.6.6.6", 403),
    ];
    for (path, ip, want) in cases {
        let (s, r) = send(gw.addr, "GET", path, &[&from(ip)]).await;
        assert_eq!(s, want, "{path} from {ip}: {r}");
        if want == 403 {
            assert_eq!(code_of(&r), "ip_denied");
        }
    }
    // The direct peer (127.0.0.1) is not in the allow list either.
    assert_eq!(send(gw.addr, "GET", "/lan/x", &[]).await.0, 403);
    assert_eq!(up.targets(), ["/lan/x", "/both/x"]);
}
