//! Routing: longest prefix on segment boundaries, host, methods (405), no route (404), strip_prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

async fn req(addr: std::net::SocketAddr, method: &str, target: &str, host: &str) -> (u16, String) {
    let r = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let resp = raw(addr, r.as_bytes()).await;
    (status_of(&resp), resp)
}

fn routes(up: &Upstream, with_root: bool) -> String {
    let u = up.url();
    let mut c = server_section("");
    if with_root {
        c += &format!(
            "[[routes]]\nname = \"root\"\npath = \"/\"\nupstream = \"{u}/r-root\"\nauth = \"none\"\n"
        );
    }
    c += &format!(
        r#"
[[routes]]
name = "v1"
path = "/v1/"
upstream = "{u}/r-v1"
auth = "none"

[[routes]]
name = "chat"
path = "/v1/chat/"
methods = ["POST"]
upstream = "{u}/r-chat"
auth = "none"

[[routes]]
name = "hosted"
path = "/v1/"
host = "api.example"
upstream = "{u}/r-hosted"
auth = "none"

[[routes]]
name = "speech"
path = "/speech/"
strip_prefix = true
upstream = "{u}/r-strip"
auth = "none"
"#
    );
    c
}

#[tokio::test]
async fn longest_prefix_host_and_strip_prefix_pick_the_route() {
    let up = upstream().await;
    let gw = Gateway::start(&routes(&up, true)).await;
    let cases = [
        ("GET", "/v1/models", "gw.test", "/r-v1/v1/models"),
        ("GET", "/v1", "gw.test", "/r-v1/v1"),
        ("GET", "/v1beta/x", "gw.test", "/r-root/v1beta/x"),
        (
            "POST",
            "/v1/chat/completions",
            "gw.test",
            "/r-chat/v1/chat/completions",
        ),
        (
            "GET",
            "/v1/models",
            "API.Example:8443",
            "/r-hosted/v1/models",
        ),
        (
            "GET",
            "/speech/v1/tts?voice=a",
            "gw.test",
            "/r-strip/v1/tts?voice=a",
        ),
        ("GET", "/speech", "gw.test", "/r-strip/"),
        ("GET", "/other", "gw.test", "/r-root/other"),
    ];
    for (i, (m, target, host, want)) in cases.iter().enumerate() {
        let (status, resp) = req(gw.addr, m, target, host).await;
        assert_eq!(status, 200, "{m} {target}: {resp}");
        assert_eq!(up.targets()[i], *want, "{m} {target} via {host}");
    }
}

#[tokio::test]
async fn method_outside_route_methods_gets_405_and_is_not_forwarded() {
    let up = upstream().await;
    let gw = Gateway::start(&routes(&up, true)).await;
    let (status, resp) = req(gw.addr, "GET", "/v1/chat/completions", "gw.test").await;
    assert_eq!(status, 405, "{resp}");
    assert!(resp.contains("\"code\":\"method_not_allowed\""), "{resp}");
    assert!(up.targets().is_empty());
}

#[tokio::test]
async fn no_matching_route_gets_404_no_route() {
    let up = upstream().await;
    let gw = Gateway::start(&routes(&up, false)).await;
    let (status, resp) = req(gw.addr, "GET", "/admin", "gw.test").await;
    assert_eq!(status, 404, "{resp}");
    assert!(resp.contains("\"code\":\"no_route\""), "{resp}");
    assert!(resp.contains("application/json"), "{resp}");
    let recs = gw.wait_requests(1).await;
    assert_eq!(recs[0]["outcome"], "no_route");
    assert_eq!(recs[0]["route"], serde_json::Value::Null);
    assert!(up.targets().is_empty());
}
