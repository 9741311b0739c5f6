//! portcullis: a hardened gateway for self-hosted AI services.
//!
//! `run` is the whole life of the process: load and validate the config before anything
//! listens, bind, serve, reload on SIGHUP, drain on SIGTERM/SIGINT. The request path is
//! described, step by step, in [`pipeline`].

pub mod admin;
pub mod audit;
pub mod auth;
pub mod client_ip;
pub mod clock;
pub mod config;
pub mod conn;
pub mod cors;
pub mod error;
pub mod gate;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod live;
pub mod llm;
pub mod lockout;
pub mod metrics;
pub mod path;
pub mod pipeline;
pub mod proxy;
pub mod rate_limit;
pub mod route;
pub mod server;
pub mod systemd;
pub mod tls;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use secrecy::ExposeSecret;

use crate::audit::Audit;
use crate::config::Config;
use crate::config::env::LayeredEnv;
use crate::pipeline::Shared;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the gateway could not start. Printed to stderr; the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file: file, line, key path and what is wrong.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// A certificate or key file of `[tls]` (the message names the file).
    #[error("{0}")]
    Tls(String),
    /// The usage ledger: not a portcullis ledger, from a newer version, unreadable.
    #[error("{0}")]
    Ledger(String),
    /// A listener could not be bound (`what`: the config key and address).
    #[error("{what}: cannot listen: {error}")]
    Listen { what: String, error: std::io::Error },
    #[error("audit.output: cannot open: {0}")]
    Audit(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// A worker thread or its runtime could not be started (`server.workers`).
    #[error("server.workers: cannot start a worker: {0}")]
    Workers(std::io::Error),
    /// A reload that changes what only a restart can change.
    #[error("{0} needs a restart")]
    NeedsRestart(&'static str),
    /// `[cluster]`: a Redis client could not be made from the URL.
    #[error("{0}")]
    Cluster(String),
}

/// The `jwks_url` slots of a config's issuers, for [`jwks::Sources::adopt`] (a fresh config:
/// its issuers are not shared yet).
fn issuer_remotes(cfg: &mut Config) -> impl Iterator<Item = &mut Option<Arc<jwks::Remote>>> {
    cfg.issuers
        .iter_mut()
        .filter_map(Arc::get_mut)
        .map(|i| &mut i.remote)
}

/// Loads and fully validates a config: the file, env secrets and the TLS files.
pub fn load_checked(
    path: &Path,
    env: &LayeredEnv,
) -> Result<(Config, Option<Arc<rustls::ServerConfig>>), StartError> {
    let cfg = config::load(path, env)?;
    // A ledger that `run` would refuse fails `check` too (without creating or changing it).
    if let Some(db) = cfg.usage.as_ref().and_then(|u| u.database.as_deref()) {
        llm::ledger::verify(db).map_err(StartError::Ledger)?;
    }
    let tls = match &cfg.tls {
        None => None,
        Some(files) => Some(
            tls::server_config(files)
                .map_err(|m| StartError::Tls(format!("{}: {m}", path.display())))?,
        ),
    };
    Ok((cfg, tls))
}

fn build_serve(
    cfg: Config,
    tls: Option<Arc<rustls::ServerConfig>>,
    ledger: Option<llm::ledger::Ledger>,
    budgets: Option<Arc<llm::budget::Book>>,
    audit: Audit,
    shutdown: CancellationToken,
) -> Result<Arc<server::Serve>, StartError> {
    let limiters = rate_limit::Registry::new(cfg.limits.max_tracked_clients);
    let gate = Arc::new(
        gate::Gate::new(limiters.store_arc(), cfg.cluster.as_ref()).map_err(StartError::Cluster)?,
    );
    if let Some(book) = &budgets
        && gate.is_shared()
    {
        book.share(gate.clone(), audit.clone());
    }
    let serve = Arc::new(server::Serve {
        semaphore: Arc::new(Semaphore::new(cfg.server.max_connections)),
        shared: Arc::new(Shared {
            ledger,
            budgets,
            gate,
            live: ArcSwap::from_pointee(live::Live::build(cfg, tls, &limiters)),
            limiters,
            forwarder: proxy::Forwarder::new(),
            audit,
            tunnels: TaskTracker::new(),
            cut: CancellationToken::new(),
        }),
        per_ip: Arc::default(),
        shutdown,
        connections: TaskTracker::new(),
    });
    serve.shared.publish_budgets();
    Ok(serve)
}

/// The request handling of [`run`] without listeners, signals, ledger or admin: for benchmarks
/// that drive whole connections through [`server::serve_stream`] (in-memory streams). TLS and
/// the audit output are as `cfg` says.
#[doc(hidden)]
pub async fn embedded(cfg: Config) -> Result<Arc<server::Serve>, StartError> {
    let tls = match &cfg.tls {
        None => None,
        Some(files) => Some(tls::server_config(files).map_err(StartError::Tls)?),
    };
    let audit = Audit::start(&cfg.audit).await.map_err(StartError::Audit)?;
    build_serve(cfg, tls, None, None, audit, CancellationToken::new())
}

/// Runs the gateway until SIGTERM/SIGINT, then drains and returns.
pub async fn run(path: PathBuf, env: LayeredEnv) -> Result<(), StartError> {
    if env.dotenv_too_open {
        tracing::warn!(".env is readable by group or others; chmod 600 .env");
    }
    // Everything that can fail is done before anything serves: config, signals, sockets, ledger.
    let (mut cfg, tls) = load_checked(&path, &env)?;
    let signals = install_signals()?;
    let listeners = server::bind(&cfg.server.listen)
        .await
        .map_err(|(a, error)| StartError::Listen {
            what: format!("server.listen {a}"),
            error,
        })?;
    let admin_listener = bind_admin(&cfg).await?;
    let (ledger, budgets) = open_ledger(&cfg)?;
    let metrics_handle = match metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    };
    let audit = Audit::start(&cfg.audit).await.map_err(StartError::Audit)?;
    warn_about_exposure(&cfg);
    announce_key_expiry(&cfg);
    // Each `jwks_url` is fetched before anything is served (boundedly: a provider that is down
    // delays startup by at most the fetch timeout, and its tokens are refused until it answers).
    let jwks = jwks::Sources::default();
    jwks.adopt(issuer_remotes(&mut cfg));
    jwks.first_fetches(jwks::FETCH_TIMEOUT).await;

    let addrs: Vec<_> = listeners.bound.iter().map(|(_, a)| *a).collect();
    let shutdown = CancellationToken::new();
    let grace = cfg.server.shutdown_grace;
    let workers = cfg.server.worker_count();
    let cluster = cfg.cluster.clone();
    let serve = build_serve(cfg, tls, ledger, budgets, audit.clone(), shutdown.clone())?;
    if let Some(c) = &cluster {
        metrics::cluster_configured();
        gate::redis::announce(c).await;
        // Charges Redis did not take when they were made are sent again, every second.
        if let Some(book) = serve.shared.budgets.clone() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    book.flush_pending().await;
                }
            });
        }
    }
    let listening = listeners.bound.into_iter().map(|(l, _)| l).collect();
    let workers =
        server::Workers::start(&serve, listening, workers).map_err(StartError::Workers)?;

    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The admin listener outlives the client listeners: it answers 503 on /readyz while draining.
    let admin_stop = CancellationToken::new();
    let admin_addr = admin_listener.as_ref().map(|(_, a)| *a);
    if let Some((l, _)) = admin_listener {
        let admin = Arc::new(admin::Admin {
            shared: serve.shared.clone(),
            metrics: metrics_handle,
            ready: ready.clone(),
        });
        tokio::spawn(admin::serve(admin, l, admin_stop.clone()));
    }

    // Listeners are bound and the config is loaded: ready, before anyone is told we started.
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    emit_startup(&serve, &audit, &addrs, admin_addr).await;
    tracing::info!(listeners = ?addrs, "portcullis {VERSION} listening");
    systemd::ready();
    let watchdog = tokio::spawn(systemd::watchdog());

    wait_for_shutdown(signals, &serve, &path, &env, &jwks).await;

    // Drain: /readyz turns 503 first, so a load balancer stops sending before the listeners close.
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    systemd::stopping();
    watchdog.abort();
    shutdown.cancel();
    workers.accepting_stopped().await;
    drain(&serve, grace).await;
    // Shared budgets: the charges of the requests just finished reach Redis before the workers
    // (whose runtimes send them) stop; any settled later are sent after.
    if let Some(book) = &serve.shared.budgets {
        book.finish(std::time::Duration::from_secs(5)).await;
    }
    workers.finish().await;
    if let Some(book) = &serve.shared.budgets {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), book.flush_pending()).await;
    }
    if let Some(ledger) = serve.shared.ledger.clone() {
        let _ = tokio::task::spawn_blocking(move || ledger.flush()).await;
    }
    audit.emit(&audit::Simple {
        ts: clock::now_rfc3339(),
        event: "shutdown",
    });
    audit.flush().await;
    admin_stop.cancel();
    Ok(())
}

