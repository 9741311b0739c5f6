//! The whole stack (issue 5): one request through a real connection's HTTP/1.1 server, the
//! pipeline (key check, limiter, audit log to a file, metrics) and the upstream client, to a
//! no-op upstream. Run: `cargo bench --bench stack`. Kept apart from `hot_paths` so a profiler
//! run over it (callgrind: instructions per request) sees nothing but this.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::config::{self, env::LayeredEnv};

const KEY: &str = "pcx_bench-key-0123456789abcdefghijklmnopqrstuv";

/// A no-op upstream: a small JSON answer to everything, over loopback TCP (HTTP/1.1).
async fn noop_upstream() -> std::net::SocketAddr {
    use hyper_util::rt::TokioIo;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                br#"{"id":"chatcmpl-1","object":"chat.completion"}"#,
                            )))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// One keep-alive client connection to the embedded gateway over an in-memory stream: the client
/// leg costs no syscalls, so what is measured is the gateway's own work plus the upstream leg.
fn stack(c: &mut Criterion) {
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sender = rt.block_on(async {
        let _ = portcullis::metrics::install();
        let up = noop_upstream().await;
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[audit]\noutput = \"{}/audit.jsonl\"\n\
             [limits]\nper_ip = \"1000000/s\"\nper_key = \"1000000/s\"\n\
             [[keys]]\nid = \"bench\"\nhash = \"{}\"\n\
             [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"http://{up}\"\n\
             [routes.upstream_headers]\nauthorization = \"Bearer sk-upstream\"\n",
            dir.path().display(),
            portcullis::keys::hash_string(KEY)
        );
        let cfg =
            config::parse(Path::new("bench.toml"), &toml, &[], &LayeredEnv::default()).unwrap();
        let serve = portcullis::embedded(cfg).await.unwrap();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let peer = "192.168.1.20:50000".parse().unwrap();
        tokio::spawn(portcullis::server::serve_stream(serve, server_io, peer).unwrap());
        let (sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(TokioIo::new(client_io))
        .await
        .unwrap();
        tokio::spawn(conn);
        sender
    });
    c.bench_function("stack/h1_get_small_json", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = http::Request::get("/v1/models")
                    .header("host", "gw.local")
                    .header("authorization", format!("Bearer {KEY}"))
                    .header("user-agent", "OpenCat/2.0")
                    .body(http_body_util::Empty::new())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                black_box(resp.into_body().collect().await.unwrap().to_bytes())
            })
        })
    });
}

criterion_group!(benches, stack);
criterion_main!(benches);
