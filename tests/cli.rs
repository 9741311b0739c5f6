//! The command line: --version, keygen and hash-key.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn version_prints_name_and_semver() {
    let out = Command::new(support::bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn keygen_prints_a_key_once_and_a_block_with_its_hash() {
    let out = Command::new(support::bin())
        .args(["keygen", "--id", "phone", "--routes", "bridge,speech"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().next().unwrap();
    assert!(key.starts_with("pcx_") && key.len() == 47, "{key}");
    assert_eq!(text.matches(key).count(), 1, "the key is printed once");
    assert!(text.contains("[[keys]]\nid = \"phone\"\n"));
    assert!(text.contains("routes = [\"bridge\", \"speech\"]"));

    let mut child = Command::new(support::bin())
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{key}").unwrap();
    let hashed = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    let hash = hashed.trim();
    assert!(hash.starts_with("sha256:") && hash.len() == 71);
    assert!(text.contains(&format!("hash = \"{hash}\"")), "{text}");
}