/// The admin listener's socket, bound with the client listeners (before anything serves).
async fn bind_admin(
    cfg: &Config,
) -> Result<Option<(tokio::net::TcpListener, std::net::SocketAddr)>, StartError> {
    let Some(a) = &cfg.admin else {
        return Ok(None);
    };
    let listen_err = |error| StartError::Listen {
        what: format!("admin.listen {}", a.listen),
        error,
    };
    let l = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(listen_err)?;
    let addr = l.local_addr().map_err(listen_err)?;
    Ok(Some((l, addr)))
}

/// The ledger's writer and the budget book (both `None` without `usage.database`).
type LedgerAndBook = (Option<llm::ledger::Ledger>, Option<Arc<llm::budget::Book>>);

/// The usage ledger, and the budget book rebuilt from it: a restart never resets a budget.
fn open_ledger(cfg: &Config) -> Result<LedgerAndBook, StartError> {
    let Some((path, retention)) = cfg
        .usage
        .as_ref()
        .and_then(|u| u.database.clone().map(|d| (d, u.retention)))
    else {
        return Ok((None, None));
    };
    let conn = llm::ledger::open(&path).map_err(StartError::Ledger)?;
    let now = clock::now_secs();
    let totals = llm::ledger::period_totals(&conn, now)
        .map_err(|e| StartError::Ledger(format!("usage.database {}: {e}", path.display())))?;
    let book = Arc::new(llm::budget::Book::rebuild(&totals, now));
    Ok((
        Some(llm::ledger::Ledger::start(conn, path, retention)),
        Some(book),
    ))
}

