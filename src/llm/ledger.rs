//! The usage ledger (SPEC §7 "Ledger"): one SQLite row per `llm` request, written by one thread
//! in batched transactions, never on the request's path. The file is created 0600, runs in WAL
//! mode (so `portcullis usage` can read while the gateway writes), and carries an application id
//! and schema version: a file that is not a portcullis ledger, or one from a newer version, is
//! refused at startup with an error naming it. If a write fails, traffic continues; the failure
//! is logged and counted.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, params};

/// "PCXU" — set with PRAGMA application_id so a foreign SQLite file is recognised as such.
const APPLICATION_ID: i64 = 0x5043_5855;
/// 1: the first ledger; 2 adds what each row charged against budgets (a reservation, when the
/// response carried no usage); 3 adds the key's user (SPEC §8 `user_header`). Older files are
/// migrated in place.
const SCHEMA_VERSION: i64 = 3;
const QUEUE: usize = 65_536;

pub struct Row {
    pub ts_ms: i64,
    pub request_id: String,
    pub key_id: Option<String>,
    /// The key's user (its `user_header`), when it names one.
    pub user: Option<String>,
    pub route: String,
    pub model: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub usage_source: &'static str,
    /// What the row counted against budgets: its usage, or its reservation when it had none.
    pub charged_tokens: u64,
    pub charged_cost: f64,
}

enum Msg {
    Row(Row),
    Flush(std::sync::mpsc::Sender<()>),
}

#[derive(Clone)]
pub struct Ledger {
    tx: SyncSender<Msg>,
}

fn err(path: &Path, what: impl std::fmt::Display) -> String {
    format!("usage.database {}: {what}", path.display())
}

/// What an existing SQLite file is, as far as the ledger is concerned.
enum Kind {
    /// No tables and no application id: a new file, ready to be made a ledger.
    Empty,
    /// A ledger of this schema version, or an older one that can be upgraded.
    Ledger(i64),
}

/// Reads what `conn` holds; `Err` when it is not SQLite, not a portcullis ledger, or from a
/// newer portcullis.
fn kind(conn: &Connection, path: &Path) -> Result<Kind, String> {
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| err(path, format!("not a SQLite database ({e})")))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| err(path, e))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| err(path, format!("not a SQLite database ({e})")))?;
    if app == 0 && tables == 0 {
        Ok(Kind::Empty)
    } else if app != APPLICATION_ID {
        Err(err(path, "is not a portcullis usage ledger"))
    } else if version > SCHEMA_VERSION {
        Err(err(
            path,
            format!("was written by a newer portcullis (schema {version})"),
        ))
    } else {
        Ok(Kind::Ledger(version))
    }
}

/// What `portcullis check` verifies: an existing file at `path` is a ledger `run` would accept
/// (opened read-only: nothing is created, migrated or locked). A missing file is fine; `run`
/// creates it.
pub fn verify(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| err(path, e))?;
    kind(&conn, path).map(|_| ())
}

/// Opens (creating if missing) and checks the ledger at `path`.
pub fn open(path: &Path) -> Result<Connection, String> {
    if !path.exists() {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        o.open(path).map_err(|e| err(path, e))?;
    }
    let conn = Connection::open(path).map_err(|e| err(path, e))?;
    match kind(&conn, path)? {
        Kind::Empty => conn
            .execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {SCHEMA_VERSION};
                 CREATE TABLE usage (
                   ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL, key_id TEXT, route TEXT NOT NULL,
                   model TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL,
                   usage_source TEXT NOT NULL, charged_tokens INTEGER, charged_cost REAL,
                   user TEXT);
                 CREATE INDEX usage_ts ON usage (ts_ms);"
            ))
            .map_err(|e| err(path, e))?,
        Kind::Ledger(v) if v < SCHEMA_VERSION => {
            let mut steps = String::from("BEGIN;");
            if v < 2 {
                steps.push_str(
                    "ALTER TABLE usage ADD COLUMN charged_tokens INTEGER;
                     ALTER TABLE usage ADD COLUMN charged_cost REAL;",
                );
            }
            steps.push_str("ALTER TABLE usage ADD COLUMN user TEXT;");
            steps.push_str(&format!("PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"));
            conn.execute_batch(&steps)
                .map_err(|e| err(path, format!("upgrading the schema: {e}")))?
        }
        Kind::Ledger(_) => {}
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| err(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| err(path, e))?;
    Ok(conn)
}

