//! The gateway under test: the real binary on an ephemeral port, its output collected line by
//! line, `portcullis check`, `[[keys]]` blocks, and its audit records read back as JSON.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::WAIT;
use super::pki::client;

// ---------------------------------------------------------------- lines from a child process

/// Lines a child wrote, collected by a reader thread; waiters are woken on each new line.
#[derive(Clone, Default)]
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    notify: Arc<Notify>,
    closed: Arc<Mutex<bool>>,
}

impl Lines {
    fn collect<R: std::io::Read + Send + 'static>(r: R) -> Lines {
        let l = Lines::default();
        let l2 = l.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                l2.lines.lock().unwrap().push(line);
                l2.notify.notify_waiters();
            }
            *l2.closed.lock().unwrap() = true;
            l2.notify.notify_waiters();
        });
        l
    }

    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// Waits until `pred` holds for the collected lines (bounded by `WAIT`).
    pub async fn wait_until<T>(&self, mut pred: impl FnMut(&[String]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = pred(&self.lines.lock().unwrap()) {
                return v;
            }
            if *self.closed.lock().unwrap() {
                // One last look: the closing line may have arrived with the close.
                if let Some(v) = pred(&self.lines.lock().unwrap()) {
                    return v;
                }
                panic!(
                    "stream closed before the awaited line; got:\n{}",
                    self.text()
                );
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for a line; got:\n{}", self.text());
            }
        }
    }
}

// ---------------------------------------------------------------- the gateway

pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub stdout: Lines,
    pub stderr: Lines,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_portcullis")
}

/// The `[server]` section with short, test-friendly timeouts; `extra` is appended inside it.
pub fn server_section(extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\nshutdown_grace = \"10s\"\n{extra}\n"
    )
}

impl Gateway {
    /// Starts the binary on `config` and waits for its `startup` event.
    pub async fn start(config: &str) -> Gateway {
        Self::start_with_env(config, &[]).await
    }

    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_full(config, env, false).await
    }

    /// `addr_from_stderr`: find the bound address in the diagnostic log (for runs whose audit
    /// log, and so the `startup` event, goes to a file).
    pub async fn start_full(config: &str, env: &[(&str, &str)], addr_from_stderr: bool) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("portcullis.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env("PORTCULLIS_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn gateway");
        let stdout = Lines::collect(child.stdout.take().unwrap());
        let stderr = Lines::collect(child.stderr.take().unwrap());
        let addr = if addr_from_stderr {
            stderr
                .wait_until(|lines| {
                    lines.iter().find_map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).ok()?;
                        let list = v["fields"]["listeners"].as_str()?;
                        list.trim_matches(|c| c == '[' || c == ']')
                            .split(',')
                            .next()?
                            .trim()
                            .parse()
                            .ok()
                    })
                })
                .await
        } else {
            stdout
                .wait_until(|lines| {
                    lines.iter().find_map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).ok()?;
                        (v["event"] == "startup")
                            .then(|| v["listeners"][0].as_str().unwrap().parse().unwrap())
                    })
                })
                .await
        };
        Gateway {
            child,
            addr,
            stdout,
            stderr,
            dir,
            config_path,
        }
    }

    /// The admin listener's address, from the `startup` event.
    pub fn admin_addr(&self) -> SocketAddr {
        self.events("startup")[0]["admin"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The admin listener's /metrics text (no token).
    pub async fn metrics_text(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin_addr()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Audit records of one event type, from stdout.
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.stdout
            .all()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits until `n` audit events of type `event` have been written.
    pub async fn wait_events(&self, event: &str, n: usize) -> Vec<serde_json::Value> {
        self.stdout
            .wait_until(|lines| {
                let found: Vec<serde_json::Value> = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["event"] == event)
                    .collect();
                (found.len() >= n).then_some(found)
            })
            .await
    }

    /// Replaces the config file (the next SIGHUP loads it).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    /// SIGHUP, then waits for the `reload` event it produces; returns that event.
    pub async fn reload(&self) -> serde_json::Value {
        let before = self.events("reload").len();
        self.signal("HUP");
        self.wait_events("reload", before + 1).await.pop().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub async fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(std::time::Instant::now() < deadline, "gateway did not exit");
            // Process exit has no async notification in std; poll at a short interval.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident set size of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Audit records with `event == "request"`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.stdout
            .all()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "request")
            .collect()
    }

    /// Waits for `n` request records.
    pub async fn wait_requests(&self, n: usize) -> Vec<serde_json::Value> {
        self.stdout
            .wait_until(|lines| {
                let recs: Vec<serde_json::Value> = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["event"] == "request")
                    .collect();
                (recs.len() >= n).then_some(recs)
            })
            .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `portcullis check` on a config text; returns (exit code, stdout, stderr).
pub fn check(config: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("check")
        .arg("--config")
        .arg(&path)
        .current_dir(dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------- keys

/// A `[[keys]]` block for `key` (hashed as the config stores it) plus `extra` lines.
pub fn key_block(id: &str, key: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nhash = \"{}\"\n{extra}\n",
        portcullis::keys::hash_string(key)
    )
}

// ---------------------------------------------------------------- an audit file

/// Waits (bounded) until the audit file at `path` holds `n` request records; returns them.
/// A file has no change notification in std, so it is re-read at a short interval.
pub async fn wait_file_records(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "request")
            .collect();
        if recs.len() >= n {
            return recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} records in {}:\n{text}",
            recs.len(),
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- configs

/// `server_section("")` and one keyless route, `api` on `/`, to `upstream_url`; `extra_route`
/// is appended inside the route.
pub fn open_route_config(upstream_url: &str, extra_route: &str) -> String {
    format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{upstream_url}\"\nauth = \"none\"\n{extra_route}",
        server_section("")
    )
}
