//! `[[issuers]] jwks_url` (SPEC §10): the issuer's JWKS fetched over HTTPS off the request path,
//! refreshed every `jwks_refresh`, the last good set kept when a fetch fails (a warning line and
//! `portcullis_jwks_refresh_errors_total{issuer}`), kept across a reload, and no token of the
//! issuer accepted before a first fetch succeeds; a token naming a key not fetched yet wakes a
//! fetch and does not count toward lockout. The JWKS server is a real HTTPS server in the
//! test (hyper over rustls, an rcgen certificate) whose answer the test changes; waits are on
//! its requests and on the gateway's log lines, never on the clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::convert::Infallible;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::*;
use tokio::sync::Notify;

const ISS: &str = "https://sso.example/";
const AUD: &str = "portcullis";
/// `[auth]` and `[limits]` that refuse nothing by themselves (lockout high, limits off).
const PERMISSIVE: &str =
    "[auth]\nlockout_failures = 1000\n[limits]\nper_ip = \"off\"\nper_key = \"off\"\n";
/// In the JWKS URL's query: the logs must never show it.
const QUERY_SECRET: &str = "jwks-query-credential-7f3a";

// ---------------------------------------------------------------- keys and tokens

struct SigningKey {
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

/// RS256 keys `a` (the issuer's first) and `b` (the one it rotates to), made once per binary.
static KEYS: LazyLock<(SigningKey, SigningKey)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    (rsa_key(dir.path(), "key-a"), rsa_key(dir.path(), "key-b"))
});

fn rsa_key(dir: &Path, kid: &str) -> SigningKey {
    let path = dir.join(format!("{kid}.pem"));
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .arg("-out")
        .arg(&path)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let enc = EncodingKey::from_rsa_pem(&std::fs::read(&path).unwrap()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    SigningKey {
        kid: kid.to_owned(),
        jwk: serde_json::to_value(jwk).unwrap(),
        enc,
    }
}

fn key_a() -> &'static SigningKey {
    &KEYS.0
}

fn key_b() -> &'static SigningKey {
    &KEYS.1
}

/// A valid token for `sub` signed with `key` (its `kid` in the header).
fn token(key: &SigningKey, sub: &str) -> String {
    token_as(&key.enc, &key.kid, sub)
}

/// A token for `sub` signed with `enc`, naming `kid` (a forgery when that is another key's).
fn token_as(enc: &EncodingKey, kid: &str, sub: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({ "iss": ISS, "sub": sub, "aud": AUD, "iat": now, "exp": now + 300 });
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_owned());
    encode(&h, &claims, enc).unwrap()
}

/// A JWKS document holding the public halves of `keys`.
fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| &k.jwk).collect::<Vec<_>>() }).to_string()
}

// ---------------------------------------------------------------- the JWKS server

/// What the JWKS server answers.
#[derive(Clone)]
enum Answer {
    /// 200 with this document.
    Jwks(String),
    /// This status, with a small body.
    Status(u16),
    /// 302 to another path.
    Redirect,
    /// 200 with a body over the gateway's 1 MiB bound.
    Huge,
    /// The connection closed before the TLS handshake (as if nothing answered).
    Close,
}

#[derive(Default)]
struct Served {
    answer: Option<Answer>,
    /// Requests (connections, for `Close`) that arrived.
    arrivals: usize,
    /// Each request: method, target, `Connection` and `User-Agent`.
    seen: Vec<String>,
}

