//! The audit log (SPEC §4): one JSON object per line, on stdout or an append-only 0600 file.
//!
//! Records go through a bounded queue to one writer task, so the request path never waits on
//! disk. The queue is lossless: when it is full, the record is handed to a task that waits for
//! room (backpressure), never dropped. Every value is JSON-escaped by serde, so a client's CR/LF,
//! quotes or control bytes stay inside their string and cannot forge a line.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::runtime::AuditOutput;

const QUEUE: usize = 16 * 1024;

enum Msg {
    Line(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    /// Records waiting for room in a full queue; `flush` waits for them first.
    overflow: tokio_util::task::TaskTracker,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Audit {
    /// Opens the output and starts the writer task.
    pub async fn start(output: &AuditOutput) -> std::io::Result<Audit> {
        let (tx, rx) = mpsc::channel(QUEUE);
        // A thread of its own rather than a task: tokio's file and stdout handles hop to the
        // blocking pool on every write, which cost a thread switch per flush on the request path's
        // core (measured: about a third of the gateway's throughput).
        let spawn = |f: Box<dyn std::io::Write + Send>| {
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || writer(f, rx))
                .map(|_| ())
        };
        match output {
            AuditOutput::Stdout => spawn(Box::new(std::io::stdout()))?,
            AuditOutput::File(path) => spawn(Box::new(open_append(path)?))?,
        }
        Ok(Audit {
            tx,
            overflow: tokio_util::task::TaskTracker::new(),
        })
    }

    /// Queues one event record (startup, reload, lockout, shutdown). Never blocks and never drops:
    /// a full queue hands the record to a task. Request records use a reserved [`Slot`] instead,
    /// so these overflow tasks stay few (lockouts and reloads are rare by construction).
    pub fn emit<T: Serialize>(&self, record: &T) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "audit record could not be serialized");
                return;
            }
        };
        line.push(b'\n');
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let tx = self.tx.clone();
                self.overflow.spawn(async move {
                    let _ = tx.send(msg).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer has stopped; record lost");
            }
        }
    }

    /// A guaranteed place in the queue for one record. Requests take one before they are
    /// processed, so their record can always be written without waiting or dropping: when the
    /// writer falls behind, new requests wait here (backpressure) and memory stays bounded.
    pub async fn reserve(&self) -> Option<Slot> {
        self.tx.clone().reserve_owned().await.ok().map(Slot)
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

fn writer(out: Box<dyn std::io::Write + Send>, mut rx: mpsc::Receiver<Msg>) {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Some(msg) = rx.blocking_recv() {
        let result = match msg {
            Msg::Line(l) => out.write_all(&l),
            Msg::Flush(ack) => {
                let r = out.flush();
                let _ = ack.send(());
                r
            }
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

/// A reserved place in the audit queue (see [`Audit::reserve`]).
pub struct Slot(mpsc::OwnedPermit<Msg>);

/// The `request` record (SPEC §4), completed and written when the response body ends.
#[derive(Serialize)]
pub struct RequestRecord {
    pub ts: String,
    pub event: &'static str,
    pub request_id: String,
    pub client_ip: IpAddr,
    pub method: std::borrow::Cow<'static, str>,
    pub path: String,
    pub route: Option<String>,
    pub key_id: Option<String>,
    pub status: u16,
    pub outcome: &'static str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
    pub user_agent: Option<String>,
    /// SPEC §7: model, tokens, cost and their sources, on `llm` routes only.
    #[serde(flatten)]
    pub llm: Option<crate::llm::usage::LlmRecord>,
}

/// Writes its record when dropped: the end of the response body, whichever way it ended.
pub struct RecordGuard {
    pub audit: Audit,
    pub slot: Option<Slot>,
    /// On `llm` routes: the model asked for, where the response's usage lands, and the metrics
    /// label for the model (bounded).
    pub llm: Option<crate::llm::usage::LlmAudit>,
    /// The usage ledger, when `usage.database` is set: `llm` records also become ledger rows.
    pub ledger: Option<crate::llm::ledger::Ledger>,
    /// The route's request series (none when no route matched).
    pub metrics: Option<Arc<crate::metrics::RouteMetrics>>,
    pub record: RequestRecord,
    pub start: Instant,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        self.record.ts = now_rfc3339();
        self.record.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.record.bytes_out = self.bytes_out.load(Ordering::Relaxed);
        if let Some(llm) = self.llm.take() {
            let usage = llm.usage.lock().ok().and_then(|u| *u);
            let rec = crate::llm::usage::LlmRecord::new(llm.model, usage, llm.price);
            if let Some(u) = usage {
                crate::metrics::llm_usage(
                    self.record.route.as_deref().unwrap_or("none"),
                    self.record.key_id.as_deref().unwrap_or("none"),
                    llm.label,
                    &u,
                    rec.cost_usd,
                );
            }
            // What the request counts against budgets: its usage; without usage, its
            // reservation when the upstream answered 2xx (so an upstream that stops reporting
            // usage cannot bypass a budget); nothing when no upstream answer was produced.
            let charged = match (&usage, &llm.reservation) {
                (Some(u), _) => crate::llm::budget::Amount {
                    tokens: (u.prompt_tokens + u.completion_tokens) as f64,
                    cost: rec.cost_usd.unwrap_or(0.0),
                },
                (None, Some(r))
                    if self.record.upstream_ms.is_some()
                        && (200..300).contains(&self.record.status) =>
                {
                    r.amount()
                }
                _ => crate::llm::budget::Amount::default(),
            };
            if let Some(r) = llm.reservation {
                let events = r.settle(charged, crate::llm::budget::now_secs());
                for e in &events {
                    self.audit.emit(e);
                }
            }
            if let (Some(ledger), Some(route)) = (&self.ledger, &self.record.route) {
                ledger.record(crate::llm::ledger::Row {
                    ts_ms: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0),
                    request_id: self.record.request_id.clone(),
                    key_id: self.record.key_id.clone(),
                    route: route.clone(),
                    model: rec.model.clone(),
                    prompt_tokens: rec.prompt_tokens,
                    completion_tokens: rec.completion_tokens,
                    cost_usd: rec.cost_usd,
                    usage_source: rec.usage_source,
                    charged_tokens: charged.tokens as u64,
                    charged_cost: charged.cost,
                });
            }
            self.record.llm = Some(rec);
        }
        let elapsed = self.start.elapsed();
        self.record.duration_ms = ms(elapsed);
        match (&self.metrics, &self.record.route) {
            (Some(m), Some(route)) => m.request(route, self.record.outcome, elapsed),
            _ => {
                crate::metrics::request(self.record.route.as_deref(), self.record.outcome, elapsed)
            }
        }
        // Sized for a typical record up front: growing from empty costs half a dozen reallocs.
        let mut line = Vec::with_capacity(512);
        match (
            self.slot.take(),
            serde_json::to_writer(&mut line, &self.record),
        ) {
            (Some(Slot(permit)), Ok(())) => {
                line.push(b'\n');
                permit.send(Msg::Line(line));
            }
            _ => self.audit.emit(&self.record),
        }
    }
}

pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

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

#[derive(Serialize)]
pub struct Simple {
    pub ts: String,
    pub event: &'static str,
}
