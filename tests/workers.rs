//! `server.workers`: the gateway serves connections on that many threads, `portcullis-w<i>`,
//! each accepting on the shared listeners; concurrent connections are all served and recorded;
//! SIGTERM lets a request in flight on a worker finish, then the process exits 0; more than 1024
//! workers is a config error.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::*;

const WORKERS: usize = 3;
const CHAT: &str = r#"{"model":"m","messages":[]}"#;

/// A gateway with `workers = 3` and one keyless route to the test upstream, without rate limits
/// (the tests send many requests from one address).
async fn gateway(up: &Upstream) -> Gateway {
    let config = format!(
        "{}[limits]\nper_ip = \"off\"\n[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(&format!("workers = {WORKERS}")),
        up.url()
    );
    Gateway::start(&config).await
}

/// The names of the process's threads, from `/proc/<pid>/task/*/comm`.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim_end().to_owned())
        .collect()
}

/// The names of the worker threads, sorted.
fn worker_names(pid: u32) -> Vec<String> {
    let mut w: Vec<String> = thread_names(pid)
        .into_iter()
        .filter(|n| n.starts_with("portcullis-w"))
        .collect();
    w.sort();
    w
}

#[tokio::test]
async fn the_process_has_one_named_thread_per_worker() {
    let up = upstream().await;
    let gw = gateway(&up).await;
    let want: Vec<String> = (0..WORKERS).map(|i| format!("portcullis-w{i}")).collect();
    // A thread names itself once it runs: wait (bounded) for all three. /proc has no change
    // notification; re-read it at a short interval.
    let deadline = std::time::Instant::now() + WAIT;
    while worker_names(gw.pid()) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "worker threads {:?}, want {want:?}; all threads: {:?}",
            worker_names(gw.pid()),
            thread_names(gw.pid())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // They serve.
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(worker_names(gw.pid()), want);
}

/// One HTTP/1.1 connection of its own; returns its local address and the sender.
async fn connection(
    addr: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    (local, sender)
}

/// Sends `req` and reads the whole answer (bounded); returns the status and body.
async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> (u16, Bytes) {
    tokio::time::timeout(WAIT, async {
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    })
    .await
    .expect("answered in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_requests_over_thirty_parallel_connections_are_all_served_and_recorded() {
    const CONNECTIONS: usize = 30;
    let up = upstream().await;
    let gw = gateway(&up).await;
    let addr = gw.addr;
    // Each connection's first request is held by the upstream until all 30 are in flight at
    // once; then each sends a second request on the same connection.
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            tokio::spawn(async move {
                let (local, mut sender) = connection(addr).await;
                let held = http::Request::post("/v1/chat/completions?hold=1")
                    .header("host", "gw.test")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                    .unwrap();
                let (s1, body) = exchange(&mut sender, held).await;
                assert!(
                    String::from_utf8_lossy(&body).contains("Hello!"),
                    "{body:?}"
                );
                let second = http::Request::get(format!("/second/{i}"))
                    .header("host", "gw.test")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let (s2, _) = exchange(&mut sender, second).await;
                (local, s1, s2)
            })
        })
        .collect();
    let mut held = up.gate.watch_held();
    tokio::time::timeout(WAIT, held.wait_for(|n| *n == CONNECTIONS))
        .await
        .expect("all 30 first requests in flight at once")
        .unwrap();
    up.gate.open();
    let mut locals = HashSet::new();
    for t in tasks {
        let (local, s1, s2) = t.await.unwrap();
        assert_eq!((s1, s2), (200, 200), "connection {local}");
        locals.insert(local);
    }
    assert_eq!(locals.len(), CONNECTIONS, "separate connections");
    let recs = gw.wait_requests(2 * CONNECTIONS).await;
    assert_eq!(recs.len(), 2 * CONNECTIONS);
    assert!(
        recs.iter().all(|r| r["status"] == 200),
        "{:?}",
        recs.iter()
            .filter(|r| r["status"] != 200)
            .collect::<Vec<_>>()
    );
    let seconds: HashSet<String> = recs
        .iter()
        .filter_map(|r| r["path"].as_str())
        .filter(|p| p.starts_with("/second/"))
        .map(str::to_owned)
        .collect();
    assert_eq!(seconds.len(), CONNECTIONS, "{seconds:?}");
    assert_eq!(up.seen().len(), 2 * CONNECTIONS);
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_and_the_process_exits_0() {
    let up = upstream().await;
    let mut gw = gateway(&up).await;
    let url = gw.url("/v1/chat/completions?hold=1");
    let in_flight = tokio::spawn(async move {
        let r = client()
            .post(url)
            .header("content-type", "application/json")
            .body(CHAT)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    tokio::time::timeout(WAIT, up.gate.watch_held().wait_for(|n| *n == 1))
        .await
        .expect("the request reached the upstream")
        .unwrap();
    gw.signal("TERM");
    // Every worker stops accepting: the listening socket, shared by the three, is closed only
    // once all of them have let go of it. Each attempt is a real connect; one the kernel still
    // completed (or reset as the socket closed) is dropped and the next made.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(gw.addr))
            .await
            .expect("connect hung")
        {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Caught by the socket's closing in the middle of the handshake: try again.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                assert!(std::time::Instant::now() < deadline, "never refused");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("connect failed with {e}, not connection refused"),
            Ok(s) => {
                drop(s);
                assert!(
                    std::time::Instant::now() < deadline,
                    "still accepting connections after SIGTERM"
                );
                tokio::task::yield_now().await;
            }
        }
    }
    // The request is still in flight, and the gateway waits for it.
    assert_eq!(up.gate.held(), 1);
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "the gateway exited with a request in flight"
    );
    up.gate.open();
    let (status, body) = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("the request finished")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello!"), "{body}");
    assert_eq!(gw.wait_exit().await, 0);
    gw.wait_events("shutdown", 1).await;
    let recs = gw.requests();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["status"], 200);
    assert_eq!(recs[0]["outcome"], "forwarded");
}

#[test]
fn more_than_1024_workers_is_a_config_error() {
    let route = "[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"http://127.0.0.1:8000\"\nauth = \"none\"\n";
    let (code, _, err) = check(&format!("{}{route}", server_section("workers = 2000")), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("server.workers"), "{err}");
    // The largest allowed number is fine.
    let (code, _, err) = check(&format!("{}{route}", server_section("workers = 1024")), &[]);
    assert_eq!(code, 0, "{err}");
}