/// An HTTPS server on 127.0.0.1 serving `/jwks` with a certificate of the test CA.
struct JwksServer {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<Served>>,
    arrived: Arc<Notify>,
    accept: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(pki: &Pki, answer: Answer) -> JwksServer {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(Served {
            answer: Some(answer),
            ..Served::default()
        }));
        let arrived = Arc::new(Notify::new());
        let (st, ar) = (state.clone(), arrived.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let closing = {
                    let mut s = st.lock().unwrap();
                    let close = matches!(s.answer, Some(Answer::Close));
                    if close {
                        s.arrivals += 1;
                    }
                    close
                };
                if closing {
                    drop(tcp);
                    ar.notify_waiters();
                    continue;
                }
                let (acceptor, st, ar) = (acceptor.clone(), st.clone(), ar.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = {
                            let mut s = st.lock().unwrap();
                            s.arrivals += 1;
                            let h = |n: &str| {
                                let v = req.headers().get(n).and_then(|v| v.to_str().ok());
                                v.unwrap_or("-").to_owned()
                            };
                            let line = format!(
                                "{} {} {} {}",
                                req.method(),
                                req.uri(),
                                h("connection"),
                                h("user-agent")
                            );
                            s.seen.push(line);
                            s.answer.clone().unwrap()
                        };
                        ar.notify_waiters();
                        let path_ok = req.uri().path() == "/jwks";
                        async move { Ok::<_, Infallible>(respond(answer, path_ok)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            state,
            arrived,
            accept,
        }
    }

    /// The `jwks_url` (with a query the logs must not show).
    fn url(&self) -> String {
        format!(
            "https://localhost:{}/jwks?access={QUERY_SECRET}",
            self.addr.port()
        )
    }

    /// Answers `answer` from now on; returns the arrivals so far (every later one gets it).
    fn answer(&self, answer: Answer) -> usize {
        let mut s = self.state.lock().unwrap();
        s.answer = Some(answer);
        s.arrivals
    }

    fn arrivals(&self) -> usize {
        self.state.lock().unwrap().arrivals
    }

    /// Waits (bounded by `WAIT`) until `n` requests have arrived.
    async fn wait_arrivals(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.arrivals() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("only {} of {n} JWKS requests arrived", self.arrivals());
            }
        }
    }

    /// Answers `answer` from now on and returns once the gateway has certainly taken in an
    /// answer given after the change: the fetch after the first one that got it has begun
    /// (the gateway fetches one at a time, and stores a fetched set before the next fetch).
    async fn change_and_wait(&self, answer: Answer) {
        let before = self.answer(answer);
        self.wait_arrivals(before + 2).await;
    }