/// At startup and each reload, a warning for each key that expires within 7 days or already has
/// — so that a phone's key does not stop working unannounced (the admin listener's
/// `portcullis_key_expiry_timestamp_seconds` says the same to an alert).
fn announce_key_expiry(cfg: &Config) {
    const SOON: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);
    let now = std::time::SystemTime::now();
    for k in &cfg.keys {
        let Some(expires) = k.expires else { continue };
        let when = humantime::format_rfc3339_seconds(expires).to_string();
        match expires.duration_since(now) {
            Err(_) => tracing::warn!(key_id = %k.id, expires = %when, "key has expired"),
            Ok(left) if left <= SOON => tracing::warn!(
                key_id = %k.id,
                expires = %when,
                days_left = left.as_secs() / 86_400,
                "key expires soon"
            ),
            Ok(_) => {}
        }
    }
}

/// Startup warnings for settings that expose more than an operator may think.
fn warn_about_exposure(cfg: &Config) {
    if let Some(a) = &cfg.admin
        && a.token.is_none()
        && !a.listen.ip().is_loopback()
    {
        tracing::warn!(
            listen = %a.listen,
            "admin.listen is beyond loopback without admin.token: anyone who reaches it can read /metrics"
        );
    }
    if cfg.server.allow_plaintext_public && cfg.tls.is_none() {
        tracing::warn!(
            "server.allow_plaintext_public: API keys will cross the network in clear text"
        );
    }
}

/// The `startup` event, flushed before the process says it is ready.
async fn emit_startup(
    serve: &server::Serve,
    audit: &Audit,
    addrs: &[std::net::SocketAddr],
    admin: Option<std::net::SocketAddr>,
) {
    let live = serve.shared.live.load();
    let cfg = &live.config;
    audit.emit(&audit::Startup {
        ts: clock::now_rfc3339(),
        event: "startup",
        version: VERSION,
        listeners: addrs.to_vec(),
        tls: live.tls.is_some(),
        admin,
        routes: cfg.routes.iter().map(|r| r.name.as_str()).collect(),
        key_count: cfg.keys.len(),
    });
    audit.flush().await;
}

/// In-flight requests, streams and tunnels get `grace` to finish; what is left is then cut, and
/// the cut connections and tunnels are waited for, so that their records are written (SPEC §4:
/// a request cut by shutdown is recorded too).
async fn drain(serve: &server::Serve, grace: std::time::Duration) {
    serve.shared.tunnels.close();
    serve.connections.close();
    let all_done = || async {
        serve.connections.wait().await;
        serve.shared.tunnels.wait().await;
    };
    if tokio::time::timeout(grace, all_done()).await.is_err() {
        tracing::warn!("shutdown_grace elapsed; closing remaining connections");
        pipeline::record::cutting_for_shutdown();
        serve.shared.cut.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all_done()).await;
    }
}

