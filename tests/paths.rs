//! SPEC §3.1: ambiguous and traversal paths are refused (400) or normalized, and the upstream's
//! log proves that nothing outside the route's prefix reached it.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

#[tokio::test]
async fn traversal_and_ambiguous_paths_never_reach_the_upstream() {
    let up = upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"public\"\npath = \"/public/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        up.url()
    );
    let gw = Gateway::start(&config).await;

    // (request line target, expected status). 404: normalized onto a path with no route.
    let refused: &[(&str, u16)] = &[
        ("/public/../admin", 404),
        ("/public/%2e%2e/admin", 400),
        ("/public/%2E%2E/admin", 400),
        ("/public/.%2e/admin", 400),
        ("/public/..%2fadmin", 400),
        ("/public%2F..%2Fadmin", 400),
        ("/public/..%5cadmin", 400),
        ("/public/..\\admin", 400),
        ("/public/%00/x", 400),
        ("/public/x%0d%0aInjected:%20yes", 400),
        ("/public/%zz", 400),
        ("/public/%2", 400),
        ("/public/a\"b", 400),
        ("/public/a{b}", 400),
        ("/public/caf\u{e9}", 400),
        ("http://evil.test/public/x", 400),
        ("*", 400),
        ("/public/..;/admin", 400),
        ("/public/..;jsessionid=x/admin", 400),
    ];
    for (target, want) in refused {
        let (status, resp) = raw_get(gw.addr, target).await;
        assert_eq!(status, *want, "{target:?}: {resp}");
    }
    // CONNECT is refused, whatever its target.
    let resp = raw(
        gw.addr,
        b"CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(
        up.targets().is_empty(),
        "refused requests reached the upstream: {:?}",
        up.targets()
    );

    // Normalizable forms are forwarded, as the normalized path the route was chosen on.
    let normalized: &[(&str, &str)] = &[
        ("//public//x", "/public/x"),
        ("/public/a/../b", "/public/b"),
        ("/public/./c", "/public/c"),
        ("/public/%64", "/public/d"),
        ("/public/e?x=%2F..", "/public/e?x=%2F.."),
    ];
    for (target, _) in normalized {
        let (status, resp) = raw_get(gw.addr, target).await;
        assert_eq!(status, 200, "{target:?}: {resp}");
    }
    let got = up.targets();
    let want: Vec<String> = normalized.iter().map(|(_, w)| w.to_string()).collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|t| t.starts_with("/public/")));
}
