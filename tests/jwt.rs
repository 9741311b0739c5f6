//! JWT verification (SPEC §10): tokens of an identity provider, signed RS256, ES256 or EdDSA
//! (keys from a JWKS file) or HS256 (the issuer's `secret`), accepted on `auth = "jwt"` and
//! `"key_or_jwt"` routes as the identity `<issuer name>:<sub>`; every invalid token refused with
//! 401 `invalid_token` (counting toward lockout, except a token whose `kid` the issuer has no key
//! for: see tests/jwt_jwks.rs), the algorithm-confusion attack included; the
//! per-key limit per subject; JWKS rotation by reload; no subject in metrics; config errors named
//! by key path. Keys are made with the `openssl` CLI, tokens signed with `jsonwebtoken`; the
//! gateway is the real binary, the upstreams the servers of `tests/support/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::*;

/// The `iss` every issuer of these tests requires.
const ISS: &str = "https://sso.example/";
/// The audience every issuer of these tests requires.
const AUD: &str = "portcullis";
/// The HS256 secret (at least 32 bytes), from `JWT_SECRET`.
const SECRET: &str = "jwt-hs256-secret-Kq83-0123456789abcdefghijklmn";
/// An API key, for `key_or_jwt`.
const KEY: &str = "pcx_jwt-laptop-key-0123456789abcdefghijklmnop";

fn env() -> [(&'static str, &'static str); 1] {
    [("JWT_SECRET", SECRET)]
}

// ---------------------------------------------------------------- keys and tokens

/// A key to sign with: its algorithm, `kid`, private key and public JWK.
struct SigningKey {
    alg: Algorithm,
    kid: Option<String>,
    enc: EncodingKey,
    jwk: Value,
}

struct Keys {
    /// RS256, `kid` `rsa-1`: the issuer's current key.
    rsa: SigningKey,
    /// RS256, `kid` `rsa-2`: the key it rotates to.
    rsa_next: SigningKey,
    /// RS256 with the current key's `kid` `rsa-1`, but in no JWKS: a forger's key.
    rogue: SigningKey,
    /// ES256 (P-256), `kid` `ec-1`.
    ec: SigningKey,
    /// EdDSA (Ed25519), `kid` `ed-1`.
    ed: SigningKey,
    /// HS256 with [`SECRET`], no `kid`.
    hs: SigningKey,
    /// The current RSA key's public half, as PEM text and as DER (what an attacker can fetch).
    rsa_public_pem: Vec<u8>,
    rsa_public_der: Vec<u8>,
}

