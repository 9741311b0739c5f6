//! The keys of an `[[issuers]]` entry with a `jwks_url` (SPEC §10): fetched off the request path
//! by a task on the control runtime, at startup and every `jwks_refresh`, and kept in an
//! [`ArcSwapOption`] that verification reads without a lock. A failed fetch keeps the last good
//! set (a warning line and `portcullis_jwks_refresh_errors_total{issuer}`) and is tried again
//! sooner (1 s, 2 s, 4 s… up to `jwks_refresh`); until a first fetch succeeds, the issuer's tokens
//! are refused (401 `invalid_token`). A token that names a key the set lacks (the provider has
//! rotated its signing key) wakes the task: [`Remote::fetch_soon`], at most every
//! [`WAKE_INTERVAL`]; the request itself never waits for a fetch.
//!
//! A [`Remote`] belongs to one issuer name and URL. [`Sources`] keeps the running ones across
//! reloads: a reload that keeps both hands the new config the running `Remote`, its fetched set
//! included (so a reload never leaves an issuer without keys), takes its new `jwks_refresh` and
//! `jwks_ca_file`, and makes it fetch again at once. When the last config holding a `Remote` is
//! gone, its task ends.
//!
//! A fetch is one HTTP/1.1 `GET` over rustls (the system's CA certificates, or only those of
//! `jwks_ca_file`), which must be answered `200` within [`FETCH_TIMEOUT`] with at most
//! [`MAX_BODY`] bytes of a JWKS holding at least one usable key. Each address the host resolves
//! to is tried in turn for at most [`CONNECT_TIMEOUT`]. Redirects are not followed.
//! Plain `http://` is accepted only to a loopback address (an identity provider on the same
//! machine). `portcullis check` fetches nothing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{ACCEPT, CONNECTION, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::{Notify, watch};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};

/// Verification keys: `(kid, key)`.
pub type Keys = Vec<(Option<String>, DecodingKey)>;

/// The longest a fetch may take, connection and TLS handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection to one of the host's addresses may take before the next is tried
/// (a black-holed IPv6 address must not use up [`FETCH_TIMEOUT`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The shortest time between two fetches woken by tokens naming a key the set lacks.
pub const WAKE_INTERVAL: Duration = Duration::from_secs(30);
/// The largest JWKS document accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// `jwks_refresh` when not set.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
/// The bounds of `jwks_refresh`.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
pub const MAX_REFRESH: Duration = Duration::from_secs(86_400);

/// How a [`Remote`] fetches; a reload may change it.
#[derive(Debug)]
pub struct Settings {
    /// `jwks_refresh`.
    pub refresh: Duration,
    /// The issuer's `algorithms`: a key declaring another (`alg`) is skipped.
    pub algorithms: Vec<Algorithm>,
    /// The TLS client: with `jwks_ca_file`'s certificates, made with the config; with the
    /// system's, made at the first fetch that needs it (read off the runtime's thread) and kept
    /// for as long as these settings (a reload reads the system's store again).
    tls: OnceLock<Arc<rustls::ClientConfig>>,
}

impl Settings {
    /// `roots`: `jwks_ca_file`'s certificates, trusted instead of the system's.
    pub fn new(
        refresh: Duration,
        algorithms: Vec<Algorithm>,
        roots: Option<RootCertStore>,
    ) -> Result<Settings, String> {
        let tls = OnceLock::new();
        if let Some(roots) = roots {
            let _ = tls.set(client_config(roots)?);
        }
        Ok(Settings {
            refresh,
            algorithms,
            tls,
        })
    }

    /// The TLS client config, the system's CA certificates loaded for it if not yet done.
    async fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        if let Some(c) = self.tls.get() {
            return Ok(c.clone());
        }
        // Reading the store is file I/O: not on the (single-threaded) control runtime's thread.
        let roots = tokio::task::spawn_blocking(system_roots)
            .await
            .map_err(|e| format!("reading the system's CA certificates: {e}"))??;
        let c = client_config(roots)?;
        Ok(self.tls.get_or_init(|| c).clone())
    }
}

