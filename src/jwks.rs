//! The keys of an `[[issuers]]` entry with a `jwks_url` (SPEC §10): fetched off the request path
//! by a task on the control runtime, at startup and every `jwks_refresh`, and kept in an
//! [`ArcSwapOption`] that verification reads without a lock. A failed fetch keeps the last good
//! set (a warning line and `portcullis_jwks_refresh_errors_total{issuer}`) and is tried again
//! sooner (1 s, 2 s, 4 s… up to `jwks_refresh`); until a first fetch succeeds, the issuer's tokens
//! are refused (401 `invalid_token`).
//!
//! A [`Remote`] belongs to one issuer name and URL. [`Sources`] keeps the running ones across
//! reloads: a reload that keeps both hands the new config the running `Remote`, its fetched set
//! included (so a reload never leaves an issuer without keys), takes its new `jwks_refresh` and
//! `jwks_ca_file`, and makes it fetch again at once. When the last config holding a `Remote` is
//! gone, its task ends.
//!
//! A fetch is one HTTP/1.1 `GET` over rustls (the system's CA certificates, or only those of
//! `jwks_ca_file`), which must be answered `200` within [`FETCH_TIMEOUT`] with at most
//! [`MAX_BODY`] bytes of a JWKS holding at least one usable key. Redirects are not followed.
//! Plain `http://` is accepted only to a loopback address (an identity provider on the same
//! machine). `portcullis check` fetches nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

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

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::JwkSet;

/// Verification keys: `(kid, key)`.
pub type Keys = Vec<(Option<String>, DecodingKey)>;

/// The longest a fetch may take, connection and TLS handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// `jwks_ca_file`'s certificates, trusted instead of the system's.
    pub roots: Option<Arc<RootCertStore>>,
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
/// Read at each fetch, so an updated store is used without a restart.
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

fn client_config(roots: Option<&RootCertStore>) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = match roots {
        Some(r) => r.clone(),
        None => system_roots()?,
    };
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
    parse_jwks(&body)
}

async fn get(url: &Uri, settings: &Settings) -> Result<Bytes, String> {
    let authority = url.authority().ok_or("the URL has no host")?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let https = url.scheme_str() == Some("https");
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host, port))
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
    let config = client_config(settings.roots.as_deref())?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))?;
    exchange(TokioIo::new(tls), req).await
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

/// The verification keys of a JWKS document (a `jwks_file`'s text, a `jwks_url`'s answer): at
/// least one, or an error.
pub fn parse_jwks(text: &[u8]) -> Result<Keys, String> {
    let set: JwkSet =
        serde_json::from_slice(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        // Keys of other kinds (encryption keys, unsupported curves) are skipped, and so are
        // symmetric (`oct`) keys: HMAC keys come only from `secret`.
        if let Ok(k) = DecodingKey::from_jwk(jwk)
            && k.family() != jsonwebtoken::AlgorithmFamily::Hmac
        {
            keys.push((jwk.common.key_id.clone(), k));
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable verification key".to_owned());
    }
    Ok(keys)
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
