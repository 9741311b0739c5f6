//! Lockout (SPEC §3 step 5, §3.4 "Keys"): failed key checks from one IP lock it out of every
//! route, even with a valid key, and the lockout ends by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use support::*;

const KEY: &str = "pcx_lockout-key-0123456789abcdefghijklmnopqrst";
const EXPIRED: &str = "pcx_lockout-expired-0123456789abcdefghijklmno";

fn config(up: &Upstream) -> String {
    let u = up.url();
    // The per-IP rate limit runs before the key check: off, so that only the lockout refuses.
    format!(
        "{}[auth]\nlockout_failures = 4\nlockout_window = \"1m\"\nlockout_duration = \"3s\"\n\
         [limits]\nper_ip = \"off\"\n{}{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{u}\"\n\
         [[routes]]\nname = \"open\"\npath = \"/open/\"\nupstream = \"{u}\"\nauth = \"none\"\n",
        server_section("trusted_proxies = [\"127.0.0.1\"]"),
        key_block("k", KEY, ""),
        key_block("old", EXPIRED, "expires = \"2020-01-01T00:00:00Z\""),
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
    // Unknown and expired keys do, whichever key they name: 2 unknown + 2 expired reach
    // lockout_failures = 4 (were expired keys not counted, the IP would not be locked out).
    let bearer = |k: &str| format!("Authorization: Bearer {k}");
    let attempts = [
        ("pcx_a", "invalid_api_key"),
        (EXPIRED, "expired_api_key"),
        ("pcx_b", "invalid_api_key"),
    ];
    for (k, code) in attempts {
        let (s, r) = send(gw.addr, "GET", "/v1/x", &[from, &bearer(k)]).await;
        assert_eq!((s, code_of(&r).as_str()), (401, code), "{r}");
    }
    // Three failures: not locked out yet.
    assert_eq!(send(gw.addr, "GET", "/v1/x", &[from, &good]).await.0, 200);
    // The fourth, an expired key, locks the IP out.
    let (s, r) = send(gw.addr, "GET", "/v1/x", &[from, &bearer(EXPIRED)]).await;
    assert_eq!((s, code_of(&r).as_str()), (401, "expired_api_key"), "{r}");
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
    // The audit writer batches lines: wait until all 14 requests so far are recorded (the lockout
    // event was written before the later ones) rather than reading stdout at once.
    let recs = gw.wait_requests(14).await;
    let expired: Vec<_> = recs
        .iter()
        .filter(|r| r["outcome"] == "expired_api_key")
        .collect();
    assert_eq!(expired.len(), 2, "{recs:?}");
    assert!(expired.iter().all(|r| r["key_id"] == "old"), "{expired:?}");
    let lockouts = gw.events("lockout");
    assert_eq!(
        lockouts.len(),
        1,
        "one lockout, not one per refused request"
    );
    assert_eq!(lockouts[0]["client_ip"], "198.51.100.9");
    assert_eq!(lockouts[0]["failures"], 4);
    // The lockout ends by itself once lockout_duration has passed (the wait is the behaviour
    // under test, not synchronisation).
    tokio::time::sleep_until((locked_at + Duration::from_millis(3100)).into()).await;
    assert_eq!(send(gw.addr, "GET", "/v1/x", &[from, &good]).await.0, 200);
}
