//! Criterion benchmarks of the request hot path: route match, key lookup, limiter check, path
//! normalization, and the whole stack: one request through a real connection's HTTP/1.1
//! server, the pipeline (key, limiter, audit log to a file, metrics) and the upstream client, to a
//! no-op upstream (issue 5). Run: `cargo bench --bench hot_paths`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use portcullis::auth::{KeyStore, Presented};
use portcullis::config::{self, env::LayeredEnv};
use portcullis::rate_limit::{LimiterId, Registry, Subject};

fn config(routes: usize, keys: usize) -> portcullis::config::Config {
    let mut c = String::from("[server]\nlisten = \"127.0.0.1:0\"\n");
    for i in 0..keys {
        c += &format!(
            "[[keys]]\nid = \"k{i}\"\nhash = \"{}\"\n",
            portcullis::keys::hash_string(&format!("pcx_key_{i}"))
        );
    }
    for i in 0..routes {
        c += &format!(
            "[[routes]]\nname = \"r{i}\"\npath = \"/svc{i}/v1/\"\nupstream = \"http://127.0.0.1:8000\"\n"
        );
    }
    config::parse(Path::new("bench.toml"), &c, &[], &LayeredEnv::default()).unwrap()
}

fn route_match(c: &mut Criterion) {
    for n in [10, 100] {
        let cfg = config(n, 0);
        let path = format!("/svc{}/v1/chat/completions", n / 2);
        c.bench_function(&format!("route_match/{n}_routes"), |b| {
            b.iter(|| {
                black_box(portcullis::route::find(
                    &cfg.routes,
                    Some("gw.test"),
                    &Method::POST,
                    black_box(&path),
                ));
            })
        });
    }
}

fn key_lookup(c: &mut Criterion) {
    for n in [10, 10_000] {
        let cfg = config(1, n);
        let store = KeyStore::new(&cfg.keys);
        let key = format!("pcx_key_{}", n / 2);
        c.bench_function(&format!("key_lookup/{n}_keys"), |b| {
            b.iter(|| {
                let r = store.check(
                    &cfg.keys,
                    Presented::One(black_box(&key)),
                    "r0",
                    SystemTime::now(),
                );
                assert!(r.is_ok());
            })
        });
    }
}

fn limiter(c: &mut Criterion) {
    let reg = Registry::new(100_000);
    let l = reg
        .get(LimiterId::DefaultKey {
            rate: portcullis::config::units::Rate::parse("1000000/s").unwrap(),
        })
        .unwrap();
    let ips: Vec<Subject> = (0..100_000u32)
        .map(|i| Subject::Ip(IpAddr::from((0x0a00_0000 + i).to_be_bytes())))
        .collect();
    for s in &ips {
        let _ = l.check(s);
    }
    let hot = ips[50_000].clone();
    c.bench_function("limiter/hit_100k_tracked", |b| {
        b.iter(|| black_box(l.check(black_box(&hot))))
    });
    let mut i = 0u32;
    c.bench_function("limiter/miss_100k_tracked", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let s = Subject::Ip(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
            black_box(l.check(&s))
        })
    });
    let key = Subject::Key(Arc::from("phone"));
    c.bench_function("limiter/key_subject", |b| {
        b.iter(|| black_box(l.check(black_box(&key))))
    });
}

fn normalize(c: &mut Criterion) {
    c.bench_function("path_normalize/plain", |b| {
        b.iter(|| {
            black_box(portcullis::path::normalize(black_box(
                "/v1/chat/completions",
            )))
        })
    });
    c.bench_function("path_normalize/dots_and_escapes", |b| {
        b.iter(|| {
            black_box(portcullis::path::normalize(black_box(
                "/v1/./models/../chat/%63ompletions",
            )))
        })
    });
}

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

criterion_group!(benches, route_match, key_lookup, limiter, normalize, stack);
criterion_main!(benches);