    /// Stops listening: connections to the port are refused from now on.
    fn stop(&self) {
        self.accept.abort();
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn respond(answer: Answer, path_ok: bool) -> hyper::Response<Full<Bytes>> {
    let mut b = hyper::Response::builder();
    let body = match answer {
        _ if !path_ok => {
            b = b.status(404);
            "not here".to_owned()
        }
        Answer::Jwks(doc) => {
            b = b.header("content-type", "application/json");
            doc
        }
        Answer::Status(s) => {
            b = b.status(s);
            "unavailable".to_owned()
        }
        Answer::Redirect => {
            b = b.status(302).header("location", "/jwks");
            String::new()
        }
        Answer::Huge => {
            let pad = "x".repeat(1024 * 1024 + 1);
            format!("{{\"keys\":[],\"pad\":\"{pad}\"}}")
        }
        // Changed to `Close` after this connection was accepted.
        Answer::Close => {
            b = b.status(503);
            String::new()
        }
    };
    b.body(Full::new(Bytes::from(body))).unwrap()
}

// ---------------------------------------------------------------- the gateway

/// The gateway with one issuer `sso` at `url` (refreshed every second, trusting `ca_file` when
/// given) on route `/v1/`, an admin listener, and `extra` blocks.
fn config(up: &Upstream, url: &str, ca_file: Option<&Path>, extra: &str) -> String {
    let ca = ca_file
        .map(|p| format!("jwks_ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        "{}{PERMISSIVE}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[issuers]]\nname = \"sso\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
         algorithms = [\"RS256\"]\njwks_url = \"{url}\"\njwks_refresh = \"1s\"\n{ca}\n\
         [[routes]]\nname = \"api\"\npath = \"/v1/\"\nupstream = \"{}\"\nauth = \"jwt\"\n\
         issuers = [\"sso\"]\n\n{extra}",
        server_section(""),
        up.url()
    )
}

/// Writes the test CA's certificate into `dir`; returns its path.
fn ca_file(pki: &Pki, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("sso-ca.pem");
    std::fs::write(&path, &pki.ca_pem).unwrap();
    path
}

/// A CA certificate of another CA (its own name: the test CA's is not found in a store of it).
fn other_ca_pem() -> String {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Another CA, not the provider's");
    params.self_signed(&key).unwrap().pem()
}

/// `GET /v1/x` with `token`: (status, error code).
async fn get(gw: &Gateway, token: &str) -> (u16, String) {
    let (s, r) = send(
        gw.addr,
        "GET",
        "/v1/x",
        &[&format!("Authorization: Bearer {token}")],
    )
    .await;
    (s, code_of(&r))
}

async fn accepted(gw: &Gateway, token: &str, what: &str) {
    assert_eq!(get(gw, token).await, (200, String::new()), "{what}");
}

async fn refused(gw: &Gateway, token: &str, what: &str) {
    assert_eq!(
        get(gw, token).await,
        (401, "invalid_token".to_owned()),
        "{what}"
    );
}

/// The diagnostic log lines with `message` (for `issuer`, if given).
fn logged(lines: &[String], message: &str, issuer: &str) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message && v["fields"]["issuer"] == issuer)
        .collect()
}

/// Waits until at least `n` log lines with `message` for `issuer` are written; returns them.
async fn wait_logged(gw: &Gateway, message: &str, issuer: &str, n: usize) -> Vec<Value> {
    gw.stderr
        .wait_until(|lines| {
            let found = logged(lines, message, issuer);
            (found.len() >= n).then_some(found)
        })
        .await
}

const FETCHED: &str = "JWKS fetched";
const KEPT: &str = "JWKS refresh failed; keeping the last good key set";
const NONE_YET: &str = "JWKS fetch failed; the issuer's tokens are refused until one succeeds";
const RECOVERED: &str = "JWKS fetch works again";
const REFRESHED: &str = "JWKS refreshed";
const WOKEN: &str = "a token names a key not in the issuer's JWKS; fetching the JWKS again";

/// `config` with `lockout_failures` instead of 1000.
fn with_lockout(cfg: &str, failures: u32) -> String {
    let out = cfg.replace(
        "lockout_failures = 1000",
        &format!("lockout_failures = {failures}"),
    );
    assert_ne!(out, cfg);
    out
}

/// `portcullis_jwks_refresh_errors_total{issuer="…"}` from the admin listener.
async fn refresh_errors(gw: &Gateway, issuer: &str) -> Option<u64> {
    let series = format!("portcullis_jwks_refresh_errors_total{{issuer=\"{issuer}\"}}");
    gw.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
}

/// No token, and not the URL's query, in anything the gateway wrote.
fn assert_nothing_secret_logged(gw: &Gateway, tokens: &[&str]) {
    let (out, err) = (gw.stdout.text(), gw.stderr.text());
    assert!(!err.contains(QUERY_SECRET), "the URL's query in the log");
    assert!(
        !out.contains(QUERY_SECRET),
        "the URL's query in the audit log"
    );
    for t in tokens {
        assert!(!err.contains(t), "a token in the log");
        assert!(!out.contains(t), "a token in the audit log");
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_rotated_jwks_is_picked_up_at_refresh_and_a_removed_key_is_refused() {
    let (a, b) = (key_a(), key_b());
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&pki, dir.path());
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[a]))).await;
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, &server.url(), Some(&ca), "")).await;

    // The first fetch is done before the gateway serves.
    let fetched = wait_logged(&gw, FETCHED, "sso", 1).await;
    assert_eq!(fetched[0]["fields"]["keys"], 1, "{}", fetched[0]);
    let (ta, tb) = (token(a, "alice"), token(b, "bob"));
    accepted(&gw, &ta, "key A, in the JWKS").await;
    refused(&gw, &tb, "key B, not yet in the JWKS").await;

    // The provider adds key B: the next refresh takes it in.
    server.change_and_wait(Answer::Jwks(jwks(&[a, b]))).await;
    accepted(&gw, &tb, "key B, after the refresh that added it").await;
    accepted(&gw, &ta, "key A, still in the JWKS").await;

    // Then removes key A: its tokens are refused after the next refresh.
    server.change_and_wait(Answer::Jwks(jwks(&[b]))).await;
    refused(&gw, &ta, "key A, removed from the JWKS").await;
    accepted(&gw, &tb, "key B").await;

    let recs = gw.wait_requests(6).await;
    let mut who: Vec<&str> = recs
        .iter()
        .map(|r| r["key_id"].as_str().unwrap_or("-"))
        .collect();
    who.sort_unstable();
    assert_eq!(
        who,
        ["-", "-", "sso:alice", "sso:alice", "sso:bob", "sso:bob"]
    );
    // What the gateway asked: GET of the URL's path and query, on a connection of its own.
    let seen = server.state.lock().unwrap().seen.clone();
    assert!(seen.len() >= 5, "{seen:?}");
    let want = format!("GET /jwks?access={QUERY_SECRET} close portcullis/");
    assert!(seen.iter().all(|s| s.starts_with(&want)), "{seen:?}");
    assert_eq!(refresh_errors(&gw, "sso").await, Some(0));
    assert_nothing_secret_logged(&gw, &[&ta, &tb]);
}