/// Made once per test binary (RSA key generation takes a moment).
static KEYS: LazyLock<Keys> = LazyLock::new(make_keys);

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `openssl genpkey <args>` into `dir/name` (PKCS#8 PEM); returns (private PEM, path).
fn genpkey(dir: &Path, name: &str, args: &[&str]) -> (Vec<u8>, PathBuf) {
    let path = dir.join(name);
    let mut a = vec!["genpkey"];
    a.extend_from_slice(args);
    a.extend(["-out", path.to_str().unwrap()]);
    openssl(&a);
    (std::fs::read(&path).unwrap(), path)
}

/// The JWK of an RSA or EC key, with `kid`.
fn jwk_of(enc: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(enc, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_value(jwk).unwrap()
}

fn rsa_key(dir: &Path, kid: &str) -> (SigningKey, PathBuf) {
    let (pem, path) = genpkey(
        dir,
        &format!("{kid}.pem"),
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let enc = EncodingKey::from_rsa_pem(&pem).unwrap();
    let jwk = jwk_of(&enc, Algorithm::RS256, kid);
    let key = SigningKey {
        alg: Algorithm::RS256,
        kid: Some(kid.to_owned()),
        enc,
        jwk,
    };
    (key, path)
}

fn make_keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (rsa, rsa_path) = rsa_key(d, "rsa-1");
    let (rsa_next, _) = rsa_key(d, "rsa-2");
    let (mut rogue, _) = rsa_key(d, "rogue");
    rogue.kid = Some("rsa-1".to_owned());
    let rsa_file = rsa_path.to_str().unwrap();
    let rsa_public_pem = openssl(&["pkey", "-in", rsa_file, "-pubout"]);
    let rsa_public_der = openssl(&["pkey", "-in", rsa_file, "-pubout", "-outform", "DER"]);
    assert!(rsa_public_pem.starts_with(b"-----BEGIN PUBLIC KEY-----"));

    let (ec_pem, _) = genpkey(
        d,
        "ec.pem",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    // jsonwebtoken reads EC keys as PKCS#8, which `genpkey` writes; made sure of here.
    let ec_pem = if ec_pem.starts_with(b"-----BEGIN PRIVATE KEY-----") {
        ec_pem
    } else {
        let p = d.join("ec.pem");
        openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", p.to_str().unwrap()])
    };
    let ec_enc = EncodingKey::from_ec_pem(&ec_pem).unwrap();
    let ec = SigningKey {
        alg: Algorithm::ES256,
        kid: Some("ec-1".to_owned()),
        jwk: jwk_of(&ec_enc, Algorithm::ES256, "ec-1"),
        enc: ec_enc,
    };

    // `Jwk::from_encoding_key` does not do Ed25519: the JWK is built by hand from the raw public
    // key, the last 32 bytes of its DER SubjectPublicKeyInfo.
    let (ed_pem, ed_path) = genpkey(d, "ed.pem", &["-algorithm", "ed25519"]);
    let ed_der = openssl(&[
        "pkey",
        "-in",
        ed_path.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    assert_eq!(ed_der.len(), 44, "an Ed25519 SubjectPublicKeyInfo");
    let ed = SigningKey {
        alg: Algorithm::EdDSA,
        kid: Some("ed-1".to_owned()),
        enc: EncodingKey::from_ed_pem(&ed_pem).unwrap(),
        jwk: json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(&ed_der[ed_der.len() - 32..]),
            "kid": "ed-1",
            "alg": "EdDSA",
            "use": "sig",
        }),
    };
    let hs = SigningKey {
        alg: Algorithm::HS256,
        kid: None,
        enc: EncodingKey::from_secret(SECRET.as_bytes()),
        jwk: Value::Null,
    };
    Keys {
        rsa,
        rsa_next,
        rogue,
        ec,
        ed,
        hs,
        rsa_public_pem,
        rsa_public_der,
    }
}

/// Writes a JWKS document holding `keys` (their JWKs, as given) to `path`.
fn write_jwks(path: &Path, keys: &[&Value]) {
    let doc = json!({ "keys": keys });
    std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
}

/// A JWKS file `name` in `dir` with the public keys of `keys`; returns its path.
fn jwks_file(dir: &Path, name: &str, keys: &[&SigningKey]) -> PathBuf {
    let path = dir.join(name);
    write_jwks(&path, &keys.iter().map(|k| &k.jwk).collect::<Vec<_>>());
    path
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Valid claims for `sub`: the issuer, the audience, the required `group`, 5 min to live.
fn claims(sub: &str) -> Value {
    json!({
        "iss": ISS,
        "sub": sub,
        "aud": AUD,
        "iat": now(),
        "exp": now() + 300,
        "group": "llm",
    })
}

fn with(mut c: Value, name: &str, v: Value) -> Value {
    c[name] = v;
    c
}

fn without(mut c: Value, name: &str) -> Value {
    c.as_object_mut().unwrap().remove(name);
    c
}

/// `claims` signed with `key` (its algorithm and `kid` in the header).
fn sign(key: &SigningKey, claims: &Value) -> String {
    sign_as(key, key.alg, claims)
}

/// `claims` signed with `key` under header `alg` (another algorithm of the key's family).
fn sign_as(key: &SigningKey, alg: Algorithm, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = key.kid.clone();
    encode(&h, claims, &key.enc).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with `header` and `claims` and an empty signature (`alg: none`).
fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// An HS256 token with `kid`, its HMAC key `secret` (the confusion attack's forgery when that is
/// an RSA public key).
fn hs256_with(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_owned);
    encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
}

// ---------------------------------------------------------------- configs and requests

/// `[auth]` and `[limits]` that refuse nothing by themselves (lockout high, limits off).
const PERMISSIVE: &str =
    "[auth]\nlockout_failures = 1000\n[limits]\nper_ip = \"off\"\nper_key = \"off\"\n";

/// An `[[issuers]]` entry named `name`: `iss` [`ISS`], audience [`AUD`], `group = "llm"`
/// required, `algorithms`, the JWKS at `jwks` (if any), `secret = "${JWT_SECRET}"` when HS256 is
/// listed, and `extra` lines.
fn issuer(name: &str, algorithms: &[&str], jwks: Option<&Path>, extra: &str) -> String {
    let algs = algorithms
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "[[issuers]]\nname = \"{name}\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
         algorithms = [{algs}]\nrequired_claims = {{ group = \"llm\" }}\n"
    );
    if let Some(j) = jwks {
        s.push_str(&format!("jwks_file = \"{}\"\n", j.display()));
    }
    if algorithms.contains(&"HS256") {
        s.push_str("secret = \"${JWT_SECRET}\"\n");
    }
    s.push_str(extra);
    s.push('\n');
    s
}

/// A `[[routes]]` entry to `up` with `auth` and `issuers`, then `extra` lines.
fn route(
    name: &str,
    path: &str,
    up: &Upstream,
    auth: &str,
    issuers: &[&str],
    extra: &str,
) -> String {
    let mut s = format!(
        "[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstream = \"{}\"\nauth = \"{auth}\"\n",
        up.url()
    );
    if !issuers.is_empty() {
        let list = issuers
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!("issuers = [{list}]\n"));
    }
    s.push_str(extra);
    s.push('\n');
    s
}

/// The server section, then `top` (`[auth]`, `[limits]`, `[admin]`…), then `blocks`.
fn config(top: &str, blocks: &[String]) -> String {
    format!("{}{top}\n{}", server_section(""), blocks.concat())
}

/// All four algorithms (the JWKS for the first three, the secret for HS256).
const ALL_ALGS: [&str; 4] = ["RS256", "ES256", "EdDSA", "HS256"];

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

/// `GET path` with `token` as the bearer credential; (status, error code, raw answer).
async fn get(gw: &Gateway, path: &str, token: &str) -> (u16, String, String) {
    let (s, r) = send(gw.addr, "GET", path, &[&bearer(token)]).await;
    (s, code_of(&r), r)
}

/// Asserts `token` is accepted on `path` (200).
async fn accepted(gw: &Gateway, path: &str, token: &str, what: &str) {
    let (s, _, r) = get(gw, path, token).await;
    assert_eq!(s, 200, "{what}: should be accepted on {path}:\n{r}");
}

/// Asserts `token` is refused on `path` with 401 `invalid_token`.
async fn refused(gw: &Gateway, path: &str, token: &str, what: &str) {
    let (s, code, r) = get(gw, path, token).await;
    assert_eq!(
        (s, code.as_str()),
        (401, "invalid_token"),
        "{what}: should be refused on {path}:\n{r}"
    );
}

/// A token's three parts: header, payload, signature.
fn parts(token: &str) -> [&str; 3] {
    let v: Vec<&str> = token.split('.').collect();
    [v[0], v[1], v[2]]
}

// ---------------------------------------------------------------- acceptance

#[tokio::test]
async fn valid_rs256_es256_eddsa_and_hs256_tokens_are_accepted_as_issuer_and_subject() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa, &k.ec, &k.ed]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("sso", &ALL_ALGS, Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;

    let tokens = [
        ("rs-user", sign(&k.rsa, &claims("rs-user"))),
        ("es-user", sign(&k.ec, &claims("es-user"))),
        ("ed-user", sign(&k.ed, &claims("ed-user"))),
        ("hs-user", sign(&k.hs, &claims("hs-user"))),
    ];
    for (i, (sub, t)) in tokens.iter().enumerate() {
        accepted(&gw, &format!("/v1/{i}"), t, sub).await;
    }
    // In the other configured key header too, and with `aud` a list that holds ours.
    let listed = sign(
        &k.rsa,
        &with(claims("list-user"), "aud", json!(["another-app", AUD])),
    );
    let (s, r) = send(gw.addr, "GET", "/v1/4", &[&format!("X-API-Key: {listed}")]).await;
    assert_eq!(s, 200, "a JWT in X-API-Key: {r}");
    assert_eq!(up.targets(), ["/v1/0", "/v1/1", "/v1/2", "/v1/3", "/v1/4"]);

    // The audit records name the identity `<issuer name>:<sub>` as the key.
    let recs = gw.wait_requests(5).await;
    let subs = ["rs-user", "es-user", "ed-user", "hs-user", "list-user"];
    for (rec, sub) in recs.iter().zip(subs) {
        assert_eq!(rec["outcome"], "forwarded", "{rec}");
        assert_eq!(rec["key_id"], format!("sso:{sub}"), "{rec}");
    }
    // The JWT never reaches the upstream: no Authorization, no X-API-Key, no header holding it.
    let all: Vec<&String> = tokens.iter().map(|(_, t)| t).chain([&listed]).collect();
    for seen in up.seen() {
        assert_eq!(seen.header("authorization"), None, "{seen:?}");
        assert_eq!(seen.header("x-api-key"), None, "{seen:?}");
        for t in &all {
            assert!(
                seen.headers.iter().all(|(_, v)| !v.contains(t.as_str())),
                "{seen:?}"
            );
        }
    }
    // Nor is it written out.
    for t in &all {
        assert!(
            !gw.stdout.text().contains(t.as_str()),
            "a JWT in the audit log"
        );
        assert!(!gw.stderr.text().contains(t.as_str()), "a JWT in the log");
    }
}

#[tokio::test]
async fn a_jwt_route_without_a_credential_answers_missing_api_key() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("sso", &["RS256"], Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let (s, r) = send(gw.addr, "GET", "/v1/x", &[]).await;
    assert_eq!((s, code_of(&r).as_str()), (401, "missing_api_key"), "{r}");
    assert!(up.seen().is_empty(), "{:?}", up.targets());
    let rec = &gw.wait_requests(1).await[0];
    assert_eq!(rec["outcome"], "missing_api_key", "{rec}");
}

// ---------------------------------------------------------------- refusals

#[tokio::test]
async fn each_invalid_token_is_refused_with_invalid_token_and_nothing_is_forwarded() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa, &k.ec, &k.ed]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("sso", &ALL_ALGS, Some(&jwks), ""),
            // The same keys, but RS256 only.
            issuer("strict", &["RS256"], Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], ""),
            route("strict", "/strict/", &up, "jwt", &["strict"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;

    let good = sign(&k.rsa, &claims("alice"));
    let [h, p, sig] = parts(&good);
    // A character in the middle of the signature (the last one may only change padding bits).
    let mid = sig.len() / 2;
    let flipped = if &sig[mid..=mid] == "A" { "B" } else { "A" };
    let bad_sig = format!("{h}.{p}.{}{flipped}{}", &sig[..mid], &sig[mid + 1..]);
    let other_payload = b64(claims("mallory").to_string().as_bytes());
    let swapped_payload = format!("{h}.{other_payload}.{sig}");

    let cases: Vec<(&str, String)> = vec![
        (
            "signed by a key not in the JWKS, under its kid",
            sign(&k.rogue, &claims("alice")),
        ),
        ("a changed signature", bad_sig),
        ("another payload under the signature", swapped_payload),
        (
            "HS256 with another secret",
            hs256_with(
                b"another-secret-of-enough-length-0123456789",
                None,
                &claims("alice"),
            ),
        ),
        (
            "another iss",
            sign(
                &k.rsa,
                &with(claims("alice"), "iss", json!("https://evil.example/")),
            ),
        ),
        (
            "another aud",
            sign(&k.rsa, &with(claims("alice"), "aud", json!("another-app"))),
        ),
        (
            "an aud list without ours",
            sign(&k.rsa, &with(claims("alice"), "aud", json!(["a", "b"]))),
        ),
        (
            "expired 2 min ago (beyond the 30 s leeway)",
            sign(&k.rsa, &with(claims("alice"), "exp", json!(now() - 120))),
        ),
        (
            "not valid for 2 min (beyond the 30 s leeway)",
            sign(&k.rsa, &with(claims("alice"), "nbf", json!(now() + 120))),
        ),
        ("no exp", sign(&k.rsa, &without(claims("alice"), "exp"))),
        ("no iss", sign(&k.rsa, &without(claims("alice"), "iss"))),
        ("no sub", sign(&k.rsa, &without(claims("alice"), "sub"))),
        (
            "the required claim missing",
            sign(&k.rsa, &without(claims("alice"), "group")),
        ),
        (
            "the required claim different",
            sign(&k.rsa, &with(claims("alice"), "group", json!("ops"))),
        ),
        (
            "the required claim as a list (not the exact value)",
            sign(&k.rsa, &with(claims("alice"), "group", json!(["llm"]))),
        ),
        (
            "RS384, an algorithm the issuer does not list, with a listed key",
            sign_as(&k.rsa, Algorithm::RS384, &claims("alice")),
        ),
        ("not a JWT", "not-a-jwt".to_owned()),
    ];
    for (what, t) in &cases {
        refused(&gw, "/v1/x", t, what).await;
    }
    // ES256 and EdDSA are valid for `sso`, with keys in the JWKS `strict` reads, but `strict`
    // lists RS256 only.
    let unlisted = [
        (
            "ES256 on an RS256-only issuer",
            sign(&k.ec, &claims("alice")),
        ),
        (
            "EdDSA on an RS256-only issuer",
            sign(&k.ed, &claims("alice")),
        ),
        (
            "HS256 on an RS256-only issuer",
            sign(&k.hs, &claims("alice")),
        ),
    ];
    for (what, t) in &unlisted {
        accepted(&gw, "/v1/ok", t, &format!("{what} (on sso)")).await;
        refused(&gw, "/strict/x", t, what).await;
    }
    // Nothing refused was forwarded.
    assert_eq!(up.targets(), ["/v1/ok"; 3]);

    let n = cases.len() + 2 * unlisted.len();
    let recs = gw.wait_requests(n).await;
    let refusals: Vec<_> = recs.iter().filter(|r| r["status"] == 401).collect();
    assert_eq!(refusals.len(), cases.len() + unlisted.len(), "{recs:?}");
    for rec in refusals {
        assert_eq!(rec["outcome"], "invalid_token", "{rec}");
        // A refused token gives no identity.
        assert!(rec["key_id"].is_null(), "{rec}");
    }
    // The good token itself, on both routes.
    accepted(&gw, "/v1/x", &good, "the unaltered token").await;
    accepted(&gw, "/strict/x", &good, "the unaltered token").await;
}

#[tokio::test]
async fn a_token_without_aud_is_refused_when_audiences_are_set() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("sso", &["RS256"], Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    // `audiences = ["portcullis"]`: the token's `aud` must hold one; no `aud` holds none.
    refused(
        &gw,
        "/v1/x",
        &sign(&k.rsa, &without(claims("alice"), "aud")),
        "no aud",
    )
    .await;
    refused(
        &gw,
        "/v1/x",
        &sign(&k.rsa, &with(claims("alice"), "aud", json!([]))),
        "an empty aud list",
    )
    .await;
    assert!(up.seen().is_empty(), "{:?}", up.targets());
    accepted(&gw, "/v1/x", &sign(&k.rsa, &claims("alice")), "with aud").await;
}

#[tokio::test]
async fn alg_none_is_refused() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa, &k.ec, &k.ed]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("sso", &ALL_ALGS, Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let c = claims("alice");
    let good = sign(&k.rsa, &c);
    let forged = [
        unsigned(&json!({"alg": "none", "typ": "JWT"}), &c),
        unsigned(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}), &c),
        unsigned(&json!({"alg": "None", "typ": "JWT"}), &c),
        unsigned(&json!({"alg": "NONE", "typ": "JWT"}), &c),
        // `none`, with the real token's signature kept.
        format!(
            "{}.{}.{}",
            b64(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes()),
            parts(&good)[1],
            parts(&good)[2]
        ),
    ];
    for t in &forged {
        assert!(t.starts_with("eyJ"), "{t}");
        refused(&gw, "/v1/x", t, &format!("alg none: {t}")).await;
    }
    assert!(up.seen().is_empty(), "{:?}", up.targets());
    accepted(&gw, "/v1/x", &good, "the same claims, signed").await;
}

