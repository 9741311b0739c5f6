//! What `[cluster]` costs a request (issue 16): the same gateway config with and without a shared
//! Redis, side by side in one run, on loopback.
//!
//! Run: `cargo bench --bench cluster` (under half a minute once built; installs Debian's
//! `redis-server` if it is missing). `CLUSTER_REQUESTS` sets the requests per row and mode
//! (10,000 by default, in 5 rounds).
//!
//! The bench starts its own `redis-server` (loopback, a free port, no persistence, a temporary
//! directory), a tiny upstream (its own process: every path answers a 245-byte OpenAI-style chat
//! completion with a `usage` object), and two gateways with the same config, one of them with
//! `[cluster] redis = "redis://127.0.0.1:PORT/0"`. Redis, the upstream and this process (the
//! client) run on core 0, the gateways on core 1 (taskset; so each gateway has one worker).
//!
//! Rows: `keyed` (GET, key check, per-IP and per-key limits on), `open` (GET, `auth = "none"`,
//! `per_ip = "off"`: nothing but the lockout to check) and `llm` (POST of a small chat request on
//! an `llm = true` route, the key under a `tokens_per_day` budget, usage ledger on). Each row
//! sends its requests one at a time over one keep-alive HTTP/1.1 connection (after a warm-up), in
//! rounds alternating without and with `[cluster]`; latency is from sending a request to the end
//! of its response body. Any non-2xx answer fails the bench. Redis's round trips per request are
//! its `INFO commandstats` calls of `evalsha`, `eval` and `script` before and after each round
//! (read once they stop changing: the budget settle runs after the response). At the end the
//! tokens Redis holds as spent by the key must be the upstream's 15 per `llm` request sent with
//! `[cluster]`, so a settle that never reached Redis fails the bench too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../tests/support/resp.rs"]
mod resp;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const KEY: &str = "pcx_bench-key-0123456789abcdefghijklmnopqrstuv";
/// The upstream's answer to every request: a chat completion with usage (12 + 3 tokens).
const COMPLETION: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
const TOKENS_PER_ANSWER: f64 = 15.0;
const CHAT: &[u8] = br#"{"model":"m","messages":[],"max_tokens":1}"#;
const ROUNDS: usize = 5;
const WARMUP: usize = 200;
/// The longest one request may take before the bench gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------------ the upstream (own process)

async fn upstream_svc(
    _req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    Ok(http::Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(COMPLETION)))
        .unwrap())
}

fn run_upstream() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap());
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), service_fn(upstream_svc))
                    .await;
            });
        }
    });
}

// ------------------------------------------------------------------ processes

use common::Proc;

fn start_upstream() -> (Proc, SocketAddr) {
    let mut child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(std::env::current_exe().unwrap())
        .arg("--upstream")
        .stdout(Stdio::piped())
        .spawn()
        .expect("taskset");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let proc = Proc(child);
    (proc, line.trim().parse().expect("upstream did not start"))
}

// ------------------------------------------------------------------ Redis

