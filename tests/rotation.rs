//! Rotation: `SIGUSR1` reopens the audit file (every record lands exactly once, in the old file
//! or the new one; a failed reopen keeps the old file), `portcullis keys` lists the keys without
//! a secret, and keys about to expire show up in `/metrics` and as warnings at startup and reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use support::*;

/// The bound on waits that depend on the progress of a load of thousands of requests (a debug
/// build on a busy machine), where `WAIT` is too tight.
const LOAD_WAIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- audit files

/// The lines of `path` that parse as JSON (a line being written may not, yet); a file that does
/// not exist has none.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn requests_in(lines: &[serde_json::Value]) -> usize {
    lines.iter().filter(|v| v["event"] == "request").count()
}

/// Waits until `pred` holds for the JSON lines of `path`, within `within`. A file has no change
/// notification in std, so it is re-read at a short interval.
async fn poll_file<T>(
    path: &Path,
    within: Duration,
    what: &str,
    mut pred: impl FnMut(&[serde_json::Value]) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = pred(&json_lines(path)) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} in {}:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a file exists again at `path` and its first line is the `reopen` event.
async fn wait_reopened(path: &Path) {
    poll_file(path, WAIT, "a new file starting with `reopen`", |lines| {
        lines.first().filter(|v| v["event"] == "reopen").map(|_| ())
    })
    .await;
}

/// Every line of the file at `path`, each required to be one whole JSON object.
fn strict_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{}: the last line is unfinished",
        path.display()
    );
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{} line {}: not one JSON object ({e}): {l}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A gateway config whose audit output is `audit`, with one keyless route to `up` and no per-IP
/// limit. The header timeout is long, so that a client's keep-alive connection, idle while the
/// load waits for a rotation, is not closed under it.
fn file_audit_config(audit: &Path, up: &Upstream) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"60s\"\nshutdown_grace = \"10s\"\n\
         [audit]\noutput = \"{}\"\n[limits]\nper_ip = \"off\"\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        audit.display(),
        up.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_split_across_reopens_are_all_there_once() {
    const N: usize = 10_000;
    const CLIENTS: usize = 20;
    const ROTATIONS: usize = 3;
    // The load runs in four phases of 2,500 requests; phase p may start once p rotations are
    // done, so the load cannot end before the third rotation and every file gets requests.
    const PHASE: usize = N / (ROTATIONS + 1);
    // A file is rotated once it holds this many records: mid-phase, with requests in flight.
    // The file after rotation p gets at least the whole of phase p, so it always gets there.
    const ROTATE_AT: usize = PHASE / 2;

    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let mut gw = Gateway::start_full(&file_audit_config(&audit, &up), &[], true).await;

    let (rotated, rotations) = tokio::sync::watch::channel(0usize);
    let c = client();
    let base = gw.url("/r/");
    let load = tokio::spawn(async move {
        futures_util::stream::iter(0..N)
            .map(|i| {
                let (c, mut rotations, url) = (c.clone(), rotations.clone(), format!("{base}{i}"));
                async move {
                    rotations.wait_for(|r| *r >= i / PHASE).await.unwrap();
                    match c.get(&url).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            r.bytes().await.map_or(0, |_| status)
                        }
                        Err(_) => 0,
                    }
                }
            })
            .buffer_unordered(CLIENTS)
            .collect::<Vec<u16>>()
            .await
    });

    let mut files: Vec<PathBuf> = Vec::new();
    for n in 1..=ROTATIONS {
        poll_file(&audit, LOAD_WAIT, "records of this phase", |lines| {
            (requests_in(lines) >= ROTATE_AT).then_some(())
        })
        .await;
        let renamed = dir.path().join(format!("audit.log.{n}"));
        std::fs::rename(&audit, &renamed).unwrap();
        gw.signal("USR1");
        wait_reopened(&audit).await;
        files.push(renamed);
        rotated.send_replace(n);
    }
    files.push(audit.clone());

    let statuses = tokio::time::timeout(LOAD_WAIT, load)
        .await
        .expect("the load did not finish")
        .unwrap();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{failed} of {N} requests were not answered 200");
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0, "stderr:\n{}", gw.stderr.text());

    let mut ids = HashSet::new();
    let mut paths = HashSet::new();
    let mut per_file = Vec::new();
    for (k, file) in files.iter().enumerate() {
        let lines = strict_lines(file);
        if k == 0 {
            let startup = lines.iter().any(|v| v["event"] == "startup");
            assert!(startup, "no startup event in {}", file.display());
        } else {
            assert_eq!(
                lines.first().map(|v| &v["event"]),
                Some(&serde_json::json!("reopen")),
                "{} does not start with a reopen event",
                file.display()
            );
            // `{"ts":"…","event":"reopen"}` and nothing else.
            let fields = lines[0].as_object().unwrap();
            assert!(
                fields.len() == 2 && lines[0]["ts"].is_string(),
                "{}",
                lines[0]
            );
            #[cfg(unix)]
            assert_eq!(mode(file), 0o600, "{}", file.display());
        }
        let records: Vec<&serde_json::Value> =
            lines.iter().filter(|v| v["event"] == "request").collect();
        for r in &records {
            let id = r["request_id"].as_str().unwrap().to_owned();
            assert!(ids.insert(id), "request_id twice: {r}");
            paths.insert(r["path"].as_str().unwrap().to_owned());
        }
        per_file.push(records.len());
    }
    assert_eq!(
        per_file.iter().sum::<usize>(),
        N,
        "request records per file: {per_file:?}"
    );
    for (k, n) in per_file[..ROTATIONS].iter().enumerate() {
        assert!(*n > 0, "{} holds no request record", files[k].display());
    }
    // Every request, once: its path is its number.
    let expected: HashSet<String> = (0..N).map(|i| format!("/r/{i}")).collect();
    assert_eq!(paths, expected);
    let last = strict_lines(&audit);
    assert_eq!(last.last().unwrap()["event"], "shutdown");
}

