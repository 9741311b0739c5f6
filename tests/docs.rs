//! The documentation promises nothing the binary lacks, and leaves out nothing the example shows:
//!
//! - every key in a key table of `docs/configuration.md` (columns key, default, meaning, under a
//!   heading naming its table, such as "## `[server]`") is accepted by `config::parse`: a
//!   document holding just that key may fail for other reasons, but never with `unknown field`;
//! - every key the parser knows (the list in its own `unknown field` error) is documented there,
//!   and so is every key of `config/portcullis.toml`, commented-out ones included;
//! - every command and flag in the command-line table of `docs/operations.md` is in the binary's
//!   `--help`, and every command the binary has is in that table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use portcullis::config::{self, Env};

/// An environment with no variables: `${NAME}` stays unresolved, which is a later error.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

const TABLES: [&str; 14] = [
    "server", "tls", "admin", "audit", "auth", "cors", "limits", "usage", "budgets", "keys",
    "routes", "tokens", "issuers", "cluster",
];

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cells of a Markdown table row, trimmed; an escaped `\|` stays inside its cell.
fn cells(row: &str) -> Vec<String> {
    let (mut out, mut cell, mut escaped) = (Vec::new(), String::new(), false);
    for c in row.trim().trim_start_matches('|').chars() {
        match c {
            '|' if !escaped => out.push(std::mem::take(&mut cell).trim().to_owned()),
            _ => cell.push(c),
        }
        escaped = c == '\\';
    }
    out
}

/// Whether `s` looks like a config key: `max_body`, `http2_max_concurrent_streams`.
fn is_key(s: &str) -> bool {
    let key_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    !s.is_empty() && s.chars().all(key_char)
}

/// The table a heading names: "## `[usage]` (optional)" is `usage`, "## `[[routes]]`" `routes`.
fn table_of(heading: &str) -> Option<String> {
    let start = heading.find("`[")? + 1;
    let len = heading[start..].find('`')?;
    let name = &heading[start..start + len];
    Some(name.trim_matches(['[', ']']).to_owned())
}

/// (table, key, default cell) of every key row in docs/configuration.md. A dotted key such as
/// `prices."<model>"` names a sub-table (`[usage.prices."<model>"]`): its key is `prices`.
fn documented_keys() -> Vec<(String, String, String)> {
    let (mut table, mut in_key_table, mut out) = (None, false, Vec::new());
    for line in read("docs/configuration.md").lines() {
        if line.starts_with('#') {
            table = table_of(line);
        } else if !line.starts_with('|') {
            in_key_table = false;
        } else if let Some(t) = &table {
            let row = cells(line);
            if row[0] == "key" {
                assert_eq!(
                    row[..],
                    ["key", "default", "meaning"],
                    "key table of [{t}]: {line}"
                );
                in_key_table = true;
            } else if in_key_table && row[0].starts_with('`') {
                let key = row[0].trim_matches('`').split('.').next().unwrap();
                assert!(is_key(key), "not a key in the table of [{t}]: {line}");
                out.push((t.clone(), key.to_owned(), row[1].clone()));
            }
        }
    }
    out
}

fn documented_set() -> BTreeSet<(String, String)> {
    let keys = documented_keys().into_iter();
    keys.map(|(table, key, _)| (table, key)).collect()
}

/// A TOML value of a plausible type: the default when it is a TOML literal (`"10MiB"`, `100`,
/// `false`, `[]`, `{}`), else a string. A wrong type is a different error, which is fine here.
fn plausible_value(default: &str) -> String {
    let literal = default.split('`').nth(1).unwrap_or_default();
    let parses = toml::from_str::<toml::Table>(&format!("v = {literal}")).is_ok();
    if !literal.is_empty() && parses {
        literal.to_owned()
    } else {
        "\"x\"".to_owned()
    }
}

/// The error `config::parse` gives for a document holding only `key = value` in `table`, if any.
fn parse_error(table: &str, key: &str, value: &str) -> Option<String> {
    let header = match table {
        "keys" | "routes" | "issuers" => format!("[[{table}]]"),
        _ => format!("[{table}]"),
    };
    let text = format!("{header}\n{key} = {value}\n");
    let parsed = config::parse(Path::new("docs.toml"), &text, &[], &NoEnv);
    parsed.err().map(|e| e.to_string())
}

