//! Hot reload on SIGHUP (SPEC §6): swap when valid, keep serving when not, keys and
//! certificates take effect, unchanged limits keep their state, and no request fails meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use futures_util::StreamExt;
use support::*;

const A: &str = "pcx_reload-key-a-0123456789abcdefghijklmnopqrs";
const B: &str = "pcx_reload-key-b-0123456789abcdefghijklmnopqrs";

fn config(up: &Upstream, keys: &str, tls: &str) -> String {
    format!(
        "{}{tls}[limits]\nper_key = \"off\"\n{keys}[[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nper_ip = \"off\"\n\
         [[routes]]\nname = \"tight\"\npath = \"/tight/\"\nupstream = \"{}\"\nauth = \"none\"\nper_ip = \"1/min\"\n",
        server_section(""),
        up.url(),
        up.url()
    )
}

#[tokio::test]
async fn keys_change_on_reload_and_an_invalid_config_keeps_the_old_one() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, &key_block("a", A, ""), "")).await;
    let with = |k: &str| format!("Authorization: Bearer {k}");
    assert_eq!(send(gw.addr, "GET", "/v1/x", &[&with(A)]).await.0, 200);
    assert_eq!(send(gw.addr, "GET", "/v1/x", &[&with(B)]).await.0, 401);
    // The tight route's limit is used up; it stays used up across a reload that keeps it.
    assert_eq!(send(gw.addr, "GET", "/tight/x", &[]).await.0, 200);
    assert_eq!(send(gw.addr, "GET", "/tight/x", &[]).await.0, 429);

    gw.rewrite_config(&config(
        &up,
        &format!(
            "{}{}",
            key_block("b", B, ""),
            key_block("c", "pcx_reload-c", "")
        ),
        "",
    ));
    let ev = gw.reload().await;
    assert_eq!(
        (ev["result"].as_str(), ev["key_count"].as_u64()),
        (Some("ok"), Some(2)),
        "{ev}"
    );
    assert_eq!(
        send(gw.addr, "GET", "/v1/x", &[&with(A)]).await.0,
        401,
        "removed key still works"
    );
    assert_eq!(
        send(gw.addr, "GET", "/v1/x", &[&with(B)]).await.0,
        200,
        "added key does not work"
    );
    assert_eq!(
        send(gw.addr, "GET", "/tight/x", &[]).await.0,
        429,
        "limiter state was lost"
    );

    gw.rewrite_config("[server]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nname = \"x\"\npath = \"/\"\nupstream = \"ftp://nope\"\n");
    let ev = gw.reload().await;
    assert_eq!(ev["result"], "failed");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("routes[0].upstream"),
        "{ev}"
    );
    // The old config (two keys) keeps serving; whoever sent SIGHUP sees why on stderr too.
    assert_eq!(ev["key_count"], 2, "{ev}");
    gw.stderr
        .wait_until(|lines| {
            lines
                .iter()
                .any(|l| l.contains("reload failed") && l.contains("routes[0].upstream"))
                .then_some(())
        })
        .await;
    assert_eq!(
        send(gw.addr, "GET", "/v1/x", &[&with(B)]).await.0,
        200,
        "old config no longer serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_fail_no_request() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up, &key_block("a", A, ""), "")).await;
    let url = gw.url("/v1/load");
    let load = tokio::spawn(async move {
        let c = client();
        futures_util::stream::iter(0..2000)
            .map(|_| {
                let c = c.clone();
                let url = url.clone();
                async move {
                    c.get(&url)
                        .bearer_auth(A)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0)
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<u16>>()
            .await
    });
    for _ in 0..20 {
        assert_eq!(gw.reload().await["result"], "ok");
    }
    let statuses = load.await.unwrap();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", statuses.len());
    assert_eq!(gw.events("reload").len(), 20);
}

#[tokio::test]
async fn a_new_certificate_is_served_after_reload() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let first = pki();
    let gw = Gateway::start(&config(&up, "", &first.tls_section(dir.path()))).await;
    let served = |p: &Pki| {
        let cfg = p.rustls_client(&[b"http/1.1"]);
        let addr = gw.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(
                    rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        }
    };
    let pem_der = |pem: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    assert_eq!(served(&first).await, pem_der(&first.cert_pem));
    let second = pki();
    second.tls_section(dir.path()); // overwrites cert.pem and key.pem in place
    assert_eq!(gw.reload().await["result"], "ok");
    assert_eq!(served(&second).await, pem_der(&second.cert_pem));
}
