//! Criterion benchmarks of the request hot path: route match, key lookup, limiter check and
//! path normalization (issue 5). Run: `cargo bench --bench hot_paths`. The whole stack is
//! `benches/stack.rs`.
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
                    &cfg.routes[0],
                    None,
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

criterion_group!(benches, route_match, key_lookup, limiter, normalize);
criterion_main!(benches);
