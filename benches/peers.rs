//! Side by side with the peers: portcullis, nginx and HAProxy doing the same proxy job in one run,
//! each with its own CPU time per request.
//!
//! Run: `cargo bench --bench peers` (about 3 to 4 minutes; `PEERS_SECS` sets the length of one
//! run, 5 s by default; `PORTCULLIS_BIN` runs another build of the gateway). Installs Debian's `wrk`, `nginx-light`, `haproxy` and `nghttp2-client`
//! (for `h2load`) when they are missing; without HAProxy or h2load their cells are skipped.
//!
//! The job, the same for every proxy: refuse a request without `Authorization: Bearer <KEY>`
//! with 401, set the upstream's `Authorization: Bearer sk-upstream`, add `X-Forwarded-For`, and
//! forward over HTTP/1.1 keep-alive connections to one upstream. The upstream (an nginx with a
//! fixed 292-byte JSON answer) and the load generators run on CPU 0, the proxy under test on
//! CPU 1. The upstream answers 401 unless it gets `Bearer sk-upstream`, and 412 unless it gets
//! `X-Forwarded-For: 127.0.0.1`, so a proxy that skips part of the job fails its row; so does any
//! non-2xx answer (S1 to S3), any answer but 401 (S4), any socket error, and any wrong-key
//! request that reaches the upstream: a regression to fast refusals cannot pass for throughput.
//!
//! The proxy's CPU is utime + stime of all its processes (nginx: master and worker) from
//! `/proc/<pid>/stat`, read before and after each run; µs/req is that delta over the requests
//! completed. Each scenario runs nginx, HAProxy, portcullis, direct, twice in that order; the
//! table shows the mean of the two rounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const KEY: &str = "pcx_bench-key-0123456789abcdefghijklmnopqrstuv";
/// As long as `KEY`, in the same format: refused only because no key has its hash.
const WRONG_KEY: &str = "pcx_bench-key-WRONG56789abcdefghijklmnopqrstuv";
const UPSTREAM_AUTH: &str = "Bearer sk-upstream";
const BODY_LEN: usize = 292;
const IDLE_CONNS: usize = 1000;
/// The upstream pool the peers are configured with (portcullis has its own, fixed one).
const POOL: usize = 64;

/// The upstream's answer: OpenAI-style JSON of exactly `BODY_LEN` bytes, with nothing nginx's
/// single-quoted `return` string would read specially (`'`, `\`, `$`).
fn json_body() -> String {
    let head = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":""#;
    let tail = r#""},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
    let words = "the quick brown fox jumps over the lazy dog ".repeat(4);
    let body = format!(
        "{head}{}{tail}",
        &words[..BODY_LEN - head.len() - tail.len()]
    );
    assert_eq!(body.len(), BODY_LEN);
    assert!(!body.contains(['\'', '\\', '$']));
    body
}

// ------------------------------------------------------------------ tools

struct Tools {
    nginx: PathBuf,
    nginx_version: (u32, u32, u32),
    haproxy: Option<PathBuf>,
    wrk: PathBuf,
    h2load: Option<PathBuf>,
}

/// The whole output (stdout then stderr) of `bin args`, or "" when it cannot run.
fn output_of(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// `nginx -v`: "nginx version: nginx/1.22.1".
fn nginx_version(nginx: &Path) -> (u32, u32, u32) {
    let out = output_of(nginx, &["-v"]);
    let v = out
        .split("nginx/")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("0.0.0");
    let mut n = v.split('.').map(|x| x.parse().unwrap_or(0));
    (
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
    )
}

fn clk_tck() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

// ------------------------------------------------------------------ processes and /proc

/// A started server; stopped and reaped on drop.
struct Proc {
    name: String,
    child: Child,
    /// A command that asks the process to stop before it is killed: nginx's master, sent
    /// SIGKILL, would leave its worker running; asked with `nginx -s stop`, it takes it along.
    stop: Option<(PathBuf, Vec<String>)>,
    /// Files its output and error log go to, shown when it fails.
    logs: Vec<PathBuf>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for l in &self.logs {
            let text = std::fs::read_to_string(l).unwrap_or_default();
            let start = text.len().saturating_sub(3000);
            let start = (start..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            s.push_str(&format!("--- {}:\n{}\n", l.display(), &text[start..]));
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some((bin, args)) = &self.stop {
            let _ = Command::new(bin)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("{} did not stop within 5 s; killing it", self.name);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fields 3 and on of `/proc/<pid>/stat` (after the command name, which may hold spaces):
/// field n is at index n - 3.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// `root` and its children (nginx: the master and its worker).
fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
            && pid != root
            && stat_fields(pid).and_then(|f| f.get(1).copied()) == Some(u64::from(root))
        {
            pids.push(pid);
        }
    }
    pids
}

/// utime + stime (fields 14 and 15), in clock ticks, of `root` and its children.
fn cpu_ticks(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| f[11] + f[12])
        .sum()
}

/// Ticks CPU `cpu` spent on anything but idling, from `/proc/stat` (user, nice, system, irq,
/// softirq, steal).
fn cpu_busy_ticks(cpu: usize) -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let prefix = format!("cpu{cpu} ");
    stat.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            // user nice system idle iowait irq softirq steal (guest time is in user already)
            f.iter().take(8).sum::<u64>() - f.get(3).unwrap_or(&0) - f.get(4).unwrap_or(&0)
        })
        .unwrap_or(0)
}

