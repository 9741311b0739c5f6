//! Loading `portcullis.toml`: TOML -> [`RawConfig`] -> runtime [`Config`].
//!
//! Errors name the file, the line:column and the key path (`routes[1].upstream: invalid URL ...`)
//! and never a secret's value. `PORTCULLIS_<SECTION>__<KEY>` variables replace scalars of
//! top-level tables before the document is deserialized; an error in such a value names the
//! variable as well as the line it replaced.

pub mod build;
pub mod env;
pub mod parse;
pub mod runtime;
pub mod schema;
pub mod secret;
pub mod units;

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub use runtime::Config;
pub use secret::Env;

const ENV_PREFIX: &str = "PORTCULLIS_";

/// A config file that cannot be used, said so that the operator can fix it without guessing.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line_col: Option<(usize, usize)>,
    pub key_path: Option<String>,
    pub env_var: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((l, c)) = self.line_col {
            write!(f, ":{l}:{c}")?;
        }
        f.write_str(": ")?;
        if let Some(p) = &self.key_path {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(v) = &self.env_var {
            write!(f, " (value from env {v})")?;
        }
        Ok(())
    }
}

/// Where the config file is: `--config`, else env `PORTCULLIS_CONFIG`, else the system path.
pub fn resolve_path(cli: Option<&Path>, env: &dyn Env) -> PathBuf {
    if let Some(p) = cli {
        return p.to_owned();
    }
    if let Some(p) = env.var("PORTCULLIS_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    PathBuf::from("/etc/portcullis/portcullis.toml")
}

/// Reads, overrides from the environment, deserializes and validates the config at `path`.
pub fn load(path: &Path, env: &env::LayeredEnv) -> Result<Config, ConfigError> {
    parse(path, &read(path)?, &env.prefixed(ENV_PREFIX), env)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line_col: None,
        key_path: None,
        env_var: None,
        message: format!("cannot read the config file: {e}"),
    })
}

/// [`load`] for a command that reads only part of the config (`portcullis usage`): a `${NAME}`
/// that resolves nowhere becomes [`secret::Lenient::PLACEHOLDER`] instead of an error. Returns the
/// names that did not resolve; the caller checks what it reads against the placeholder.
pub fn load_lenient(
    path: &Path,
    env: &env::LayeredEnv,
) -> Result<(Config, Vec<String>), ConfigError> {
    let lenient = secret::Lenient::new(env);
    let cfg = parse(path, &read(path)?, &env.prefixed(ENV_PREFIX), &lenient)?;
    Ok((cfg, lenient.missing()))
}

/// The pure part of [`load`]: `text` is the file's content, `overrides` the `PORTCULLIS_*` vars.
///
/// An override's value is read as a TOML scalar (`PORTCULLIS_SERVER__MAX_CONNECTIONS=64` is a
/// number), except where the field wants a string: an admin token of `123456` stays the string
/// `"123456"`. The value of an override never appears in an error (it may be a secret).
pub fn parse(
    path: &Path,
    text: &str,
    overrides: &[(String, String)],
    env: &dyn Env,
) -> Result<Config, ConfigError> {
    let mut as_string: Vec<String> = Vec::new();
    loop {
        match parse_once(path, text, overrides, env, &as_string) {
            Ok(c) => return Ok(c),
            // A type error at an overridden key: the field wants a string; read it as one.
            Err(failed) => match *failed {
                (_, Some(var)) if !as_string.contains(&var) => as_string.push(var),
                (mut e, _) => {
                    if let Some(var) = &e.env_var
                        && let Some((_, value)) = overrides.iter().find(|(v, _)| v == var)
                        && !value.is_empty()
                    {
                        let escaped = format!("{value:?}");
                        e.message = e
                            .message
                            .replace(escaped.trim_matches('"'), "<value>")
                            .replace(value.as_str(), "<value>");
                    }
                    return Err(e);
                }
            },
        }
    }
}

