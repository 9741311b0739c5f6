//! Several gateways, one set of limits (SPEC §9): per-IP and per-key limits and lockout shared
//! through a real redis-server, with two and three gateway processes on loopback; what Redis
//! going away and coming back does under `on_error = "local"` and `"deny"`; and that Redis
//! holds nothing without a TTL.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::{Duration, Instant};

use support::*;

const KEY: &str = "pcx_cluster-key-0123456789abcdefghijklmnopqrstu";

/// A gateway config sharing its limits through `redis`; `limits` and `cluster` are added to
/// their sections. Clients are told apart by `X-Forwarded-For` (loopback is a trusted proxy).
fn config(up: &Upstream, redis: &str, limits: &str, cluster: &str) -> String {
    let u = up.url();
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nlockout_failures = 3\nlockout_window = \"1m\"\nlockout_duration = \"1m\"\n\
         [limits]\n{limits}\n\
         [cluster]\nredis = \"{redis}\"\nprefix = \"pcx-test:\"\n{cluster}\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{u}\"\n\
         [[routes]]\nname = \"open\"\npath = \"/open/\"\nupstream = \"{u}\"\nauth = \"none\"\n",
        server_section("trusted_proxies = [\"127.0.0.1\"]"),
        key_block("k", KEY, ""),
    )
}

fn from(ip: &str) -> String {
    format!("X-Forwarded-For: {ip}")
}

fn bearer(k: &str) -> String {
    format!("Authorization: Bearer {k}")
}

/// Every key the gateways wrote into Redis carries a TTL (none would stay forever).
fn assert_all_keys_expire(redis: &Redis) {
    assert!(
        !redis.keys().is_empty(),
        "the gateways wrote nothing to Redis"
    );
    assert_no_key_without_ttl(redis);
}

fn assert_no_key_without_ttl(redis: &Redis) {
    for k in &redis.keys() {
        assert!(k.starts_with("pcx-test:"), "key outside the prefix: {k}");
        // -2: it expired between KEYS and PTTL (gone is fine; -1, no TTL, is not).
        let ttl = redis.pttl(k);
        assert!(ttl > 0 || ttl == -2, "{k} has no TTL ({ttl})");
    }
}

#[tokio::test]
async fn a_per_ip_limit_holds_across_three_instances() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let cfg = config(
        &up,
        &redis.url(),
        "per_ip = \"10/min\"\nper_key = \"off\"",
        "",
    );
    let gws = [
        Gateway::start(&cfg).await,
        Gateway::start(&cfg).await,
        Gateway::start(&cfg).await,
    ];
    let client = from("198.51.100.10");
    let mut passed = 0;
    let mut remaining = Vec::new();
    for i in 0..30 {
        let gw = &gws[i % 3];
        let (s, r) = send(gw.addr, "GET", "/open/x", &[&client]).await;
        match s {
            200 => {
                passed += 1;
                let state = header_of(&r, "ratelimit").unwrap();
                let left = state.split(", ").find_map(|p| p.strip_prefix("remaining="));
                remaining.push(left.unwrap().to_owned());
            }
            429 => {
                assert_eq!(code_of(&r), "rate_limited", "{r}");
                let retry: u64 = header_of(&r, "retry-after").unwrap().parse().unwrap();
                assert!((1..=6).contains(&retry), "Retry-After {retry}");
            }
            other => panic!("unexpected {other}: {r}"),
        }
    }
    // 10/min across all three, not 10 each.
    assert_eq!(passed, 10);
    // One bucket, counted down across the instances.
    let expected: Vec<String> = (0..10).rev().map(|n| n.to_string()).collect();
    assert_eq!(remaining, expected);
    // Another client has its own bucket.
    assert_eq!(
        send(gws[1].addr, "GET", "/open/x", &[&from("198.51.100.11")])
            .await
            .0,
        200
    );
    for gw in &gws {
        let m = gw.metrics_text().await;
        assert!(
            m.contains("portcullis_cluster_errors_total{op=\"admit\"} 0"),
            "{m}"
        );
        assert!(
            m.contains("portcullis_cluster_duration_seconds_count"),
            "{m}"
        );
    }
    assert_all_keys_expire(&redis);
}