/// VmRSS of `root` and its children, KiB.
fn rss_kib(root: u32) -> u64 {
    tree(root).into_iter().map(common::vm_rss_kib).sum()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `n` distinct free loopback ports (held together while they are picked).
fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until `p` accepts connections on every port in `ports` (15 s at most).
fn wait_listening(p: &mut Proc, ports: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for &port in ports {
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!(
                    "{} exited ({st}) before listening on port {port}\n{}",
                    p.name,
                    p.log_tail()
                );
            }
            if TcpStream::connect_timeout(&addr(port), Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} is not listening on port {port} after 15 s\n{}",
                p.name,
                p.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One plain HTTP/1.1 GET on a new connection: status and body (the answers here are never
/// chunked: nginx's `return` and error pages, portcullis' JSON errors and forwarded bodies).
fn http_get(port: u16, target: &str, headers: &[String]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("GET {target} on port {port}: {e}"));
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {target} on port {port}: no response head"));
    let head = String::from_utf8_lossy(&buf[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, buf[end + 4..].to_vec())
}

// ------------------------------------------------------------------ the servers

fn nginx_args(dir: &Path, name: &str, tools: &Tools) -> Vec<String> {
    let mut args = vec![
        "-p".to_owned(),
        format!("{}/", dir.display()),
        "-c".to_owned(),
        dir.join(format!("{name}.conf")).display().to_string(),
    ];
    // `-e` (1.19.5): the error log before the config is read, so nothing goes to /var/log.
    if tools.nginx_version >= (1, 19, 5) {
        args.push("-e".to_owned());
        args.push(dir.join(format!("{name}-error.log")).display().to_string());
    }
    args
}

/// The part every nginx config here shares: one worker, files in `dir`, no access log.
fn nginx_main(dir: &Path, name: &str) -> String {
    let d = dir.display();
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\n{user}pid {d}/{name}.pid;\n\
         error_log {d}/{name}-error.log warn;\nworker_rlimit_nofile 16384;\n\
         events {{ worker_connections 8192; }}\n"
    )
}

fn nginx_http_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "    access_log off;\n\
         \x20   client_body_temp_path {d}/{name}-body;\n\
         \x20   proxy_temp_path {d}/{name}-proxy;\n\
         \x20   fastcgi_temp_path {d}/{name}-fastcgi;\n\
         \x20   uwsgi_temp_path {d}/{name}-uwsgi;\n\
         \x20   scgi_temp_path {d}/{name}-scgi;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   keepalive_timeout 300s;\n\
         \x20   ssl_certificate {d}/cert.pem;\n\
         \x20   ssl_certificate_key {d}/key.pem;\n\
         \x20   ssl_protocols TLSv1.3;\n"
    )
}

/// `listen` of a TLS + HTTP/2 listener: `listen ... ssl http2` before nginx 1.25.1, then
/// `listen ... ssl` with `http2 on`.
fn nginx_tls_listen(tools: &Tools, port: u16) -> String {
    if tools.nginx_version >= (1, 25, 1) {
        format!("listen 127.0.0.1:{port} ssl;\n        http2 on;")
    } else {
        format!("listen 127.0.0.1:{port} ssl http2;")
    }
}

fn start_nginx(dir: &Path, name: &str, conf: &str, cpu: &str, tools: &Tools) -> Proc {
    std::fs::write(dir.join(format!("{name}.conf")), conf).unwrap();
    let args = nginx_args(dir, name, tools);
    let test = Command::new(&tools.nginx)
        .args(&args)
        .arg("-t")
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "nginx -t refused the {name} config:\n{}\n{conf}",
        String::from_utf8_lossy(&test.stderr)
    );
    let out = dir.join(format!("{name}.out"));
    let f = std::fs::File::create(&out).unwrap();
    let child = Command::new("taskset")
        .args(["-c", cpu])
        .arg(&tools.nginx)
        .args(&args)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("taskset");
    let mut stop = args;
    stop.extend(["-s".to_owned(), "stop".to_owned()]);
    Proc {
        name: name.to_owned(),
        child,
        stop: Some((tools.nginx.clone(), stop)),
        logs: vec![out, dir.join(format!("{name}-error.log"))],
    }
}

struct Ports {
    plain: u16,
    tls: u16,
}

/// The upstream: nginx on CPU 0 answering `/v1/` with the fixed JSON, when the proxy did its job.
fn upstream_conf(dir: &Path, tools: &Tools, up: &Ports, status: u16) -> String {
    format!(
        "{main}http {{\n{common}\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{plain} backlog=4096;\n\
         \x20       {tls}\n\
         \x20       location /v1/ {{\n\
         \x20           if ($http_authorization != \"{UPSTREAM_AUTH}\") {{ return 401; }}\n\
         \x20           if ($http_x_forwarded_for != \"127.0.0.1\") {{ return 412; }}\n\
         \x20           default_type application/json;\n\
         \x20           return 200 '{body}';\n\
         \x20       }}\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{status};\n\
         \x20       location = /status {{ stub_status; }}\n\
         \x20   }}\n\
         }}\n",
        main = nginx_main(dir, "upstream"),
        common = nginx_http_common(dir, "upstream"),
        plain = up.plain,
        tls = nginx_tls_listen(tools, up.tls),
        body = json_body(),
    )
}

fn proxy_nginx_conf(dir: &Path, tools: &Tools, p: &Ports, up: u16) -> String {
    format!(
        "{main}http {{\n{common}\
         \x20   upstream up {{\n\
         \x20       server 127.0.0.1:{up};\n\
         \x20       keepalive {POOL};\n\
         \x20       keepalive_requests 1000000;\n\
         \x20       keepalive_timeout 300s;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{plain} backlog=4096;\n\
         \x20       {tls}\n\
         \x20       location /v1/ {{\n\
         \x20           if ($http_authorization != \"Bearer {KEY}\") {{ return 401; }}\n\
         \x20           proxy_pass http://up;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_set_header Authorization \"{UPSTREAM_AUTH}\";\n\
         \x20           proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        main = nginx_main(dir, "nginx"),
        common = nginx_http_common(dir, "nginx"),
        plain = p.plain,
        tls = nginx_tls_listen(tools, p.tls),
    )
}

