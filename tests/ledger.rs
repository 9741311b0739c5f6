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
