//! SPEC §10 `[[issuers]] budget`: each subject of an issuer is held to the issuer's caps
//! separately, its spend kept under its identity `<issuer>:<sub>` (ledger `key_id`), rebuilt from
//! the ledger after a restart like a key's.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use support::*;

const SECRET: &str = "a-test-hmac-secret-of-more-than-32-bytes";
const ISS: &str = "https://sso.example/";

/// A chat request the test upstream answers with 11 prompt + 5 completion tokens; with
/// `max_tokens: 1` it reserves about a dozen tokens, so a 20-token cap admits one and not two.
const CHAT: &str = r#"{"model":"m","messages":[],"max_tokens":1}"#;

fn token(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"iss": ISS, "sub": sub, "exp": now + 600});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn config(up: &Upstream, db: &Path) -> String {
    format!(
        "{}[limits]\nper_ip = \"off\"\nper_key = \"off\"\n[usage]\ndatabase = \"{}\"\n\
         [[issuers]]\nname = \"sso\"\nissuer = \"{ISS}\"\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\"\n\
         budget = {{ tokens_per_day = 20 }}\n\
         [[routes]]\nname = \"bridge\"\npath = \"/v1/\"\nupstream = \"{}\"\nllm = true\nauth = \"jwt\"\nissuers = [\"sso\"]\n",
        server_section(""),
        db.display(),
        up.url()
    )
}

async fn ask(gw: &Gateway, sub: &str) -> (u16, String) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(token(sub))
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

#[tokio::test]
async fn each_subject_has_the_issuers_caps_and_its_spend_survives_a_restart() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let mut gw = Gateway::start(&config(&up, &db)).await;
    assert_eq!(ask(&gw, "alice").await.0, 200);
    // alice has spent 16 of her 20: the next request's reservation does not fit.
    let (status, body) = ask(&gw, "alice").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("budget_exceeded"), "{body}");
    // bob has his own 20.
    assert_eq!(ask(&gw, "bob").await.0, 200);
    let records = gw.wait_requests(3).await;
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sso:alice", "sso:alice", "sso:bob"]);
    assert_eq!(up.seen().len(), 2, "the refused request was forwarded");
    gw.signal("TERM");
    assert_eq!(gw.wait_exit().await, 0);

    // The ledger keeps the spend under the identity, and a restart rebuilds it from there.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let alice: i64 = conn
        .query_row(
            "SELECT COALESCE(sum(charged_tokens), 0) FROM usage WHERE key_id = 'sso:alice'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(alice, 16);
    drop(conn);
    let gw = Gateway::start(&config(&up, &db)).await;
    let (status, body) = ask(&gw, "alice").await;
    assert_eq!(status, 429, "after the restart: {body}");
    assert_eq!(ask(&gw, "carol").await.0, 200);
}
