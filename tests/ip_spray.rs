//! SPEC §3.4 "State is bounded": 100,000 distinct client IPs (via a trusted proxy) cost memory up
//! to `max_tracked_clients` and no further.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use futures_util::StreamExt;
use support::*;

const KEY: &str = "pcx_spray-key-0123456789abcdefghijklmnopqrstuv";

async fn spray(gw: &Gateway, from: u32, to: u32) {
    let client = client();
    let url = gw.url("/a/x");
    futures_util::stream::iter(from..to)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                let r = client
                    .get(&url)
                    .header("authorization", format!("Bearer {KEY}"))
                    .header("x-forwarded-for", ip.to_string())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("request as client {ip}: {e:?}"));
                assert_eq!(r.status(), 200, "request as client {ip}");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_client_ips_keep_rss_flat() {
    let up = upstream().await;
    let config = format!(
        "{}[limits]\nmax_tracked_clients = 10000\nper_key = \"off\"\n{}\
         [[routes]]\nname = \"a\"\npath = \"/a/\"\nupstream = \"{}\"\nper_ip = \"1000/min\"\n",
        server_section("trusted_proxies = [\"127.0.0.1\"]"),
        key_block("k", KEY, ""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    // Fill the table past its cap, then measure; then 80,000 more distinct clients.
    spray(&gw, 0, 20_000).await;
    let filled = gw.rss_kib();
    spray(&gw, 20_000, 100_000).await;
    let after = gw.rss_kib();
    println!(
        "RSS with 10,000 tracked clients: {filled} KiB; after 100,000 distinct clients: {after} KiB"
    );
    assert!(
        after < filled + 8 * 1024,
        "RSS grew from {filled} KiB to {after} KiB"
    );
}