fn haproxy_conf(dir: &Path, p: &Ports, up: u16) -> String {
    format!(
        "global\n\
         \x20   nbthread 1\n\
         \x20   maxconn 8000\n\
         defaults\n\
         \x20   mode http\n\
         \x20   maxconn 8000\n\
         \x20   option forwardfor\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 300s\n\
         \x20   timeout server 300s\n\
         \x20   timeout http-request 60s\n\
         \x20   timeout http-keep-alive 300s\n\
         frontend fe\n\
         \x20   bind 127.0.0.1:{plain}\n\
         \x20   bind 127.0.0.1:{tls} ssl crt {d}/combined.pem alpn h2,http/1.1 ssl-min-ver TLSv1.3\n\
         \x20   http-request return status 401 unless {{ req.hdr(authorization) -m str \"Bearer {KEY}\" }}\n\
         \x20   http-request set-header Authorization \"{UPSTREAM_AUTH}\"\n\
         \x20   default_backend be\n\
         backend be\n\
         \x20   http-reuse always\n\
         \x20   server s1 127.0.0.1:{up} pool-max-conn {POOL}\n",
        plain = p.plain,
        tls = p.tls,
        d = dir.display(),
    )
}

fn start_haproxy(dir: &Path, haproxy: &Path, p: &Ports, up: u16) -> Proc {
    let conf = haproxy_conf(dir, p, up);
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &conf).unwrap();
    let check = Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c refused the config:\n{}{}\n{conf}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let out = dir.join("haproxy.out");
    let f = std::fs::File::create(&out).unwrap();
    let child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("taskset");
    Proc {
        name: "haproxy".to_owned(),
        child,
        stop: None,
        logs: vec![out],
    }
}

/// portcullis with one key and one route; TLS is all or nothing per process (`[tls]` applies
/// to every listener), so the plain and the TLS scenarios get one process each.
fn start_portcullis(dir: &Path, port: u16, up: u16, tls: bool) -> Proc {
    let name = if tls { "portcullis-tls" } else { "portcullis" };
    let d = dir.display();
    let tls_section = if tls {
        format!("[tls]\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\n")
    } else {
        String::new()
    };
    // Rate limits off; the lockout (on by default after 10 bad keys a minute) pushed out of
    // reach, so that S4's flood is answered 401 throughout, as the peers answer it.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 16384\n\
         header_timeout = \"60s\"\nidle_timeout = \"300s\"\n{tls_section}\
         [audit]\noutput = \"/dev/null\"\n\
         [auth]\nlockout_failures = 1000000000\nlockout_window = \"1s\"\n\
         [limits]\nper_ip = \"off\"\nper_key = \"off\"\nmax_connections_per_ip = 100000\n\
         [[keys]]\nid = \"bench\"\nhash = \"{hash}\"\n\
         [[routes]]\nname = \"v1\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:{up}\"\n\
         [routes.upstream_headers]\nauthorization = \"{UPSTREAM_AUTH}\"\n",
        hash = portcullis::keys::hash_string(KEY),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let out = dir.join(format!("{name}.out"));
    let f = std::fs::File::create(&out).unwrap();
    let child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(common::gateway_bin())
        .args(["run", "--config"])
        .arg(&path)
        // The temp dir: no `.env` of the working directory is read.
        .current_dir(dir)
        .env("PORTCULLIS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("taskset");
    Proc {
        name: name.to_owned(),
        child,
        stop: None,
        logs: vec![out],
    }
}

/// The upstream's stub_status: connections accepted and requests served so far (each read
/// counts itself: one connection and one request).
fn upstream_stat(status_port: u16) -> (u64, u64) {
    let (code, body) = http_get(status_port, "/status", &[]);
    assert_eq!(code, 200, "upstream stub_status");
    let text = String::from_utf8_lossy(&body);
    let nums: Vec<u64> = text
        .lines()
        .skip_while(|l| !l.starts_with("server accepts"))
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(nums.len(), 3, "stub_status: {text}");
    (nums[0], nums[2])
}

// ------------------------------------------------------------------ load generators

#[derive(Default)]
struct LoadOut {
    requests: u64,
    rps: f64,
    /// wrk: p50 and p99; h2load: mean and NaN.
    lat_ms: (f64, f64),
}

fn parse_dur_ms(s: &str) -> f64 {
    common::latency_ms(s).unwrap_or(f64::NAN)
}

/// The numbers in a line such as "connect 0, read 0, write 0, timeout 0".
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Counts the answers by status: 401 and any other (S4).
const STATUS_SCRIPT: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) n401 = 0; other = 0 end
function response(status, headers, body)
  if status == 401 then n401 = n401 + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, b = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("n401"); b = b + t:get("other") end
  io.write(string.format("status-count: %d 401 %d other\n", a, b))
end
"#;