/// One issuer's `jwks_url` and the key set last fetched from it.
pub struct Remote {
    /// The issuer's name (logs and the metric's `issuer` label).
    issuer: String,
    url: Uri,
    /// `None` until the first fetch succeeds.
    keys: ArcSwapOption<Keys>,
    settings: ArcSwap<Settings>,
    /// Wakes the fetch task: to fetch at once (a reload), or to end (this `Remote` is dropped).
    wake: Arc<Notify>,
    /// Whether the first fetch has finished, well or not (startup waits for it, boundedly).
    tried: watch::Sender<bool>,
    /// When [`Remote::fetch_soon`] last woke the task: milliseconds since `born`, plus one (0:
    /// never).
    woken: AtomicU64,
    born: Instant,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &shown(&self.url))
            .field("keys", &self.keys.load().as_ref().map(|k| k.len()))
            .finish_non_exhaustive()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // The task holds only a weak reference: woken, it finds this gone and ends.
        self.wake.notify_one();
    }
}

impl Remote {
    /// A `Remote` with no keys yet; nothing is fetched until [`Sources::adopt`] takes it.
    pub fn new(issuer: String, url: Uri, settings: Settings) -> Remote {
        Remote {
            issuer,
            url,
            keys: ArcSwapOption::empty(),
            settings: ArcSwap::from_pointee(settings),
            wake: Arc::new(Notify::new()),
            tried: watch::Sender::new(false),
            woken: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Asks the fetch task to fetch the JWKS now, for a token that names a key the set lacks
    /// (or that came before any set): at most once every [`WAKE_INTERVAL`], so tokens with made-up
    /// `kid`s cannot make the gateway hammer the provider. Never fetches here, never waits.
    pub fn fetch_soon(&self) {
        let now = u64::try_from(self.born.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let last = self.woken.load(Ordering::Relaxed);
        if !wake_due(last, now) {
            return;
        }
        // One of the requests that find it due wakes the task.
        if self
            .woken
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(issuer = %self.issuer, url = %shown(&self.url),
                "a token names a key not in the issuer's JWKS; fetching the JWKS again");
            self.wake.notify_one();
        }
    }

    /// The key set last fetched, `None` before the first success. Lock-free.
    pub fn keys(&self) -> arc_swap::Guard<Option<Arc<Keys>>> {
        self.keys.load()
    }

    fn id(&self) -> (String, String) {
        (self.issuer.clone(), self.url.to_string())
    }
}

/// The running [`Remote`]s by issuer name and URL, kept across reloads.
#[derive(Default)]
pub struct Sources {
    running: Mutex<HashMap<(String, String), Weak<Remote>>>,
}

impl Sources {
    /// Gives each `jwks_url` issuer of `cfg` its running [`Remote`] when one of the same name and
    /// URL runs (with the new settings, and a fetch at once), else starts a fetch task for the
    /// config's own. Call on the runtime the tasks are to run on, once the config is to be used.
    /// `remotes`: each issuer's `remote` slot, of a config not yet shared.
    pub fn adopt<'a>(&self, remotes: impl Iterator<Item = &'a mut Option<Arc<Remote>>>) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.retain(|_, r| r.strong_count() > 0);
        for slot in remotes {
            let Some(fresh) = slot.clone() else {
                continue;
            };
            let id = fresh.id();
            if let Some(r) = running.get(&id).and_then(Weak::upgrade) {
                r.settings.store(fresh.settings.load_full());
                r.wake.notify_one();
                *slot = Some(r);
                continue;
            }
            crate::metrics::jwks_issuer(&fresh.issuer);
            running.insert(id, Arc::downgrade(&fresh));
            tokio::spawn(refresh(Arc::downgrade(&fresh), fresh.wake.clone()));
        }
    }