#[tokio::test]
async fn a_per_key_limit_holds_across_two_instances_and_its_clients() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let cfg = config(
        &up,
        &redis.url(),
        "per_ip = \"off\"\nper_key = \"4/min\"",
        "",
    );
    let (a, b) = (Gateway::start(&cfg).await, Gateway::start(&cfg).await);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        // A different address each time: only the key's limit can refuse.
        let ip = format!("198.51.100.{}", 20 + i);
        let (s, r) = send(gw.addr, "GET", "/v1/x", &[&from(&ip), &bearer(KEY)]).await;
        if s == 429 {
            assert_eq!(code_of(&r), "rate_limited", "{r}");
        }
        statuses.push(s);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429, 429]);
    assert_all_keys_expire(&redis);
}

#[tokio::test]
async fn a_lockout_begun_on_one_instance_blocks_the_address_on_the_other() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let cfg = config(&up, &redis.url(), "per_ip = \"off\"\nper_key = \"off\"", "");
    let (a, b) = (Gateway::start(&cfg).await, Gateway::start(&cfg).await);
    let attacker = from("203.0.113.5");
    // Two failures on A, the third on B: three in the window lock the address out.
    for (gw, n) in [(&a, 1), (&a, 2), (&b, 3)] {
        let (s, r) = send(gw.addr, "GET", "/v1/x", &[&attacker, &bearer("pcx_wrong")]).await;
        assert_eq!(
            (s, code_of(&r).as_str()),
            (401, "invalid_api_key"),
            "{n}: {r}"
        );
    }
    // B saw the failure that began it, and says so.
    let events = b.wait_events("lockout", 1).await;
    assert_eq!(events[0]["client_ip"], "203.0.113.5");
    assert_eq!(events[0]["failures"], 3);
    assert!(a.events("lockout").is_empty());
    // Both refuse the address now, even with a valid key, on every route.
    for gw in [&a, &b] {
        let (s, r) = send(gw.addr, "GET", "/v1/x", &[&attacker, &bearer(KEY)]).await;
        assert_eq!((s, code_of(&r).as_str()), (429, "locked_out"), "{r}");
        let retry: u64 = header_of(&r, "retry-after").unwrap().parse().unwrap();
        assert!((55..=60).contains(&retry), "Retry-After {retry}");
        assert_eq!(send(gw.addr, "GET", "/open/x", &[&attacker]).await.0, 429);
    }
    // Another address is not affected.
    assert_eq!(
        send(
            a.addr,
            "GET",
            "/v1/x",
            &[&from("203.0.113.6"), &bearer(KEY)]
        )
        .await
        .0,
        200
    );
    assert_all_keys_expire(&redis);
}

/// Waits (bounded) until `gw` answers `want` for a request built by `req`.
async fn wait_status(gw: &Gateway, ip: &str, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        let (s, _) = send(gw.addr, "GET", "/open/x", &[&from(ip)]).await;
        if s == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < WAIT, "{} never answered {want}", gw.addr);
        // Polling: the gateway's retry after an outage is not an event the test can see.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lines of `gw`'s diagnostic log holding `needle`, once at least one has arrived (the
/// log is read by another thread).
async fn count_lines(gw: &Gateway, needle: &str) -> usize {
    gw.stderr
        .wait_until(|l| l.iter().any(|l| l.contains(needle)).then_some(()))
        .await;
    count_now(gw, needle)
}