/// `wrk -t1 -c50 --latency` on CPU 0; `count_401`: with the script above, and every answer
/// must be 401 instead of 2xx. Panics, naming `what`, on any error or wrong status.
fn wrk(
    tools: &Tools,
    url: &str,
    headers: &[String],
    secs: u32,
    count_401: Option<&Path>,
    what: &str,
) -> LoadOut {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(&tools.wrk)
        .args(["-t1", "-c50", &format!("-d{secs}s"), "--latency"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(script) = count_401 {
        cmd.arg("-s").arg(script);
    }
    let out = cmd.arg(url).output().expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "FAIL {what}: wrk exited with {}:\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
    };
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(requests > 0, "FAIL {what}: no requests completed:\n{text}");
    if let Some(errs) = line("Socket errors:") {
        let n: u64 = numbers(&errs).iter().sum();
        assert!(n == 0, "FAIL {what}: {n} socket errors ({errs}):\n{text}");
    }
    let non2xx: u64 = line("Non-2xx or 3xx responses:")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if count_401.is_some() {
        let counts = line("status-count:")
            .map(|v| numbers(&v))
            .unwrap_or_default();
        assert!(
            counts.len() == 3,
            "FAIL {what}: no status count from wrk:\n{text}"
        );
        let (n401, other) = (counts[0], counts[2]);
        assert!(
            other == 0,
            "FAIL {what}: {other} answers other than 401 (and {n401} of 401):\n{text}"
        );
        assert!(
            n401 >= requests && non2xx == requests,
            "FAIL {what}: {requests} requests, {n401} answered 401, {non2xx} non-2xx:\n{text}"
        );
    } else {
        assert!(
            non2xx == 0,
            "FAIL {what}: {non2xx} non-2xx answers (of {requests}):\n{text}"
        );
    }
    LoadOut {
        requests,
        rps: line("Requests/sec:")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0),
        lat_ms: (
            parse_dur_ms(&line("50%").unwrap_or_default()),
            parse_dur_ms(&line("99%").unwrap_or_default()),
        ),
    }
}

/// `h2load -c50 -m10` over TLS 1.3 and HTTP/2 on CPU 0. Panics, naming `what`, on any failed,
/// errored or timed-out request, any non-2xx status, or another protocol.
fn h2load(h2load: &Path, url: &str, headers: &[String], secs: u32, what: &str) -> LoadOut {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(h2load)
        .args(["-c50", "-m10", "-D", &secs.to_string()]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("h2load");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "FAIL {what}: h2load exited with {}:\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("FAIL {what}: no \"{prefix}\" line from h2load:\n{text}"))
    };
    let proto = line("TLS Protocol:");
    assert!(
        proto.trim() == "TLSv1.3",
        "FAIL {what}: TLS protocol {proto}"
    );
    let alpn = line("Application protocol:");
    assert!(alpn.trim() == "h2", "FAIL {what}: protocol {alpn}");
    // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    let req = numbers(&line("requests:"));
    assert!(req.len() >= 6, "FAIL {what}: requests line:\n{text}");
    let (done, succeeded, failed, errored) = (req[2], req[3], req[4], req[5]);
    let timeout = req.get(6).copied().unwrap_or(0);
    assert!(
        failed == 0 && errored == 0 && timeout == 0 && succeeded == done && done > 0,
        "FAIL {what}: {done} done, {succeeded} succeeded, {failed} failed, {errored} errored, {timeout} timed out:\n{text}"
    );
    // "status codes: N 2xx, N 3xx, N 4xx, N 5xx"
    let codes = line("status codes:");
    let c: Vec<u64> = codes
        .split(',')
        .filter_map(|p| p.split_whitespace().next().and_then(|n| n.parse().ok()))
        .collect();
    assert!(
        c.len() == 4 && c[0] == done && c[1] + c[2] + c[3] == 0,
        "FAIL {what}: status codes {codes} for {done} requests done:\n{text}"
    );
    // "finished in 5.00s, 12345.60 req/s, 5.12MB/s"
    let rps = line("finished in")
        .split(',')
        .nth(1)
        .and_then(|v| v.trim().strip_suffix("req/s"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    // "time for request:  min  max  mean  sd  +/- sd"
    let mean = line("time for request:")
        .split_whitespace()
        .nth(2)
        .map(parse_dur_ms)
        .unwrap_or(f64::NAN);
    LoadOut {
        requests: done,
        rps,
        lat_ms: (mean, f64::NAN),
    }
}

// ------------------------------------------------------------------ idle TLS connections

type Held = Vec<(
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)>;

/// `n` TLS 1.3 HTTP/1.1 keep-alive connections to `port`, one request with the key on each
/// (a 200 with the upstream's body), all held open.
async fn open_idle(port: u16, n: usize, cfg: Arc<rustls::ClientConfig>, what: &str) -> Held {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let tcp = tokio::net::TcpStream::connect(addr(port))
            .await
            .unwrap_or_else(|e| panic!("FAIL {what}: connection {i}: {e}"));
        let tls = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap_or_else(|e| panic!("FAIL {what}: TLS handshake {i}: {e}"));
        let version = tls.get_ref().1.protocol_version();
        assert_eq!(
            version,
            Some(rustls::ProtocolVersion::TLSv1_3),
            "FAIL {what}: TLS version"
        );
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        keyed_get(
            &mut sender,
            port,
            &format!("{what}: request on connection {i}"),
        )
        .await;
        held.push((sender, driver));
    }
    held
}

/// How long S6 holds its connections idle before reading the RSS.
const IDLE_SETTLE: Duration = Duration::from_secs(5);

/// One more request on each held connection: a 200 with the upstream's body.
async fn reuse(held: &mut Held, port: u16, what: &str) {
    for (i, (sender, _)) in held.iter_mut().enumerate() {
        keyed_get(
            sender,
            port,
            &format!("{what}: second request on connection {i}"),
        )
        .await;
    }
}

/// A GET of `/v1/x` with the key on `sender`, which must answer 200 with the upstream's body.
async fn keyed_get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    port: u16,
    what: &str,
) {
    let req = http::Request::get("/v1/x")
        .header("host", format!("localhost:{port}"))
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("FAIL {what}: {e}"));
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status == 200 && body.len() == BODY_LEN,
        "FAIL {what}: status {status}, {} body bytes",
        body.len()
    );
}

fn release(rt: &tokio::runtime::Runtime, held: Held) {
    rt.block_on(async move {
        for (sender, driver) in held {
            drop(sender);
            driver.abort();
            let _ = driver.await;
        }
    });
}

