//! A real `redis-server` (Debian's package) on a loopback port, for the `[cluster]` tests. The
//! server is this test's own child: started with no persistence in a temporary directory,
//! stopped (SIGKILL, by PID) when dropped. Without redis-server the tests that need it skip,
//! unless `PORTCULLIS_REDIS_TESTS=1` (set by `.ci/run`) makes that a failure.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// Whether the Redis tests can run here; panics where they must (CI) and cannot.
pub fn redis_available() -> bool {
    let present = std::path::Path::new(REDIS_SERVER).exists();
    if !present && std::env::var("PORTCULLIS_REDIS_TESTS").as_deref() == Ok("1") {
        panic!(
            "PORTCULLIS_REDIS_TESTS=1 but {REDIS_SERVER} is missing (apt-get install redis-server)"
        );
    }
    if !present {
        eprintln!("skipped: {REDIS_SERVER} is not installed");
    }
    present
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
}

impl Redis {
    /// A fresh server on a free loopback port, answering PING.
    pub fn start() -> Redis {
        Self::start_inner(None)
    }

    /// A server that asks for `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> Redis {
        Self::start_inner(Some(password.to_owned()))
    }

    fn start_inner(password: Option<String>) -> Redis {
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut r = Redis {
                child: None,
                port,
                dir: tempfile::tempdir().unwrap(),
                password: password.clone(),
            };
            if r.spawn() {
                return r;
            }
            // The port was taken between the probe and the bind: another one.
        }
        panic!("redis-server found no free port");
    }

    /// Starts (or restarts) the server on its port; false if it exited before answering.
    fn spawn(&mut self) -> bool {
        let child = Command::new(REDIS_SERVER)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(
                self.password
                    .iter()
                    .flat_map(|p| ["--requirepass", p.as_str()]),
            )
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + super::WAIT;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && c.try_wait().unwrap().is_some()
            {
                self.child = None;
                return false;
            }
            if self.command(&["PING"]).is_some_and(|r| r.contains("+PONG")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20)); // polling readiness: no event to wait on
        }
        panic!(
            "redis-server on port {} did not answer within {:?}",
            self.port,
            super::WAIT
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL: a crash, not a shutdown) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: nothing was persisted).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// One command in RESP, its raw answer (`None`: no connection).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        super::resp::command(self.addr(), self.password.as_deref(), args)
    }

    /// Every key (KEYS *: fine for a test's own small server).
    pub fn keys(&self) -> Vec<String> {
        let raw = self.command(&["KEYS", "*"]).unwrap_or_default();
        let mut lines = raw.split("\r\n");
        let mut out = Vec::new();
        while let Some(l) = lines.next() {
            if l.starts_with('$')
                && let Some(k) = lines.next()
            {
                out.push(k.to_owned());
            }
        }
        out
    }

    /// A key's TTL in milliseconds (-1: none, -2: no such key).
    pub fn pttl(&self, key: &str) -> i64 {
        let raw = self.command(&["PTTL", key]).unwrap_or_default();
        raw.split("\r\n")
            .find_map(|l| l.strip_prefix(':'))
            .and_then(|n| n.parse().ok())
            .unwrap_or(-3)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The key prefix the `[cluster]` tests configure.
pub const REDIS_PREFIX: &str = "pcx-test:";

impl Redis {
    /// The tokens a budget scope (`k:<key id>`, `u:<key id>:<user>`, `*`) has spent today, as
    /// this Redis holds them (0 when it holds nothing).
    pub fn day_tokens(&self, scope: &str) -> f64 {
        let now = portcullis::clock::now_secs();
        let start = portcullis::llm::budget::Period::Day.bounds(now).0;
        let key = format!("{REDIS_PREFIX}b:{scope}:0:{start}");
        let raw = self.command(&["HGET", &key, "t"]).unwrap_or_default();
        raw.split("\r\n")
            .find_map(|l| l.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (bounded) until `scope` has spent exactly `want` tokens today. Polling: a charge
    /// settles in Redis off the request's path, with no event a test can wait on.
    pub async fn wait_day_tokens(&self, scope: &str, want: f64) {
        let start = Instant::now();
        while self.day_tokens(scope) != want {
            assert!(
                start.elapsed() < super::WAIT,
                "{scope} spent {} in Redis, want {want}",
                self.day_tokens(scope)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