    /// Waits, at most `limit`, until every running [`Remote`] has finished its first fetch (so
    /// that the gateway does not start serving a moment before the keys are there).
    pub async fn first_fetches(&self, limit: Duration) {
        let remotes: Vec<Arc<Remote>> = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let all = async {
            for r in &remotes {
                let _ = r.tried.subscribe().wait_for(|tried| *tried).await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
    }
}

/// The fetch task of one [`Remote`]: fetch, wait `jwks_refresh` (less after a failure) or a
/// wake-up, again; ends when the `Remote` is gone.
async fn refresh(remote: Weak<Remote>, wake: Arc<Notify>) {
    let mut failures: u32 = 0;
    loop {
        let Some(r) = remote.upgrade() else {
            return;
        };
        let settings = r.settings.load_full();
        let url = shown(&r.url);
        let wait = match fetch(&r.url, &settings).await {
            Ok(keys) => {
                let count = keys.len();
                let first = r.keys.load().is_none();
                r.keys.store(Some(Arc::new(keys)));
                if failures > 0 {
                    tracing::info!(issuer = %r.issuer, %url, keys = count, failures, "JWKS fetch works again");
                } else if first {
                    tracing::info!(issuer = %r.issuer, %url, keys = count, "JWKS fetched");
                } else {
                    tracing::debug!(issuer = %r.issuer, %url, keys = count, "JWKS refreshed");
                }
                failures = 0;
                settings.refresh
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                crate::metrics::jwks_refresh_error(&r.issuer);
                if r.keys.load().is_some() {
                    tracing::warn!(issuer = %r.issuer, %url, %error, failures,
                        "JWKS refresh failed; keeping the last good key set");
                } else {
                    tracing::warn!(issuer = %r.issuer, %url, %error, failures,
                        "JWKS fetch failed; the issuer's tokens are refused until one succeeds");
                }
                retry_after(failures).min(settings.refresh)
            }
        };
        r.tried.send_replace(true);
        drop(r);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
        }
    }
}

/// Whether a wake-up last given at `last` (see [`Remote::woken`]) allows another at `now`.
fn wake_due(last: u64, now: u64) -> bool {
    let interval = u64::try_from(WAKE_INTERVAL.as_millis()).unwrap_or(u64::MAX);
    last == 0 || now.saturating_sub(last) >= interval
}

/// The wait before the next try after `failures` failed fetches in a row: 1 s, doubling.
fn retry_after(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(12))
}

/// `url` as logs show it: without its query string (which could hold a credential).
fn shown(url: &Uri) -> String {
    match url.authority() {
        Some(a) => format!(
            "{}://{a}{}",
            url.scheme_str().unwrap_or("https"),
            url.path()
        ),
        None => url.path().to_owned(),
    }
}

/// A `jwks_url`: absolute, `https://` (or `http://` to a loopback address), no credentials.
pub fn parse_url(s: &str) -> Result<Uri, String> {
    let url: Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); e.g. https://sso.example/jwks.json"))?;
    let Some(authority) = url.authority() else {
        return Err("not an absolute URL; e.g. https://sso.example/jwks.json".to_owned());
    };
    if authority.as_str().contains('@') {
        return Err("a user name or password in the URL is not supported".to_owned());
    }
    if authority.host().is_empty() {
        return Err("the URL has no host".to_owned());
    }
    port(authority.as_str())?;
    match url.scheme_str() {
        Some("https") => Ok(url),
        Some("http") if is_loopback(authority.host()) => Ok(url),
        Some("http") => Err(
            "must be https:// (plain http:// only to a loopback address, such as an identity \
             provider on this machine at 127.0.0.1)"
                .to_owned(),
        ),
        _ => Err("must be an https:// URL".to_owned()),
    }
}

/// The port of `authority` (`host`, `host:port`, `[v6]:port`), if it has one: 1 to 65535.
fn port(authority: &str) -> Result<Option<u16>, String> {
    let after_host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, rest)| rest),
        None => authority.find(':').map_or("", |at| &authority[at..]),
    };
    let Some(port) = after_host.strip_prefix(':') else {
        return Ok(None);
    };
    match port.parse::<u16>() {
        Ok(n) if n > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(format!(
            "{port:?} is not a port: give a number from 1 to 65535 (or none, for 443)"
        )),
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The CA certificates of a PEM file (`jwks_ca_file`): at least one.
pub fn roots_from_file(path: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))? {
        let c = c.map_err(|e| format!("{path}: {e}"))?;
        roots.add(c).map_err(|e| format!("{path}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{path}: no certificate found in the file"));
    }
    Ok(roots)
}