#[tokio::test]
async fn a_failed_reopen_keeps_writing_to_the_old_file() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    let mut gw =
        Gateway::start_full(&file_audit_config(&a.join("audit.log"), &up), &[], true).await;
    let c = client();
    assert_eq!(c.get(gw.url("/one")).send().await.unwrap().status(), 200);
    wait_file_records(&a.join("audit.log"), 1).await;

    // The open file moves with its directory; the configured path's directory is gone.
    std::fs::rename(&a, &b).unwrap();
    gw.signal("USR1");
    gw.stderr
        .wait_until(|lines| {
            (lines.iter())
                .any(|l| l.contains("audit reopen failed"))
                .then_some(())
        })
        .await;

    assert_eq!(c.get(gw.url("/two")).send().await.unwrap().status(), 200);
    let recs = wait_file_records(&b.join("audit.log"), 2).await;
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1]["path"], "/two");
    assert!(!a.exists(), "the reopen recreated {}", a.display());

    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0, "stderr:\n{}", gw.stderr.text());
    assert!(!a.exists(), "{} was recreated at shutdown", a.display());
}

// ---------------------------------------------------------------- portcullis keys

const PHONE: &str = "pcx_rotation-phone-0123456789abcdefghijklmnopq";
const TABLET: &str = "pcx_rotation-tablet-0123456789abcdefghijklmnop";
const LAPTOP: &str = "pcx_rotation-laptop-0123456789abcdefghijklmnop";