/// The signals the gateway handles, installed before anything listens: a SIGHUP that arrives
/// just after startup must reload, not kill the process (SIGHUP's default action).
#[cfg(unix)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

#[cfg(unix)]
fn install_signals() -> Result<Signals, StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let err = StartError::Signals;
    Ok(Signals {
        term: signal(SignalKind::terminate()).map_err(err)?,
        int: signal(SignalKind::interrupt()).map_err(err)?,
        hup: signal(SignalKind::hangup()).map_err(err)?,
        usr1: signal(SignalKind::user_defined1()).map_err(err)?,
    })
}

#[cfg(unix)]
async fn wait_for_shutdown(
    mut s: Signals,
    serve: &server::Serve,
    path: &Path,
    env: &LayeredEnv,
    jwks: &jwks::Sources,
) {
    loop {
        tokio::select! {
            _ = s.term.recv() => return,
            _ = s.int.recv() => return,
            _ = s.hup.recv() => reload(serve, path, env, jwks),
            _ = s.usr1.recv() => serve.shared.audit.reopen(),
        }
    }
}

#[cfg(not(unix))]
pub struct Signals;

#[cfg(not(unix))]
fn install_signals() -> Result<Signals, StartError> {
    Ok(Signals)
}

#[cfg(not(unix))]
async fn wait_for_shutdown(
    _s: Signals,
    _serve: &server::Serve,
    _path: &Path,
    _env: &LayeredEnv,
    _jwks: &jwks::Sources,
) {
    let _ = tokio::signal::ctrl_c().await;
}

/// SIGHUP: load and validate off to the side, then swap; on error keep serving the old config.
fn reload(serve: &server::Serve, path: &Path, env: &LayeredEnv, jwks: &jwks::Sources) {
    systemd::reloading();
    let result = load_checked(path, env).and_then(|(mut cfg, tls)| {
        let old = serve.shared.live.load();
        if cfg.server.listen != old.config.server.listen {
            tracing::warn!("server.listen changed: takes effect at the next restart");
        }
        if cfg.server.workers != old.config.server.workers {
            tracing::warn!("server.workers changed: takes effect at the next restart");
        }
        // The admin listener is bound once; its token is reloadable, its existence is not (a
        // reload that removed [admin] must not leave /metrics open under the old listener).
        if old.config.admin.as_ref().map(|a| a.listen) != cfg.admin.as_ref().map(|a| a.listen) {
            return Err(StartError::NeedsRestart(
                "adding or removing [admin], or changing admin.listen,",
            ));
        }
        let db = |c: &Config| c.usage.as_ref().and_then(|u| u.database.clone());
        if db(&old.config) != db(&cfg) {
            return Err(StartError::NeedsRestart("changing usage.database"));
        }
        // Redis is connected to once, at startup; its limits and on_error follow reloads.
        let at = |c: &Config| {
            c.cluster
                .as_ref()
                .map(|c| (c.redis.expose_secret().to_owned(), c.prefix.clone()))
        };
        if at(&old.config) != at(&cfg) {
            return Err(StartError::NeedsRestart(
                "adding or removing [cluster], or changing cluster.redis or cluster.prefix,",
            ));
        }
        // Listeners speak TLS or not from startup; the certificates themselves are re-read.
        if old.tls.is_some() != tls.is_some() {
            return Err(StartError::NeedsRestart("adding or removing [tls]"));
        }
        announce_key_expiry(&cfg);
        // A `jwks_url` the old config had too keeps its fetched keys (and fetches again now).
        jwks.adopt(issuer_remotes(&mut cfg));
        serve.shared.gate.configure(cfg.cluster.as_ref());
        // One swap: config, limiters and certificates change together.
        serve.shared.live.store(Arc::new(live::Live::build(
            cfg,
            tls,
            &serve.shared.limiters,
        )));
        serve.shared.publish_budgets();
        Ok(())
    });
    let (res, reason) = match &result {
        Ok(()) => ("ok", None),
        Err(e) => {
            // On the terminal too, not only in the audit log: whoever sent SIGHUP looks here.
            tracing::error!(reason = %e, "reload failed; the previous config keeps serving");
            ("failed", Some(e.to_string()))
        }
    };
    metrics::reload(res);
    systemd::ready();
    serve.shared.audit.emit(&audit::Reload {
        ts: clock::now_rfc3339(),
        event: "reload",
        result: res,
        reason: reason.as_deref(),
        key_count: serve.shared.live.load().config.keys.len(),
    });
}