/// The system's CA certificates (`SSL_CERT_FILE` and `SSL_CERT_DIR` replace them when set).
/// Read by [`Settings::tls`]: once for each config (a reload reads the store again).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "no CA certificate found in the system's store{why}; install ca-certificates or set jwks_ca_file"
        ));
    }
    Ok(roots)
}

fn client_config(roots: RootCertStore) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// Fetches and parses the JWKS at `url`, within [`FETCH_TIMEOUT`].
async fn fetch(url: &Uri, settings: &Settings) -> Result<Keys, String> {
    let body = tokio::time::timeout(FETCH_TIMEOUT, get(url, settings))
        .await
        .map_err(|_| format!("no complete answer within {} s", FETCH_TIMEOUT.as_secs()))??;
    parse_jwks(&body, &settings.algorithms)
}

async fn get(url: &Uri, settings: &Settings) -> Result<Bytes, String> {
    let authority = url.authority().ok_or("the URL has no host")?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let https = url.scheme_str() == Some("https");
    let port = port(authority.as_str())?.unwrap_or(if https { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let tcp = connect(&addrs, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let req = Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(HOST, authority.as_str())
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .header(
            USER_AGENT,
            concat!("portcullis/", env!("CARGO_PKG_VERSION")),
        )
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    if !https {
        return exchange(TokioIo::new(tcp), req).await;
    }
    let config = settings.tls().await?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))?;
    exchange(TokioIo::new(tls), req).await
}

/// A connection to the first of `addrs` that answers, each tried for at most `each`.
async fn connect(addrs: &[SocketAddr], each: Duration) -> Result<tokio::net::TcpStream, String> {
    let mut failed = Vec::new();
    for addr in addrs {
        match tokio::time::timeout(each, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => failed.push(format!("{addr}: {e}")),
            Err(_) => failed.push(format!("{addr}: no answer within {} s", each.as_secs_f32())),
        }
    }
    if failed.is_empty() {
        return Err("the name resolves to no address".to_owned());
    }
    Err(failed.join("; "))
}

/// One request on a new HTTP/1.1 connection: the body of a `200` answer, at most [`MAX_BODY`].
async fn exchange<I>(io: I, req: Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let work = async move {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(format!(
                "answered {status}; redirects are not followed (set jwks_url to the final address)"
            ));
        }
        if status != StatusCode::OK {
            return Err(format!("answered {status}"));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("the JWKS is larger than {} KiB", MAX_BODY / 1024)
                } else {
                    format!("reading the JWKS: {e}")
                }
            })?;
        Ok(body.to_bytes())
    };
    // The connection is driven here, not in a task of its own: it ends with this call.
    tokio::pin!(work, conn);
    tokio::select! {
        r = &mut work => r,
        c = &mut conn => match c {
            Err(e) => Err(format!("HTTP: {e}")),
            Ok(()) => work.await,
        },
    }
}

/// The verification keys of a JWKS document (a `jwks_file`'s text, a `jwks_url`'s answer) for
/// an issuer with `algorithms`: at least one, or an error. Each key is read on its own, so a key
/// this gateway cannot use (another curve, such as Ed448 or X25519; another `kty`; an `oct`
/// key; one for encryption, or for another algorithm) is skipped without spoiling the others.
pub fn parse_jwks(text: &[u8], algorithms: &[Algorithm]) -> Result<Keys, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(text)
        .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = Vec::new();
    for raw in &set.keys {
        // Each key skipped is named, with why: a token of it is then refused (as "no key"),
        // and the log should say the key was there but not usable.
        let kid = raw.get("kid").and_then(|k| k.as_str()).unwrap_or("");
        let skip = |why: &str| tracing::info!(kid, why, "JWKS key skipped");
        if let Err(why) = for_verifying(raw, algorithms) {
            skip(why);
            continue;
        }
        let Ok(jwk) = <Jwk as serde::Deserialize>::deserialize(raw) else {
            skip("not a key this gateway can read");
            continue;
        };
        // Symmetric (`oct`) keys are skipped: HMAC keys come only from `secret`.
        match DecodingKey::from_jwk(&jwk) {
            Ok(k) if k.family() != jsonwebtoken::AlgorithmFamily::Hmac => {
                keys.push((jwk.common.key_id.clone(), k));
            }
            Ok(_) => skip("a symmetric key (HMAC keys come only from `secret`)"),
            Err(_) => skip("not a key this gateway can read"),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "the JWKS holds no usable verification key (none of its {} keys is an RSA, P-256 \
             or Ed25519 key for signatures with the issuer's algorithms)",
            set.keys.len()
        ));
    }
    Ok(keys)
}

