//! A real browser against the gateway: Debian's headless Chromium loads a page from an allowed
//! origin (a small server in this test) whose JavaScript uses the gateway as a browser app would
//! (fetch with expose headers, a streamed fetch, EventSource and WebSocket with the key in the
//! query, a readable 429 and 404, the OpenAI JavaScript SDK's headers through a preflight), and a
//! page from another origin that must be refused. Each page writes its results as JSON into the
//! DOM, which `chromium --dump-dom` prints.
//!
//! Nothing here downloads a browser: it uses Debian's `chromium` package (`apt-get install
//! chromium`). The test runs when `/usr/bin/chromium` is there and is skipped with a note when it
//! is not, unless `PORTCULLIS_BROWSER_TESTS=1` is set: then a missing Chromium is a failure.
//! `.ci/run` installs Chromium and sets it, so CI never skips this test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;

const KEY: &str = "pcx_browser-key-0123456789abcdefghijklmnopqrstu";
const CHROMIUM: &str = "/usr/bin/chromium";
/// Events in each SSE stream the page reads.
const EVENTS: usize = 5;
/// The bound on one Chromium run (it is killed, with its process group, past this).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a page's load is held at most: past it the DOM is dumped with the checks so far
/// (its `state` names the one that hung), well within `BROWSER_TIMEOUT`.
const HOLD_BOUND: Duration = Duration::from_secs(30);

const ALLOWED_PAGE: &str = include_str!("browser/allowed.html");
const REFUSED_PAGE: &str = include_str!("browser/refused.html");

/// The page with its placeholders filled in.
fn page(template: &str, gateway: SocketAddr) -> String {
    template
        .replace("__GATEWAY__", &gateway.to_string())
        .replace("__KEY__", KEY)
        .replace("__N__", &EVENTS.to_string())
}

/// Serves `html` at `/page.html` on `listener` (one origin per listener), and the pair that lets
/// the page hold its own load event until its checks are done: `/hold` (an image in the page)
/// is answered only after `/release` (the page's last request) or `HOLD_BOUND`. Anything else
/// is a 404.
fn serve_page(listener: TcpListener, html: String) {
    let html = Bytes::from(html);
    let released = tokio::sync::watch::Sender::new(false);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let html = html.clone();
            let released = released.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let html = html.clone();
                    let released = released.clone();
                    async move {
                        let resp = match req.uri().path() {
                            "/page.html" => Response::builder()
                                .header("content-type", "text/html; charset=utf-8")
                                .header("cache-control", "no-store")
                                .body(Full::new(html)),
                            "/hold" => {
                                let mut rx = released.subscribe();
                                let _ = tokio::time::timeout(HOLD_BOUND, rx.wait_for(|r| *r)).await;
                                Response::builder()
                                    .status(StatusCode::NO_CONTENT)
                                    .body(Full::new(Bytes::new()))
                            }
                            "/release" => {
                                released.send_replace(true);
                                Response::builder()
                                    .status(StatusCode::NO_CONTENT)
                                    .body(Full::new(Bytes::new()))
                            }
                            _ => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::new())),
                        };
                        Ok::<_, Infallible>(resp.unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Kills a Chromium process group when dropped (a timeout, or a panic while it runs).
///
/// With the system call, not the `kill` program: Debian 12's procps-ng 4.0.2 `kill -KILL -12345`
/// signals process group `-1` (it reads only the first digit of a negative id), which is every
/// process the user may signal. That took the whole sandbox down when this test first ran.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // The group leader's id is the group's id; never 0 or 1 (this process's group, init).
        let Some(pgid) = i32::try_from(self.0)
            .ok()
            .filter(|id| *id > 1)
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        // A group that already exited is no error.
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    }
}

