//! TLS termination (SPEC §2 `[tls]`): TLS 1.2 and 1.3 are served, a returning client resumes its
//! session, and with `client_ca` set, only clients presenting a certificate signed by that CA get
//! through.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn roots(pem: &str) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    r.add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .unwrap();
    r
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `[tls]` with `p`'s certificate (written into `dir`) and one keyless route `api` on `/`.
fn tls_config(up: &Upstream, p: &Pki, dir: &std::path::Path) -> String {
    format!(
        "{}{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        p.tls_section(dir),
        up.url()
    )
}

/// One HTTP/1.1 GET over TLS with `cfg`: the status and how the handshake went (full or
/// resumed), or the error that stopped it.
async fn exchange(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(u16, rustls::HandshakeKind), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    // Reading to the end also takes in the session tickets a TLS 1.3 server sends.
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let kind = tls.get_ref().1.handshake_kind().ok_or("no handshake")?;
    Ok((status_of(&String::from_utf8_lossy(&out)), kind))
}

/// The status of one GET over TLS with `cfg`, or the error that stopped it.
async fn get(addr: std::net::SocketAddr, cfg: rustls::ClientConfig) -> Result<u16, String> {
    exchange(addr, Arc::new(cfg))
        .await
        .map(|(status, _)| status)
}

#[tokio::test]
async fn client_certificates_are_required_when_client_ca_is_set() {
    let up = upstream().await;
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("clients-ca.pem");
    std::fs::write(&ca, &p.ca_pem).unwrap();
    let config = format!(
        "{}{}client_ca = \"{}\"\n[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        p.tls_section(dir.path()),
        ca.display(),
        up.url()
    );
    let gw = Gateway::start(&config).await;
    let base = || {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&p.ca_pem))
    };

    // Without a client certificate: refused during the handshake (TLS 1.3 reports it on first read).
    let r = get(gw.addr, base().with_no_client_auth()).await;
    assert!(r.is_err(), "served without a client certificate: {r:?}");

    // With a certificate from another CA: refused.
    let other = pki();
    let cfg = base()
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(other.client_cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(other.client_key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let r = get(gw.addr, cfg).await;
    assert!(
        r.is_err(),
        "served with a foreign client certificate: {r:?}"
    );

    // With a certificate signed by client_ca: served.
    let cfg = base()
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(p.client_cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(p.client_key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    assert_eq!(get(gw.addr, cfg).await, Ok(200));
    assert_eq!(up.targets(), ["/x"]);
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_served_sessions_resume_and_plaintext_is_not() {
    let up = upstream().await;
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&tls_config(&up, &p, dir.path())).await;
    // Pin 1.2 and 1.3 in turn (the server is built with exactly these two versions). The same
    // client config dials twice: its in-memory session store carries the session (TLS 1.2) or
    // ticket (TLS 1.3) to the second connection, which resumes instead of a full handshake.
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots(&p.ca_pem))
                .with_no_client_auth(),
        );
        assert_eq!(
            exchange(gw.addr, cfg.clone()).await,
            Ok((200, rustls::HandshakeKind::Full)),
            "{version:?}"
        );
        assert_eq!(
            exchange(gw.addr, cfg).await,
            Ok((200, rustls::HandshakeKind::Resumed)),
            "{version:?}"
        );
    }
    // A plaintext request on the TLS port is not served.
    let (status, _) = raw_get(gw.addr, "/x").await;
    assert_ne!(status, 200);
}

/// Bodies through TLS arrive whole, both ways: a 3 MiB upload (many TLS records) is counted byte
/// for byte by the upstream, and a 3 MiB download streams back complete.
#[tokio::test]
async fn large_bodies_cross_tls_whole() {
    let up = upstream().await;
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&tls_config(&up, &p, dir.path())).await;
    let client = p.reqwest();
    let base = format!("https://localhost:{}", gw.addr.port());
    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let resp = client
        .post(format!("{base}/count"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let counted: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(counted["bytes"], body.len());
    let down = client
        .get(format!("{base}/bytes?n={}", 3 * 1024 * 1024))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(down.len(), 3 * 1024 * 1024);
}
