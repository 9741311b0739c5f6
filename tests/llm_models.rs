//! SPEC §7 model scopes: on `llm` routes, a key with `models` only reaches the upstream with a
//! model its allow-list names (exact, or a prefix with a trailing `*`).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const SCOPED: &str = "pcx_scoped-key-0123456789abcdefghijklmnopqrstu";
const FREE: &str = "pcx_free-key-0123456789abcdefghijklmnopqrstuvw";

async fn post(addr: std::net::SocketAddr, key: &str, body: &str, chunked: bool) -> (u16, String) {
    let framing = if chunked {
        format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    } else {
        format!("Content-Length: {}\r\n\r\n{body}", body.len())
    };
    let req = format!(
        "POST /v1/count HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nConnection: close\r\n{framing}"
    );
    let r = raw(addr, req.as_bytes()).await;
    (status_of(&r), r)
}

#[tokio::test]
async fn models_outside_the_allow_list_never_reach_the_upstream() {
    let up = upstream().await;
    let config = format!(
        "{}{}{}[[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        key_block(
            "scoped",
            SCOPED,
            "models = [\"openai/gpt-4o-mini\", \"anthropic/*\"]"
        ),
        key_block("free", FREE, ""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let body = |m: &str| {
        format!("{{\"model\":\"{m}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}")
    };

    let refused = [
        (body("openai/gpt-4o"), 403, "model_not_allowed"),
        (body("anthropicx/claude"), 403, "model_not_allowed"),
        ("{\"messages\":[]}".to_owned(), 403, "model_not_allowed"),
        ("this is not json".to_owned(), 400, "bad_request"),
    ];
    for chunked in [false, true] {
        for (b, status, code) in &refused {
            let (s, r) = post(gw.addr, SCOPED, b, chunked).await;
            assert_eq!(
                (s, code_of(&r).as_str()),
                (*status, *code),
                "{b} (chunked: {chunked}): {r}"
            );
        }
    }
    assert!(
        up.targets().is_empty(),
        "refused requests reached the upstream: {:?}",
        up.targets()
    );

    // Allowed: exact name and prefix; the body reaches the upstream byte for byte.
    for m in ["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"] {
        let b = body(m);
        let (s, r) = post(gw.addr, SCOPED, &b, true).await;
        assert_eq!(s, 200, "{r}");
        assert!(r.ends_with(&format!("{{\"bytes\":{}}}", b.len())), "{r}");
    }
    // A key without `models` is not inspected: anything goes, JSON or not.
    let (s, _) = post(gw.addr, FREE, "this is not json", false).await;
    assert_eq!(s, 200);
    // A request without a body (GET /v1/models) passes for the scoped key too.
    let (s, _) = send(
        gw.addr,
        "GET",
        "/v1/models",
        &[&format!("Authorization: Bearer {SCOPED}")],
    )
    .await;
    assert_eq!(s, 200);
    let recs = gw.wait_requests(12).await;
    assert_eq!(
        recs.iter()
            .filter(|r| r["outcome"] == "model_not_allowed")
            .count(),
        6
    );
}