#[tokio::test]
async fn a_jwks_url_that_goes_down_keeps_the_last_good_set_and_a_reload_keeps_it_too() {
    let a = key_a();
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&pki, dir.path());
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[a]))).await;
    let up = upstream().await;
    // The system's CA store replaced by the test CA (SSL_CERT_FILE), instead of jwks_ca_file.
    let cfg = config(&up, &server.url(), None, "");
    let ca_env = ca.to_str().unwrap();
    let gw = Gateway::start_with_env(&cfg, &[("SSL_CERT_FILE", ca_env)]).await;
    wait_logged(&gw, FETCHED, "sso", 1).await;
    let ta = token(a, "alice");
    accepted(&gw, &ta, "key A").await;
    assert_eq!(
        refresh_errors(&gw, "sso").await,
        Some(0),
        "the series exists at 0"
    );

    // The provider answers 500: the set is kept, one warning a failed fetch, the metric counts.
    server.answer(Answer::Status(500));
    let warned = wait_logged(&gw, KEPT, "sso", 1).await;
    let w = &warned[0];
    assert_eq!(w["level"], "WARN", "{w}");
    assert!(
        w["fields"]["error"].as_str().unwrap().contains("500"),
        "{w}"
    );
    assert_eq!(
        w["fields"]["url"],
        format!("https://localhost:{}/jwks", server.addr.port()),
        "{w}"
    );
    accepted(&gw, &ta, "key A while the JWKS URL answers 500").await;
    assert!(refresh_errors(&gw, "sso").await.unwrap() >= 1);

    // It answers again: one line says so.
    server.answer(Answer::Jwks(jwks(&[a])));
    let back = wait_logged(&gw, RECOVERED, "sso", 1).await;
    assert!(
        back[0]["fields"]["failures"].as_u64().unwrap() >= 1,
        "{}",
        back[0]
    );

    // The server goes away altogether (connection refused).
    let errors = refresh_errors(&gw, "sso").await.unwrap();
    let warnings = logged(&gw.stderr.all(), KEPT, "sso").len();
    server.stop();
    wait_logged(&gw, KEPT, "sso", warnings + 1).await;
    accepted(&gw, &ta, "key A while the JWKS URL is down").await;
    assert!(refresh_errors(&gw, "sso").await.unwrap() > errors);

    // A reload that keeps the URL keeps the fetched set (the fetch it makes fails).
    let reload = gw.reload().await;
    assert_eq!(reload["result"], "ok", "{reload}");
    accepted(&gw, &ta, "key A after a reload while the JWKS URL is down").await;
    assert!(
        logged(&gw.stderr.all(), NONE_YET, "sso").is_empty(),
        "the set was lost:\n{}",
        gw.stderr.text()
    );
    assert_nothing_secret_logged(&gw, &[&ta]);
}

#[tokio::test]
async fn tokens_are_refused_until_a_first_fetch_succeeds() {
    let a = key_a();
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&pki, dir.path());
    // Nothing answers at startup: each connection is closed at once.
    let server = JwksServer::start(&pki, Answer::Close).await;
    let up = upstream().await;
    let cfg = with_lockout(&config(&up, &server.url(), Some(&ca), ""), 2);
    let gw = Gateway::start(&cfg).await;

    let warned = wait_logged(&gw, NONE_YET, "sso", 1).await;
    assert_eq!(warned[0]["level"], "WARN", "{}", warned[0]);
    let ta = token(a, "alice");
    // Refused, but not counted toward lockout (2 failures): the tokens may well be valid.
    for _ in 0..3 {
        refused(&gw, &ta, "before any JWKS was fetched").await;
    }
    assert!(up.seen().is_empty());
    assert!(refresh_errors(&gw, "sso").await.unwrap() >= 1);

    // The provider comes up: the next try fetches it, and the tokens pass.
    server.answer(Answer::Jwks(jwks(&[a])));
    wait_logged(&gw, RECOVERED, "sso", 1).await;
    accepted(&gw, &ta, "once the JWKS is fetched").await;
    assert_nothing_secret_logged(&gw, &[&ta]);
}