/// Loads `url` in headless Chromium with a fresh profile and returns the DOM it dumps.
///
/// `--dump-dom` prints the DOM at the load event, which the page holds (its `/hold` image) until
/// its checks are done. `--virtual-time-budget` is not used: virtual time does not wait for a
/// streamed response body, so the DOM was dumped while the page was still reading one.
async fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg("--dump-dom")
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // Its own process group, so that a timeout ends the renderer and helpers too.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().expect("spawn chromium");
    let group = ProcessGroup(child.id());
    let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(BROWSER_TIMEOUT, waiter).await {
        Ok(joined) => joined.unwrap().unwrap(),
        Err(_) => {
            drop(group);
            panic!("chromium did not finish within {BROWSER_TIMEOUT:?} on {url}");
        }
    };
    drop(group);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("id=\"result\""),
        "chromium on {url}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The JSON the page wrote into `<pre id="result">`.
fn page_result(dom: &str) -> serde_json::Value {
    let start = dom
        .find("<pre id=\"result\">")
        .expect("no #result in the DOM")
        + 17;
    let end = start + dom[start..].find("</pre>").expect("#result is not closed");
    let text = dom[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("#result is not JSON ({e}): {text}"))
}

/// Whether Chromium is there to run the browser test; with `PORTCULLIS_BROWSER_TESTS=1` (as
/// `.ci/run` sets) it must be.
fn chromium_present() -> bool {
    let present = Path::new(CHROMIUM).exists();
    if std::env::var_os("PORTCULLIS_BROWSER_TESTS").is_some_and(|v| v == "1") {
        assert!(
            present,
            "PORTCULLIS_BROWSER_TESTS=1 but {CHROMIUM} is missing (apt-get install chromium)"
        );
    } else if !present {
        eprintln!("note: browser test skipped: {CHROMIUM} is missing (apt-get install chromium)");
    }
    present
}

