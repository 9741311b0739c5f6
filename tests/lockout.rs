//! Lockout (SPEC §3 step 5, §3.4 "Keys"): failed key checks from one IP lock it out of every
//! route, even with a valid key, and the lockout ends by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use support::*;

const KEY: &str = "pcx_lockout-key-0123456789abcdefghijklmnopqrst";

fn config(up: &Upstream) -> String {
    let u = up.url();
    format!(
        "{}[auth]\nlockout_failures = 3\nlockout_window = \"1m\"\nlockout_duration = \"3s\"\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{u}\"\n\
         [[routes]]\nname = \"open\"\npath = \"/open/\"\nupstream = \"{u}\"\nauth = \"none\"\n",
        server_section("trusted_proxies = [\"127.0.0.1\"]"),
        key_block("k", KEY, ""),
    )
}

#[tokio::test]
async fn failed_keys_lock_the_ip_out_of_every_route_until_the_lockout_ends() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let from = "X-Forwarded-For: 198.51.100.9";
    let good = format!("Authorization: Bearer {KEY}");
    // Missing keys do not count.
    for _ in 0..5 {
        assert_eq!(send(gw.addr, "GET", "/v1/x", &[from]).await.0, 401);
    }
    assert_eq!(send(gw.addr, "GET", "/v1/x", &[from, &good]).await.0, 200);
    // Wrong and expired keys do, whichever key they name.
    for k in ["pcx_a", "pcx_b", "pcx_c"] {
        assert_eq!(
            send(
                gw.addr,
                "GET",
                "/v1/x",
                &[from, &format!("Authorization: Bearer {k}")]
            )
            .await
            .0,
            401
        );
    }
    let locked_at = Instant::now();
    let (s, r) = send(gw.addr, "GET", "/v1/x", &[from, &good]).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "locked_out"), "{r}");
    let retry: u64 = header_of(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    // Every route, including one without auth.
    assert_eq!(send(gw.addr, "GET", "/open/x", &[from]).await.0, 429);
    // Another client is unaffected.
    assert_eq!(
        send(
            gw.addr,
            "GET",
            "/v1/x",
            &["X-Forwarded-For: 198.51.100.10", &good]
        )
        .await
        .0,
        200
    );
    // The audit writer batches lines: wait until all 12 requests so far are recorded (the lockout
    // event was written before the later ones) rather than reading stdout at once.
    gw.wait_requests(12).await;
    let lockouts = gw.events("lockout");
    assert_eq!(
        lockouts.len(),
        1,
        "one lockout, not one per refused request"
    );
    assert_eq!(lockouts[0]["client_ip"], "198.51.100.9");
    assert_eq!(lockouts[0]["failures"], 3);
    // The lockout ends by itself once lockout_duration has passed (the wait is the behaviour
    // under test, not synchronisation).
    tokio::time::sleep_until((locked_at + Duration::from_millis(3100)).into()).await;
    assert_eq!(send(gw.addr, "GET", "/v1/x", &[from, &good]).await.0, 200);
}