fn count_now(gw: &Gateway, needle: &str) -> usize {
    gw.stderr
        .all()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

fn cluster_errors(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_cluster_errors_total{op=\"admit\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn redis_going_away_local_serves_deny_refuses_and_both_share_again_when_it_returns() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    let up = upstream().await;
    let limits = "per_ip = \"3/min\"\nper_key = \"off\"";
    // One worker each (see `one_worker`).
    let local = Gateway::start(&one_worker(config(
        &up,
        &redis.url(),
        limits,
        "on_error = \"local\"",
    )))
    .await;
    let deny = Gateway::start(&one_worker(config(
        &up,
        &redis.url(),
        limits,
        "on_error = \"deny\"",
    )))
    .await;
    assert_eq!(
        send(local.addr, "GET", "/open/x", &[&from("192.0.2.1")])
            .await
            .0,
        200
    );
    assert_eq!(
        send(deny.addr, "GET", "/open/x", &[&from("192.0.2.1")])
            .await
            .0,
        200
    );

    redis.kill();
    // local: its own state, with its own limit (3/min for this instance alone).
    let mut local_statuses = Vec::new();
    for _ in 0..5 {
        local_statuses.push(
            send(local.addr, "GET", "/open/x", &[&from("192.0.2.2")])
                .await
                .0,
        );
    }
    assert_eq!(local_statuses, [200, 200, 200, 429, 429]);
    // deny: 503 overloaded, whatever the route.
    for path in ["/open/x", "/v1/x"] {
        let (s, r) = send(deny.addr, "GET", path, &[&from("192.0.2.3"), &bearer(KEY)]).await;
        assert_eq!((s, code_of(&r).as_str()), (503, "overloaded"), "{r}");
    }
    assert!(cluster_errors(&local.metrics_text().await) >= 5);
    assert!(cluster_errors(&deny.metrics_text().await) >= 2);
    // One log line per outage, however many requests met it.
    let outage = "Redis does not answer";
    assert_eq!(
        count_lines(&local, outage).await,
        1,
        "{}",
        local.stderr.text()
    );
    assert_eq!(
        count_lines(&deny, outage).await,
        1,
        "{}",
        deny.stderr.text()
    );

    redis.restart();
    // No gateway restart: both use Redis again by themselves. `deny` shows it by answering;
    // `local` by writing its client's state to Redis again.
    wait_status(&deny, "192.0.2.4", 200).await;
    let start = Instant::now();
    for i in 0.. {
        let ip = format!("192.0.2.{}", 100 + i);
        assert_eq!(
            send(local.addr, "GET", "/open/x", &[&from(&ip)]).await.0,
            200
        );
        if redis.keys().iter().any(|k| k.ends_with(&format!(":{ip}"))) {
            break;
        }
        assert!(start.elapsed() < WAIT, "local never used Redis again");
        // Polling: the gateway's retry after an outage is not an event the test can see.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The outage is logged as over once Redis has answered, with no failure, for a second: a
    // request now and then until the line comes.
    for (n, gw) in [&local, &deny].into_iter().enumerate() {
        let start = Instant::now();
        for i in 0.. {
            if count_now(gw, "Redis answers again") > 0 {
                break;
            }
            assert!(start.elapsed() < WAIT, "{}", gw.stderr.text());
            let ip = format!("192.0.{}.{}", 10 + n, i % 250);
            assert_eq!(send(gw.addr, "GET", "/open/x", &[&from(&ip)]).await.0, 200);
            // Polling: the end of an outage is a quiet second, not an event the test can see.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            count_now(gw, "Redis answers again"),
            1,
            "{}",
            gw.stderr.text()
        );
        assert_eq!(count_now(gw, outage), 1, "{}", gw.stderr.text());
    }
    // Shared again: 3/min across both.
    let mut statuses = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &local } else { &deny };
        statuses.push(
            send(gw.addr, "GET", "/open/x", &[&from("192.0.2.9")])
                .await
                .0,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    assert_all_keys_expire(&redis);
}

#[tokio::test]
async fn the_redis_password_never_reaches_the_logs_and_a_reload_cannot_move_redis() {
    if !redis_available() {
        return;
    }
    const PASSWORD: &str = "redis-secret-password-4f9a2c";
    let mut redis = Redis::start_with_password(PASSWORD);
    let up = upstream().await;
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port);
    let cfg = config(
        &up,
        "${REDIS_URL}",
        "per_ip = \"2/min\"\nper_key = \"off\"",
        "",
    );
    let gw = Gateway::start_with_env(&cfg, &[("REDIS_URL", &url)]).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                send(gw.addr, "GET", "/open/x", &[&from("192.0.2.77")])
                    .await
                    .0,
            );
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429]);
    assert!(redis.keys().iter().any(|k| k.ends_with(":192.0.2.77")));
    // An outage's log line, and a refused reload, name no password either.
    redis.kill();
    send(gw.addr, "GET", "/open/x", &[&from("192.0.2.78")]).await;
    gw.stderr
        .wait_until(|l| {
            l.iter()
                .any(|l| l.contains("Redis does not answer"))
                .then_some(())
        })
        .await;
    let moved = config(
        &up,
        "redis://127.0.0.1:1/0",
        "per_ip = \"2/min\"\nper_key = \"off\"",
        "",
    );
    gw.rewrite_config(&moved);
    let reload = gw.reload().await;
    assert_eq!(reload["result"], "failed", "{reload}");
    assert!(
        reload["reason"]
            .as_str()
            .unwrap()
            .contains("needs a restart"),
        "{reload}"
    );
    let all = format!("{}{}", gw.stdout.text(), gw.stderr.text());
    assert!(!all.contains(PASSWORD), "the Redis password is in the logs");
}