fn rfc3339_in(secs: u64) -> (String, u64) {
    let at = SystemTime::now() + Duration::from_secs(secs);
    let unix = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
    (humantime::format_rfc3339_seconds(at).to_string(), unix)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Runs `portcullis keys --config <config> [args]` on a config text in `dir`; returns (exit code,
/// stdout, stderr).
fn keys(dir: &Path, config: &str, args: &[&str]) -> (i32, String, String) {
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin())
        .arg("keys")
        .arg("--config")
        .arg(&path)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Three keys: `phone` with every optional field (expiring in 30 days), `tablet` disabled with
/// none, `laptop` expired.
fn three_keys_config(dir: &Path, phone_expires: &str) -> String {
    format!(
        "{}[usage]\ndatabase = \"{}\"\n{}{}{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:9\"\nllm = true\n\
         [[routes]]\nname = \"speech\"\npath = \"/speech/\"\nupstream = \"http://127.0.0.1:9\"\n",
        server_section(""),
        dir.join("usage.db").display(),
        key_block(
            "phone",
            PHONE,
            &format!(
                "routes = [\"bridge\", \"speech\"]\nmodels = [\"gpt-4o\", \"anthropic/*\"]\n\
                 budget = {{ tokens_per_day = 1000 }}\nexpires = \"{phone_expires}\""
            )
        ),
        key_block("tablet", TABLET, "disabled = true"),
        key_block("laptop", LAPTOP, "expires = \"2020-01-01T00:00:00Z\""),
    )
}

/// Neither a hash nor a key, in any form.
fn assert_no_secret(out: &str) {
    assert!(!out.contains("sha256:"), "{out}");
    for key in [PHONE, TABLET, LAPTOP] {
        let hash = portcullis::keys::hash_string(key);
        let hex = hash.trim_start_matches("sha256:");
        assert!(!out.contains(key) && !out.contains(hex), "{out}");
    }
}

#[test]
fn keys_json_lists_each_key_with_its_scope_budget_and_expiry_but_no_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (expires, _) = rfc3339_in(30 * 86_400);
    let config = three_keys_config(dir.path(), &expires);
    let before = unix_now();
    let (code, out, err) = keys(dir.path(), &config, &["--json"]);
    let after = unix_now();
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_no_secret(&out);
    assert_no_secret(&err);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    let key = |id: &str| {
        lines
            .iter()
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}:\n{out}"))
            .clone()
    };
    let fields = [
        "id",
        "routes",
        "models",
        "budget",
        "expires",
        "days_left",
        "disabled",
    ];
    for v in &lines {
        let keys: HashSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, fields.into_iter().collect(), "{v}");
    }

    let phone = key("phone");
    assert_eq!(phone["routes"], serde_json::json!(["bridge", "speech"]));
    assert_eq!(
        phone["models"],
        serde_json::json!(["gpt-4o", "anthropic/*"])
    );
    assert_eq!(phone["budget"], "tokens_per_day = 1000");
    assert_eq!(phone["expires"], expires.as_str());
    let days = phone["days_left"].as_i64().unwrap();
    assert!(days == 29 || days == 30, "days_left {days}");
    assert_eq!(phone["disabled"], false);

    let tablet = key("tablet");
    for f in ["routes", "models", "budget", "expires", "days_left"] {
        assert!(tablet[f].is_null(), "tablet {f}: {tablet}");
    }
    assert_eq!(tablet["disabled"], true);

    let laptop = key("laptop");
    assert_eq!(laptop["expires"], "2020-01-01T00:00:00Z");
    // Rounded down: 2020-01-01 was -N.x days ago, which is -(N + 1) whole days.
    const EXPIRED: i64 = 1_577_836_800;
    let floor = |now: i64| (EXPIRED - now).div_euclid(86_400);
    let days = laptop["days_left"].as_i64().unwrap();
    assert!(days == floor(before) || days == floor(after), "{laptop}");
    for f in ["routes", "models", "budget"] {
        assert!(laptop[f].is_null(), "laptop {f}: {laptop}");
    }
    assert_eq!(laptop["disabled"], false);
}

#[test]
fn keys_table_has_a_header_and_one_row_per_key_but_no_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (expires, _) = rfc3339_in(30 * 86_400);
    let config = three_keys_config(dir.path(), &expires);
    let (code, out, err) = keys(dir.path(), &config, &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_no_secret(&out);
    assert_no_secret(&err);
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 4, "a header and three rows:\n{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    for column in [
        "id",
        "routes",
        "models",
        "budget",
        "expires",
        "days_left",
        "disabled",
    ] {
        assert!(header.contains(&column), "no {column} column:\n{out}");
    }
    for id in ["phone", "tablet", "laptop"] {
        let rows = lines[1..].iter().filter(|l| l.contains(id)).count();
        assert_eq!(rows, 1, "{id}:\n{out}");
    }
}

#[test]
fn keys_refuses_a_bad_config_like_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"http://127.0.0.1:9\"\nnot_a_key = 1\n",
        server_section("")
    );
    let (code, out, err) = keys(dir.path(), &config, &["--json"]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(check(&config, &[]).0, 1);
}

// ---------------------------------------------------------------- expiry: gauge and warnings