#[tokio::test]
async fn the_rs256_as_hs256_confusion_attack_is_refused_in_both_issuer_configs() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("strict", &["RS256"], Some(&jwks), ""),
            // HS256 listed too, with a secret: HMAC keys still come only from that secret.
            issuer("mixed", &["RS256", "HS256"], Some(&jwks), ""),
            route("strict", "/strict/", &up, "jwt", &["strict"], ""),
            route("mixed", "/mixed/", &up, "jwt", &["mixed"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let c = claims("alice");
    // The attacker re-signs as HS256 with the RSA public key's bytes as the HMAC secret.
    let pem_trimmed = k.rsa_public_pem.trim_ascii_end();
    let forged = [
        (
            "PEM, with kid",
            hs256_with(&k.rsa_public_pem, Some("rsa-1"), &c),
        ),
        ("PEM, no kid", hs256_with(&k.rsa_public_pem, None, &c)),
        (
            "PEM without its last newline",
            hs256_with(pem_trimmed, Some("rsa-1"), &c),
        ),
        (
            "DER, with kid",
            hs256_with(&k.rsa_public_der, Some("rsa-1"), &c),
        ),
        ("DER, no kid", hs256_with(&k.rsa_public_der, None, &c)),
    ];
    for path in ["/strict/x", "/mixed/x"] {
        for (what, t) in &forged {
            refused(
                &gw,
                path,
                t,
                &format!("HS256 keyed with the RSA public key ({what})"),
            )
            .await;
        }
    }
    assert!(up.seen().is_empty(), "{:?}", up.targets());
    // What each issuer does accept: the RS256 original on both, HS256 with the secret on `mixed`.
    accepted(&gw, "/strict/x", &sign(&k.rsa, &c), "RS256").await;
    accepted(&gw, "/mixed/x", &sign(&k.rsa, &c), "RS256").await;
    accepted(&gw, "/mixed/x", &sign(&k.hs, &c), "HS256 with the secret").await;
    refused(&gw, "/strict/x", &sign(&k.hs, &c), "HS256 not listed").await;
}

#[tokio::test]
async fn an_hmac_key_in_the_jwks_never_verifies_a_token() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // A JWKS that also holds a symmetric (`oct`) key: docs/configuration.md, `secret`: "HMAC keys
    // come only from here, never from the JWKS".
    let oct_secret = b"an-oct-key-published-in-the-jwks-0123456789";
    let oct = json!({"kty": "oct", "k": b64(oct_secret), "kid": "hmac-1", "alg": "HS256"});
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[&k.rsa.jwk, &oct]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("mixed", &["RS256", "HS256"], Some(&path), ""),
            route("mixed", "/mixed/", &up, "jwt", &["mixed"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let c = claims("alice");
    refused(
        &gw,
        "/mixed/x",
        &hs256_with(oct_secret, Some("hmac-1"), &c),
        "HS256 signed with the JWKS's oct key",
    )
    .await;
    assert!(up.seen().is_empty(), "{:?}", up.targets());
    // The same header, signed with the configured secret, is accepted.
    accepted(
        &gw,
        "/mixed/x",
        &hs256_with(SECRET.as_bytes(), Some("hmac-1"), &c),
        "HS256 with the secret",
    )
    .await;
}

// ---------------------------------------------------------------- leeway

#[tokio::test]
async fn leeway_admits_a_token_expired_10_s_ago_by_default_and_not_with_0_s() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let cfg = config(
        PERMISSIVE,
        &[
            issuer("sso", &["RS256"], Some(&jwks), ""),
            issuer("exact", &["RS256"], Some(&jwks), "leeway = \"0s\""),
            route("lenient", "/lenient/", &up, "jwt", &["sso"], ""),
            route("exact", "/exact/", &up, "jwt", &["exact"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let expired = sign(&k.rsa, &with(claims("alice"), "exp", json!(now() - 10)));
    let early = sign(&k.rsa, &with(claims("alice"), "nbf", json!(now() + 10)));

    accepted(
        &gw,
        "/lenient/x",
        &expired,
        "expired 10 s ago, default leeway 30 s",
    )
    .await;
    refused(&gw, "/exact/x", &expired, "expired 10 s ago, leeway 0 s").await;
    accepted(
        &gw,
        "/lenient/y",
        &early,
        "nbf in 10 s, default leeway 30 s",
    )
    .await;
    refused(&gw, "/exact/y", &early, "nbf in 10 s, leeway 0 s").await;
    assert_eq!(up.targets(), ["/lenient/x", "/lenient/y"]);
    // The fresh token is accepted with no leeway: the refusals are the leeway's.
    accepted(
        &gw,
        "/exact/z",
        &sign(&k.rsa, &claims("alice")),
        "a fresh token",
    )
    .await;
    let recs = gw.wait_requests(5).await;
    assert_eq!(recs[0]["key_id"], "sso:alice", "{}", recs[0]);
    assert_eq!(recs[4]["key_id"], "exact:alice", "{}", recs[4]);
}

// ---------------------------------------------------------------- lockout

#[tokio::test]
async fn bad_tokens_count_toward_lockout() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let cfg = config(
        "[auth]\nlockout_failures = 3\nlockout_window = \"1m\"\nlockout_duration = \"1m\"\n\
         [limits]\nper_ip = \"off\"\nper_key = \"off\"\n",
        &[
            issuer("sso", &["RS256"], Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let good = sign(&k.rsa, &claims("alice"));
    let bad = [
        sign(&k.rogue, &claims("alice")),
        sign(&k.rsa, &with(claims("alice"), "exp", json!(now() - 3600))),
        sign(
            &k.rsa,
            &with(claims("alice"), "iss", json!("https://evil.example/")),
        ),
    ];
    refused(&gw, "/v1/x", &bad[0], "bad signature").await;
    refused(&gw, "/v1/x", &bad[1], "expired").await;
    // Two failures: not locked out yet.
    accepted(&gw, "/v1/x", &good, "after two failures").await;
    // The third locks the IP out, even with a valid token.
    refused(&gw, "/v1/x", &bad[2], "another iss").await;
    let (s, code, r) = get(&gw, "/v1/x", &good).await;
    assert_eq!((s, code.as_str()), (429, "locked_out"), "{r}");
    assert!(header_of(&r, "retry-after").is_some(), "{r}");
    assert_eq!(up.targets().len(), 1, "{:?}", up.targets());

    gw.wait_requests(5).await;
    let lockouts = gw.events("lockout");
    assert_eq!(lockouts.len(), 1, "{lockouts:?}");
    assert_eq!(lockouts[0]["client_ip"], "127.0.0.1");
    assert_eq!(lockouts[0]["failures"], 3);
}

// ---------------------------------------------------------------- per-subject limits

#[tokio::test]
async fn the_per_key_limit_applies_per_subject() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa, &k.ec]);
    let cfg = config(
        "[auth]\nlockout_failures = 1000\n[limits]\nper_ip = \"off\"\nper_key = \"3/min\"\n",
        &[
            issuer("sso", &ALL_ALGS, Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], "per_key = \"2/min\""),
            // No `per_key` of its own: `[limits] per_key` applies.
            route("other", "/other/", &up, "jwt", &["sso"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;

    // Subject A: two requests pass, the third is limited — with another token, signed with
    // another key and algorithm: the subject is limited, not the token.
    let a1 = sign(&k.rsa, &claims("alice"));
    accepted(&gw, "/v1/1", &a1, "alice 1").await;
    accepted(&gw, "/v1/2", &a1, "alice 2").await;
    let a2 = sign(&k.ec, &with(claims("alice"), "exp", json!(now() + 600)));
    assert_ne!(a1, a2);
    let (s, code, r) = get(&gw, "/v1/3", &a2).await;
    assert_eq!((s, code.as_str()), (429, "rate_limited"), "{r}");
    assert_eq!(header_of(&r, "ratelimit-policy").as_deref(), Some("2;w=60"));
    // Subject B has its own allowance.
    accepted(&gw, "/v1/4", &sign(&k.rsa, &claims("bob")), "bob").await;
    assert_eq!(up.targets(), ["/v1/1", "/v1/2", "/v1/4"]);
    let recs = gw.wait_requests(4).await;
    assert_eq!(recs[2]["outcome"], "rate_limited", "{}", recs[2]);
    assert_eq!(recs[2]["key_id"], "sso:alice", "{}", recs[2]);
    assert_eq!(recs[3]["key_id"], "sso:bob", "{}", recs[3]);

    // On a route without its own `per_key`: `[limits] per_key = "3/min"`.
    let c = sign(&k.rsa, &claims("carol"));
    for i in 0..3 {
        accepted(&gw, &format!("/other/{i}"), &c, &format!("carol {i}")).await;
    }
    let (s, code, r) = get(&gw, "/other/3", &c).await;
    assert_eq!((s, code.as_str()), (429, "rate_limited"), "{r}");
    assert_eq!(header_of(&r, "ratelimit-policy").as_deref(), Some("3;w=60"));
}

// ---------------------------------------------------------------- key_or_jwt

#[tokio::test]
async fn key_or_jwt_accepts_an_api_key_and_a_jwt_on_the_same_route() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let cfg = config(
        PERMISSIVE,
        &[
            key_block("laptop", KEY, ""),
            issuer("sso", &["RS256"], Some(&jwks), ""),
            route("api", "/v1/", &up, "key_or_jwt", &["sso"], ""),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let jwt = sign(&k.rsa, &claims("alice"));

    accepted(&gw, "/v1/key", KEY, "the API key").await;
    accepted(&gw, "/v1/jwt", &jwt, "the JWT").await;
    let (s, r) = send(
        gw.addr,
        "GET",
        "/v1/jwt-header",
        &[&format!("X-API-Key: {jwt}")],
    )
    .await;
    assert_eq!(s, 200, "the JWT in X-API-Key: {r}");
    // Each still refused when invalid, as its kind.
    refused(
        &gw,
        "/v1/x",
        &sign(&k.rogue, &claims("alice")),
        "a forged JWT",
    )
    .await;
    let (s, code, r) = get(
        &gw,
        "/v1/x",
        "pcx_not-a-key-0123456789abcdefghijklmnopqrstu",
    )
    .await;
    assert_eq!((s, code.as_str()), (401, "invalid_api_key"), "{r}");
    assert_eq!(up.targets(), ["/v1/key", "/v1/jwt", "/v1/jwt-header"]);

    let recs = gw.wait_requests(5).await;
    assert_eq!(recs[0]["key_id"], "laptop", "{}", recs[0]);
    assert_eq!(recs[1]["key_id"], "sso:alice", "{}", recs[1]);
    assert_eq!(recs[2]["key_id"], "sso:alice", "{}", recs[2]);
    // Neither credential goes upstream.
    for seen in up.seen() {
        assert_eq!(seen.header("authorization"), None, "{seen:?}");
        assert_eq!(seen.header("x-api-key"), None, "{seen:?}");
        assert!(
            seen.headers
                .iter()
                .all(|(_, v)| !v.contains(&jwt) && !v.contains(KEY)),
            "{seen:?}"
        );
    }
}

// ---------------------------------------------------------------- rotation

#[tokio::test]
async fn a_rotated_jwks_is_picked_up_by_reload_and_the_removed_key_is_refused() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let routes = route("api", "/v1/", &up, "jwt", &["sso"], "");
    let cfg = config(
        PERMISSIVE,
        &[issuer("sso", &["RS256"], Some(&jwks), ""), routes.clone()],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let old = sign(&k.rsa, &claims("alice"));
    let new = sign(&k.rsa_next, &claims("alice"));
    accepted(&gw, "/v1/x", &old, "the current key").await;
    refused(&gw, "/v1/x", &new, "a kid not yet in the JWKS").await;

    // The provider adds its next key: the JWKS file is rewritten in place, then SIGHUP.
    write_jwks(&jwks, &[&k.rsa.jwk, &k.rsa_next.jwk]);
    let ev = gw.reload().await;
    assert_eq!(ev["result"], "ok", "{ev}");
    accepted(&gw, "/v1/x", &new, "the new kid after reload").await;
    accepted(&gw, "/v1/x", &old, "the old kid, still in the JWKS").await;

    // Then drops the old one: here a new JWKS file, named by a rewritten config.
    let next = jwks_file(dir.path(), "jwks-next.json", &[&k.rsa_next]);
    gw.rewrite_config(&config(
        PERMISSIVE,
        &[issuer("sso", &["RS256"], Some(&next), ""), routes],
    ));
    let ev = gw.reload().await;
    assert_eq!(ev["result"], "ok", "{ev}");
    refused(&gw, "/v1/x", &old, "the removed key after reload").await;
    accepted(&gw, "/v1/x", &new, "the new key").await;
    assert_eq!(up.targets().len(), 4, "{:?}", up.targets());
}

// ---------------------------------------------------------------- metrics

#[tokio::test]
async fn metrics_name_the_issuer_never_the_subject() {
    let k = &*KEYS;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = jwks_file(dir.path(), "jwks.json", &[&k.rsa]);
    let cfg = config(
        &format!("{PERMISSIVE}[admin]\nlisten = \"127.0.0.1:0\"\n"),
        &[
            issuer("sso", &["RS256"], Some(&jwks), ""),
            route("api", "/v1/", &up, "jwt", &["sso"], "llm = true"),
        ],
    );
    let gw = Gateway::start_with_env(&cfg, &env()).await;
    let sub = "alice-7f3c9e";
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(sign(&k.rsa, &claims(sub)))
        .json(&json!({"model": "openai/gpt-4o-mini", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await.unwrap();
    // A refused token's subject neither.
    let refused_sub = "mallory-2b8d41";
    let expired = sign(
        &k.rsa,
        &with(claims(refused_sub), "exp", json!(now() - 3600)),
    );
    refused(&gw, "/v1/chat/completions", &expired, "expired").await;

    // The audit record has the subject.
    let recs = gw.wait_requests(2).await;
    assert_eq!(recs[0]["key_id"], format!("sso:{sub}"), "{}", recs[0]);
    assert_eq!(recs[0]["prompt_tokens"], 11, "{}", recs[0]);
    let text = gw.metrics_text().await;
    // The usage metric is labelled with the issuer's name.
    assert!(
        text.lines().any(|l| l
            .starts_with("portcullis_llm_tokens_total{route=\"api\",key_id=\"sso\",")
            && l.ends_with(" 11")),
        "{text}"
    );
    assert!(!text.contains(sub), "a subject in the metrics:\n{text}");
    assert!(
        !text.contains(refused_sub),
        "a subject in the metrics:\n{text}"
    );
    assert!(
        !text.contains("sso:"),
        "an identity in the metrics:\n{text}"
    );
}

// ---------------------------------------------------------------- config errors

/// A JWKS file (the RSA key) in a fresh directory, kept alive by the returned guard.
fn config_jwks() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = jwks_file(dir.path(), "jwks.json", &[&KEYS.rsa]);
    (dir, path)
}

const ROUTE_JWT: &str = "[[routes]]\nname = \"api\"\npath = \"/v1/\"\n\
                         upstream = \"http://127.0.0.1:8000\"\nauth = \"jwt\"\n";

/// An issuer entry from its lines (after `name` and `issuer`).
fn raw_issuer(lines: &str) -> String {
    format!("[[issuers]]\nname = \"sso\"\nissuer = \"{ISS}\"\n{lines}\n")
}

/// Runs `check` and asserts exit 1 and that stderr holds every fragment.
fn check_refuses(config: &str, fragments: &[&str]) {
    let (code, _out, err) = check(config, &env());
    assert_eq!(
        code, 1,
        "config should be refused:\n{config}\nstderr: {err}"
    );
    assert!(err.contains("portcullis.toml"), "file not named: {err}");
    for f in fragments {
        assert!(err.contains(f), "missing {f:?} in: {err}");
    }
}

#[test]
fn a_valid_issuer_config_passes_check() {
    let (_d, jwks) = config_jwks();
    let cfg = format!(
        "{}{ROUTE_JWT}issuers = [\"sso\"]\n",
        raw_issuer(&format!(
            "audiences = [\"{AUD}\"]\nalgorithms = [\"RS256\", \"HS256\"]\n\
             jwks_file = \"{}\"\nsecret = \"${{JWT_SECRET}}\"\nleeway = \"10s\"\n\
             required_claims = {{ group = \"llm\" }}",
            jwks.display()
        ))
    );
    let (code, out, err) = check(&cfg, &env());
    assert_eq!(code, 0, "{cfg}\nstdout: {out}\nstderr: {err}");
    assert!(out.contains("auth=jwt"), "{out}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}{err}");
}

#[test]
fn an_unknown_algorithm_names_its_key_path() {
    let (_d, jwks) = config_jwks();
    let cfg = format!(
        "{}{ROUTE_JWT}issuers = [\"sso\"]\n",
        raw_issuer(&format!(
            "algorithms = [\"RS256\", \"PS256\"]\njwks_file = \"{}\"",
            jwks.display()
        ))
    );
    check_refuses(&cfg, &["issuers[0].algorithms[1]", "PS256"]);
}

#[test]
fn hs256_without_a_secret_names_its_key_path() {
    let cfg = format!(
        "{}{ROUTE_JWT}issuers = [\"sso\"]\n",
        raw_issuer("algorithms = [\"HS256\"]")
    );
    check_refuses(&cfg, &["issuers[0].secret"]);
}

#[test]
fn an_hs256_secret_under_32_bytes_names_its_key_path() {
    let cfg = format!(
        "{}{ROUTE_JWT}issuers = [\"sso\"]\n",
        raw_issuer("algorithms = [\"HS256\"]\nsecret = \"${SHORT_JWT_SECRET}\"")
    );
    let (code, _, err) = check(
        &cfg,
        &[("SHORT_JWT_SECRET", "only-31-bytes-0123456789abcdef")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("issuers[0].secret"), "{err}");
    assert!(err.contains("32 bytes"), "{err}");
    assert!(
        !err.contains("only-31-bytes"),
        "the secret in an error: {err}"
    );
}

#[test]
fn rs256_without_a_jwks_file_names_its_key_path() {
    let cfg = format!(
        "{}{ROUTE_JWT}issuers = [\"sso\"]\n",
        raw_issuer("algorithms = [\"RS256\"]")
    );
    check_refuses(&cfg, &["issuers[0].jwks_file"]);
}

#[test]
fn an_unknown_issuer_in_a_route_names_its_key_path() {
    let (_d, jwks) = config_jwks();
    let cfg = format!(
        "{}{ROUTE_JWT}issuers = [\"sso\", \"nope\"]\n",
        raw_issuer(&format!(
            "algorithms = [\"RS256\"]\njwks_file = \"{}\"",
            jwks.display()
        ))
    );
    check_refuses(&cfg, &["routes[0].issuers[1]", "nope"]);
}

#[test]
fn a_jwt_route_without_issuers_names_its_key_path() {
    let (_d, jwks) = config_jwks();
    let cfg = format!(
        "{}{ROUTE_JWT}",
        raw_issuer(&format!(
            "algorithms = [\"RS256\"]\njwks_file = \"{}\"",
            jwks.display()
        ))
    );
    check_refuses(&cfg, &["routes[0].issuers"]);
}