#[test]
fn cluster_config_errors_name_their_key() {
    let cases = [
        ("redis = \"http://127.0.0.1:6379\"", "cluster.redis"),
        (
            "redis = \"redis://127.0.0.1:6379\"\ntimeout = \"0s\"",
            "cluster.timeout",
        ),
        (
            "redis = \"redis://127.0.0.1:6379\"\non_error = \"ignore\"",
            "on_error",
        ),
        (
            "redis = \"redis://127.0.0.1:6379\"\nprefix = \"a b\"",
            "cluster.prefix",
        ),
        ("prefix = \"x:\"", "redis"),
    ];
    for (section, path) in cases {
        let cfg = format!(
            "{}[cluster]\n{section}\n[[routes]]\nname = \"r\"\npath = \"/\"\nupstream = \"http://127.0.0.1:9\"\nauth = \"none\"\n",
            server_section("")
        );
        let (code, _, err) = check(&cfg, &[]);
        assert_eq!(code, 1, "{section}: {err}");
        assert!(err.contains(path), "{section}: {err}");
        assert!(err.contains("portcullis.toml:"), "{section}: {err}");
    }
}

const PHONE: &str = "pcx_cluster-phone-0123456789abcdefghijklmnopqr";

/// An `llm` route whose `phone` key has `budget`, its ledger at `db`, shared through `redis`.
fn budget_config(up: &Upstream, redis: &str, db: &std::path::Path, budget: &str) -> String {
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nper_ip = \"off\"\nper_key = \"off\"\n\
         [usage]\ndatabase = \"{}\"\n\
         [cluster]\nredis = \"{redis}\"\nprefix = \"pcx-test:\"\n{}\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\n",
        server_section(""),
        db.display(),
        key_block("phone", PHONE, budget),
        up.url()
    )
}