/// Whether a JWK's declared use allows verifying the issuer's tokens: a `use` other than `sig`,
/// `key_ops` without `verify`, or an `alg` not among `algorithms` (RFC 7517 §4.2–4.4) rules it
/// out; a key that declares none of them is for any use. EC keys must be on P-256 (ES256) and
/// OKP keys Ed25519 (EdDSA): the library reads other curves' keys without checking the curve.
/// `Err`: why not.
fn for_verifying(jwk: &serde_json::Value, algorithms: &[Algorithm]) -> Result<(), &'static str> {
    let curve = |want: &str| jwk.get("crv").is_some_and(|c| c == want);
    match jwk.get("kty").and_then(|k| k.as_str()) {
        Some("EC") if !curve("P-256") => return Err("an EC key not on P-256 (ES256)"),
        Some("OKP") if !curve("Ed25519") => return Err("an OKP key not Ed25519 (EdDSA)"),
        _ => {}
    }
    let use_ok = jwk.get("use").is_none_or(|u| u == "sig");
    let ops_ok = jwk.get("key_ops").is_none_or(|ops| {
        ops.as_array()
            .is_some_and(|ops| ops.iter().any(|op| op == "verify"))
    });
    let alg_ok = jwk.get("alg").is_none_or(|a| {
        a.as_str()
            // RFC 9864's fully specified name for EdDSA with Ed25519.
            .map(|a| if a == "Ed25519" { "EdDSA" } else { a })
            .and_then(|a| a.parse::<Algorithm>().ok())
            .is_some_and(|a| algorithms.contains(&a))
    });
    if !use_ok {
        Err("declared for a use other than signatures (`use`)")
    } else if !ops_ok {
        Err("its `key_ops` do not include verify")
    } else if !alg_ok {
        Err("its `alg` is not one of the issuer's algorithms")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_or_loopback_http_without_credentials() {
        assert!(parse_url("https://sso.example/application/o/x/jwks/").is_ok());
        assert!(parse_url("https://[2001:db8::1]:8443/certs").is_ok());
        assert!(parse_url("http://127.0.0.1:9000/certs").is_ok());
        assert!(parse_url("http://localhost/certs").is_ok());
        assert!(parse_url("http://[::1]:8080/certs").is_ok());
        for bad in [
            "http://sso.example/jwks",
            "http://192.168.1.10/jwks",
            "ftp://sso.example/jwks",
            "/jwks.json",
            "sso.example/jwks",
            "https://user:pass@sso.example/jwks",
            "not a url",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_port_that_is_not_one_is_refused_not_replaced_by_the_default() {
        for bad in [
            "https://sso.example:84430/jwks",
            "https://sso.example:abc/jwks",
            "https://sso.example:0/jwks",
            "https://sso.example:+443/jwks",
            "https://sso.example:/jwks",
            "https://[2001:db8::1]:99999/certs",
            "http://127.0.0.1:65536/certs",
        ] {
            match parse_url(bad) {
                Ok(u) => panic!("{bad} accepted as {u}"),
                Err(e) => assert!(e.contains("not a port"), "{bad}: {e}"),
            }
        }
        assert_eq!(port("sso.example"), Ok(None));
        assert_eq!(port("sso.example:8443"), Ok(Some(8443)));
        assert_eq!(port("[2001:db8::1]"), Ok(None));
        assert_eq!(port("[2001:db8::1]:65535"), Ok(Some(65535)));
    }

    #[test]
    fn tokens_wake_the_fetch_task_at_most_every_thirty_seconds() {
        let ms = |s: u64| s * 1000 + 1;
        assert!(wake_due(0, 1), "never woken: due at once");
        assert!(!wake_due(ms(10), ms(10)));
        assert!(!wake_due(ms(10), ms(39)));
        assert!(wake_due(ms(10), ms(40)));
        // The remote itself: the first call wakes, the next ones within the interval do not.
        let r = Remote::new(
            "sso".to_owned(),
            parse_url("https://sso.example/jwks").unwrap(),
            Settings::new(DEFAULT_REFRESH, vec![Algorithm::RS256], None).unwrap(),
        );
        r.fetch_soon();
        let first = r.woken.load(Ordering::Relaxed);
        assert_ne!(first, 0);
        r.fetch_soon();
        assert_eq!(r.woken.load(Ordering::Relaxed), first);
    }

    /// RFC 7517 A.1's RSA key, with `extra` members.
    fn rsa(kid: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut k = serde_json::json!({
            "kty": "RSA",
            "kid": kid,
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
        });
        if let (Some(k), Some(extra)) = (k.as_object_mut(), extra.as_object()) {
            k.extend(extra.clone());
        }
        k
    }

    fn kids(doc: &serde_json::Value, algorithms: &[Algorithm]) -> Result<Vec<String>, String> {
        let keys = parse_jwks(doc.to_string().as_bytes(), algorithms)?;
        Ok(keys
            .into_iter()
            .map(|(kid, _)| kid.unwrap_or_default())
            .collect())
    }

    #[test]
    fn a_key_the_library_cannot_read_is_skipped_not_fatal() {
        use serde_json::json;
        let ed448 = json!({"kty": "OKP", "crv": "Ed448", "kid": "ed448",
            "x": "X9dEm1m0Yf0s54fsYWrUah2hNCSFpw4fig6nXYDpZ3jt8SR2m0bHBhvWeD3x5Q9s0foavq_oJWGA"});
        let x25519 = json!({"kty": "OKP", "crv": "X25519", "kid": "x25519",
            "x": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"});
        let k256 = json!({"kty": "EC", "crv": "secp256k1", "kid": "k256",
            "x": "WfY7Px6AgH6x-_dgAoRbg8weYRJA36ON-gQiFnETrqw",
            "y": "ZfU_K6vXbvqi0WV5TGmqMXXwN8V-MxHfU0NVEgkoEDo"});
        let future = json!({"kty": "AKP", "alg": "ML-DSA-44", "kid": "pq", "pub": "AAAA"});
        let doc = json!({"keys": [ed448, x25519, k256, future, rsa("rsa-1", json!({}))]});
        assert_eq!(
            kids(&doc, &[Algorithm::RS256]),
            Ok(vec!["rsa-1".to_owned()])
        );
        // Nothing usable at all: an error, naming how many keys there were.
        let doc = json!({"keys": [ed448, x25519]});
        let e = kids(&doc, &[Algorithm::EdDSA]).unwrap_err();
        assert!(
            e.contains("no usable verification key (none of its 2 keys"),
            "{e}"
        );
        // Not a JWKS document at all.
        for bad in [json!([]), json!({"keys": {}}), json!({"key": []})] {
            let e = kids(&bad, &[Algorithm::RS256]).unwrap_err();
            assert!(e.starts_with("not a JWKS document"), "{bad}: {e}");
        }
    }

    #[test]
    fn ec_keys_off_p256_are_skipped_though_the_library_would_read_them() {
        use serde_json::json;
        // A P-384 point: the library builds a key from any coordinates, whatever `crv` says.
        let p384 = json!({"kty": "EC", "crv": "P-384", "kid": "p384",
            "x": "iA7lWQLzVrKGEFjfGMfMHfTEZ2KnLiKU7JuNT3E7ygsfE7ygAK5l2NcJLhRjG0bf",
            "y": "BbFIg8sYD8qUYpzV6bnOVkGyhKKZx4d8yjDSsNz-7W-iYvl4ylZ6zR2DeA1Wq_lc"});
        let no_crv = json!({"kty": "OKP", "kid": "okp",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        let doc = json!({"keys": [p384, no_crv, rsa("rsa-1", json!({}))]});
        assert_eq!(
            kids(
                &doc,
                &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
            ),
            Ok(vec!["rsa-1".to_owned()])
        );
        // RFC 9864's `alg: "Ed25519"` is EdDSA.
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(
            kids(&json!({"keys": [ed]}), &[Algorithm::EdDSA]),
            Ok(vec!["ed".to_owned()])
        );
    }

    #[test]
    fn keys_declared_for_something_else_are_skipped() {
        use serde_json::json;
        let doc = json!({"keys": [
            // Keycloak publishes its encryption key next to its signing key.
            rsa("enc", json!({"use": "enc", "alg": "RSA-OAEP"})),
            rsa("enc-use-only", json!({"use": "enc"})),
            rsa("oaep-alg-only", json!({"alg": "RSA-OAEP-256"})),
            rsa("ops-encrypt", json!({"key_ops": ["encrypt", "wrapKey"]})),
            rsa("ops-not-a-list", json!({"key_ops": "verify"})),
            rsa("other-alg", json!({"alg": "PS256"})),
            rsa("rs384", json!({"alg": "RS384"})),
            rsa("alg-not-a-string", json!({"alg": 256})),
            rsa("sig", json!({"use": "sig", "alg": "RS256"})),
            rsa("ops-verify", json!({"key_ops": ["verify"]})),
            rsa("plain", json!({})),
        ]});
        assert_eq!(
            kids(&doc, &[Algorithm::RS256, Algorithm::ES256]),
            Ok(vec![
                "sig".to_owned(),
                "ops-verify".to_owned(),
                "plain".to_owned()
            ])
        );
        // An issuer without RS256 takes none of the RSA keys that declare it.
        let doc = json!({"keys": [rsa("sig", json!({"alg": "RS256"}))]});
        assert!(kids(&doc, &[Algorithm::EdDSA]).is_err());
    }

    #[tokio::test]
    async fn an_address_that_never_answers_does_not_keep_the_others_from_being_tried() {
        // A listener whose accept queue is full drops new SYNs, as a black-holed address does:
        // backlog 0 takes one connection, never accepted, and then no more.
        let hole = tokio::net::TcpSocket::new_v4().unwrap();
        hole.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let hole = hole.listen(0).unwrap();
        let hole_addr = hole.local_addr().unwrap();
        let _queued = tokio::net::TcpStream::connect(hole_addr).await.unwrap();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let each = Duration::from_millis(300);
        // Bounded well below the system's own connect timeout (minutes).
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            connect(&[hole_addr, refused, good_addr], each),
        )
        .await
        .unwrap_or_else(|_| panic!("connect waited on the address that never answers"))
        .unwrap();
        assert_eq!(tcp.peer_addr().ok(), Some(good_addr));
        // When none answers, each address says why.
        let e = connect(&[hole_addr, refused], each)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            e.contains(&format!("{hole_addr}: no answer within 0.3 s")),
            "{e}"
        );
        assert!(e.contains(&format!("{refused}: ")), "{e}");
        assert_eq!(
            connect(&[], each).await.map(|_| ()).unwrap_err(),
            "the name resolves to no address"
        );
    }

    #[test]
    fn logs_show_no_query_string() {
        let u = parse_url("https://sso.example:8443/jwks?token=abc").unwrap();
        assert_eq!(shown(&u), "https://sso.example:8443/jwks");
    }

    #[test]
    fn retries_back_off_from_one_second() {
        let secs: Vec<u64> = (1..=4).map(|f| retry_after(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8]);
        assert_eq!(retry_after(u32::MAX), Duration::from_secs(4096));
    }
}
