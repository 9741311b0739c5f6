//! SPEC §7 ledger: one row per `llm` request in a 0600 SQLite file, `portcullis usage` totals
//! equal the upstream's reported usage, and a file that is not a ledger stops startup.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::process::Command;

use futures_util::StreamExt;
use support::*;

const A: &str = "pcx_ledger-key-a-0123456789abcdefghijklmnopqrs";
const B: &str = "pcx_ledger-key-b-0123456789abcdefghijklmnopqrs";

fn config(up: &Upstream, db: &std::path::Path) -> String {
    format!(
        "{}[limits]\nper_ip = \"off\"\nper_key = \"off\"\n[usage]\ndatabase = \"{}\"\n{}{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        db.display(),
        key_block("a", A, ""),
        key_block("b", B, ""),
        up.url()
    )
}

fn usage_json(config_path: &std::path::Path, by: &str) -> Vec<serde_json::Value> {
    let out = Command::new(bin())
        .args(["usage", "--json", "--by", by, "--config"])
        .arg(config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_equal_the_upstreams_reported_usage() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let mut gw = Gateway::start(&config(&up, &db)).await;
    // 1,000 requests from 20 concurrent clients, half with each key; each answer reports
    // 11 prompt and 5 completion tokens.
    let url = gw.url("/v1/chat/completions");
    let statuses: Vec<u16> = futures_util::stream::iter(0..1000)
        .map(|i| {
            let url = url.clone();
            async move {
                let key = if i % 2 == 0 { A } else { B };
                client()
                    .post(&url)
                    .bearer_auth(key)
                    .body(r#"{"model":"openai/gpt-4o-mini","messages":[]}"#)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(20)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200));
    gw.wait_requests(1000).await;
    // It reads while the gateway runs.
    let _ = usage_json(&gw.config_path, "key");
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);

    let by_key = usage_json(&gw.config_path, "key");
    assert_eq!(by_key.len(), 2, "{by_key:?}");
    for (row, id) in by_key.iter().zip(["a", "b"]) {
        assert_eq!(row["key_id"], id);
        assert_eq!(row["requests"], 500);
        assert_eq!(row["prompt_tokens"], 500 * 11);
        assert_eq!(row["completion_tokens"], 500 * 5);
    }
    let by_model = usage_json(&gw.config_path, "model");
    assert_eq!(by_model[0]["model"], "openai/gpt-4o-mini");
    assert_eq!(by_model[0]["requests"], 1000);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[tokio::test]
async fn a_sqlite_file_that_is_not_a_ledger_stops_startup() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    drop(conn);
    let cfg_path = dir.path().join("portcullis.toml");
    std::fs::write(&cfg_path, config(&up, &db)).unwrap();
    let out = Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("other.db") && err.contains("not a portcullis usage ledger"),
        "{err}"
    );
    // `check` says so too, for a foreign SQLite file and for a file that is not SQLite at all,
    // and leaves both as they were.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text, not a database\n".repeat(200)).unwrap();
    for (file, why) in [
        (&db, "not a portcullis usage ledger"),
        (&text, "not a SQLite database"),
    ] {
        let before = std::fs::read(file).unwrap();
        let (code, _, err) = check(&config(&up, file), &[]);
        assert_eq!(code, 1, "{}: {err}", file.display());
        assert!(err.contains(why), "{err}");
        assert_eq!(
            std::fs::read(file).unwrap(),
            before,
            "check changed the file"
        );
    }
    // A missing ledger is fine (run creates it), and check does not create it.
    let missing = dir.path().join("new.db");
    let (code, _, err) = check(&config(&up, &missing), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!missing.exists());
}

#[tokio::test]
async fn usage_reads_the_ledger_without_secrets_it_does_not_need() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    drop(rusqlite::Connection::open(&db).unwrap());
    // An empty SQLite file is made a ledger by `run`; `usage` needs one that is already a ledger.
    let gw = Gateway::start(&config(&up, &db)).await;
    drop(gw);
    // The upstream's API key is a secret `usage` has no use for: it need not be set.
    let with_secret = config(&up, &db).replace(
        "llm = true\n",
        "llm = true\n[routes.upstream_headers]\nauthorization = \"Bearer ${OPENROUTER_API_KEY}\"\n",
    );
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, &with_secret).unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&path)
            .env_remove("OPENROUTER_API_KEY")
            .env_remove("DB_PATH")
            .output()
            .unwrap()
    };
    let out = run(&["usage"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("key_id"));
    // `check` still resolves everything.
    let out = run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPENROUTER_API_KEY"));
    // What `usage` does read must resolve.
    let db_from_env = with_secret.replace(&db.display().to_string(), "${DB_PATH}");
    std::fs::write(&path, db_from_env).unwrap();
    let out = run(&["usage"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("usage.database") && err.contains("DB_PATH"),
        "{err}"
    );
}

/// `portcullis usage` with `args` and no config anywhere (`PORTCULLIS_CONFIG` names a file that
/// does not exist, so a read of it would fail): (exit code, stdout, stderr).
fn usage_without_config(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("usage")
        .args(args)
        .env("PORTCULLIS_CONFIG", "/nonexistent/portcullis.toml")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `--database` once for each of `dbs`, then `extra`.
fn database_args<'a>(
    dbs: &'a [&'a std::path::Path],
    extra: &'a [&'a str],
) -> Vec<&'a std::ffi::OsStr> {
    let mut args: Vec<&std::ffi::OsStr> = Vec::new();
    for db in dbs {
        args.push("--database".as_ref());
        args.push(db.as_os_str());
    }
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts one `usage --json` row exactly: group, requests, tokens, cost.
fn assert_row(row: &serde_json::Value, field: &str, want: (&str, u64, u64, u64, f64)) {
    let (group, requests, prompt, completion, cost) = want;
    assert_eq!(row[field], group, "{row}");
    assert_eq!(row["requests"], requests, "{row}");
    assert_eq!(row["prompt_tokens"], prompt, "{row}");
    assert_eq!(row["completion_tokens"], completion, "{row}");
    assert_eq!(row["cost_usd"].as_f64(), Some(cost), "{row}");
    assert_eq!(row.as_object().unwrap().len(), 5, "{row}");
}