struct Redis {
    proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Our own redis-server on a free loopback port (no persistence, a temporary directory),
    /// answering PING.
    fn start(bin: &Path) -> Redis {
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new("taskset")
                .args(["-c", "0"])
                .arg(bin)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("taskset redis-server");
            let mut r = Redis {
                proc: Proc(child),
                port,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if r.proc.0.try_wait().unwrap().is_some() {
                    break; // the port was taken in the meantime: another one
                }
                if r.command(&["PING"]).is_some_and(|a| a.contains("+PONG")) {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start");
    }

    /// One command in RESP on a new connection; the raw answer (`None`: no connection).
    fn command(&self, args: &[&str]) -> Option<String> {
        resp::command(SocketAddr::from(([127, 0, 0, 1], self.port)), None, args)
    }

    /// `INFO commandstats` as command name -> calls.
    fn calls(&self) -> BTreeMap<String, u64> {
        let info = self.command(&["INFO", "commandstats"]).expect("INFO");
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// Script calls (`evalsha`, `eval`, `script ...`: the gateway's round trips) so far.
    fn script_calls(&self) -> u64 {
        self.calls()
            .iter()
            .filter(|(n, _)| n.starts_with("eval") || n.starts_with("script"))
            .map(|(_, c)| c)
            .sum()
    }

    /// [`Redis::script_calls`] once it has stopped changing (the same in reads 100 ms apart;
    /// 5 s at most): the budget settle is sent after the response, off the request's path.
    fn settled_script_calls(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.script_calls();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.script_calls();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// The bulk strings and integers of a RESP answer, in order (enough for KEYS and HGET).
    fn values(answer: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut lines = answer.split("\r\n");
        while let Some(l) = lines.next() {
            if let Some(len) = l.strip_prefix('$') {
                if len != "-1" {
                    out.push(lines.next().unwrap_or_default().to_owned());
                }
            } else if let Some(v) = l.strip_prefix(':').or_else(|| l.strip_prefix('+')) {
                out.push(v.to_owned());
            }
        }
        out
    }
}

// ------------------------------------------------------------------ the gateways

struct Gw {
    proc: Proc,
    addr: SocketAddr,
    /// Its diagnostic log (stderr), drained by a thread so that the pipe never fills.
    log: Arc<Mutex<Vec<String>>>,
}

impl Gw {
    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// The gateway with the bench config; `cluster`: the port of the Redis to share state through.
fn start_gateway(dir: &Path, name: &str, upstream: SocketAddr, cluster: Option<u16>) -> Gw {
    let d = dir.display();
    let cluster_section = match cluster {
        Some(port) => format!("[cluster]\nredis = \"redis://127.0.0.1:{port}/0\"\n"),
        None => String::new(),
    };
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [audit]\noutput = \"/dev/null\"\n\
         [limits]\nper_ip = \"1000000/min\"\nper_key = \"1000000/min\"\n\
         [usage]\ndatabase = \"{d}/usage-{name}.db\"\n\
         {cluster_section}\
         [[keys]]\nid = \"bench\"\nhash = \"{hash}\"\nbudget = {{ tokens_per_day = 1000000000 }}\n\
         [[routes]]\nname = \"keyed\"\npath = \"/keyed/\"\nupstream = \"http://{upstream}\"\n\
         [[routes]]\nname = \"open\"\npath = \"/open/\"\nupstream = \"http://{upstream}\"\n\
         auth = \"none\"\nper_ip = \"off\"\n\
         [[routes]]\nname = \"llm\"\npath = \"/llm/\"\nupstream = \"http://{upstream}\"\nllm = true\n",
        hash = portcullis::keys::hash_string(KEY),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new("taskset")
        .args([
            "-c",
            "1",
            env!("CARGO_BIN_EXE_portcullis"),
            "run",
            "--config",
        ])
        .arg(&path)
        // The temp dir: no `.env` of the working directory is read.
        .current_dir(dir)
        .env("PORTCULLIS_LOG", "warn,portcullis=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("taskset");
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(l) = v["fields"]["listeners"].as_str()
                && let Ok(a) = l.trim_matches(['[', ']']).parse::<SocketAddr>()
            {
                let _ = tx.send(a);
            }
            lines.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Gw { proc, addr, log },
        Err(_) => panic!(
            "gateway {name} did not start:\n{}",
            log.lock().unwrap().join("\n")
        ),
    }
}

// ------------------------------------------------------------------ the client

#[derive(Clone, Copy, PartialEq)]
enum Row {
    Keyed,
    Open,
    Llm,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Keyed => "keyed: GET, key, per-IP + per-key limits",
            Row::Open => "open: GET, auth none, per_ip off",
            Row::Llm => "llm: POST chat, key budget, ledger",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Row::Keyed => "keyed",
            Row::Open => "open",
            Row::Llm => "llm",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Row::Keyed => "added p50 ≤ 0.2 ms; 1 call (admission)",
            Row::Open => "added p50 ≤ 0.2 ms; issue: 0 calls (no limits); lead: 1 (lockout)",
            Row::Llm => {
                "added p50 ≤ 0.2 ms; issue: 2 calls (admission, settle); docs: 3 (+ reservation)"
            }
        }
    }

    fn request(self, addr: SocketAddr) -> http::Request<Full<Bytes>> {
        let b = http::Request::builder().header("host", addr.to_string());
        match self {
            Row::Keyed => b
                .uri("/keyed/v1/models")
                .header("authorization", format!("Bearer {KEY}"))
                .body(Full::new(Bytes::new())),
            Row::Open => b.uri("/open/v1/models").body(Full::new(Bytes::new())),
            Row::Llm => b
                .method(http::Method::POST)
                .uri("/llm/v1/chat/completions")
                .header("authorization", format!("Bearer {KEY}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(CHAT))),
        }
        .unwrap()
    }
}

/// What one round measured.
#[derive(Default)]
struct Round {
    /// Latency of each request, ms.
    lat: Vec<f64>,
    /// Non-2xx answers: (status, body) of the first few, and how many.
    bad: Vec<(u16, String)>,
    bad_count: usize,
}

/// `warmup` then `n` requests of `row`, one at a time over one new keep-alive connection.
async fn round(addr: SocketAddr, row: Row, warmup: usize, n: usize) -> Round {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let mut r = Round {
        lat: Vec::with_capacity(n),
        ..Round::default()
    };
    for i in 0..warmup + n {
        let req = row.request(addr);
        let t0 = Instant::now();
        let exchange = async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("{} request {i}: {e}", row.short()),
            Err(_) => panic!(
                "{} request {i}: no answer within {REQUEST_TIMEOUT:?}",
                row.short()
            ),
        };
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if !status.is_success() {
            r.bad_count += 1;
            if r.bad.len() < 3 {
                r.bad
                    .push((status.as_u16(), String::from_utf8_lossy(&body).into_owned()));
            }
        }
        if i >= warmup {
            r.lat.push(ms);
        }
    }
    drop(sender);
    driver.abort();
    r
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One row and mode over all rounds.
#[derive(Default)]
struct Cell {
    lat: Vec<f64>,
    /// p50 of each round, ms.
    round_p50: Vec<f64>,
    script_calls: u64,
    requests: usize,
}

fn main() {
    if std::env::args().any(|a| a == "--upstream") {
        run_upstream();
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("cluster: benchmark");
        return;
    }
    let started = Instant::now();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    assert!(
        nproc >= 2,
        "the bench pins Redis, the upstream and the client to CPU 0 and the gateways to CPU 1: it needs 2 CPUs"
    );
    let requests: usize = std::env::var("CLUSTER_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n >= ROUNDS)
        .unwrap_or(10_000);
    let per_round = requests / ROUNDS;
    let redis_bin = common::ensure("redis-server", &["redis-server"]).expect(
        "redis-server is required and could not be installed (apt-get install redis-server)",
    );
    // Pin this process (the client) next to Redis and the upstream.
    let _ = Command::new("taskset")
        .args(["-p", "-c", "0", &std::process::id().to_string()])
        .output();

    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(&redis_bin);
    let version = redis
        .command(&["INFO", "server"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let (_upstream, up_addr) = start_upstream();
    let mut local = start_gateway(dir.path(), "local", up_addr, None);
    let mut shared = start_gateway(dir.path(), "cluster", up_addr, Some(redis.port));
    eprintln!(
        "redis-server {version} on 127.0.0.1:{}, upstream {up_addr}, gateways {} (without) and {} (with [cluster])",
        redis.port, local.addr, shared.addr
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = [Row::Keyed, Row::Open, Row::Llm];
    // [row][0 without, 1 with]
    let mut cells: Vec<[Cell; 2]> = rows.iter().map(|_| Default::default()).collect();
    let mut llm_sent_shared = 0usize;
    for (ri, &row) in rows.iter().enumerate() {
        for k in 0..ROUNDS {
            // A/B, then B/A: neither mode always goes first.
            let order: [usize; 2] = if k % 2 == 0 { [0, 1] } else { [1, 0] };
            for mode in order {
                let gw = if mode == 0 { &local } else { &shared };
                // The warm-up's settles are done before counting starts.
                let warm = if k < 2 { WARMUP } else { WARMUP / 4 };
                let r0 = rt.block_on(round(gw.addr, row, warm, 0));
                assert_eq!(r0.bad_count, 0, "warm-up: {:?}\n{}", r0.bad, gw.log_text());
                let before = redis.settled_script_calls();
                let r = rt.block_on(round(gw.addr, row, 0, per_round));
                let after = redis.settled_script_calls();
                if r.bad_count > 0 {
                    panic!(
                        "{} ({}): {} of {per_round} answers were not 2xx, e.g. {:?}\ngateway log:\n{}",
                        row.short(),
                        if mode == 0 {
                            "without"
                        } else {
                            "with [cluster]"
                        },
                        r.bad_count,
                        r.bad,
                        gw.log_text()
                    );
                }
                if row == Row::Llm && mode == 1 {
                    llm_sent_shared += warm + per_round;
                }
                let c = &mut cells[ri][mode];
                let mut sorted = r.lat.clone();
                sorted.sort_by(f64::total_cmp);
                c.round_p50.push(pct(&sorted, 0.5));
                c.lat.extend(r.lat);
                c.requests += per_round;
                c.script_calls += after - before;
            }
        }
    }

    // Both gateways still running, the shared one never without Redis.
    for (name, gw) in [("without", &mut local), ("with [cluster]", &mut shared)] {
        if let Ok(Some(st)) = gw.proc.0.try_wait() {
            panic!("the gateway {name} exited ({st}):\n{}", gw.log_text());
        }
    }
    let shared_log = shared.log_text();
    assert!(
        shared_log.contains("Redis answers"),
        "the [cluster] gateway never said Redis answers:\n{shared_log}"
    );
    assert!(
        !shared_log.contains("does not answer"),
        "the [cluster] gateway lost Redis during the bench:\n{shared_log}"
    );
    // The settles reached Redis: the key's day spend (two days' keys if the run crossed
    // midnight UTC) is 15 tokens per llm request sent.
    let keys = Redis::values(
        &redis
            .command(&["KEYS", "portcullis:b:k:bench:0:*"])
            .unwrap_or_default(),
    );
    assert!(!keys.is_empty(), "no day spend of the key in Redis");
    let spent: f64 = keys
        .iter()
        .filter_map(|k| {
            Redis::values(&redis.command(&["HGET", k, "t"]).unwrap_or_default())
                .first()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum();
    let expected = TOKENS_PER_ANSWER * llm_sent_shared as f64;
    assert!(
        (spent - expected).abs() < 0.5,
        "Redis holds {spent} tokens spent by the key, expected {expected} ({llm_sent_shared} llm requests)"
    );
    // The script calls as Redis counts them, with the time it spent in each (the rest of a
    // round trip is the network and the two processes waking up).
    let scripts: Vec<String> = redis
        .command(&["INFO", "commandstats"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|l| l.starts_with("eval") || l.starts_with("script"))
        .map(|l| {
            let (name, rest) = l.split_once(':').unwrap_or((l, ""));
            let field = |f: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                    .unwrap_or("?")
                    .to_owned()
            };
            format!(
                "{name} {} calls, {} µs each in Redis",
                field("calls"),
                field("usec_per_call")
            )
        })
        .collect();

    println!(
        "\n| row | mode | requests | p50 ms | p90 ms | p99 ms | added p50 ms | added p99 ms | Redis calls/request | target |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut notes = Vec::new();
    for (ri, &row) in rows.iter().enumerate() {
        let mut sorted: Vec<Vec<f64>> = cells[ri]
            .iter()
            .map(|c| {
                let mut v = c.lat.clone();
                v.sort_by(f64::total_cmp);
                v
            })
            .collect();
        let (b, s) = (
            std::mem::take(&mut sorted[0]),
            std::mem::take(&mut sorted[1]),
        );
        for (mode, v) in [(0usize, &b), (1, &s)] {
            let c = &cells[ri][mode];
            let (added50, added99, target) = if mode == 0 {
                (String::new(), String::new(), "")
            } else {
                (
                    format!("{:+.3}", pct(&s, 0.5) - pct(&b, 0.5)),
                    format!("{:+.3}", pct(&s, 0.99) - pct(&b, 0.99)),
                    row.target(),
                )
            };
            println!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {added50} | {added99} | {:.2} | {target} |",
                row.name(),
                if mode == 0 { "without" } else { "[cluster]" },
                c.requests,
                pct(v, 0.5),
                pct(v, 0.9),
                pct(v, 0.99),
                c.script_calls as f64 / c.requests as f64,
            );
        }
        let per_round: Vec<String> = cells[ri][1]
            .round_p50
            .iter()
            .zip(&cells[ri][0].round_p50)
            .map(|(s, b)| format!("{:+.3}", s - b))
            .collect();
        notes.push(format!(
            "{}: added p50 per round (ms): {}",
            row.short(),
            per_round.join(", ")
        ));
    }
    println!();
    for n in notes {
        println!("{n}");
    }
    println!(
        "Redis {version}; its script calls over the whole run (warm-ups included): {}; the key's spend in Redis: {spent} tokens = 15 x {llm_sent_shared} llm requests",
        scripts.join(", ")
    );
    println!(
        "{} requests per row and mode in {ROUNDS} rounds; bench took {:.0} s",
        requests - requests % ROUNDS,
        started.elapsed().as_secs_f64()
    );
    drop(shared);
    drop(local);
    drop(redis);
}