async fn post_chat(gw: &Gateway, query: &str, body: &str) -> (u16, String) {
    let r = client()
        .post(gw.url(&format!("/v1/chat/completions{query}")))
        .bearer_auth(PHONE)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The phone key's token spend today, as Redis holds it.
fn redis_spend(redis: &Redis) -> f64 {
    redis.day_tokens("k:phone")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_shared_by_two_instances_is_not_overspent_and_outlives_them() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // A streamed chat asking for 100 tokens reserves ceil(len / 4) + 100; the cap fits 10.
    let body = serde_json::json!({"model": "m", "messages": [], "stream": true, "max_tokens": 100})
        .to_string();
    let res = body.len().div_ceil(4) as u64 + 100;
    let cap = 10 * res;
    let budget = format!("budget = {{ tokens_per_day = {cap} }}");
    let a = std::sync::Arc::new(
        Gateway::start(&budget_config(
            &up,
            &redis.url(),
            &dir.path().join("a.db"),
            &budget,
        ))
        .await,
    );
    let b = std::sync::Arc::new(
        Gateway::start(&budget_config(
            &up,
            &redis.url(),
            &dir.path().join("b.db"),
            &budget,
        ))
        .await,
    );
    // 40 requests at once, half on each instance; the upstream holds every admitted one until
    // all 40 are decided (watched on its gate and the refusals' count).
    let refused = std::sync::Arc::new(tokio::sync::watch::Sender::new(0usize));
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (refused, body) = (refused.clone(), body.clone());
            tokio::spawn(async move {
                let (s, text) = post_chat(&gw, "?hold=1", &body).await;
                if s == 429 {
                    refused.send_modify(|n| *n += 1);
                }
                (s, text)
            })
        })
        .collect();
    let (mut held, mut no) = (up.gate.watch_held(), refused.subscribe());
    tokio::time::timeout(WAIT, async {
        while *held.borrow_and_update() + *no.borrow_and_update() < 40 {
            tokio::select! {
                r = held.changed() => r.unwrap(),
                r = no.changed() => r.unwrap(),
            }
        }
    })
    .await
    .expect("all 40 requests decided");
    // Ten across both instances (each alone would have admitted ten).
    assert_eq!(up.gate.held(), 10, "admitted while all were in flight");
    up.gate.open();
    let mut ok = 0;
    for t in tasks {
        let (s, text) = t.await.unwrap();
        match s {
            200 => ok += 1,
            429 => assert!(text.contains("budget_exceeded"), "{text}"),
            s => panic!("unexpected {s}: {text}"),
        }
    }
    assert_eq!(ok, 10);
    // Settled in Redis by their real usage, 24 tokens each (settling is off the request's
    // path: wait for it).
    redis.wait_day_tokens("k:phone", 240.0).await;
    assert_eq!(redis_spend(&redis), 240.0);
    drop((a, b));

    // Both restarted with new, empty ledgers: the spend is Redis's. A small request reserves
    // ceil(len / 4) + 1; with a cap 1 token short of 240 + that, it is refused on both.
    let small = serde_json::json!({"model": "m", "messages": [], "max_tokens": 1}).to_string();
    let small_res = small.len().div_ceil(4) as u64 + 1;
    let tight = format!("budget = {{ tokens_per_day = {} }}", 240 + small_res - 1);
    for name in ["a2.db", "b2.db"] {
        let gw = Gateway::start(&budget_config(
            &up,
            &redis.url(),
            &dir.path().join(name),
            &tight,
        ))
        .await;
        let (s, text) = post_chat(&gw, "", &small).await;
        assert_eq!(s, 429, "{text}");
    }
    let fits = format!("budget = {{ tokens_per_day = {} }}", 240 + small_res);
    let gw = Gateway::start(&budget_config(
        &up,
        &redis.url(),
        &dir.path().join("c.db"),
        &fits,
    ))
    .await;
    assert_eq!(post_chat(&gw, "", &small).await.0, 200);
    redis.wait_day_tokens("k:phone", 256.0).await;
    // Nothing is held any more, and everything expires.
    let holds = redis
        .command(&["ZCARD", "pcx-test:r:k:phone"])
        .unwrap_or_default();
    assert!(holds.contains(":0"), "reservations left: {holds}");
    assert_all_keys_expire(&redis);
}

const JWT_SECRET: &str = "a-cluster-test-hmac-secret-of-more-than-32-bytes";

