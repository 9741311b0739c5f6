//! The `portcullis` command: run, check, keygen, hash-key, keys, usage.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis::config::{self, env::LayeredEnv};

/// mimalloc rather than glibc's malloc: 6 % less CPU per proxied request and less memory after
/// load (glibc's consolidation of freed chunks showed in every profile). Its arenas commit
/// memory as used (`.cargo/config.toml`), which keeps idle RSS at 7 MiB; docs/performance.md
/// has the figures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A hardened gateway for self-hosted AI services"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArg,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--config`, on the commands that read the config (not on `hash-key`, which reads none).
#[derive(clap::Args, Clone, Default)]
struct ConfigArg {
    /// Config file (default: $PORTCULLIS_CONFIG, else /etc/portcullis/portcullis.toml)
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway in the foreground (the default)
    Run(ConfigArg),
    /// Validate the config (env secrets and certificate files included) and print a summary
    Check(ConfigArg),
    /// Print a new random API key once, then a [[keys]] block holding only its hash
    Keygen {
        /// The key's id, as logs and metrics will name it (letters, digits, '-', '_', '.')
        #[arg(long)]
        id: String,
        /// Comma-separated route names the key may use (default: every route with auth = "key")
        #[arg(long, value_delimiter = ',')]
        routes: Vec<String>,
        /// A config to check the route names against (they are not checked without one)
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Read one key from stdin and print sha256:<hex>
    HashKey,
    /// List the configured keys: routes, models, budget, expiry (never a hash)
    Keys {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Print spend from the usage ledger (works while the gateway runs; reads only what it needs)
    Usage {
        #[command(flatten)]
        config: ConfigArg,
        /// Read this ledger instead of the config's usage.database; repeat it to add up several
        /// instances' ledgers. With --database no config is read, so name every ledger to count
        /// (a file named twice is counted once)
        #[arg(long, value_name = "PATH")]
        database: Vec<PathBuf>,
        /// How far back, e.g. 7d, 12h
        #[arg(long, default_value = "30d")]
        since: String,
        /// Group by key, model, day or user
        #[arg(long, value_enum, default_value = "key")]
        by: portcullis::llm::ledger::GroupBy,
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `portcullis --config X` alone runs the gateway, as `portcullis run --config X` does.
    let top = cli.config.config;
    let or_top = |c: ConfigArg| c.config.or_else(|| top.clone());
    match cli
        .command
        .unwrap_or_else(|| Command::Run(ConfigArg::default()))
    {
        Command::Run(c) => run(or_top(c)),
        Command::Check(c) => check(or_top(c)),
        Command::Keygen { id, routes, config } => keygen(&id, &routes, config),
        Command::HashKey => hash_key(),
        Command::Keys { config, json } => keys(or_top(config), json),
        Command::Usage {
            config,
            database,
            since,
            by,
            json,
        } => usage(or_top(config), &database, &since, by, json),
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("PORTCULLIS_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    // One JSON object per line on stderr: a client's bytes in a field cannot start a new line.
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_current_span(false)
        .init();
}

fn env() -> Result<LayeredEnv, ExitCode> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    LayeredEnv::load(&cwd).map_err(|e| {
        eprintln!("portcullis: {e}");
        ExitCode::from(1)
    })
}

fn run(cli_path: Option<PathBuf>) -> ExitCode {
    init_tracing();
    let env = match env() {
        Ok(e) => e,
        Err(c) => return c,
    };
    let path = config::resolve_path(cli_path.as_deref(), &env);
    // This thread's runtime runs the control side (signals, reload, admin, drain); connections
    // are served by `server.workers` worker threads with a runtime each (server::Workers).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(portcullis::run(path, env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(cli_path: Option<PathBuf>) -> ExitCode {
    let env = match env() {
        Ok(e) => e,
        Err(c) => return c,
    };
    let path = config::resolve_path(cli_path.as_deref(), &env);
    match portcullis::load_checked(&path, &env) {
        Err(e) => {
            eprintln!("portcullis: {e}");
            ExitCode::from(1)
        }
        Ok((cfg, _)) => {
            println!("{}: OK", path.display());
            let listeners: Vec<String> = cfg.server.listen.iter().map(|a| a.to_string()).collect();
            println!(
                "listeners: {} ({})",
                listeners.join(", "),
                if cfg.tls.is_some() {
                    "TLS"
                } else {
                    "plain HTTP"
                }
            );
            if let Some(a) = &cfg.admin {
                println!("admin: {}", a.listen);
            }
            println!("routes:");
            for r in &cfg.routes {
                let host = r
                    .host
                    .as_deref()
                    .map(|h| format!(" host={h}"))
                    .unwrap_or_default();
                let auth = match r.auth {
                    portcullis::config::runtime::AuthMode::Key => "key",
                    portcullis::config::runtime::AuthMode::None => "none",
                    portcullis::config::runtime::AuthMode::Jwt => "jwt",
                    portcullis::config::runtime::AuthMode::KeyOrJwt => "key_or_jwt",
                };
                println!(
                    "  {:<12} {}/{host} -> {}://{}{} auth={auth}{}",
                    r.name,
                    r.prefix,
                    r.upstream.scheme,
                    r.upstream.authority,
                    r.upstream.base_path,
                    if r.websocket { " websocket" } else { "" }
                );
            }
            let ids: Vec<&str> = cfg.keys.iter().map(|k| k.id.as_str()).collect();
            println!("keys: {} [{}]", ids.len(), ids.join(", "));
            let scopes = std::iter::once(("(gateway)", &cfg.budgets))
                .chain(cfg.keys.iter().map(|k| (k.id.as_str(), &k.budget)))
                .filter(|(_, caps)| !caps.is_empty());
            for (who, caps) in scopes {
                let caps: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
                println!("budget {who}: {}", caps.join(", "));
            }
            ExitCode::SUCCESS
        }
    }
}

fn keygen(id: &str, routes: &[String], config_path: Option<PathBuf>) -> ExitCode {
    if !portcullis::keys::is_valid_id(id) {
        eprintln!("portcullis: --id must be letters, digits, '-', '_' or '.'");
        return ExitCode::from(2);
    }
    // With a config, a misspelt route is caught now rather than as a 403 on the phone.
    if let Some(path) = config_path {
        let env = match env() {
            Ok(e) => e,
            Err(c) => return c,
        };
        // Only the route names are read: no secret needs to be set.
        let cfg = match portcullis::config::load_lenient(&path, &env) {
            Ok((c, _)) => c,
            Err(e) => {
                eprintln!("portcullis: {e}");
                return ExitCode::from(1);
            }
        };
        if let Some(bad) = routes
            .iter()
            .find(|r| !cfg.routes.iter().any(|x| &x.name == *r))
        {
            eprintln!(
                "portcullis: --routes: no route named {bad:?} in {}",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    let key = match portcullis::keys::generate() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("portcullis: no randomness from the OS: {e}");
            return ExitCode::from(1);
        }
    };
    let mut text = format!("{key}\n\n");
    text.push_str("# Give the key above to the client; it is not stored anywhere. Paste this into the config:\n");
    text.push_str(&format!(
        "[[keys]]\nid = \"{id}\"\nhash = \"{}\"\n",
        portcullis::keys::hash_string(&key)
    ));
    if !routes.is_empty() {
        let list: Vec<String> = routes.iter().map(|r| format!("\"{r}\"")).collect();
        text.push_str(&format!("routes = [{}]\n", list.join(", ")));
    }
    // write_all, not println!: a closed pipe (`keygen | head -1`) is not a panic.
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
    ExitCode::SUCCESS
}

fn hash_key() -> ExitCode {
    let mut s = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut s) {
        eprintln!("portcullis: cannot read stdin: {e}");
        return ExitCode::from(1);
    }
    let key = s.trim_end_matches(['\n', '\r']);
    if key.is_empty() {
        eprintln!("portcullis: no key on stdin");
        return ExitCode::from(1);
    }
    println!("{}", portcullis::keys::hash_string(key));
    ExitCode::SUCCESS
}

/// `portcullis keys`: one line per key, so an operator sees an expiry before a phone does.
fn keys(cli_path: Option<PathBuf>, json: bool) -> ExitCode {
    let env = match env() {
        Ok(e) => e,
        Err(c) => return c,
    };
    let path = config::resolve_path(cli_path.as_deref(), &env);
    // Keys need no secret: an operator's shell need not have the upstream's API key.
    let cfg = match portcullis::config::load_lenient(&path, &env) {
        Ok((c, _)) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(1);
        }
    };
    let now = std::time::SystemTime::now();
    let mut out = String::new();
    if !json {
        out.push_str(&format!(
            "{:<20} {:<20} {:<28} {:<36} {:<21} {:>9} {}\n",
            "id", "routes", "models", "budget", "expires", "days_left", "disabled"
        ));
    }
    for k in &cfg.keys {
        let models: Option<Vec<String>> = k
            .models
            .as_ref()
            .map(|m| m.iter().map(|p| p.as_written()).collect());
        let budget = (!k.budget.is_empty()).then(|| {
            k.budget
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        });
        let expires = k
            .expires
            .map(|e| humantime::format_rfc3339_seconds(e).to_string());
        // Whole days left, rounded down; negative once expired.
        let days_left = k.expires.map(|e| match e.duration_since(now) {
            Ok(left) => (left.as_secs() / 86_400) as i64,
            Err(past) => -(past.duration().as_secs().div_ceil(86_400) as i64),
        });
        if json {
            let v = serde_json::json!({
                "id": k.id, "routes": k.routes, "models": models, "budget": budget,
                "expires": expires, "days_left": days_left, "disabled": k.disabled,
            });
            out.push_str(&v.to_string());
            out.push('\n');
        } else {
            let or_all = |v: Option<String>| v.unwrap_or_else(|| "*".to_owned());
            out.push_str(&format!(
                "{:<20} {:<20} {:<28} {:<36} {:<21} {:>9} {}\n",
                k.id,
                or_all(k.routes.as_ref().map(|r| r.join(","))),
                or_all(models.map(|m| m.join(","))),
                budget.unwrap_or_else(|| "-".to_owned()),
                expires.unwrap_or_else(|| "-".to_owned()),
                days_left.map_or_else(|| "-".to_owned(), |d| d.to_string()),
                k.disabled
            ));
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

/// The ledger `usage` reads by default: the config's `usage.database`.
fn configured_ledger(cli_path: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    let env = env()?;
    let path = config::resolve_path(cli_path.as_deref(), &env);
    // Only the ledger's path is read: secrets it does not need (an upstream's API key, the admin
    // token) may be absent, as they are for an operator's shell on a systemd-credentials Pi.
    let (cfg, unresolved) = match portcullis::config::load_lenient(&path, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return Err(ExitCode::from(1));
        }
    };
    let Some(db) = cfg.usage.as_ref().and_then(|u| u.database.clone()) else {
        eprintln!(
            "portcullis: {}: no usage.database is configured",
            path.display()
        );
        return Err(ExitCode::from(1));
    };
    let placeholder = portcullis::config::secret::Lenient::PLACEHOLDER;
    if db.to_string_lossy().contains(placeholder) {
        eprintln!(
            "portcullis: {}: usage.database: ${{{}}} is not set",
            path.display(),
            unresolved.join("}, ${")
        );
        return Err(ExitCode::from(1));
    }
    Ok(db)
}

/// `portcullis usage`: the config's ledger, or (with `--database`, repeatable) only the ledgers
/// named, their totals added up per group; no config is read then.
fn usage(
    cli_path: Option<PathBuf>,
    databases: &[PathBuf],
    since: &str,
    by: portcullis::llm::ledger::GroupBy,
    json: bool,
) -> ExitCode {
    let db = if databases.is_empty() {
        match configured_ledger(cli_path) {
            Ok(db) => Some(db),
            Err(c) => return c,
        }
    } else {
        None
    };
    let window = match portcullis::config::units::parse_duration(since) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("portcullis: --since: {e}");
            return ExitCode::from(2);
        }
    };
    let since_ms = std::time::SystemTime::now()
        .checked_sub(window)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let field = by.field();
    let read = match &db {
        Some(db) => portcullis::llm::ledger::totals(db, since_ms, by),
        None => portcullis::llm::ledger::totals_of(databases, since_ms, by).map(|(t, again)| {
            for r in again {
                eprintln!(
                    "portcullis: --database {} is {} again; counted once",
                    r.given.display(),
                    r.first.display()
                );
            }
            t
        }),
    };
    let totals = match read {
        Ok(t) => t,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = String::new();
    if json {
        for t in &totals {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(field.to_owned(), serde_json::Value::String(t.group.clone()));
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
    } else {
        // The first column fits its longest entry (a user's UUID is 36 characters).
        let w = totals
            .iter()
            .map(|t| t.group.chars().count())
            .max()
            .unwrap_or(0)
            .max(24);
        out.push_str(&format!(
            "{:<w$} {:>9} {:>14} {:>17} {:>12}\n",
            field, "requests", "prompt_tokens", "completion_tokens", "cost_usd"
        ));
        for t in &totals {
            out.push_str(&format!(
                "{:<w$} {:>9} {:>14} {:>17} {:>12.6}\n",
                t.group, t.requests, t.prompt_tokens, t.completion_tokens, t.cost_usd
            ));
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().write_all(out.as_bytes());
    ExitCode::SUCCESS
}