#[tokio::test]
async fn answers_that_are_no_usable_jwks_are_failed_fetches_and_an_unknown_ca_is_refused() {
    let a = key_a();
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&pki, dir.path());
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[a]))).await;
    let up = upstream().await;
    // A second issuer at the same server without the test CA: the system's roots (replaced by
    // another CA's, so that the answer does not depend on this machine's store) do not hold it.
    let stranger = format!(
        "[[issuers]]\nname = \"stranger\"\nissuer = \"{ISS}\"\nalgorithms = [\"RS256\"]\n\
         jwks_url = \"{}\"\n",
        server.url()
    );
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other_ca_pem()).unwrap();
    let gw = Gateway::start_with_env(
        &config(&up, &server.url(), Some(&ca), &stranger),
        &[("SSL_CERT_FILE", other_ca.to_str().unwrap())],
    )
    .await;
    wait_logged(&gw, FETCHED, "sso", 1).await;
    let refused_ca = wait_logged(&gw, NONE_YET, "stranger", 1).await;
    let e = refused_ca[0]["fields"]["error"].as_str().unwrap();
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    let ta = token(a, "alice");

    let cases = [
        (Answer::Redirect, "redirects are not followed"),
        (Answer::Huge, "larger than 1024 KiB"),
        (
            Answer::Jwks("<html>sign in</html>".to_owned()),
            "not a JWKS document",
        ),
        (
            Answer::Jwks("{\"keys\":[]}".to_owned()),
            "no usable verification key",
        ),
        (Answer::Status(404), "404"),
    ];
    for (i, (answer, why)) in cases.into_iter().enumerate() {
        server.answer(answer);
        let lines = gw
            .stderr
            .wait_until(|lines| {
                let found: Vec<Value> = logged(lines, KEPT, "sso")
                    .into_iter()
                    .filter(|v| v["fields"]["error"].as_str().unwrap_or("").contains(why))
                    .collect();
                (!found.is_empty()).then_some(found)
            })
            .await;
        assert!(!lines.is_empty(), "case {i}");
        accepted(&gw, &ta, why).await;
    }
    assert!(refresh_errors(&gw, "sso").await.unwrap() >= 5);
    assert!(refresh_errors(&gw, "stranger").await.unwrap() >= 1);
    assert_nothing_secret_logged(&gw, &[&ta]);
}

#[tokio::test]
async fn a_token_of_a_key_not_fetched_yet_wakes_a_fetch_and_does_not_count_toward_lockout() {
    let (a, b) = (key_a(), key_b());
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&pki, dir.path());
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[a]))).await;
    let up = upstream().await;
    // Lockout after 2 failures; the next scheduled refresh an hour away.
    let cfg = with_lockout(&config(&up, &server.url(), Some(&ca), ""), 2)
        .replace("jwks_refresh = \"1s\"", "jwks_refresh = \"1h\"");
    let gw = Gateway::start(&cfg).await;
    wait_logged(&gw, FETCHED, "sso", 1).await;
    assert_eq!(server.arrivals(), 1);

    // The provider rotates to key B; tokens of a key the gateway does not have arrive. (They
    // name a `kid` the provider never publishes, so that each is refused whenever the woken
    // fetch completes; a token of key B itself might already be accepted by the second.)
    server.answer(Answer::Jwks(jwks(&[a, b])));
    let (ta, tb) = (token(a, "alice"), token(b, "bob"));
    let unknown = token_as(&b.enc, "not-published-yet", "bob");
    for _ in 0..3 {
        refused(&gw, &unknown, "a key not fetched").await;
    }
    // Not counted toward lockout: three of them, and the address is not locked out.
    accepted(&gw, &ta, "key A after three tokens of an unknown key").await;

    // The first of them woke the fetch task (once: the others came within 30 s of it), which
    // took key B in without waiting for jwks_refresh.
    let woken = wait_logged(&gw, WOKEN, "sso", 1).await;
    assert_eq!(woken[0]["level"], "INFO", "{}", woken[0]);
    gw.stderr
        .wait_until(|lines| {
            let found = logged(lines, REFRESHED, "sso");
            found.iter().any(|v| v["fields"]["keys"] == 2).then_some(())
        })
        .await;
    accepted(&gw, &tb, "key B, after the woken fetch").await;
    assert_eq!(server.arrivals(), 2, "one fetch at startup, one woken");
    assert_eq!(logged(&gw.stderr.all(), WOKEN, "sso").len(), 1);

    // An invalid token still counts: a forgery under key A's kid, twice, locks the address out.
    let forged = token_as(&b.enc, &a.kid, "alice");
    refused(&gw, &forged, "a forgery under a known kid").await;
    refused(&gw, &forged, "a forgery under a known kid").await;
    assert_eq!(get(&gw, &ta).await, (429, "locked_out".to_owned()));
    // The event reaches stdout through the audit writer, a moment after the answer.
    assert_eq!(gw.wait_events("lockout", 1).await.len(), 1);
    assert_nothing_secret_logged(&gw, &[&ta, &tb, &unknown, &forged]);
}