/// An HS256 token of issuer `sso` for `sub`, valid for ten minutes (`good`), or signed with
/// another secret.
fn jwt(sub: &str, good: bool) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let now = portcullis::clock::now_secs();
    let claims = serde_json::json!({"iss": "https://sso.test", "sub": sub, "exp": now + 600});
    let secret = if good {
        JWT_SECRET
    } else {
        "another-secret-of-more-than-32-bytes!!"
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_subjects_limits_and_failures_are_shared_too() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let cfg = format!(
        "{}[auth]\nlockout_failures = 2\nlockout_window = \"1m\"\nlockout_duration = \"1m\"\n\
         [limits]\nper_ip = \"off\"\nper_key = \"2/min\"\n\
         [cluster]\nredis = \"{}\"\nprefix = \"pcx-test:\"\n\
         [[issuers]]\nname = \"sso\"\nissuer = \"https://sso.test\"\nalgorithms = [\"HS256\"]\nsecret = \"{JWT_SECRET}\"\n\
         [[routes]]\nname = \"app\"\npath = \"/v1/\"\nupstream = \"{}\"\nauth = \"jwt\"\nissuers = [\"sso\"]\n",
        server_section("trusted_proxies = [\"127.0.0.1\"]"),
        redis.url(),
        up.url()
    );
    let (a, b) = (Gateway::start(&cfg).await, Gateway::start(&cfg).await);
    // alice's 2/min holds across both instances, from any address.
    let mut statuses = Vec::new();
    for (i, gw) in [&a, &b, &a, &b].into_iter().enumerate() {
        let ip = format!("198.51.100.{}", 50 + i);
        let auth = bearer(&jwt("alice", true));
        statuses.push(send(gw.addr, "GET", "/v1/x", &[&from(&ip), &auth]).await.0);
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    // bob has his own.
    let auth = bearer(&jwt("bob", true));
    assert_eq!(
        send(b.addr, "GET", "/v1/x", &[&from("198.51.100.60"), &auth])
            .await
            .0,
        200
    );
    // Two forged tokens, one on each instance, lock the address out on both.
    let forged = bearer(&jwt("alice", false));
    let mallory = from("203.0.113.66");
    for gw in [&a, &b] {
        let (s, r) = send(gw.addr, "GET", "/v1/x", &[&mallory, &forged]).await;
        assert_eq!((s, code_of(&r).as_str()), (401, "invalid_token"), "{r}");
    }
    b.wait_events("lockout", 1).await;
    let carol = bearer(&jwt("carol", true));
    for gw in [&a, &b] {
        let (s, r) = send(gw.addr, "GET", "/v1/x", &[&mallory, &carol]).await;
        assert_eq!((s, code_of(&r).as_str()), (429, "locked_out"), "{r}");
    }
    assert!(redis.keys().iter().any(|k| k.contains(":sso:alice")));
    assert_all_keys_expire(&redis);
}

#[tokio::test]
async fn a_shared_budgets_events_are_written_once_by_the_instance_whose_charge_crossed() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // Each JSON answer is charged 16 tokens: the third brings the key to exactly 48 of 48.
    let budget = "budget = { tokens_per_day = 48 }";
    let a = Gateway::start(&budget_config(
        &up,
        &redis.url(),
        &dir.path().join("a.db"),
        budget,
    ))
    .await;
    let b = Gateway::start(&budget_config(
        &up,
        &redis.url(),
        &dir.path().join("b.db"),
        budget,
    ))
    .await;
    let small = serde_json::json!({"model": "m", "messages": [], "max_tokens": 1}).to_string();
    for (n, gw) in [(1, &a), (2, &b), (3, &a)] {
        assert_eq!(post_chat(gw, "", &small).await.0, 200);
        // Settled in Redis before the next one (settling is off the request's path).
        redis.wait_day_tokens("k:phone", f64::from(16 * n)).await;
    }
    // 32 -> 48 crossed 80 % and 100 % at once, on a: both events there, once each.
    let events = a.wait_events("budget", 2).await;
    let thresholds: Vec<_> = events
        .iter()
        .map(|e| e["threshold"].as_u64().unwrap())
        .collect();
    assert_eq!(thresholds, [80, 100]);
    for e in &events {
        assert_eq!(e["key_id"], "phone");
        assert_eq!(e["spent"], 48.0);
        assert_eq!(e["limit"], 48.0);
    }
    // Spent on both instances; b wrote no event of its own.
    for gw in [&a, &b] {
        let (s, text) = post_chat(gw, "", &small).await;
        assert_eq!(s, 429, "{text}");
        assert!(text.contains("budget_exceeded"), "{text}");
    }
    assert_eq!(a.events("budget").len(), 2);
    assert_all_keys_expire(&redis);
}

/// `cfg` with one worker (each worker has its own Redis connection and pause after a failure;
/// with one, "the gateway uses Redis again" is one observable step).
fn one_worker(cfg: String) -> String {
    cfg.replace("[server]\n", "[server]\nworkers = 1\n")
}

