//! The admin listener (SPEC §5): health, readiness, and Prometheus metrics behind a token.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;

const KEY: &str = "pcx_admin-key-0123456789abcdefghijklmnopqrstuv";
const TOKEN: &str = "admin-token-5e1f";

#[tokio::test]
async fn health_readiness_and_metrics_that_move_with_traffic() {
    let up = upstream().await;
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"${{ADMIN_TOKEN}}\"\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nper_ip = \"3/min\"\n",
        server_section(""),
        key_block("phone", KEY, ""),
        up.url()
    );
    let gw = Gateway::start_with_env(&config, &[("ADMIN_TOKEN", TOKEN)]).await;
    let admin = format!("http://{}", gw.admin_addr());
    let c = client();
    let r = c.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "{\"status\":\"ok\"}");
    assert_eq!(
        c.get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // /metrics refuses a missing or wrong token.
    assert_eq!(
        c.get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = c
        .get(format!("{admin}/metrics"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // SPEC §5: counters whose labels are known at startup are there at 0 before any traffic.
    let text = scrape(&c, &admin).await;
    for needle in [
        "portcullis_config_reloads_total{result=\"ok\"} 0",
        "portcullis_config_reloads_total{result=\"failed\"} 0",
        "portcullis_auth_failures_total{reason=\"missing_api_key\"} 0",
        "portcullis_auth_failures_total{reason=\"expired_api_key\"} 0",
        "portcullis_requests_total{route=\"bridge\",outcome=\"forwarded\"} 0",
        "portcullis_requests_total{route=\"bridge\",outcome=\"client_closed\"} 0",
        "portcullis_requests_total{route=\"bridge\",outcome=\"upstream_timeout\"} 0",
        "portcullis_rate_limited_total{route=\"bridge\",scope=\"key\"} 0",
        "portcullis_connections_refused_total{reason=\"per_ip\"} 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }

    // Traffic: one auth failure, two forwarded, one rate limited (per IP, before the key
    // check); then a reload.
    let key = format!("Authorization: Bearer {KEY}");
    assert_eq!(
        send(gw.addr, "GET", "/v1/a", &["Authorization: Bearer pcx_nope"])
            .await
            .0,
        401
    );
    assert_eq!(send(gw.addr, "GET", "/v1/a", &[&key]).await.0, 200);
    assert_eq!(send(gw.addr, "GET", "/v1/a", &[&key]).await.0, 200);
    assert_eq!(send(gw.addr, "GET", "/v1/a", &[&key]).await.0, 429);
    assert_eq!(gw.reload().await["result"], "ok");
    gw.wait_requests(4).await;

    let text = scrape(&c, &admin).await;
    for needle in [
        "portcullis_requests_total{route=\"bridge\",outcome=\"forwarded\"} 2",
        "portcullis_requests_total{route=\"bridge\",outcome=\"rate_limited\"} 1",
        "portcullis_requests_total{route=\"bridge\",outcome=\"invalid_api_key\"} 1",
        "portcullis_rate_limited_total{route=\"bridge\",scope=\"ip\"} 1",
        "portcullis_auth_failures_total{reason=\"invalid_api_key\"} 1",
        "portcullis_config_reloads_total{result=\"ok\"} 1",
        "portcullis_request_duration_seconds_bucket{route=\"bridge\"",
        "portcullis_upstream_duration_seconds_bucket{route=\"bridge\"",
        "portcullis_active_connections",
        &format!(
            "portcullis_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains(KEY) && !text.contains(TOKEN));
}

/// `/metrics` with the token.
async fn scrape(c: &reqwest::Client, admin: &str) -> String {
    c.get(format!("{admin}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