const SOON: &str = "pcx_rotation-soon-0123456789abcdefghijklmnopqrs";
const FOREVER: &str = "pcx_rotation-forever-0123456789abcdefghijklmno";
const GONE: &str = "pcx_rotation-gone-0123456789abcdefghijklmnopqrs";

/// `portcullis_key_expiry_timestamp_seconds` series of /metrics: (key_id, value).
fn expiry_series(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_key_expiry_timestamp_seconds{"))
        .map(|l| {
            let id = l
                .split("key_id=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let value = l.rsplit(' ').next().unwrap().parse().unwrap();
            (id.to_owned(), value)
        })
        .collect()
}

/// How many warnings with `message` on stderr name `key_id`.
fn warnings(lines: &[String], message: &str, key_id: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.contains(message))
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["level"] == "WARN" && v["fields"]["key_id"] == key_id)
        })
        .count()
}

#[tokio::test]
async fn a_key_expiring_tomorrow_has_a_gauge_and_a_warning_at_startup_and_reload() {
    const SOON_MSG: &str = "key expires soon";
    const GONE_MSG: &str = "key has expired";
    let up = upstream().await;
    let (expires, unix) = rfc3339_in(86_400);
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{}\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\n",
        server_section(""),
        key_block("soon", SOON, &format!("expires = \"{expires}\"")),
        key_block("forever", FOREVER, ""),
        key_block("gone", GONE, "expires = \"2020-01-01T00:00:00Z\""),
        up.url()
    );
    let gw = Gateway::start(&config).await;

    let metrics = gw.metrics_text().await;
    let mut series = expiry_series(&metrics);
    series.sort_by(|a, b| a.0.cmp(&b.0));
    let series: Vec<(&str, u64)> = (series.iter())
        .map(|(id, v)| (id.as_str(), *v as u64))
        .collect();
    // `forever` has no `expires`, so no series.
    assert_eq!(
        series,
        [("gone", 1_577_836_800), ("soon", unix)],
        "soon expires {expires}:\n{metrics}"
    );

    // At startup, then again at a reload.
    for n in 1..=2 {
        if n == 2 {
            assert_eq!(gw.reload().await["result"], "ok");
        }
        gw.stderr
            .wait_until(|lines| {
                let soon = warnings(lines, SOON_MSG, "soon");
                let gone = warnings(lines, GONE_MSG, "gone");
                (soon >= n && gone >= n).then_some(())
            })
            .await;
    }
    let all = gw.stderr.all();
    for (message, key_id) in [
        (SOON_MSG, "forever"),
        (GONE_MSG, "forever"),
        (SOON_MSG, "gone"),
        (GONE_MSG, "soon"),
    ] {
        let n = warnings(&all, message, key_id);
        assert_eq!(n, 0, "{message} for {key_id}:\n{}", gw.stderr.text());
    }
}

#[tokio::test]
async fn a_reload_drops_the_expiry_gauge_of_a_removed_key_and_of_a_key_without_expires() {
    let up = upstream().await;
    let (soon, _) = rfc3339_in(86_400);
    let config = |keys: &str| {
        format!(
            "{}[admin]\nlisten = \"127.0.0.1:0\"\n{keys}\
             [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\n",
            server_section(""),
            up.url()
        )
    };
    let both = format!(
        "{}{}",
        key_block("soon", SOON, &format!("expires = \"{soon}\"")),
        key_block("forever", FOREVER, "expires = \"2030-01-01T00:00:00Z\"")
    );
    let gw = Gateway::start(&config(&both)).await;
    let ids = |series: Vec<(String, f64)>| series.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let mut before = ids(expiry_series(&gw.metrics_text().await));
    before.sort();
    assert_eq!(before, ["forever", "soon"]);

    // The rotation runbook's last step: the old key's block goes; and `forever` loses `expires`.
    gw.rewrite_config(&config(&key_block("forever", FOREVER, "")));
    assert_eq!(gw.reload().await["result"], "ok");
    let metrics = gw.metrics_text().await;
    assert!(
        expiry_series(&metrics).is_empty(),
        "series of keys without expires after the reload:\n{}",
        (metrics.lines())
            .filter(|l| l.starts_with("portcullis_key_expiry_timestamp_seconds"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
