//! The process environment as the config sees it: real variables first, then `.env`.
//!
//! SPEC §2: a `.env` file in the working directory is loaded if present and never overrides a
//! variable that is already set. Rather than writing it into the process environment (a global,
//! and `set_var` is unsound once threads run), the values are layered under the real environment
//! here and every lookup goes through this type.

use std::collections::HashMap;
use std::path::Path;

use super::secret::Env;

#[derive(Default)]
pub struct LayeredEnv {
    dotenv: HashMap<String, String>,
    /// Set when `.env` is readable by group or others: startup logs it as a warning.
    pub dotenv_too_open: bool,
}

impl LayeredEnv {
    /// Reads `.env` from `dir` if it exists. A malformed `.env` is an error naming its line.
    pub fn load(dir: &Path) -> Result<LayeredEnv, String> {
        let path = dir.join(".env");
        let mut env = LayeredEnv::default();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => return Ok(env),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            env.dotenv_too_open = meta.permissions().mode() & 0o077 != 0;
        }
        #[cfg(not(unix))]
        let _ = meta;
        let text = std::fs::read_to_string(&path).map_err(|e| format!(".env: {e}"))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!(".env:{}: expected NAME=value", i + 1))?;
            let k = k.trim();
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(".env:{}: invalid variable name", i + 1));
            }
            let v = v.trim();
            let v = if v.len() >= 2
                && ((v.starts_with('"') && v.ends_with('"'))
                    || (v.starts_with('\'') && v.ends_with('\'')))
            {
                &v[1..v.len() - 1]
            } else {
                v
            };
            env.dotenv.insert(k.to_owned(), v.to_owned());
        }
        Ok(env)
    }

    /// All `PORTCULLIS_*` variables, real and from `.env`, real ones winning.
    pub fn prefixed(&self, prefix: &str) -> Vec<(String, String)> {
        let mut out: HashMap<String, String> = self
            .dotenv
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in std::env::vars_os() {
            if let (Some(k), Some(v)) = (k.to_str(), v.to_str())
                && k.starts_with(prefix)
            {
                out.insert(k.to_owned(), v.to_owned());
            }
        }
        let mut v: Vec<_> = out.into_iter().collect();
        v.sort();
        v
    }
}

impl Env for LayeredEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .or_else(|| self.dotenv.get(name).cloned())
    }
}
