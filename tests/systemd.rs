//! sd_notify (SPEC §6): READY=1, RELOADING=1 + MONOTONIC_USEC then READY=1, STOPPING=1, and
//! WATCHDOG=1 pings, received on a unix datagram socket the test binds.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use support::*;
use tokio::net::UnixDatagram;

async fn next(sock: &UnixDatagram, skip_watchdog: bool) -> String {
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
            .await
            .expect("no notification")
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
        if skip_watchdog && msg == "WATCHDOG=1" {
            continue;
        }
        return msg;
    }
}

#[tokio::test]
async fn notifications_arrive_for_ready_reload_watchdog_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let up = upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        up.url()
    );
    let mut gw = Gateway::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .await;
    assert_eq!(next(&sock, true).await, "READY=1");
    assert_eq!(
        next(&sock, false).await,
        "WATCHDOG=1",
        "watchdog pings at half of WATCHDOG_USEC"
    );
    gw.signal("HUP");
    let reloading = next(&sock, true).await;
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"));
    let usec: u64 = lines
        .next()
        .unwrap()
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(usec > 0);
    assert_eq!(next(&sock, true).await, "READY=1");
    gw.signal("TERM");
    assert_eq!(next(&sock, true).await, "STOPPING=1");
    assert_eq!(gw.wait_exit().await, 0);
}