/// A ledger as the first schema wrote it (no charged_*, no user), with rows of now.
fn schema_1_ledger(path: &std::path::Path, rows: &[(Option<&str>, i64, i64, Option<f64>)]) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA application_id = 1346590805; PRAGMA user_version = 1;
         CREATE TABLE usage (
           ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL, key_id TEXT, route TEXT NOT NULL,
           model TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL,
           usage_source TEXT NOT NULL);
         CREATE INDEX usage_ts ON usage (ts_ms);",
    )
    .unwrap();
    let now = portcullis::clock::now_secs() * 1000;
    for (i, (key, prompt, completion, cost)) in rows.iter().enumerate() {
        conn.execute(
            "INSERT INTO usage VALUES (?1, ?2, ?3, 'bridge', 'old-model', ?4, ?5, ?6, 'upstream')",
            rusqlite::params![now, format!("old-{i}"), key, prompt, completion, cost],
        )
        .unwrap();
    }
}

/// A current ledger written by the gateway's own writer, one row per (key, prompt, completion,
/// cost), all of now.
fn written_ledger(path: &std::path::Path, rows: &[(&str, u64, u64, f64)]) {
    use portcullis::llm::ledger;
    let conn = ledger::open(path).unwrap();
    let writer = ledger::Ledger::start(conn, path.to_owned(), std::time::Duration::from_secs(3600));
    let now = portcullis::clock::now_secs() * 1000;
    for (i, (key, prompt, completion, cost)) in rows.iter().enumerate() {
        writer.record(ledger::Row {
            ts_ms: now,
            request_id: format!("r{i}"),
            key_id: Some((*key).to_owned()),
            user: None,
            route: "bridge".to_owned(),
            model: Some("m".to_owned()),
            prompt_tokens: Some(*prompt),
            completion_tokens: Some(*completion),
            cost_usd: Some(*cost),
            usage_source: "upstream",
            charged_tokens: prompt + completion,
            charged_cost: *cost,
        });
    }
    writer.flush();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_adds_up_the_ledgers_of_several_instances() {
    // Two instances behind one upstream (11 prompt and 5 completion tokens an answer, priced at
    // $2 and $4 per million: $0.000042 an answer), each with its own ledger.
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let priced = |db: &std::path::Path| {
        config(&up, db).replace(
            "[usage]\n",
            "[usage]\nprices.\"openai/gpt-4o-mini\" = { input = 2.0, output = 4.0 }\n",
        )
    };
    let (db1, db2) = (dir.path().join("one.db"), dir.path().join("two.db"));
    // One: key a three times, key b once. Two: key a twice.
    for (db, keys) in [(&db1, &[A, A, A, B][..]), (&db2, &[A, A][..])] {
        let mut gw = Gateway::start(&priced(db)).await;
        for key in keys {
            let r = client()
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(key)
                .body(r#"{"model":"openai/gpt-4o-mini","messages":[]}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        gw.wait_requests(keys.len()).await;
        gw.signal("TERM");
        assert_eq!(gw.wait_exit().await, 0);
    }
    // A third, older instance whose ledger is still schema 1 (no users): key b with a cost the
    // upstream reported, and a request without a key or a cost.
    let db3 = dir.path().join("three.db");
    schema_1_ledger(
        &db3,
        &[(Some("b"), 30, 10, Some(0.001)), (None, 1, 1, None)],
    );

    let dbs = [db1.as_path(), &db2, &db3];
    let (code, out, err) = usage_without_config(&database_args(&dbs, &["--json", "--by", "key"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 3, "{out}");
    assert_row(&rows[0], "key_id", ("-", 1, 1, 1, 0.0));
    assert_row(&rows[1], "key_id", ("a", 5, 55, 25, 0.00021));
    assert_row(&rows[2], "key_id", ("b", 2, 41, 15, 0.001042));

    // Every grouping sums the same way; the schema-1 rows have no user, as when read alone.
    let (code, out, err) = usage_without_config(&database_args(&dbs, &["--json", "--by", "user"]));
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "{out}");
    assert_row(&rows[0], "user", ("-", 8, 97, 41, 0.001252));
    let (code, out, err) = usage_without_config(&database_args(&dbs, &["--json", "--by", "model"]));
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2, "{out}");
    assert_row(&rows[0], "model", ("old-model", 2, 31, 11, 0.001));
    assert_row(
        &rows[1],
        "model",
        ("openai/gpt-4o-mini", 6, 66, 30, 0.000252),
    );

    // The table is today's table, with the sums.
    let (code, out, err) = usage_without_config(&database_args(&dbs, &[]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec![
                "key_id",
                "requests",
                "prompt_tokens",
                "completion_tokens",
                "cost_usd"
            ],
            vec!["-", "1", "1", "1", "0.000000"],
            vec!["a", "5", "55", "25", "0.000210"],
            vec!["b", "2", "41", "15", "0.001042"],
        ]
    );

    // `--database` replaces the config's ledger rather than adding to it: with the first
    // instance's config, naming only the second ledger counts only the second.
    let cfg = dir.path().join("portcullis.toml");
    std::fs::write(&cfg, priced(&db1)).unwrap();
    let only_two = [db2.as_path()];
    let mut args = database_args(&only_two, &["--json", "--config"]);
    args.push(cfg.as_os_str());
    let (code, out, err) = usage_without_config(&args);
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "{out}");
    assert_row(&rows[0], "key_id", ("a", 2, 22, 10, 0.000084));

    // Read-only: the schema-1 file is not upgraded.
    let conn = rusqlite::Connection::open(&db3).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
}

#[test]
fn usage_refuses_a_missing_ledger_or_one_that_is_not_a_ledger_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.db");
    written_ledger(&good, &[("a", 10, 5, 0.5)]);
    let missing = dir.path().join("missing.db");
    let (code, out, err) =
        usage_without_config(&database_args(&[good.as_path(), &missing], &["--json"]));
    assert_eq!(code, 1, "{out}");
    assert_eq!(out, "", "nothing is printed when a ledger cannot be read");
    assert!(
        err.contains(&format!("--database {}", missing.display())),
        "{err}"
    );
    assert!(!missing.exists(), "usage created the missing ledger");

    // A SQLite file of something else, and a file that is not SQLite at all.
    let other = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&other).unwrap();
    conn.execute_batch("CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
    drop(conn);
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text, not a database\n".repeat(200)).unwrap();
    for (file, why) in [
        (&other, "is not a portcullis usage ledger"),
        (&text, "not a database"),
    ] {
        let before = std::fs::read(file).unwrap();
        let (code, out, err) =
            usage_without_config(&database_args(&[good.as_path(), file], &["--json"]));
        assert_eq!(code, 1, "{out}");
        assert_eq!(out, "");
        assert!(
            err.contains(&format!("--database {}", file.display())) && err.contains(why),
            "{err}"
        );
        assert_eq!(
            std::fs::read(file).unwrap(),
            before,
            "usage changed the file"
        );
    }
}

#[test]
fn usage_counts_a_ledger_named_twice_once() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one.db"), dir.path().join("two.db"));
    written_ledger(&one, &[("a", 10, 5, 0.5), ("b", 1, 2, 0.25)]);
    written_ledger(&two, &[("a", 100, 50, 1.0)]);
    // The same file again, by the same name and by another (`./` and a symbolic link).
    let dotted = dir.path().join(".").join("one.db");
    let mut names = vec![one.clone(), two.clone(), one.clone(), dotted];
    #[cfg(unix)]
    {
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&one, &link).unwrap();
        names.push(link);
    }
    let paths: Vec<&std::path::Path> = names.iter().map(|p| p.as_path()).collect();
    let (code, out, err) = usage_without_config(&database_args(&paths, &["--json", "--by", "key"]));
    assert_eq!(code, 0, "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2, "{out}");
    assert_row(&rows[0], "key_id", ("a", 2, 110, 55, 1.5));
    assert_row(&rows[1], "key_id", ("b", 1, 1, 2, 0.25));
    // Each repeat is said on stderr, naming both names.
    for again in &names[2..] {
        assert!(
            err.contains(&format!(
                "--database {} is {} again; counted once",
                again.display(),
                one.display()
            )),
            "{err}"
        );
    }
    assert_eq!(err.lines().count(), names.len() - 2, "{err}");
}