#[tokio::test]
async fn keys_that_cannot_be_read_or_are_not_for_signatures_are_skipped_and_the_rest_used() {
    let (a, b) = (key_a(), key_b());
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_file(&pki, dir.path());
    // An Ed448 key (a curve the library does not read), key B published for encryption only
    // (as Keycloak publishes its RSA-OAEP key), and key A.
    let ed448 = json!({"kty": "OKP", "crv": "Ed448", "kid": "ed448",
        "x": "X9dEm1m0Yf0s54fsYWrUah2hNCSFpw4fig6nXYDpZ3jt8SR2m0bHBhvWeD3x5Q9s0foavq_oJWGA"});
    let mut b_enc = b.jwk.clone();
    b_enc["use"] = json!("enc");
    b_enc["alg"] = json!("RSA-OAEP");
    let doc = json!({ "keys": [ed448, b_enc, a.jwk] }).to_string();
    let server = JwksServer::start(&pki, Answer::Jwks(doc)).await;
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, &server.url(), Some(&ca), "")).await;
    let fetched = wait_logged(&gw, FETCHED, "sso", 1).await;
    assert_eq!(fetched[0]["fields"]["keys"], 1, "{}", fetched[0]);
    accepted(&gw, &token(a, "alice"), "key A, next to keys it cannot use").await;
    refused(&gw, &token(b, "bob"), "key B, published for encryption").await;
    assert_eq!(refresh_errors(&gw, "sso").await, Some(0));
}

// ---------------------------------------------------------------- config checks

/// An issuer `sso` with `lines`, and a route using it.
fn issuer_config(lines: &str) -> String {
    format!(
        "[[issuers]]\nname = \"sso\"\nissuer = \"{ISS}\"\nalgorithms = [\"RS256\"]\n{lines}\n\
         [[routes]]\nname = \"api\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:8000\"\n\
         auth = \"jwt\"\nissuers = [\"sso\"]\n"
    )
}

fn check_refuses(config: &str, fragments: &[&str]) {
    let (code, _, err) = check(config, &[]);
    assert_eq!(code, 1, "should be refused:\n{config}\nstderr: {err}");
    for f in fragments {
        assert!(err.contains(f), "missing {f:?} in: {err}");
    }
}

#[test]
fn check_accepts_a_jwks_url_without_fetching_it() {
    // A listener at the URL: a connection to it would wait in its queue, accepted or not.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let no_connection = |what: &str| match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("{what}: check connected to the jwks_url: {other:?}"),
    };
    let cfg = issuer_config(&format!(
        "jwks_url = \"https://127.0.0.1:{port}/realms/home/protocol/openid-connect/certs\"\n\
         jwks_refresh = \"15m\""
    ));
    let (code, out, err) = check(&cfg, &[]);
    assert_eq!(code, 0, "{cfg}\nstdout: {out}\nstderr: {err}");
    no_connection("https");
    // Plain HTTP to the machine itself is allowed.
    let cfg = issuer_config(&format!("jwks_url = \"http://127.0.0.1:{port}/certs\""));
    let (code, _, err) = check(&cfg, &[]);
    assert_eq!(code, 0, "{err}");
    no_connection("http");
}