#[tokio::test]
async fn a_real_browser_uses_the_gateway_from_an_allowed_origin_and_is_refused_from_another() {
    if !chromium_present() {
        return;
    }
    let up = upstream().await;
    let ws = ws_echo_upstream().await;
    let allowed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let allowed_addr = allowed.local_addr().unwrap();
    let refused_addr = refused.local_addr().unwrap();
    let config = format!(
        "{}[auth]\nquery_param = \"\"\n[cors]\nallowed_origins = [\"http://{allowed_addr}\"]\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{up}\"\n\
         [[routes]]\nname = \"tight\"\npath = \"/tight/\"\nupstream = \"{up}\"\nauth = \"none\"\nper_ip = \"2/min\"\n\
         [[routes]]\nname = \"stream\"\npath = \"/stream/\"\nupstream = \"{up}\"\n\
         [[routes]]\nname = \"events\"\npath = \"/events/\"\nupstream = \"{up}\"\nquery_param = \"api_key\"\n\
         [[routes]]\nname = \"ws\"\npath = \"/ws/\"\nupstream = \"http://{ws}\"\nwebsocket = true\nquery_param = \"api_key\"\n",
        server_section(""),
        key_block("browser", KEY, ""),
        up = up.url(),
    );
    let gw = Gateway::start(&config).await;
    serve_page(allowed, page(ALLOWED_PAGE, gw.addr));
    serve_page(refused, page(REFUSED_PAGE, gw.addr));

    // ---------------------------------------------------------------- the allowed origin
    let dom = dump_dom(&format!("http://{allowed_addr}/page.html")).await;
    let r = page_result(&dom);
    eprintln!("allowed origin's page: {r}");
    assert_eq!(r["state"], "done", "{r}");
    // 1. The key in a header, and X-Request-Id readable (exposed).
    assert_eq!(r["fetch"]["status"], 200, "{r}");
    assert!(r["fetch"]["request_id"].is_string(), "{r}");
    assert_eq!(r["fetch"]["body"]["target"], "/v1/x", "{r}");
    // 2. A streamed fetch: every event, read as a stream (more than one read).
    assert_eq!(r["stream"]["status"], 200, "{r}");
    assert_eq!(r["stream"]["events"], EVENTS, "{r}");
    assert!(r["stream"]["reads"].as_u64().unwrap() > 1, "{r}");
    // 3. EventSource with the key in the query.
    assert_eq!(r["eventsource"]["events"], EVENTS, "{r}");
    assert_eq!(
        r["eventsource"]["data"],
        serde_json::json!((0..EVENTS).collect::<Vec<_>>()),
        "{r}"
    );
    // 4. A WebSocket with the key in the query: an echo.
    assert_eq!(r["websocket"]["opened"], true, "{r}");
    assert_eq!(r["websocket"]["echo"], "ping from the page", "{r}");
    assert_eq!(r["websocket"]["errored"], false, "{r}");
    // 5. A 429 the page can read, with a numeric Retry-After.
    assert_eq!(
        r["rate_limit"]["statuses"],
        serde_json::json!([200, 200, 429]),
        "{r}"
    );
    assert_eq!(r["rate_limit"]["retry_after_numeric"], true, "{r}");
    assert_eq!(r["rate_limit"]["code"], "rate_limited", "{r}");
    // 6. A 404 the page can read.
    assert_eq!(r["not_found"]["status"], 404, "{r}");
    assert_eq!(r["not_found"]["code"], "no_route", "{r}");
    // 7. The OpenAI SDK's headers: the preflight passes and the POST is answered.
    assert_eq!(r["openai_sdk"]["status"], 200, "{r}");
    assert_eq!(r["openai_sdk"]["content"], "Hello!", "{r}");

    // What the upstream saw: the page's requests, no key in a header or a query.
    let seen = up.seen();
    let chat = seen
        .iter()
        .find(|s| s.target == "/v1/chat/completions")
        .expect("the SDK's POST reached the upstream");
    assert_eq!(chat.method, "POST");
    assert_eq!(chat.header("x-stainless-lang"), Some("js"));
    assert_eq!(chat.header("openai-organization"), Some("org-browser-test"));
    let events = seen
        .iter()
        .find(|s| s.target.starts_with("/events/sse"))
        .expect("the EventSource reached the upstream");
    assert_eq!(events.header("accept"), Some("text/event-stream"));
    for s in &seen {
        assert_ne!(
            s.method, "OPTIONS",
            "a preflight reached the upstream: {s:?}"
        );
        assert!(!s.target.contains(KEY), "the key went upstream: {s:?}");
        assert!(
            s.headers.iter().all(|(_, v)| !v.contains(KEY)),
            "the key went upstream: {s:?}"
        );
    }

    // ---------------------------------------------------------------- a foreign origin
    let before = up.seen().len();
    let dom = dump_dom(&format!("http://{refused_addr}/page.html")).await;
    let r = page_result(&dom);
    eprintln!("refused origin's page: {r}");
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["fetch"]["threw"], true, "{r}");
    assert_eq!(r["fetch"]["error_name"], "TypeError", "{r}");
    assert_eq!(r["websocket"]["opened"], false, "{r}");
    assert_eq!(r["websocket"]["errored"], true, "{r}");
    assert_eq!(r["websocket"]["echo"], serde_json::Value::Null, "{r}");
    assert_eq!(
        up.seen().len(),
        before,
        "a refused request reached the upstream"
    );
    // The gateway refused both: the preflight and the WebSocket handshake.
    let foreign = format!("http://{refused_addr}");
    let refusals: Vec<_> = gw
        .requests()
        .into_iter()
        .filter(|rec| rec["outcome"] == "origin_not_allowed")
        .collect();
    assert!(
        refusals
            .iter()
            .any(|rec| rec["route"] == "ws" && rec["status"] == 403),
        "no refused WebSocket handshake from {foreign}: {refusals:?}"
    );
    assert!(
        refusals
            .iter()
            .any(|rec| rec["route"] == "bridge" && rec["status"] == 403),
        "no refused preflight from {foreign}: {refusals:?}"
    );

    // The key, sent in headers and in URLs, is in no output of the gateway.
    for (name, text) in [("stdout", gw.stdout.text()), ("stderr", gw.stderr.text())] {
        assert!(
            !text.contains(KEY),
            "the key is in the gateway's {name}:\n{text}"
        );
    }
}
