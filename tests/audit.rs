//! The audit log (SPEC §4): exactly one complete record per request, nothing lost behind a slow
//! sink, and no secret in any output of a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::io::BufRead;

use futures_util::StreamExt;
use support::*;

const KEY: &str = "pcx_audit-key-0123456789abcdefghijklmnopqrstuv";
const UPSTREAM_SECRET: &str = "sk-audit-upstream-secret-91b2";

const FIELDS: &[&str] = &[
    "ts",
    "event",
    "request_id",
    "client_ip",
    "method",
    "path",
    "route",
    "key_id",
    "status",
    "outcome",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_ms",
    "user_agent",
];

#[tokio::test]
async fn every_request_of_a_mixed_batch_has_exactly_one_complete_record() {
    let up = upstream().await;
    let ws = ws_echo_upstream().await;
    let dead = dead_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let config = format!(
        "{}[audit]\noutput = \"{}\"\n[cors]\nallowed_origins = [\"https://app.example\"]\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nper_ip = \"100/min\"\nmax_body = \"10\"\nmethods = [\"GET\", \"POST\"]\n\
         [routes.upstream_headers]\nauthorization = \"Bearer ${{UP}}\"\n\
         [[routes]]\nname = \"tight\"\npath = \"/tight/\"\nupstream = \"{}\"\nper_ip = \"1/min\"\n\
         [[routes]]\nname = \"down\"\npath = \"/down/\"\nupstream = \"http://{dead}\"\nauth = \"none\"\n\
         [[routes]]\nname = \"slow\"\npath = \"/slow/\"\nupstream = \"{}\"\nauth = \"none\"\ntimeout = \"300ms\"\n\
         [[routes]]\nname = \"denied\"\npath = \"/denied/\"\nupstream = \"{}\"\nauth = \"none\"\ndeny_ips = [\"127.0.0.1\"]\n\
         [[routes]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"http://{ws}\"\nauth = \"none\"\nwebsocket = true\n",
        server_section(""),
        audit_path.display(),
        key_block("phone", KEY, "routes = [\"bridge\"]"),
        up.url(),
        up.url(),
        up.url(),
        up.url(),
    );
    let gw = Gateway::start_full(&config, &[("UP", UPSTREAM_SECRET)], true).await;
    let key = format!("Authorization: Bearer {KEY}");
    let expected: Vec<(u16, &str)> = vec![
        (send(gw.addr, "GET", "/v1/models?token=query-secret", &[&key, "Cookie: sid=cookie-secret", "User-Agent: OpenCat/2.0"]).await.0, "forwarded"),
        (send(gw.addr, "GET", "/v1/models", &[]).await.0, "missing_api_key"),
        (send(gw.addr, "GET", "/v1/models", &["Authorization: Bearer pcx_wrong-secret-guess"]).await.0, "invalid_api_key"),
        (send(gw.addr, "GET", "/tight/x", &[&key]).await.0, "key_not_allowed"),
        (send(gw.addr, "GET", "/denied/x", &[]).await.0, "ip_denied"),
        (send(gw.addr, "GET", "/v1/x", &[&key, "Origin: https://evil.example"]).await.0, "origin_not_allowed"),
        (send(gw.addr, "DELETE", "/v1/x", &[&key]).await.0, "method_not_allowed"),
        (send(gw.addr, "GET", "/nowhere", &[]).await.0, "no_route"),
        (send(gw.addr, "GET", "/v1/%2e%2e/x", &[]).await.0, "bad_request"),
        (send(gw.addr, "GET", "/down/x", &[]).await.0, "upstream_unavailable"),
        (send(gw.addr, "GET", "/slow/slow?ms=3000", &[]).await.0, "upstream_timeout"),
        (raw_status(gw.addr, "POST /v1/count HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world").await, "payload_too_large"),
    ];
    let (ws_stream, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    drop(ws_stream);
    let n = expected.len() + 1;

    let records = wait_file_records(&audit_path, n).await;
    assert_eq!(records.len(), n);
    for (i, (status, outcome)) in expected.iter().enumerate() {
        let rec = &records[i];
        for f in FIELDS {
            assert!(rec.get(f).is_some(), "record {i} lacks {f}: {rec}");
        }
        assert_eq!(rec["outcome"], *outcome, "record {i}: {rec}");
        assert_eq!(rec["status"], *status, "record {i}: {rec}");
    }
    assert_eq!(records[0]["key_id"], "phone");
    assert_eq!(records[0]["user_agent"], "OpenCat/2.0");
    assert_eq!(records[0]["path"], "/v1/models");
    assert_eq!(records[n - 1]["route"], "ws");
    assert_eq!(records[n - 1]["status"], 101);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&audit_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // No secret of this run anywhere the gateway wrote.
    let everything = format!(
        "{}\n{}\n{}",
        std::fs::read_to_string(&audit_path).unwrap(),
        gw.stdout.text(),
        gw.stderr.text()
    );
    for secret in [
        KEY,
        UPSTREAM_SECRET,
        "query-secret",
        "cookie-secret",
        "pcx_wrong-secret-guess",
    ] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
}

async fn raw_status(addr: std::net::SocketAddr, req: &str) -> u16 {
    status_of(&raw(addr, req.replace("{KEY}", KEY).as_bytes()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_audit_sink_loses_nothing() {
    // The sink takes one line per 5 ms (under 200 a second); the gateway serves this test's
    // requests several times faster, even in a debug build on a busy machine. Records are made
    // about 2.3 KB long (a long path), so that the writer's 64 KiB buffer and the pipe's 64 KiB
    // hold only some 60 of them ahead of the 64-record queue: after the first ~150 requests the
    // queue is full, and each of the other ~350 requests waits for a record to be read, for about
    // two seconds.
    const N: usize = 500;
    const QUEUE: usize = 64;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let fifo2 = fifo.clone();
    let reader = std::thread::spawn(move || {
        let f = std::fs::File::open(&fifo2).unwrap();
        let mut n = 0;
        for (i, line) in std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .enumerate()
        {
            if i > 0 {
                // The slowness of the sink under test, not synchronisation.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if line.contains("\"event\":\"request\"") {
                n += 1;
            }
        }
        n
    });
    // The audit output is the FIFO, so the `startup` event (which names the admin address) is not
    // on stdout: give the admin listener a port reserved here instead.
    let admin = free_port();
    let config = format!(
        "{}[audit]\noutput = \"{}\"\nqueue = {QUEUE}\n[admin]\nlisten = \"{admin}\"\n[limits]\nper_ip = \"off\"\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        fifo.display(),
        up.url()
    );
    let mut gw = Gateway::start_full(&config, &[], true).await;
    let metrics_url = format!("http://{admin}/metrics");
    assert_eq!(
        audit_waits(&metrics_url).await,
        0,
        "backpressure before any request"
    );
    // When the queue is full, requests wait for a place in it (backpressure) instead of records
    // being dropped.
    let c = client();
    let url = gw.url(&format!("/x/{}", "p".repeat(1900)));
    let statuses: Vec<u16> = futures_util::stream::iter(0..N)
        .map(|_| {
            let c = c.clone();
            let url = url.clone();
            async move {
                c.get(&url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let not_ok: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        not_ok.is_empty(),
        "{} of {N} requests were not 200: {:?}",
        not_ok.len(),
        &not_ok[..not_ok.len().min(20)]
    );
    // The queue really filled: requests waited for room in it. (The counter counts a wait when
    // it ends, so it is read once every request has been answered.)
    let waits = audit_waits(&metrics_url).await;
    assert!(
        waits > 0,
        "no request waited for the audit queue: backpressure was not exercised"
    );
    // The drain: what is still queued (and in the writer's buffer) reaches the sink before exit.
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0, "stderr:\n{}", gw.stderr.text());
    assert_eq!(
        reader.join().unwrap(),
        N,
        "records were lost ({waits} requests had waited for the queue)"
    );
}

/// A loopback port that was free a moment ago (bound, read, released).
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `portcullis_audit_waits_total` from the admin listener's /metrics.
async fn audit_waits(metrics_url: &str) -> u64 {
    let text = client()
        .get(metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(' ')?;
            (name == "portcullis_audit_waits_total").then(|| value.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no portcullis_audit_waits_total in:\n{text}")) as u64
}

#[tokio::test]
async fn a_huge_user_agent_or_path_makes_a_bounded_record() {
    let up = upstream().await;
    let config = format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section("max_header_bytes = \"64KiB\""),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    // A 30 KB User-Agent, then a 20 KB path.
    let ua = format!("User-Agent: {}", "u".repeat(30_000));
    assert_eq!(send(gw.addr, "GET", "/x", &[&ua]).await.0, 200);
    let long = format!("/{}", "p".repeat(20_000));
    assert_eq!(send(gw.addr, "GET", &long, &[]).await.0, 200);
    let recs = gw.wait_requests(2).await;
    let ua = recs[0]["user_agent"].as_str().unwrap();
    assert!(ua.len() <= 512 && ua.ends_with('…'), "{} bytes", ua.len());
    let path = recs[1]["path"].as_str().unwrap();
    assert!(
        path.len() <= 2048 && path.ends_with('…'),
        "{} bytes",
        path.len()
    );
    // The upstream still got the whole path: only the record is bounded.
    assert_eq!(up.seen()[1].target.len(), long.len());
}