#[test]
fn a_jwks_url_with_a_port_that_is_not_one_is_refused_naming_the_key_path() {
    for port in ["84430", "abc", "0"] {
        let cfg = issuer_config(&format!("jwks_url = \"https://sso.example:{port}/certs\""));
        check_refuses(&cfg, &["issuers[0].jwks_url", "is not a port"]);
    }
}

#[test]
fn plain_http_beyond_loopback_is_refused_naming_the_key_path() {
    let cfg = issuer_config("jwks_url = \"http://sso.example/certs\"");
    check_refuses(&cfg, &["issuers[0].jwks_url", "https://"]);
    let cfg = issuer_config("jwks_url = \"https://user:pw@sso.example/certs\"");
    check_refuses(&cfg, &["issuers[0].jwks_url", "password"]);
    let cfg = issuer_config("jwks_url = \"sso.example/certs\"");
    check_refuses(&cfg, &["issuers[0].jwks_url"]);
}

#[test]
fn jwks_url_and_jwks_file_together_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[key_a()])).unwrap();
    let cfg = issuer_config(&format!(
        "jwks_url = \"https://sso.example/certs\"\njwks_file = \"{}\"",
        file.display()
    ));
    check_refuses(&cfg, &["issuers[0].jwks_url", "not both"]);
}

#[test]
fn jwks_refresh_and_jwks_ca_file_go_with_jwks_url_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[key_a()])).unwrap();
    let jwks_file = format!("jwks_file = \"{}\"\n", file.display());
    check_refuses(
        &issuer_config(&format!("{jwks_file}jwks_refresh = \"5m\"")),
        &["issuers[0].jwks_refresh", "jwks_url"],
    );
    check_refuses(
        &issuer_config(&format!("{jwks_file}jwks_ca_file = \"/etc/ssl/ca.pem\"")),
        &["issuers[0].jwks_ca_file", "jwks_url"],
    );
    // HS256 alone takes no JWKS.
    let cfg = issuer_config(
        "jwks_url = \"https://sso.example/certs\"\nsecret = \"0123456789abcdef0123456789abcdef0123\"",
    )
    .replace("[\"RS256\"]", "[\"HS256\"]");
    check_refuses(&cfg, &["issuers[0].jwks_url", "HS256"]);
}

#[test]
fn jwks_refresh_bounds_and_a_ca_file_without_certificates_are_refused() {
    let url = "jwks_url = \"https://sso.example/certs\"\n";
    for bad in ["500ms", "2d"] {
        check_refuses(
            &issuer_config(&format!("{url}jwks_refresh = \"{bad}\"")),
            &["issuers[0].jwks_refresh", "between 1s and 24h"],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    check_refuses(
        &issuer_config(&format!("{url}jwks_ca_file = \"{}\"", empty.display())),
        &["issuers[0].jwks_ca_file", "no certificate"],
    );
    check_refuses(
        &issuer_config(&format!(
            "{url}jwks_ca_file = \"{}\"",
            dir.path().join("missing.pem").display()
        )),
        &["issuers[0].jwks_ca_file", "missing.pem"],
    );
    // A CA file is for HTTPS.
    check_refuses(
        &issuer_config(&format!(
            "jwks_url = \"http://127.0.0.1:9000/certs\"\njwks_ca_file = \"{}\"",
            empty.display()
        )),
        &["issuers[0].jwks_ca_file", "https"],
    );
}

#[test]
fn keys_reads_a_config_whose_jwks_url_comes_from_an_unset_variable() {
    // `portcullis keys` needs no secret; a `${NAME}` URL unset here is not fetched by it anyway.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, issuer_config("jwks_url = \"${SSO_JWKS_URL}\"")).unwrap();
    let out = Command::new(bin())
        .args(["keys", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .env_remove("SSO_JWKS_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // `check` resolves everything: there it is an error naming the key.
    let (code, _, err) = check(&issuer_config("jwks_url = \"${SSO_JWKS_URL}\""), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("issuers[0].jwks_url"), "{err}");
    assert!(err.contains("SSO_JWKS_URL"), "{err}");
}
