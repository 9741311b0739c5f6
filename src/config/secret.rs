//! `${NAME}` references in config strings (SPEC §2).
//!
//! A reference resolves, in order, from env `NAME`, from the file named by env `NAME_FILE`, then
//! from `$CREDENTIALS_DIRECTORY/NAME` (systemd `LoadCredential=`). Values read from files lose one
//! trailing newline, as `echo "$KEY" > file` would add one. The resolved text is returned as a
//! `SecretString` so that no `Debug`, log line or error message can print it; errors name the
//! variable, never its value.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

/// Where secrets come from. Tests build one from a map; the binary reads the process.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;

    /// Whether unresolved secrets stand for [`Lenient::PLACEHOLDER`] (the config is read for a
    /// command that does not use them).
    fn lenient(&self) -> bool {
        false
    }
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// An environment for commands that read only part of the config (`portcullis usage`): a
/// `${NAME}` that resolves nowhere stands for [`Lenient::PLACEHOLDER`] instead of failing, and
/// its name is noted, so an unrelated secret (an upstream API key) need not be present. What the
/// command does read must be checked for the placeholder.
pub struct Lenient<'a> {
    inner: &'a dyn Env,
    missing: std::sync::Mutex<Vec<String>>,
}

impl<'a> Lenient<'a> {
    pub const PLACEHOLDER: &'static str = "portcullis-unresolved";

    pub fn new(inner: &'a dyn Env) -> Lenient<'a> {
        Lenient {
            inner,
            missing: std::sync::Mutex::default(),
        }
    }

    /// The names that resolved nowhere.
    pub fn missing(&self) -> Vec<String> {
        self.missing.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Env for Lenient<'_> {
    fn lenient(&self) -> bool {
        true
    }

    fn var(&self, name: &str) -> Option<String> {
        if let Some(v) = self.inner.var(name) {
            return Some(v);
        }
        // The lookup's own fallbacks (NAME_FILE, credentials) are tried before a placeholder.
        let fallback = name.ends_with("_FILE")
            || name == "CREDENTIALS_DIRECTORY"
            || self.inner.var(&format!("{name}_FILE")).is_some()
            || self
                .inner
                .var("CREDENTIALS_DIRECTORY")
                .is_some_and(|d| Path::new(&d).join(name).exists());
        if fallback {
            return None;
        }
        if let Ok(mut m) = self.missing.lock() {
            m.push(name.to_owned());
        }
        Some(Self::PLACEHOLDER.to_owned())
    }
}

/// Resolves every `${NAME}` in `input`. A `$` not followed by `{` is kept as written.
pub fn resolve(input: &str, env: &dyn Env) -> Result<SecretString, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${...} reference".to_owned())?;
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "invalid variable name {name:?} in ${{...}} (letters, digits and _ only)"
            ));
        }
        out.push_str(&lookup(name, env)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(SecretString::from(out))
}

/// True when `input` holds a `${NAME}` reference.
pub fn has_reference(input: &str) -> bool {
    input.contains("${")
}

fn lookup(name: &str, env: &dyn Env) -> Result<String, String> {
    if let Some(v) = env.var(name) {
        return Ok(v);
    }
    if let Some(file) = env.var(&format!("{name}_FILE")) {
        return read_secret_file(Path::new(&file))
            .map_err(|e| format!("${{{name}}}: cannot read {name}_FILE: {e}"));
    }
    if let Some(dir) = env.var("CREDENTIALS_DIRECTORY") {
        let path = PathBuf::from(dir).join(name);
        if path.exists() {
            return read_secret_file(&path)
                .map_err(|e| format!("${{{name}}}: cannot read credential {name}: {e}"));
        }
    }
    Err(format!(
        "${{{name}}} is not set (looked in env {name}, env {name}_FILE and $CREDENTIALS_DIRECTORY/{name})"
    ))
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let mut s = std::fs::read_to_string(path).map_err(|e| e.kind().to_string())?;
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    pub struct MapEnv(pub HashMap<String, String>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn resolves_from_env_file_and_credentials_dir() {
        let dir = std::env::temp_dir().join(format!("pcx-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("FROM_FILE.txt"), "file-secret\n").unwrap();
        std::fs::write(dir.join("CRED"), "cred-secret\n").unwrap();
        let file = dir.join("FROM_FILE.txt");
        let e = env(&[
            ("A", "alpha"),
            ("FROM_FILE_FILE", file.to_str().unwrap()),
            ("CREDENTIALS_DIRECTORY", dir.to_str().unwrap()),
        ]);
        assert_eq!(
            resolve("Bearer ${A}", &e).unwrap().expose_secret(),
            "Bearer alpha"
        );
        assert_eq!(
            resolve("${FROM_FILE}", &e).unwrap().expose_secret(),
            "file-secret"
        );
        assert_eq!(
            resolve("x${CRED}y", &e).unwrap().expose_secret(),
            "xcred-secrety"
        );
        assert_eq!(
            resolve("no refs $HOME", &e).unwrap().expose_secret(),
            "no refs $HOME"
        );
        let err = resolve("${MISSING}", &e).unwrap_err();
        assert!(err.contains("MISSING"), "{err}");
        assert!(resolve("${A", &e).is_err());
        assert!(resolve("${A-B}", &e).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