fn cluster_errors_of(metrics: &str, op: &str) -> u64 {
    let series = format!("portcullis_cluster_errors_total{{op=\"{op}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_spend(redis: &Redis, want: f64) {
    redis.wait_day_tokens("k:phone", want).await;
}

#[tokio::test]
async fn charges_made_while_redis_is_away_reach_it_when_it_returns_and_at_shutdown() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = "budget = { tokens_per_day = 1000 }";
    let mut a = Gateway::start(&one_worker(budget_config(
        &up,
        &redis.url(),
        &dir.path().join("a.db"),
        budget,
    )))
    .await;
    let b = Gateway::start(&one_worker(
        budget_config(
            &up,
            &redis.url(),
            &dir.path().join("b.db"),
            &format!("{budget}\n"),
        )
        .replace("[cluster]\n", "[cluster]\non_error = \"deny\"\n"),
    ))
    .await;
    let small = serde_json::json!({"model": "m", "messages": [], "max_tokens": 1}).to_string();
    assert_eq!(post_chat(&a, "", &small).await.0, 200);
    wait_spend(&redis, 16.0).await;

    redis.kill();
    // local: admitted on its own book; the charge waits for Redis.
    assert_eq!(post_chat(&a, "", &small).await.0, 200);
    // deny: 503, nothing forwarded.
    let seen = up.seen().len();
    let (s, text) = post_chat(&b, "", &small).await;
    assert_eq!(s, 503, "{text}");
    assert!(text.contains("overloaded"), "{text}");
    assert_eq!(up.seen().len(), seen);
    let m = a.metrics_text().await;
    for op in ["admit", "reserve", "settle"] {
        assert!(cluster_errors_of(&m, op) >= 1, "{op}: {m}");
    }

    redis.restart();
    // The waiting charge is sent again (every second) and counted once. (This Redis keeps no
    // data across a restart: the first charge is gone with it, as the docs warn.)
    wait_spend(&redis, 16.0).await;
    // Shared again for b too.
    let start = Instant::now();
    loop {
        let (s, _) = post_chat(&b, "", &small).await;
        if s == 200 {
            break;
        }
        assert_eq!(s, 503);
        assert!(start.elapsed() < WAIT, "b never shared again");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling: b's pause after a failure
    }
    wait_spend(&redis, 32.0).await;

    // A request answered just before SIGTERM is settled before the process exits.
    assert_eq!(post_chat(&a, "", &small).await.0, 200);
    a.signal("TERM");
    assert_eq!(a.wait_exit().await, 0);
    assert_eq!(redis_spend(&redis), 48.0);
    // Nothing left held in Redis.
    let holds = redis.command(&["EXISTS", "pcx-test:r:k:phone", "pcx-test:rt:k:phone"]);
    assert!(
        holds.unwrap_or_default().contains(":0"),
        "holds left in Redis"
    );
    assert_all_keys_expire(&redis);
}

#[tokio::test]
async fn a_repeated_request_id_does_not_spare_an_address_its_lockout() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let cfg = config(&up, &redis.url(), "per_ip = \"off\"\nper_key = \"off\"", "");
    let gw = Gateway::start(&cfg).await;
    // Through a trusted proxy the client's X-Request-Id is kept: the same one each time.
    let id = "X-Request-Id: 01JDREPEATEDREPEATEDREPEAT";
    let attacker = from("203.0.113.77");
    for _ in 0..3 {
        let (s, r) = send(
            gw.addr,
            "GET",
            "/v1/x",
            &[&attacker, id, &bearer("pcx_guess")],
        )
        .await;
        assert_eq!((s, code_of(&r).as_str()), (401, "invalid_api_key"), "{r}");
    }
    let (s, r) = send(gw.addr, "GET", "/v1/x", &[&attacker, &bearer(KEY)]).await;
    assert_eq!((s, code_of(&r).as_str()), (429, "locked_out"), "{r}");
    assert_all_keys_expire(&redis);
}