// ------------------------------------------------------------------ the runs

#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Nginx,
    Haproxy,
    Portcullis,
    Direct,
}

const WHO: [Who; 4] = [Who::Nginx, Who::Haproxy, Who::Portcullis, Who::Direct];

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Nginx => "nginx",
            Who::Haproxy => "HAProxy",
            Who::Portcullis => "portcullis",
            Who::Direct => "direct",
        }
    }
}

struct Target {
    who: Who,
    plain: u16,
    tls: u16,
    /// The process whose CPU and memory count in plain and in TLS scenarios (none: direct).
    plain_pid: Option<u32>,
    tls_pid: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scen {
    S1,
    S2,
    S3,
    S4,
}

impl Scen {
    fn name(self) -> &'static str {
        match self {
            Scen::S1 => "S1 plain HTTP/1.1",
            Scen::S2 => "S2 TLS 1.3 HTTP/1.1",
            Scen::S3 => "S3 TLS 1.3 HTTP/2",
            Scen::S4 => "S4 wrong-key flood",
        }
    }
}

struct Run {
    rps: f64,
    /// Proxy CPU µs per request, and the share of its core it kept busy (none: direct).
    cpu: Option<(f64, f64)>,
    lat_ms: (f64, f64),
    upstream_conns: u64,
    /// Share of CPU 1 busy with anything but the proxies (other processes on the machine): noise.
    other_pct: f64,
}

struct Bench {
    /// Every proxy process (the roots of their trees): the ones not under test should idle.
    proxies: Vec<u32>,
    tools: Tools,
    secs: u32,
    clk_tck: f64,
    status_port: u16,
    script: PathBuf,
}

impl Bench {
    fn run(&self, scen: Scen, t: &Target, round: usize) -> Run {
        let what = format!("{} {} (round {})", t.who.name(), scen.name(), round + 1);
        let auth = match (t.who, scen) {
            (Who::Direct, Scen::S4) => "Bearer sk-wrong".to_owned(),
            (Who::Direct, _) => UPSTREAM_AUTH.to_owned(),
            (_, Scen::S4) => format!("Bearer {WRONG_KEY}"),
            _ => format!("Bearer {KEY}"),
        };
        let mut headers = vec![format!("Authorization: {auth}")];
        if t.who == Who::Direct {
            // What the proxies add, so that the upstream does the same work for everyone.
            headers.push("X-Forwarded-For: 127.0.0.1".to_owned());
        }
        let pid = match scen {
            Scen::S2 | Scen::S3 => t.tls_pid,
            Scen::S1 | Scen::S4 => t.plain_pid,
        };
        let (acc0, req0) = upstream_stat(self.status_port);
        // CPU ticks of every proxy (one reading: the one under test is among them) and of CPU 1.
        let ticks =
            || -> Vec<(u32, u64)> { self.proxies.iter().map(|&p| (p, cpu_ticks(p))).collect() };
        let (procs0, core0) = (ticks(), cpu_busy_ticks(1));
        let t0 = Instant::now();
        let out = match scen {
            Scen::S1 => wrk(
                &self.tools,
                &format!("http://127.0.0.1:{}/v1/x", t.plain),
                &headers,
                self.secs,
                None,
                &what,
            ),
            Scen::S2 => wrk(
                &self.tools,
                &format!("https://127.0.0.1:{}/v1/x", t.tls),
                &headers,
                self.secs,
                None,
                &what,
            ),
            Scen::S3 => {
                // HTTP/2 header names are lower case (the values are kept as they are).
                let h2: Vec<String> = headers
                    .iter()
                    .map(|h| {
                        let (name, value) = h.split_once(':').unwrap();
                        format!("{}:{value}", name.to_ascii_lowercase())
                    })
                    .collect();
                h2load(
                    self.tools.h2load.as_deref().unwrap(),
                    &format!("https://127.0.0.1:{}/v1/x", t.tls),
                    &h2,
                    self.secs,
                    &what,
                )
            }
            Scen::S4 => wrk(
                &self.tools,
                &format!("http://127.0.0.1:{}/v1/x", t.plain),
                &headers,
                self.secs,
                Some(&self.script),
                &what,
            ),
        };
        let wall = t0.elapsed().as_secs_f64();
        let (procs1, core1) = (ticks(), cpu_busy_ticks(1));
        // Ticks during the run: of the proxy under test, of the others, of everything on CPU 1.
        let (mut tested, mut others) = (None, 0);
        for ((p, a), (_, b)) in procs0.iter().zip(&procs1) {
            if Some(*p) == pid {
                tested = Some(b.saturating_sub(*a));
            } else {
                others += b.saturating_sub(*a);
            }
        }
        let core = core1.saturating_sub(core0);
        let (acc1, req1) = upstream_stat(self.status_port);
        // Less the second stub_status read itself.
        let upstream_conns = acc1 - acc0 - 1;
        let upstream_reqs = req1 - req0 - 1;
        if scen == Scen::S4 && t.who != Who::Direct {
            assert!(
                upstream_reqs == 0,
                "FAIL {what}: {upstream_reqs} wrong-key requests reached the upstream"
            );
        } else {
            assert!(
                upstream_reqs >= out.requests,
                "FAIL {what}: {} requests completed but only {upstream_reqs} reached the upstream",
                out.requests
            );
        }
        let cpu = tested.map(|ticks| {
            let secs = ticks as f64 / self.clk_tck;
            (secs * 1e6 / out.requests as f64, secs / wall * 100.0)
        });
        let run = Run {
            rps: out.rps,
            cpu,
            lat_ms: out.lat_ms,
            upstream_conns,
            other_pct: core.saturating_sub(tested.unwrap_or(0) + others) as f64
                / self.clk_tck
                / wall
                * 100.0,
        };
        // The proxies not under test, idle as they should be?
        let idle_pct = others as f64 / self.clk_tck / wall * 100.0;
        let lat = if scen == Scen::S3 {
            format!("mean {:.2} ms", run.lat_ms.0)
        } else {
            format!("p50 {:.2} / p99 {:.2} ms", run.lat_ms.0, run.lat_ms.1)
        };
        let cpu = run.cpu.map_or(String::new(), |(us, busy)| {
            format!(", {us:.1} µs/req, core {busy:.0} % busy")
        });
        println!(
            "{what}: {:.0} req/s{cpu}, {lat}, {} upstream conns opened, {} requests; CPU 1 busy {:.0} % \
             with other processes, {idle_pct:.0} % with the idle proxies",
            run.rps, run.upstream_conns, out.requests, run.other_pct
        );
        run
    }
}

