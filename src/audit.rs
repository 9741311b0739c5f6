//! The audit log (SPEC §4): one JSON object per line, on stdout or an append-only 0600 file.
//!
//! Records go through a bounded queue to one writer task, so the request path never waits on
//! disk. The queue is lossless: when it is full, the record is handed to a task that waits for
//! room (backpressure), never dropped. Every value is JSON-escaped by serde, so a client's CR/LF,
//! quotes or control bytes stay inside their string and cannot forge a line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

enum Msg {
    Line(Vec<u8>),
    Flush(oneshot::Sender<()>),
    /// SIGUSR1: start a new file at the configured path (see [`Audit::reopen`]).
    Reopen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
}

/// `[audit]`: where records go, and how many may wait for the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub output: AuditOutput,
    /// Records queued for the writer at most; while it is full, new requests wait.
    pub queue: usize,
}

#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    /// Records waiting for room in a full queue; `flush` waits for them first.
    overflow: tokio_util::task::TaskTracker,
    /// The runtime those waits run on: the one that started the audit (the main thread's, which
    /// outlives the workers), not the worker's that wrote the record: a worker's runtime is
    /// dropped at shutdown before the final flush, and its waiting records with it.
    rt: tokio::runtime::Handle,
}

impl Audit {
    /// Opens the output and starts the writer task.
    pub async fn start(settings: &AuditSettings) -> std::io::Result<Audit> {
        let (tx, rx) = mpsc::channel(settings.queue);
        // A thread of its own rather than a task: tokio's file and stdout handles hop to the
        // blocking pool on every write, which cost a thread switch per flush on the request path's
        // core (measured: about a third of the gateway's throughput).
        let out: Box<dyn std::io::Write + Send> = match &settings.output {
            AuditOutput::Stdout => Box::new(std::io::stdout()),
            AuditOutput::File(path) => Box::new(open_append(path)?),
        };
        let path = match &settings.output {
            AuditOutput::Stdout => None,
            AuditOutput::File(path) => Some(path.clone()),
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(out, path, rx))?;
        Ok(Audit {
            tx,
            overflow: tokio_util::task::TaskTracker::new(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// Queues one record (a request, or an event: startup, reload, lockout, budget, shutdown).
    pub fn emit<T: Serialize>(&self, record: &T) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "audit record could not be serialized");
                return;
            }
        };
        line.push(b'\n');
        self.emit_line(line);
    }

    /// SIGUSR1 (logrotate's `postrotate`, nginx's convention): records queued so far go to the
    /// current file, every later one to a new file created at the configured path, which starts
    /// with a `reopen` event. If the new file cannot be opened, writing goes on to the old one and
    /// the failure is logged. Nothing is lost either way: the queue is ordered, and the writer
    /// switches files between two records.
    pub fn reopen(&self) {
        self.send(Msg::Reopen);
    }

    /// Queues one serialized line (ending in a newline). Never blocks and never drops: a full
    /// queue hands the line to a task that waits for room. The callers are bounded (records of
    /// requests in flight, which connection and stream limits bound; and rare events).
    pub fn emit_line(&self, line: Vec<u8>) {
        self.send(Msg::Line(line));
    }