#[test]
fn every_documented_config_key_exists() {
    let keys = documented_keys();
    let tables: BTreeSet<&str> = keys.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(tables, TABLES.into_iter().collect(), "tables");
    assert!(keys.len() > 60, "only {} keys found", keys.len());

    // The check can fail: each table refuses a key it does not have.
    for table in TABLES {
        let err = parse_error(table, "not_a_documented_key", "1").unwrap_or_default();
        let unknown = err.contains("unknown field `not_a_documented_key`");
        assert!(unknown, "[{table}] accepts unknown keys: {err}");
    }

    let mut unknown = Vec::new();
    for (table, key, default) in &keys {
        let err = parse_error(table, key, &plausible_value(default)).unwrap_or_default();
        if err.contains(&format!("unknown field `{key}`")) {
            unknown.push(format!("[{table}] {key}: {err}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "documented but unknown:\n{}",
        unknown.join("\n")
    );
}

/// (table, key) of every key the parser knows, from its own error for an unknown key:
/// "unknown field `x`, expected one of `listen`, `trusted_proxies`, ...".
fn parser_keys() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for table in TABLES {
        let err = parse_error(table, "not_a_documented_key", "1").unwrap_or_default();
        let (_, expected) = err.split_once("expected").expect("a list of fields");
        for field in expected.split('`').skip(1).step_by(2) {
            out.insert((table.to_owned(), field.to_owned()));
        }
    }
    out
}

/// (table, key) of every setting in config/portcullis.toml, commented-out ones included. A
/// sub-table header (`[routes.upstream_headers]`) counts as its key; the keys inside it are
/// names (header names, model prices), not settings.
fn example_keys() -> BTreeSet<(String, String)> {
    let (mut table, mut out) = (None::<String>, BTreeSet::new());
    for line in read("config/portcullis.toml").lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[').split(']').next().unwrap();
            table = match name.split_once('.') {
                Some((t, sub)) => {
                    out.insert((t.to_owned(), sub.split('.').next().unwrap().to_owned()));
                    None
                }
                None => Some(name.to_owned()),
            };
        } else if let (Some(t), Some((key, _))) = (&table, line.split_once('=')) {
            if is_key(key.trim()) {
                out.insert((t.clone(), key.trim().to_owned()));
            }
        }
    }
    out
}

#[test]
fn every_config_key_is_documented() {
    let (parser, example) = (parser_keys(), example_keys());
    assert!(parser.len() > 60 && example.len() > 40, "too few keys");
    let documented = documented_set();
    let missing: Vec<String> = (parser.union(&example))
        .filter(|k| !documented.contains(*k))
        .map(|(table, key)| format!("[{table}] {key}"))
        .collect();
    assert!(missing.is_empty(), "undocumented: {missing:?}");
}

/// The commands (`None`: no command) and flags of the command-line table in docs/operations.md.
fn documented_commands() -> Vec<(Option<String>, Vec<String>)> {
    let text = read("docs/operations.md");
    let (_, section) = text
        .split_once("\n## Command line\n")
        .expect("## Command line");
    let section = section.split("\n#").next().unwrap();
    let mut out = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `portcullis")) {
        let usage = cells(row).remove(0);
        // "`portcullis` or `portcullis run [--config PATH]`": every odd piece is one usage line.
        for line in usage.split('`').skip(1).step_by(2) {
            let command = (line.split_whitespace().nth(1))
                .filter(|w| w.starts_with(|c: char| c.is_ascii_lowercase()));
            let flags = line
                .split("--")
                .skip(1)
                .map(|f| f.split(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
                .map(|mut f| format!("--{}", f.next().unwrap_or_default()))
                .collect();
            out.push((command.map(str::to_owned), flags));
        }
    }
    out
}

fn help(command: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(command).arg("--help");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "portcullis {command:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `text` holds `flag` as a whole word (`--by` is not found in `--bytes`).
fn has_flag(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(i, _)| {
        let next = text[i + flag.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

#[test]
fn every_documented_command_and_flag_exists() {
    let documented = documented_commands();
    let flags: usize = documented.iter().map(|(_, f)| f.len()).sum();
    assert!(
        documented.len() >= 6 && flags >= 8,
        "table not found: {documented:?}"
    );
    for (command, flags) in &documented {
        let help = help(command.as_deref());
        for flag in flags {
            assert!(
                has_flag(&help, flag),
                "{command:?} {flag} not in --help:\n{help}"
            );
        }
    }

    // And the reverse: every command the binary lists is documented.
    let top = help(None);
    let commands = top.split("Commands:").nth(1).expect("Commands: in --help");
    for line in commands
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
    {
        let name = line.split_whitespace().next().unwrap();
        let found = documented.iter().any(|(c, _)| c.as_deref() == Some(name));
        assert!(
            found || name == "help",
            "`portcullis {name}` is not in docs/operations.md"
        );
    }
}