// ------------------------------------------------------------------ the table

fn mean(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    runs.iter().map(f).sum::<f64>() / runs.len() as f64
}

#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// portcullis over the best of nginx and HAProxy.
fn ratio(vals: &[Option<f64>; 4], better: Better) -> String {
    let peers = [vals[0], vals[1]].into_iter().flatten();
    let best = match better {
        Better::Higher => peers.fold(f64::NAN, f64::max),
        Better::Lower => peers.fold(f64::NAN, f64::min),
    };
    match vals[2] {
        Some(p) if best.is_finite() && best > 0.0 => format!("{:.2}", p / best),
        _ => String::new(),
    }
}

/// A table row: label, the cells of nginx, HAProxy, portcullis and direct, and the ratio.
type Row = (String, [String; 4], String);

/// The table rows from the runs (S1 to S4: the runs of each target, by `WHO` order) and S6's
/// (idle RSS MiB, KiB per idle TLS connection).
fn table(
    results: &[(Scen, Vec<Vec<Run>>)],
    s6: &[Option<(f64, f64)>; 4],
    haproxy: bool,
    h2load: bool,
) -> Vec<Row> {
    let missing = |who: Who| {
        if who == Who::Haproxy && !haproxy {
            "skipped: not installed".to_owned()
        } else {
            "n/a".to_owned()
        }
    };
    let cells = |vals: &[Option<f64>; 4], fmt: &dyn Fn(f64) -> String| -> [String; 4] {
        std::array::from_fn(|i| vals[i].map_or_else(|| missing(WHO[i]), fmt))
    };
    let mut rows: Vec<Row> = Vec::new();
    for (scen, runs) in results {
        let scen = *scen;
        let get = |f: &dyn Fn(&[Run]) -> Option<f64>| -> [Option<f64>; 4] {
            std::array::from_fn(|i| {
                if runs[i].is_empty() {
                    None
                } else {
                    f(&runs[i])
                }
            })
        };
        let short = &scen.name()[..2];
        let rps = get(&|r| Some(mean(r, |x| x.rps)));
        let rps_label = if scen == Scen::S4 {
            format!("{} 401/s", scen.name())
        } else {
            format!("{} req/s", scen.name())
        };
        rows.push((
            rps_label,
            cells(&rps, &|v| format!("{v:.0}")),
            ratio(&rps, Better::Higher),
        ));
        let us = get(&|r| r[0].cpu.map(|_| mean(r, |x| x.cpu.map_or(0.0, |c| c.0))));
        rows.push((
            format!("{short} µs/req (proxy CPU)"),
            cells(&us, &|v| format!("{v:.1}")),
            ratio(&us, Better::Lower),
        ));
        let busy = get(&|r| r[0].cpu.map(|_| mean(r, |x| x.cpu.map_or(0.0, |c| c.1))));
        rows.push((
            format!("{short} proxy core busy %"),
            cells(&busy, &|v| format!("{v:.0}")),
            String::new(),
        ));
        if scen == Scen::S3 {
            let m = get(&|r| Some(mean(r, |x| x.lat_ms.0)));
            rows.push((
                format!("{short} mean latency ms (h2load has no percentiles)"),
                cells(&m, &|v| format!("{v:.2}")),
                ratio(&m, Better::Lower),
            ));
        } else if scen != Scen::S4 {
            let p50 = get(&|r| Some(mean(r, |x| x.lat_ms.0)));
            let p99 = get(&|r| Some(mean(r, |x| x.lat_ms.1)));
            let c: [String; 4] = std::array::from_fn(|i| match (p50[i], p99[i]) {
                (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
                _ => missing(WHO[i]),
            });
            let (r50, r99) = (ratio(&p50, Better::Lower), ratio(&p99, Better::Lower));
            rows.push((format!("{short} p50 / p99 ms"), c, format!("{r50} / {r99}")));
        }
        if scen == Scen::S3 {
            let c: [String; 4] = std::array::from_fn(|i| {
                if runs[i].is_empty() {
                    missing(WHO[i])
                } else {
                    runs[i]
                        .iter()
                        .map(|r| r.upstream_conns.to_string())
                        .collect::<Vec<_>>()
                        .join(" / ")
                }
            });
            rows.push((
                format!("{short} upstream conns opened (round 1 / round 2)"),
                c,
                String::new(),
            ));
        }
    }
    let rss: [Option<f64>; 4] = std::array::from_fn(|i| s6[i].map(|s| s.0));
    let per: [Option<f64>; 4] = std::array::from_fn(|i| s6[i].map(|s| s.1));
    rows.push((
        "S6 idle RSS MiB".to_owned(),
        cells(&rss, &|v| format!("{v:.1}")),
        ratio(&rss, Better::Lower),
    ));
    rows.push((
        format!("S6 KiB per idle TLS conn ({IDLE_CONNS} held)"),
        cells(&per, &|v| format!("{v:.1}")),
        ratio(&per, Better::Lower),
    ));

    if !h2load {
        rows.insert(
            rows.iter()
                .position(|r| r.0.starts_with("S4"))
                .unwrap_or(rows.len()),
            (
                Scen::S3.name().to_owned(),
                std::array::from_fn(|_| "skipped: no h2load".to_owned()),
                String::new(),
            ),
        );
    }
    rows
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("peers: benchmark");
        return;
    }
    let started = Instant::now();
    let secs: u32 = std::env::var("PEERS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(5);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    assert!(
        nproc >= 2,
        "the bench pins the upstream and the load to CPU 0 and the proxies to CPU 1: it needs 2 CPUs"
    );

    let wrk_bin = common::ensure("wrk", &["wrk"])
        .expect("wrk is required and could not be installed (apt-get install wrk)");
    let nginx = common::ensure("nginx", &["nginx-light", "nginx"])
        .expect("nginx is required and could not be installed (apt-get install nginx-light)");
    let haproxy = common::ensure("haproxy", &["haproxy"]);
    if haproxy.is_none() {
        println!("note: HAProxy could not be installed: its cells are skipped");
    }
    let h2load_bin = common::ensure("h2load", &["nghttp2-client"]);
    if h2load_bin.is_none() {
        println!("note: h2load (nghttp2-client) could not be installed: S3 is skipped");
    }
    let tools = Tools {
        nginx_version: nginx_version(&nginx),
        nginx,
        haproxy,
        wrk: wrk_bin,
        h2load: h2load_bin,
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let (a, b, c) = tools.nginx_version;
    let machine = format!(
        "machine: nproc {nproc} ({cpu_model}), kernel {}; nginx {a}.{b}.{c}; {}; {}; {}",
        first_line(&output_of(Path::new("uname"), &["-r"])),
        tools
            .haproxy
            .as_deref()
            .map_or("HAProxy: none".to_owned(), |h| first_line(&output_of(
                h,
                &["-v"]
            ))
            .split(" - ")
            .next()
            .unwrap_or("")
            .to_owned()),
        first_line(&output_of(&tools.wrk, &["--version"]))
            .split(" Copyright")
            .next()
            .unwrap_or(""),
        tools
            .h2load
            .as_deref()
            .map_or("h2load: none".to_owned(), |h| first_line(&output_of(
                h,
                &["--version"]
            ))
            .to_owned()),
    );
    println!("{machine}");

    // This process (the idle-connection client) runs next to the upstream and the load.
    let _ = Command::new("taskset")
        .args(["-p", "-c", "0", &std::process::id().to_string()])
        .output();
    let clk_tck = clk_tck();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cert_pem, key_pem) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    std::fs::write(d.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(d.join("key.pem"), &key_pem).unwrap();
    std::fs::write(d.join("combined.pem"), format!("{cert_pem}{key_pem}")).unwrap();
    let script = d.join("status.lua");
    std::fs::write(&script, STATUS_SCRIPT).unwrap();

    let ports = free_ports(9);
    let up = Ports {
        plain: ports[0],
        tls: ports[1],
    };
    let status_port = ports[2];
    let ng = Ports {
        plain: ports[3],
        tls: ports[4],
    };
    let hp = Ports {
        plain: ports[5],
        tls: ports[6],
    };
    let (pc_plain, pc_tls) = (ports[7], ports[8]);

    let mut upstream = start_nginx(
        d,
        "upstream",
        &upstream_conf(d, &tools, &up, status_port),
        "0",
        &tools,
    );
    wait_listening(&mut upstream, &[up.plain, up.tls, status_port]);
    let mut ngx = start_nginx(
        d,
        "nginx",
        &proxy_nginx_conf(d, &tools, &ng, up.plain),
        "1",
        &tools,
    );
    wait_listening(&mut ngx, &[ng.plain, ng.tls]);
    let mut hap = tools
        .haproxy
        .as_deref()
        .map(|h| start_haproxy(d, h, &hp, up.plain));
    if let Some(h) = hap.as_mut() {
        wait_listening(h, &[hp.plain, hp.tls]);
    }
    let mut pcx = start_portcullis(d, pc_plain, up.plain, false);
    wait_listening(&mut pcx, &[pc_plain]);
    let mut pcx_tls = start_portcullis(d, pc_tls, up.plain, true);
    wait_listening(&mut pcx_tls, &[pc_tls]);

    let mut targets = vec![Target {
        who: Who::Nginx,
        plain: ng.plain,
        tls: ng.tls,
        plain_pid: Some(ngx.pid()),
        tls_pid: Some(ngx.pid()),
    }];
    if let Some(h) = &hap {
        targets.push(Target {
            who: Who::Haproxy,
            plain: hp.plain,
            tls: hp.tls,
            plain_pid: Some(h.pid()),
            tls_pid: Some(h.pid()),
        });
    }
    targets.push(Target {
        who: Who::Portcullis,
        plain: pc_plain,
        tls: pc_tls,
        plain_pid: Some(pcx.pid()),
        tls_pid: Some(pcx_tls.pid()),
    });
    targets.push(Target {
        who: Who::Direct,
        plain: up.plain,
        tls: up.tls,
        plain_pid: None,
        tls_pid: None,
    });

    // Every target does the job: the key's request gets the upstream's body, a wrong key 401.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tls_cfg = common::tls_client(&cert_pem);
    for t in &targets {
        let (good, bad) = if t.who == Who::Direct {
            (
                vec![
                    format!("Authorization: {UPSTREAM_AUTH}"),
                    "X-Forwarded-For: 127.0.0.1".to_owned(),
                ],
                vec!["Authorization: Bearer sk-wrong".to_owned()],
            )
        } else {
            (
                vec![format!("Authorization: Bearer {KEY}")],
                vec![format!("Authorization: Bearer {WRONG_KEY}")],
            )
        };
        let (code, body) = http_get(t.plain, "/v1/x", &good);
        assert!(
            code == 200 && body.len() == BODY_LEN,
            "FAIL {}: the key's request got {code} with {} body bytes",
            t.who.name(),
            body.len()
        );
        let (code, _) = http_get(t.plain, "/v1/x", &bad);
        assert_eq!(code, 401, "FAIL {}: a wrong key got {code}", t.who.name());
        if t.who != Who::Direct {
            let what = format!("{} TLS check", t.who.name());
            let held = rt.block_on(open_idle(t.tls, 1, tls_cfg.clone(), &what));
            release(&rt, held);
        }
    }

    // S6 first, while the processes are fresh: idle RSS, then 1,000 idle TLS connections.
    let mut s6: [Option<(f64, f64)>; 4] = [None; 4];
    for t in &targets {
        let Some(pid) = t.tls_pid else { continue };
        let what = format!("{} S6", t.who.name());
        let before = rss_kib(pid);
        let mut held = rt.block_on(open_idle(t.tls, IDLE_CONNS, tls_cfg.clone(), &what));
        let opened = rss_kib(pid);
        // Idle means idle for a while: portcullis gives an HTTP/1.1 connection's buffers back
        // after 250 ms without a request (nginx at once, on every keep-alive wait), and the
        // allocator returns the pages a second later.
        std::thread::sleep(IDLE_SETTLE);
        let after = rss_kib(pid);
        // Every connection was still open, and serves again.
        rt.block_on(reuse(&mut held, t.tls, &what));
        release(&rt, held);
        let per_conn = (after as f64 - before as f64) / IDLE_CONNS as f64;
        let fresh = (opened as f64 - before as f64) / IDLE_CONNS as f64;
        println!(
            "{what}: idle RSS {before} KiB, {after} KiB with {IDLE_CONNS} idle TLS connections: {per_conn:.1} KiB each ({fresh:.1} KiB each just after their requests)"
        );
        s6[WHO.iter().position(|w| *w == t.who).unwrap()] =
            Some((before as f64 / 1024.0, per_conn));
    }

    let bench = Bench {
        proxies: targets
            .iter()
            .flat_map(|t| [t.plain_pid, t.tls_pid])
            .flatten()
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .collect(),
        tools,
        secs,
        clk_tck,
        status_port,
        script,
    };
    let mut scens = vec![Scen::S1, Scen::S2];
    if bench.tools.h2load.is_some() {
        scens.push(Scen::S3);
    }
    scens.push(Scen::S4);
    // results[scenario][who]: the runs of each round.
    let mut results: Vec<(Scen, Vec<Vec<Run>>)> = Vec::new();
    for &scen in &scens {
        let mut runs: Vec<Vec<Run>> = (0..4).map(|_| Vec::new()).collect();
        for round in 0..2 {
            for t in &targets {
                let i = WHO.iter().position(|w| *w == t.who).unwrap();
                runs[i].push(bench.run(scen, t, round));
            }
        }
        results.push((scen, runs));
    }

    let rows = table(&results, &s6, hap.is_some(), bench.tools.h2load.is_some());
    let noise = results
        .iter()
        .flat_map(|(_, runs)| runs.iter().flatten())
        .map(|r| r.other_pct)
        .fold(0.0, f64::max);
    let settle = IDLE_SETTLE.as_secs();
    println!(
        "\n{machine}\n\
         - {secs} s per run; nginx, HAProxy, portcullis, direct, then the same again: the mean of \
         the two rounds is shown. Upstream nginx and load generators on CPU 0, proxies on CPU 1; \
         wrk -t1 -c50 (S4: with a Lua script counting statuses), h2load -c50 -m10.\n\
         - µs/req: the proxy's utime+stime (all its processes) over completed requests, CLK_TCK \
         {clk_tck}. core busy %: that CPU time over the run's wall time (below ~95 % the proxy was \
         not the bottleneck).\n\
         - Logs: nginx access_log off, HAProxy no log, portcullis' audit records go to /dev/null \
         (still formatted and written).\n\
         - portcullis: per_ip/per_key \"off\", lockout out of reach (1e9 failures per 1 s) so S4 \
         stays 401, upstream pool its built-in 128 idle per host; nginx keepalive {POOL}, HAProxy \
         pool-max-conn {POOL} with http-reuse always. Its plain and TLS scenarios run one process \
         each ([tls] covers every listener); S6 is the TLS one.\n\
         - S6: VmRSS summed over the proxy's processes after start and a check request per \
         listener; per conn: the RSS growth with {IDLE_CONNS} TLS 1.3 HTTP/1.1 keep-alive \
         connections held idle for {settle} s after one request each, over {IDLE_CONNS} (then each \
         serves a second request).\n\
         - Ratio: portcullis over the best of nginx and HAProxy (req/s: higher is better, the \
         rest: lower is better).\n\
         - Noise: CPU 1 was busy with other processes for up to {noise:.0} % of a run{}.\n",
        if noise > 5.0 {
            " (the machine was not quiet: the numbers are disturbed)"
        } else {
            ""
        }
    );
    println!(
        "| scenario | nginx | HAProxy | portcullis | direct | portcullis / best peer |\n|---|---|---|---|---|---|"
    );
    for (label, c, r) in &rows {
        println!(
            "| {label} | {} | {} | {} | {} | {r} |",
            c[0], c[1], c[2], c[3]
        );
    }
    println!(
        "\npeers bench took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    drop((pcx_tls, pcx, hap, ngx, upstream));
}