impl Ledger {
    /// Starts the writer thread on an opened ledger; rows older than `retention` are pruned at
    /// start and every hour.
    pub fn start(conn: Connection, path: PathBuf, retention: Duration) -> Ledger {
        let (tx, rx) = sync_channel(QUEUE);
        let _ = std::thread::Builder::new()
            .name("usage-ledger".into())
            .spawn(move || writer(conn, path, rx, retention));
        Ledger { tx }
    }

    /// Queues a row; never blocks the request. A full queue (the disk far behind) is logged and
    /// counted rather than stalling traffic.
    pub fn record(&self, row: Row) {
        match self.tx.try_send(Msg::Row(row)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                crate::metrics::ledger_error();
                tracing::error!("usage ledger queue full or closed; row not written");
            }
        }
    }
}

impl Ledger {
    /// Blocks until every row queued so far is committed (shutdown).
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn prune(conn: &Connection, retention: Duration) {
    let cutoff = now_ms() - retention.as_millis() as i64;
    if let Err(e) = conn.execute("DELETE FROM usage WHERE ts_ms < ?1", params![cutoff]) {
        tracing::error!(error = %e, "usage ledger pruning failed");
    }
}

fn writer(mut conn: Connection, path: PathBuf, rx: Receiver<Msg>, retention: Duration) {
    prune(&conn, retention);
    let mut last_prune = std::time::Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Row(r) => batch.push(r),
                Msg::Flush(ack) => acks.push(ack),
            }
            if batch.len() < 1000 {
                next = rx.try_recv().ok();
            }
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO usage (ts_ms, request_id, key_id, route, model, prompt_tokens,
                     completion_tokens, cost_usd, usage_source, charged_tokens, charged_cost, user)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )?;
                for r in &batch {
                    stmt.execute(params![
                        r.ts_ms,
                        r.request_id,
                        r.key_id,
                        r.route,
                        r.model,
                        r.prompt_tokens.map(|v| v as i64),
                        r.completion_tokens.map(|v| v as i64),
                        r.cost_usd,
                        r.usage_source,
                        r.charged_tokens as i64,
                        r.charged_cost,
                        r.user
                    ])?;
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            crate::metrics::ledger_error();
            tracing::error!(error = %e, file = %path.display(), rows = batch.len(), "usage ledger write failed");
        }
        for ack in acks {
            let _ = ack.send(());
        }
        if last_prune.elapsed() > Duration::from_secs(3600) {
            prune(&conn, retention);
            last_prune = std::time::Instant::now();
        }
    }
}

/// One group of `portcullis usage`.
#[derive(Debug, serde::Serialize)]
pub struct Total {
    #[serde(skip)]
    pub group: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

/// How `portcullis usage` groups the ledger's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    Key,
    Model,
    Day,
    /// The key's user (`user_header`); `-` for requests without one.
    User,
}

impl GroupBy {
    /// The group's field in the output (`--json` objects, the table's first column).
    pub fn field(self) -> &'static str {
        match self {
            GroupBy::Key => "key_id",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
            GroupBy::User => "user",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            GroupBy::Key => "COALESCE(key_id, '-')",
            GroupBy::Model => "COALESCE(model, '-')",
            GroupBy::Day => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
            GroupBy::User => "COALESCE(user, '-')",
        }
    }
}

/// Totals since `since_ms`, grouped `by` key, model or day. Opens the file read-only, so it works
/// while the gateway writes.
pub fn totals(path: &Path, since_ms: i64, by: GroupBy) -> Result<Vec<Total>, String> {
    read_totals(path, since_ms, by, &|e| err(path, e))
}

/// A ledger [`totals_of`] was given again (by the same or another path), and did not count twice.
pub struct Repeat {
    /// The name given again.
    pub given: PathBuf,
    /// The earlier name of the same file, the one that was read.
    pub first: PathBuf,
}