    fn send(&self, msg: Msg) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let tx = self.tx.clone();
                self.overflow.spawn_on(
                    async move {
                        let _ = tx.send(msg).await;
                    },
                    &self.rt,
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer has stopped; record lost");
            }
        }
    }

    /// Waits until the queue has room (backpressure on new requests when the writer falls
    /// behind). Nothing is held afterwards: a request takes its place in the queue only when its
    /// record is ready (SPEC §3.4 "Slow readers"), so a client that stalls, or an upstream that
    /// never answers, cannot pin a queue slot for its whole life.
    pub async fn wait_for_room(&self) {
        if self.is_full() {
            drop(self.tx.reserve().await);
        }
    }

    /// The queue is full: the writer is behind.
    pub fn is_full(&self) -> bool {
        self.tx.capacity() == 0
    }

    /// Waits until everything queued so far is written, overflow included.
    pub async fn flush(&self) {
        self.overflow.close();
        self.overflow.wait().await;
        self.overflow.reopen();
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

fn writer(out: Box<dyn std::io::Write + Send>, path: Option<PathBuf>, mut rx: mpsc::Receiver<Msg>) {
    use std::io::Write;
    let buffered = |o| std::io::BufWriter::with_capacity(64 * 1024, o);
    let mut out = buffered(out);
    while let Some(msg) = rx.blocking_recv() {
        let result = match msg {
            Msg::Line(l) => out.write_all(&l),
            Msg::Flush(ack) => {
                let r = out.flush();
                let _ = ack.send(());
                r
            }
            Msg::Reopen => match &path {
                None => {
                    tracing::info!("audit output is stdout: nothing to reopen");
                    Ok(())
                }
                Some(path) => match open_append(path) {
                    Ok(new) => {
                        // Everything queued before the signal ends in the old file.
                        if let Err(e) = out.flush() {
                            tracing::error!(error = %e, "audit log write failed");
                        }
                        out = buffered(Box::new(new));
                        let mut line = serde_json::to_vec(&Simple {
                            ts: crate::clock::now_rfc3339(),
                            event: "reopen",
                        })
                        .unwrap_or_default();
                        line.push(b'\n');
                        out.write_all(&line)
                    }
                    Err(e) => {
                        tracing::error!(
                            file = %path.display(),
                            error = %e,
                            "audit reopen failed; still writing to the old file"
                        );
                        Ok(())
                    }
                },
            },
        };
        // Flush whenever the queue is drained, then rest a moment: lines reach the file within a
        // few milliseconds, and under load they go out in batches, not a write per record.
        let result = match result {
            Ok(()) if rx.is_empty() => {
                let r = out.flush();
                std::thread::sleep(std::time::Duration::from_millis(2));
                r
            }
            r => r,
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
    let _ = out.flush();
}

// ---------------------------------------------------------------- the events (SPEC §4, §7)
//
// Every audit event has its type here, so the log's vocabulary is in one place. The `request`
// record is `pipeline/record.rs`'s, which alone knows how a request ended.

/// `startup`: the version, the real bound addresses, the routes and the key count.
#[derive(Serialize)]
pub struct Startup<'a> {
    pub ts: String,
    pub event: &'static str,
    pub version: &'static str,
    pub listeners: Vec<SocketAddr>,
    pub tls: bool,
    pub admin: Option<SocketAddr>,
    pub routes: Vec<&'a str>,
    pub key_count: usize,
}

/// An event with no fields of its own: `shutdown`.
#[derive(Serialize)]
pub struct Simple {
    pub ts: String,
    pub event: &'static str,
}

/// `reload`: `ok`, or `failed` with the reason (the old config keeps serving).
#[derive(Serialize)]
pub struct Reload<'a> {
    pub ts: String,
    pub event: &'static str,
    pub result: &'static str,
    pub reason: Option<&'a str>,
    /// The keys of the config serving after the reload (the new one, or the old one kept).
    pub key_count: usize,
}

/// `lockout`: a client IP locked out after `failures` failed key checks, until `until`.
#[derive(Serialize)]
pub struct Lockout {
    pub ts: String,
    pub event: &'static str,
    pub client_ip: std::net::IpAddr,
    pub failures: u32,
    pub until: String,
}

/// `budget` (SPEC §7): a charge carried a cap's spend across 80 % or 100 %.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetEvent {
    pub ts: String,
    pub event: &'static str,
    pub key_id: Option<String>,
    /// The key's user, for a `user_budget` cap (SPEC §8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub period: &'static str,
    pub unit: &'static str,
    pub spent: f64,
    pub limit: f64,
    pub threshold: u8,
}