#[tokio::test]
async fn a_lockout_of_zero_seconds_is_no_error_and_leaves_nothing_behind() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let cfg = config(&up, &redis.url(), "per_ip = \"off\"\nper_key = \"off\"", "")
        .replace("lockout_failures = 3", "lockout_failures = 1")
        .replace("lockout_duration = \"1m\"", "lockout_duration = \"0s\"");
    let gw = Gateway::start(&cfg).await;
    let client = from("203.0.113.88");
    for _ in 0..3 {
        let (s, r) = send(gw.addr, "GET", "/v1/x", &[&client, &bearer("pcx_guess")]).await;
        assert_eq!((s, code_of(&r).as_str()), (401, "invalid_api_key"), "{r}");
    }
    assert_eq!(
        send(gw.addr, "GET", "/v1/x", &[&client, &bearer(KEY)])
            .await
            .0,
        200
    );
    let m = gw.metrics_text().await;
    assert_eq!(cluster_errors_of(&m, "admit"), 0, "{m}");
    assert!(
        count_now(&gw, "Redis does not answer") == 0,
        "{}",
        gw.stderr.text()
    );
    assert!(redis.keys().iter().all(|k| !k.contains("lock:")));
    assert_no_key_without_ttl(&redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_local_keeps_answering_and_deny_refuses_cleanly() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    let up = upstream().await;
    let limits = "per_ip = \"1000000/min\"\nper_key = \"1000000/min\"";
    let local = std::sync::Arc::new(
        Gateway::start(&config(&up, &redis.url(), limits, "on_error = \"local\"")).await,
    );
    let deny = std::sync::Arc::new(
        Gateway::start(&config(&up, &redis.url(), limits, "on_error = \"deny\"")).await,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, u16)>();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (gw, stop, tx) = (
            if t % 2 == 0 {
                local.clone()
            } else {
                deny.clone()
            },
            stop.clone(),
            tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let ip = format!("198.51.100.{}", 200 + t);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (s, _) = send(gw.addr, "GET", "/v1/x", &[&from(&ip), &bearer(KEY)]).await;
                let _ = tx.send((t % 2 == 0, s));
            }
        }));
    }
    drop(tx);
    // Load runs; Redis dies under it; comes back; until deny has answered 200 again.
    let mut seen = Vec::new();
    let (mut killed, mut restarted) = (false, false);
    let start = Instant::now();
    while let Some((is_local, s)) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
        seen.push((is_local, s, killed, restarted));
        if !killed && seen.len() >= 50 {
            redis.kill();
            killed = true;
        } else if killed && !restarted && seen.iter().filter(|x| x.2 && !x.3).count() >= 100 {
            redis.restart();
            restarted = true;
        } else if restarted && !is_local && s == 200 {
            break;
        }
        assert!(start.elapsed() < WAIT * 2, "the load did not finish");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for (is_local, s, ..) in &seen {
        if *is_local {
            assert_eq!(*s, 200, "local answered {s}");
        } else {
            assert!(*s == 200 || *s == 503, "deny answered {s}");
        }
    }
    // deny refused during the outage; local served throughout.
    assert!(seen.iter().any(|x| !x.0 && x.1 == 503 && x.2 && !x.3));
    assert!(seen.iter().any(|x| x.0 && x.2 && !x.3));
    assert!(cluster_errors(&local.metrics_text().await) > 0);
}

#[tokio::test]
async fn a_keys_users_caps_hold_across_instances() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // Each answer is charged 16 tokens; a request with max_tokens 1 reserves a few more than
    // that: a user's 40 a day fits two requests, not three.
    let budget = "user_header = \"x-openwebui-user-id\"\nuser_budget = { tokens_per_day = 40 }";
    let a = Gateway::start(&budget_config(
        &up,
        &redis.url(),
        &dir.path().join("a.db"),
        budget,
    ))
    .await;
    let b = Gateway::start(&budget_config(
        &up,
        &redis.url(),
        &dir.path().join("b.db"),
        budget,
    ))
    .await;
    let small = serde_json::json!({"model": "m", "messages": [], "max_tokens": 1}).to_string();
    let ask = |gw: &Gateway, user: &str| {
        let req = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(PHONE)
            .header("x-openwebui-user-id", user)
            .header("content-type", "application/json")
            .body(small.clone());
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for (n, gw) in [(1.0, &a), (2.0, &b)] {
        assert_eq!(ask(gw, "alice").await, 200);
        redis.wait_day_tokens("u:phone:alice", 16.0 * n).await;
    }
    // alice's third is refused on either instance; bob has his own 40.
    assert_eq!(ask(&a, "alice").await, 429);
    assert_eq!(ask(&b, "alice").await, 429);
    assert_eq!(ask(&a, "bob").await, 200);
    // The key's spend is the sum of its users'.
    redis.wait_day_tokens("k:phone", 48.0).await;
    assert_eq!(redis_spend(&redis), 48.0);
    assert_all_keys_expire(&redis);
}