/// The totals of several ledgers (`portcullis usage --database A --database B`, one per
/// instance) added up: a group's requests, tokens and cost are summed across the files, sorted
/// as [`totals`] sorts one. Each file is read as [`totals`] reads it (read-only, any schema
/// version); a file that is missing or not a ledger is an error naming it, never skipped. A file
/// named twice (the same canonical path) is read once, and returned in the second list so that
/// the caller can say so.
pub fn totals_of(
    paths: &[PathBuf],
    since_ms: i64,
    by: GroupBy,
) -> Result<(Vec<Total>, Vec<Repeat>), String> {
    let flag_err =
        |path: &Path, e: &dyn std::fmt::Display| format!("--database {}: {e}", path.display());
    let mut seen: Vec<(PathBuf, &PathBuf)> = Vec::new();
    let mut repeated = Vec::new();
    let mut sums: std::collections::BTreeMap<String, Total> = std::collections::BTreeMap::new();
    for path in paths {
        let canonical = std::fs::canonicalize(path).map_err(|e| flag_err(path, &e))?;
        if let Some((_, first)) = seen.iter().find(|(c, _)| *c == canonical) {
            repeated.push(Repeat {
                given: path.clone(),
                first: (*first).clone(),
            });
            continue;
        }
        seen.push((canonical, path));
        for t in read_totals(path, since_ms, by, &|e| flag_err(path, &e))? {
            let sum = sums.entry(t.group.clone()).or_insert(Total {
                group: t.group,
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_usd: 0.0,
            });
            sum.requests += t.requests;
            sum.prompt_tokens += t.prompt_tokens;
            sum.completion_tokens += t.completion_tokens;
            sum.cost_usd = super::budget::round_usd(sum.cost_usd + t.cost_usd);
        }
    }
    // A BTreeMap orders its strings by bytes, as SQLite's `ORDER BY` does with its default
    // (BINARY) collation.
    Ok((sums.into_values().collect(), repeated))
}

fn read_totals(
    path: &Path,
    since_ms: i64,
    by: GroupBy,
    err: &dyn Fn(&dyn std::fmt::Display) -> String,
) -> Result<Vec<Total>, String> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| err(&e))?;
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| err(&e))?;
    if app != APPLICATION_ID {
        return Err(err(&"is not a portcullis usage ledger"));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| err(&e))?;
    // A file the gateway has not upgraded yet (read-only here) has no users.
    let group = if by == GroupBy::User && version < 3 {
        "'-'"
    } else {
        by.sql()
    };
    let sql = format!(
        "SELECT {group} AS g, count(*), COALESCE(sum(prompt_tokens), 0), COALESCE(sum(completion_tokens), 0),
         COALESCE(sum(cost_usd), 0.0) FROM usage WHERE ts_ms >= ?1 GROUP BY g ORDER BY g"
    );
    let mut stmt = conn.prepare(&sql).map_err(|e| err(&e))?;
    let rows = stmt
        .query_map(params![since_ms], |r| {
            Ok(Total {
                group: r.get(0)?,
                requests: r.get::<_, i64>(1)? as u64,
                prompt_tokens: r.get::<_, i64>(2)? as u64,
                completion_tokens: r.get::<_, i64>(3)? as u64,
                cost_usd: super::budget::round_usd(r.get(4)?),
            })
        })
        .map_err(|e| err(&e))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))
}

/// The spend of the current UTC day, week and month per key (`None`: requests without a key) and
/// user, for rebuilding the budget book at startup. Rows from before schema 2 count their usage.
pub fn period_totals(
    conn: &Connection,
    now: i64,
) -> rusqlite::Result<Vec<super::budget::PeriodTotal>> {
    use super::budget::{Amount, PERIODS};
    let starts: Vec<i64> = PERIODS.iter().map(|p| p.bounds(now).0 * 1000).collect();
    let since = starts.iter().copied().min().unwrap_or(0);
    let tokens =
        "COALESCE(charged_tokens, COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0))";
    let cost = "COALESCE(charged_cost, cost_usd, 0.0)";
    let mut cols = String::new();
    for i in 0..starts.len() {
        let at = i + 1;
        cols.push_str(&format!(
            ", COALESCE(sum(CASE WHEN ts_ms >= ?{at} THEN {tokens} END), 0), \
             COALESCE(sum(CASE WHEN ts_ms >= ?{at} THEN {cost} END), 0.0)"
        ));
    }
    let sql =
        format!("SELECT key_id, user{cols} FROM usage WHERE ts_ms >= ?4 GROUP BY key_id, user");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![starts[0], starts[1], starts[2], since], |r| {
        let key: Option<String> = r.get(0)?;
        let user: Option<String> = r.get(1)?;
        let mut out = Vec::new();
        for (i, p) in PERIODS.iter().enumerate() {
            let t: i64 = r.get(2 + 2 * i)?;
            let c: f64 = r.get(3 + 2 * i)?;
            out.push((
                key.clone(),
                user.clone(),
                *p,
                Amount {
                    tokens: t as f64,
                    cost: c,
                },
            ));
        }
        Ok(out)
    })?;
    let mut all = Vec::new();
    for r in rows {
        all.extend(r?);
    }
    Ok(all)
}