/// One attempt at [`parse`], with the overrides named in `as_string` read as strings. On a type
/// error at an overridden key not yet read as a string, also returns that variable's name.
fn parse_once<'a>(
    path: &Path,
    text: &'a str,
    overrides: &'a [(String, String)],
    env: &dyn Env,
    as_string: &[String],
) -> Result<Config, Box<(ConfigError, Option<String>)>> {
    let err = |span: Option<Range<usize>>,
               key_path: Option<String>,
               env_var: Option<String>,
               message: String| ConfigError {
        file: path.to_owned(),
        line_col: span.map(|s| line_col(text, s.start)),
        key_path,
        env_var,
        message,
    };

    let mut root = DeTable::parse(text)
        .map_err(|e| Box::new((err(e.span(), None, None, e.message().to_owned()), None)))?;
    let mut applied: Vec<(String, String)> = Vec::new();
    for (var, value) in overrides {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let key_path = format!("{section}.{key}");
        apply_override(
            root.get_mut(),
            &section,
            &key,
            value,
            as_string.contains(var),
        )
        .map_err(|m| {
            (
                err(None, Some(key_path.clone()), Some(var.clone()), m),
                None,
            )
        })?;
        applied.push((key_path, var.clone()));
    }
    let env_var_for = |kp: &str| {
        applied
            .iter()
            .find(|(p, _)| kp == p || kp.starts_with(&format!("{p}[")))
            .map(|(_, v)| v.clone())
    };

    let located = located_spans(root.get_ref());
    let de = toml::de::Deserializer::from(root);
    let raw: schema::RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let kp = e.path().to_string();
        let kp = (kp != ".").then_some(kp);
        let env_var = kp.as_deref().and_then(env_var_for);
        let inner = e.into_inner();
        let span = inner
            .span()
            .or_else(|| kp.as_deref().and_then(|p| find_span(&located, p)));
        let retry = env_var
            .clone()
            .filter(|_| inner.message().starts_with("invalid type"));
        Box::new((err(span, kp, env_var, inner.message().to_owned()), retry))
    })?;

    Config::from_raw(raw, env).map_err(|inv| {
        let span = find_span(&located, &inv.path);
        let env_var = env_var_for(&inv.path);
        Box::new((err(span, Some(inv.path), env_var, inv.message), None))
    })
}

fn apply_override<'i>(
    root: &mut DeTable<'i>,
    section: &str,
    key: &str,
    value: &'i str,
    as_string: bool,
) -> Result<(), String> {
    if section.is_empty() || key.is_empty() || key.contains("__") {
        return Err("expected PORTCULLIS_<SECTION>__<KEY>".to_owned());
    }
    let entry = root
        .entry(Spanned::new(0..0, Cow::Owned(section.to_owned())))
        .or_insert_with(|| Spanned::new(0..0, DeValue::Table(DeTable::new())));
    let DeValue::Table(table) = entry.get_mut() else {
        return Err(format!(
            "[{section}] is not a table; only scalars of top-level tables can be overridden"
        ));
    };
    let mut new = match DeValue::parse(value) {
        Ok(v) if !as_string && !v.get_ref().is_table() => v.into_inner(),
        _ => DeValue::String(Cow::Owned(value.to_owned())),
    };
    new.make_owned();
    // Keep the span of the value being replaced, so an error still points at its line.
    let span = table.get(key).map(|v| v.span()).unwrap_or(0..0);
    table.insert(
        Spanned::new(0..0, Cow::Owned(key.to_owned())),
        Spanned::new(span, new),
    );
    Ok(())
}

/// Every key path in the document with the span of its value, for errors found after serde.
fn located_spans(root: &DeTable<'_>) -> Vec<(String, Range<usize>)> {
    fn walk(prefix: &str, v: &Spanned<DeValue<'_>>, out: &mut Vec<(String, Range<usize>)>) {
        if !v.span().is_empty() {
            out.push((prefix.to_owned(), v.span()));
        }
        match v.get_ref() {
            DeValue::Table(t) => {
                for (k, child) in t.iter() {
                    let p = if prefix.is_empty() {
                        k.get_ref().to_string()
                    } else {
                        format!("{prefix}.{}", k.get_ref())
                    };
                    // A table's own span is its header; its keys are more precise.
                    if !k.span().is_empty() {
                        out.push((p.clone(), k.span()));
                    }
                    walk(&p, child, out);
                }
            }
            DeValue::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), child, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (k, v) in root.iter() {
        let p = k.get_ref().to_string();
        if !k.span().is_empty() {
            out.push((p.clone(), k.span()));
        }
        walk(&p, v, &mut out);
    }
    out
}

/// The span of `key_path`'s value, else of its nearest located ancestor.
fn find_span(located: &[(String, Range<usize>)], key_path: &str) -> Option<Range<usize>> {
    let mut p = key_path;
    loop {
        // Prefer the value's span (pushed last for a path) over the key's.
        if let Some((_, s)) = located.iter().rev().find(|(k, _)| k == p) {
            return Some(s.clone());
        }
        let cut = p.rfind(['.', '['])?;
        p = &p[..cut];
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}
