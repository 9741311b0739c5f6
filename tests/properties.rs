//! Property tests (proptest) for the parsers an attacker feeds, through the public API only:
//!
//! - `path::normalize`: never panics; what it accepts is rooted, idempotent and unambiguous (no
//!   dot segment, `//`, `\`, encoded `/` or `\`, control byte, or non-canonical escape), and the
//!   route chosen on it is the one whose prefix the forwarded path (`route::upstream_path`) keeps.
//! - `client_ip::resolve`: never panics on any `X-Forwarded-For` lines; an untrusted peer is the
//!   client; behind a trusted peer the client is the right-most untrusted hop, and never an entry
//!   to the left of an untrusted or unreadable one.
//! - `auth::extract`: never panics; two different credentials (two lines of one header, header
//!   and query, two headers that differ) are never one presented key; `auth::strip_query_param`
//!   never leaves the key parameter in the query it forwards.
//! - `llm::sse::Scanner`: on arbitrary bytes, one chunk or any split gives the same events (data
//!   and end offsets in the stream); no event handed out is larger than the limit.
//! - `config::units`: `Rate::parse`, `ByteSize::parse` and `parse_duration` never panic, round-trip
//!   generated values, refuse overflow with an error and refuse `"0/min"`.
//! - `auth::valid_user`: exactly 1 to 128 bytes of `[A-Za-z0-9._@:-]`, returned unchanged.
//! - `proxy::frames::Scanner`: never panics on arbitrary bytes, is split-invariant, and gives back
//!   the text messages of well-formed frames (fragmented, masked, with control frames between).
//!
//! Each property runs proptest's default 256 cases, or `PROPTEST_CASES` of them. Run them longer:
//! `PROPTEST_CASES=100000 cargo test --test properties --release`. Failures are not persisted to
//! a regressions file: proptest prints the minimal failing input; add it to a unit test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use http::header::{AUTHORIZATION, HeaderName};
use http::{HeaderMap, HeaderValue, Method};
use ipnet::IpNet;
use proptest::prelude::*;

use portcullis::auth::{self, Presented};
use portcullis::client_ip;
use portcullis::config::env::LayeredEnv;
use portcullis::config::units::{ByteSize, Rate, parse_duration};
use portcullis::config::{self, Config};
use portcullis::llm::sse::Scanner;
use portcullis::path::normalize;
use portcullis::route::{self, Match};

/// proptest's defaults (so `PROPTEST_CASES` and the other `PROPTEST_*` variables apply), without
/// writing a regressions file next to the tests.
fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A config loaded through the public config API, as the gateway loads its file.
fn load(toml: &str) -> Config {
    config::parse(
        Path::new("properties.toml"),
        toml,
        &[],
        &LayeredEnv::default(),
    )
    .unwrap()
}

/// Strings made of the given pieces, `0..max` of them.
fn pieces(set: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(set), 0..max).prop_map(|v| v.concat())
}

// ---------------------------------------------------------------- 1. path normalization

const PATH_PIECES: &[&str] = &[
    "a", "b", "v1", "admin", "public", "svc", "x.y", ".", "..", "...", ".hidden", "%2e", "%2E",
    "%2e%2e", ".%2E", "%2e.", "%2F", "%2f", "%5C", "%5c", "%41", "%61", "%7e", "%7E", "%2D", "%25",
    "%252F", "%3B", "%3b", "%C3%A9", "%c3%a9", "%ff", "%7f", "%7F", "%20", "%0a", "%00", "%1F",
    "//", "\\", ";", ";x", "..;", ".;", ";=", "%", "%z", "%zz", "%2", "%%", "é", "\u{0}", "\t",
    " ", "?", "#", ":", "@", "!", "$", "&", "=", "+", ",", "'", "(", ")", "*", "~", "-", "_", "<",
    "|", "\"", "{",
];

/// Paths built from segments an attacker would try: dots, escapes of every kind, separators.
fn path_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => Just("/"),
        10 => prop::sample::select(PATH_PIECES),
    ];
    (
        prop::bool::weighted(0.95),
        prop::collection::vec(piece, 0..20),
    )
        .prop_map(|(rooted, v)| {
            let mut s = String::from(if rooted { "/" } else { "" });
            s.extend(v);
            s
        })
}

/// Arbitrary strings: any Unicode, printable ASCII after a `/`, and any ASCII after a `/`.
fn any_path_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "/[ -~]{0,48}",
        "/[\\x00-\\x7f]{0,48}",
        path_like(),
    ]
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Everything an accepted path must be; `Err` names the first broken rule.
fn check_normal(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err("does not start with '/'".into());
    }
    if normalize(p).as_deref() != Ok(p) {
        return Err(format!(
            "not idempotent: normalize again gives {:?}",
            normalize(p)
        ));
    }
    if p.contains("//") {
        return Err("holds '//'".into());
    }
    if p.contains('\\') {
        return Err("holds '\\'".into());
    }
    let segments: Vec<&str> = p[1..].split('/').collect();
    for s in &segments {
        if *s == "." || *s == ".." {
            return Err(format!("holds the dot segment {s:?}"));
        }
        if s.starts_with(".;") || s.starts_with("..;") {
            return Err(format!("holds the dot segment with parameters {s:?}"));
        }
    }
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if !(0x21..0x7f).contains(&c) {
            return Err(format!("holds the byte {c:#04x}"));
        }
        if c == b'%' {
            let esc = p.get(i + 1..i + 3).ok_or("holds a truncated escape")?;
            if !esc
                .bytes()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
            {
                return Err(format!("holds the non-canonical escape %{esc}"));
            }
            let v = u8::from_str_radix(esc, 16).unwrap();
            if v == b'/' || v == b'\\' {
                return Err(format!("holds the encoded separator %{esc}"));
            }
            if v < 0x20 || v == 0x7f {
                return Err(format!("holds the encoded control %{esc}"));
            }
            if is_unreserved(v) {
                return Err(format!("holds the encoded unreserved %{esc}"));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// The routes of [`routes`]: (prefix as configured without its `/`, name).
const ROUTE_TABLE: &[(&str, &str)] = &[
    ("", "root"),
    ("/v1", "v1"),
    ("/v1/admin", "admin"),
    ("/public", "public"),
    ("/svc", "svc"),
];

static ROUTES: LazyLock<Config> = LazyLock::new(|| {
    load(
        r#"
[server]
listen = "127.0.0.1:0"

[[routes]]
name = "root"
path = "/"
upstream = "http://127.0.0.1:9000"

[[routes]]
name = "v1"
path = "/v1/"
upstream = "http://127.0.0.1:9001"

[[routes]]
name = "admin"
path = "/v1/admin/"
upstream = "http://127.0.0.1:9002/internal/"

[[routes]]
name = "public"
path = "/public"
upstream = "http://127.0.0.1:9003"
strip_prefix = true

[[routes]]
name = "svc"
path = "/svc/"
upstream = "http://127.0.0.1:9004/base/"
strip_prefix = true
"#,
    )
});

/// The route a path belongs to, by the SPEC's rule (longest prefix on a segment boundary).
fn expected_route(path: &str) -> &'static str {
    ROUTE_TABLE
        .iter()
        .filter(|(p, _)| p.is_empty() || path == *p || path.starts_with(&format!("{p}/")))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, name)| *name)
        .unwrap()
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn normalize_never_panics_and_what_it_accepts_is_normal(raw in any_path_string()) {
        if let Ok(p) = normalize(&raw) {
            if let Err(why) = check_normal(&p) {
                prop_assert!(false, "{raw:?} -> {p:?}: {why}");
            }
        }
    }

    #[test]
    fn normalized_paths_are_idempotent_and_unambiguous(raw in path_like()) {
        if let Ok(p) = normalize(&raw) {
            if let Err(why) = check_normal(&p) {
                prop_assert!(false, "{raw:?} -> {p:?}: {why}");
            }
        }
    }

    /// What is routed on is what is forwarded: the route found for the normalized path is the
    /// one whose prefix it lies under, and `upstream_path` forwards that same path (the upstream
    /// base path, then the path, less the prefix on `strip_prefix` routes), itself normal, so the
    /// upstream cannot resolve it to anything else.
    #[test]
    fn route_choice_on_the_normalized_path_is_the_path_forwarded(raw in path_like()) {
        let Ok(n) = normalize(&raw) else { return Ok(()) };
        let routes = &ROUTES.routes;
        let r = match route::find(routes, None, &Method::GET, &n) {
            Match::Found(r) => r,
            _ => return Err(TestCaseError::fail(format!("{n:?}: no route, but '/' is routed"))),
        };
        prop_assert_eq!(r.name.as_str(), expected_route(&n), "routing {:?} (from {:?})", n, raw);
        prop_assert!(route::under(&r.prefix, &n));

        let forwarded = route::upstream_path(r, &n);
        prop_assert_eq!(normalize(&forwarded), Ok(forwarded.clone()), "forwarded path is not normal");
        let rest = forwarded
            .strip_prefix(r.upstream.base_path.as_str())
            .expect("the forwarded path starts with the upstream's base path");
        if r.strip_prefix {
            // The prefix and the forwarded rest give back exactly the path routed on.
            let back = format!("{}{rest}", r.prefix);
            prop_assert!(
                back == n || (rest == "/" && n == r.prefix),
                "{n:?} forwarded as {forwarded:?} on {}", r.name
            );
        } else {
            prop_assert_eq!(rest, n.as_str());
        }
        if r.upstream.base_path.is_empty() && !r.strip_prefix {
            // Same namespace upstream: routing the forwarded path picks the same route.
            match route::find(routes, None, &Method::GET, &forwarded) {
                Match::Found(again) => prop_assert_eq!(&again.name, &r.name),
                _ => prop_assert!(false, "forwarded path {forwarded:?} has no route"),
            }
        }
    }
}

// ---------------------------------------------------------------- 2. X-Forwarded-For

static TRUSTED: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
});

fn canon(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// Addresses, about half of them in [`TRUSTED`].
fn address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..4).prop_map(|x| IpAddr::from([10, 0, 0, x])),
        Just(IpAddr::from([127, 0, 0, 1])),
        (0u16..4).prop_map(|x| IpAddr::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, x))),
        (0u8..4).prop_map(|x| IpAddr::from([198, 51, 100, x])),
        Just(IpAddr::from([127, 0, 0, 2])),
        (0u16..4).prop_map(|x| IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, x))),
        any::<Ipv4Addr>().prop_map(IpAddr::V4),
        any::<Ipv6Addr>().prop_map(IpAddr::V6),
    ]
}

/// One well-formed entry: the (canonical) address it names and how it is written.
fn entry() -> impl Strategy<Value = (IpAddr, String)> {
    let pad = prop::sample::select(&["", "", " ", "  ", "\t"][..]);
    (address(), 0u8..4, any::<u16>(), pad.clone(), pad).prop_map(|(ip, form, port, l, r)| {
        let ip = canon(ip);
        let text = match (ip, form) {
            (IpAddr::V4(v4), 0) => format!("{v4}"),
            (IpAddr::V4(v4), 1) => format!("{v4}:{port}"),
            (IpAddr::V4(v4), 2) => format!("::ffff:{v4}"),
            (IpAddr::V4(v4), _) => format!("[::ffff:{v4}]:{port}"),
            (IpAddr::V6(v6), 0 | 2) => format!("{v6}"),
            (IpAddr::V6(v6), _) => format!("[{v6}]:{port}"),
        };
        (ip, format!("{l}{text}{r}"))
    })
}

/// The peer as the socket reports it: maybe an IPv4 address seen through a dual-stack socket.
fn peer() -> impl Strategy<Value = IpAddr> {
    (address(), any::<bool>()).prop_map(|(ip, mapped)| match canon(ip) {
        IpAddr::V4(v4) if mapped => IpAddr::V6(v4.to_ipv6_mapped()),
        ip => ip,
    })
}

const XFF_GARBAGE: &[&str] = &[
    "",
    " ",
    ",",
    ", ",
    "unknown",
    "garbage",
    "1.2.3",
    "1.2.3.4.5",
    "256.1.1.1",
    "[::1",
    "::1]:80",
    "[::1]",
    "1.2.3.4:",
    "1.2.3.4:99999",
    "fe80::1%eth0",
    "_hidden",
    "::ffff:",
    "10.0.0.1/8",
    "0x7f.1",
    "é",
    "198.51.100.7",
    "10.0.0.9",
    "[2001:db8::1]:443",
    "127.0.0.1",
    ":",
    "[",
    "]",
];

/// Any header line: well-formed lists, lists with garbage entries, arbitrary bytes.
fn xff_line() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        entry().prop_map(|(_, t)| t),
        prop::sample::select(XFF_GARBAGE).prop_map(str::to_owned),
    ];
    prop_oneof![
        4 => prop::collection::vec(token, 0..5).prop_map(|v| v.join(",").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..40),
        1 => "[0-9a-f.:\\[\\], ]{0,40}".prop_map(String::into_bytes),
    ]
}

fn xff(lines: &[Vec<u8>]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for l in lines {
        // Bytes a header value cannot hold never reach the gateway; keep the rest.
        if let Ok(v) = HeaderValue::from_bytes(l) {
            h.append("x-forwarded-for", v);
        }
    }
    h
}

/// One entry as the SPEC reads it: an address, optionally with a port; `None` if unreadable.
fn read_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .map(canon)
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Exact answer on well-formed lists: the right-most untrusted hop, across all header lines
    /// (the last line is the nearest hop); when every hop is trusted, the left-most one.
    #[test]
    fn client_ip_is_the_right_most_untrusted_hop(
        peer in peer(),
        lines in prop::collection::vec(prop::collection::vec(entry(), 1..5), 0..4),
        no_trusted_proxies in prop::bool::weighted(0.1),
    ) {
        let nets: &[IpNet] = if no_trusted_proxies { &[] } else { &TRUSTED };
        let text: Vec<Vec<u8>> = lines
            .iter()
            .map(|l| l.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join(",").into_bytes())
            .collect();
        let got = client_ip::resolve(peer, &xff(&text), nets);

        let peer = canon(peer);
        let want = if !trusted(peer, nets) {
            peer
        } else {
            let mut walk = lines.iter().rev().flat_map(|l| l.iter().rev().map(|(ip, _)| *ip));
            let mut client = peer;
            loop {
                match walk.next() {
                    None => break client,
                    Some(ip) if !trusted(ip, nets) => break ip,
                    Some(ip) => client = ip,
                }
            }
        };
        prop_assert_eq!(got, want, "peer {} lines {:?}", peer, lines);
    }

    /// On any input: no panic; an untrusted peer is the client whatever the header says; else
    /// the client is the peer or an entry of the header, and every entry between it and the peer
    /// is readable and trusted (nothing written left of an untrusted hop is ever believed).
    #[test]
    fn client_ip_never_comes_from_left_of_an_untrusted_or_unreadable_hop(
        peer in peer(),
        lines in prop::collection::vec(xff_line(), 0..4),
    ) {
        let headers = xff(&lines);
        let got = client_ip::resolve(peer, &headers, &TRUSTED);
        let peer = canon(peer);
        if !trusted(peer, &TRUSTED) {
            prop_assert_eq!(got, peer);
            return Ok(());
        }
        // The entries in walk order, nearest hop first; an undecodable line ends the list.
        let mut walk: Vec<Option<IpAddr>> = Vec::new();
        for v in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(line) = std::str::from_utf8(v.as_bytes()) else {
                walk.push(None);
                break;
            };
            walk.extend(line.rsplit(',').map(read_entry));
        }
        // The readable run next to the peer; the client is in it or is the peer.
        let run: Vec<IpAddr> = walk.iter().map_while(|e| *e).collect();
        let want = match run.iter().position(|ip| !trusted(*ip, &TRUSTED)) {
            Some(i) => run[i],
            None => run.last().copied().unwrap_or(peer),
        };
        prop_assert_eq!(got, want, "peer {} walk {:?}", peer, walk);
        if got != peer {
            let k = run.iter().position(|ip| *ip == got);
            prop_assert!(k.is_some(), "{got} is neither the peer nor in the header");
            prop_assert!(run[..k.unwrap()].iter().all(|ip| trusted(*ip, &TRUSTED)));
        }
    }
}

// ---------------------------------------------------------------- 3. key extraction

static AUTH: LazyLock<Config> = LazyLock::new(|| {
    load(
        r#"
[server]
listen = "127.0.0.1:0"

[auth]
query_param = "api_key"

[[routes]]
name = "root"
path = "/"
upstream = "http://127.0.0.1:9000"
"#,
    )
});

const KEYS: &[&str] = &["k1", "k2", "K1", "k1x", "pcx_live_0123456789"];

/// An `Authorization: Bearer <key>` line for `key`, in any case and spacing the SPEC accepts.
fn bearer(key: &'static str) -> impl Strategy<Value = String> {
    (
        prop::sample::select(&["Bearer", "bearer", "BEARER", "BeArEr"][..]),
        prop::sample::select(&[" ", "  ", " \t"][..]),
        prop::sample::select(&["", " ", "\t"][..]),
    )
        .prop_map(move |(scheme, sp, tail)| format!("{scheme}{sp}{key}{tail}"))
}

/// An `X-API-Key` line for `key`, maybe padded.
fn api_key_line(key: &'static str) -> impl Strategy<Value = String> {
    let pad = prop::sample::select(&["", " ", "\t"][..]);
    (pad.clone(), pad).prop_map(move |(l, r)| format!("{l}{key}{r}"))
}

#[derive(Debug, Clone)]
enum QueryPair {
    /// `api_key=<key>`
    Key(&'static str),
    /// `api_key=` or a bare `api_key`: an empty credential.
    EmptyKey(&'static str),
    /// Anything that is not the key parameter.
    Other(&'static str),
}

fn query_pair() -> impl Strategy<Value = QueryPair> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(QueryPair::Key),
        1 => prop::sample::select(&["api_key=", "api_key"][..]).prop_map(QueryPair::EmptyKey),
        3 => prop::sample::select(
            &["a=1", "", "api_keyx=k2", "API_KEY=k2", "xapi_key=k2", "api%5Fkey=k2", "=k2", "k2"][..]
        )
        .prop_map(QueryPair::Other),
    ]
}

impl QueryPair {
    fn text(&self) -> String {
        match self {
            QueryPair::Key(k) => format!("api_key={k}"),
            QueryPair::EmptyKey(s) | QueryPair::Other(s) => (*s).to_owned(),
        }
    }
}

/// A request's credentials: Authorization lines, X-API-Key lines, query pairs (if any query).
type Credentials = (
    Vec<(&'static str, String)>,
    Vec<(&'static str, String)>,
    Option<Vec<QueryPair>>,
);

fn credentials() -> impl Strategy<Value = Credentials> {
    let key = || prop::sample::select(KEYS);
    (
        prop::collection::vec(key().prop_flat_map(|k| (Just(k), bearer(k))), 0..3),
        prop::collection::vec(key().prop_flat_map(|k| (Just(k), api_key_line(k))), 0..3),
        prop::option::of(prop::collection::vec(query_pair(), 0..4)),
    )
}

const HEADER_JUNK: &[&str] = &[
    "Bearer k1",
    "Bearer k2",
    "bearer  k1 ",
    "Bearer ",
    "Bearer",
    "Basic dXNlcjpwYXNz",
    "k1",
    " k2",
    "",
    " ",
    "Bearer\tk1",
    "Token k1",
    "Bearer k1 k2",
    "Bearer k1,Bearer k2",
    "k1, k2",
];

/// Any header value bytes (kept only if a `HeaderValue` can hold them).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(HEADER_JUNK).prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..24),
        "[ -~]{0,24}".prop_map(String::into_bytes),
    ]
}

const QUERY_PIECES: &[&str] = &[
    "api_key",
    "=",
    "&",
    "k1",
    "k2",
    "a",
    "1",
    "api_key=k1",
    "api_key=k2",
    "&api_key=",
    ";",
    "%3D",
    "%26",
    "api_keyx",
    "+",
    " ",
];

fn any_query() -> impl Strategy<Value = String> {
    prop_oneof![pieces(QUERY_PIECES, 8), "[ -~]{0,32}", any::<String>()]
}

proptest! {
    #![proptest_config(proptest_config())]

    /// Exact answer on well-formed requests: one key presented once (in any of the places) is
    /// that key; any two credentials that differ, two lines of one header, the parameter twice,
    /// or an empty parameter are `Malformed`; nothing at all is `None`.
    #[test]
    fn two_different_keys_are_never_one_presented_key((authz, api, query) in credentials()) {
        let mut h = HeaderMap::new();
        for (_, line) in &authz {
            h.append(AUTHORIZATION, HeaderValue::from_str(line).unwrap());
        }
        for (_, line) in &api {
            h.append("x-api-key", HeaderValue::from_str(line).unwrap());
        }
        let q = query.as_ref().map(|p| p.iter().map(QueryPair::text).collect::<Vec<_>>().join("&"));
        let got = auth::extract(&h, q.as_deref(), &AUTH.auth);

        let pairs = query.as_deref().unwrap_or_default();
        let q_keys: Vec<&str> = pairs
            .iter()
            .filter_map(|p| if let QueryPair::Key(k) = p { Some(*k) } else { None })
            .collect();
        let q_empty = pairs.iter().filter(|p| matches!(p, QueryPair::EmptyKey(_))).count();
        let mut all: Vec<&str> = authz.iter().chain(&api).map(|(k, _)| *k).collect();
        all.extend(&q_keys);
        let want = if authz.len() > 1 || api.len() > 1 || q_keys.len() + q_empty > 1 || q_empty > 0 {
            Presented::Malformed
        } else if all.is_empty() {
            Presented::None
        } else if all.iter().any(|k| *k != all[0]) {
            Presented::Malformed
        } else {
            Presented::One(all[0])
        };
        prop_assert_eq!(&got, &want, "headers {:?} query {:?}", h, q);
    }

    /// On any header bytes and query: no panic, and a key handed out is the only credential:
    /// non-empty, trimmed, in every credential header line (one line each at most) and equal to
    /// the query parameter wherever that is given.
    #[test]
    fn key_extraction_never_panics_and_one_key_is_the_only_credential(
        authz in prop::collection::vec(header_bytes(), 0..3),
        api in prop::collection::vec(header_bytes(), 0..3),
        other in prop::collection::vec(header_bytes(), 0..2),
        query in prop::option::of(any_query()),
    ) {
        let mut h = HeaderMap::new();
        let lines = [(AUTHORIZATION, &authz), (HeaderName::from_static("x-api-key"), &api),
            (HeaderName::from_static("x-other"), &other)];
        for (name, values) in lines {
            for v in values {
                if let Ok(v) = HeaderValue::from_bytes(v) {
                    h.append(name.clone(), v);
                }
            }
        }
        let got = auth::extract(&h, query.as_deref(), &AUTH.auth);
        if let Presented::One(k) = got {
            prop_assert!(!k.is_empty());
            // Header values are trimmed; a query value is taken as sent (the pipeline refuses
            // raw spaces and controls in a query before it looks for a key).
            let from_headers = h.contains_key(AUTHORIZATION) || h.contains_key("x-api-key");
            prop_assert!(!from_headers || k.trim() == k, "{k:?}");
            for name in [AUTHORIZATION, HeaderName::from_static("x-api-key")] {
                let vals: Vec<_> = h.get_all(&name).iter().collect();
                prop_assert!(vals.len() <= 1, "{} lines of {name}", vals.len());
                for v in vals {
                    let v = v.to_str().unwrap();
                    prop_assert!(v.contains(k), "{name}: {v:?} does not carry {k:?}");
                }
            }
            let in_query: Vec<&str> = query
                .as_deref()
                .unwrap_or_default()
                .split('&')
                .filter_map(|p| {
                    let (n, v) = p.split_once('=').unwrap_or((p, ""));
                    (n == "api_key").then_some(v)
                })
                .collect();
            prop_assert!(in_query.len() <= 1 && in_query.iter().all(|v| *v == k),
                "{k:?} vs query {in_query:?}");
        }
    }

    /// The query forwarded upstream: every pair but the key parameter, in order, and never the
    /// key parameter (as `name=...` or a bare `name`).
    #[test]
    fn strip_query_param_removes_the_parameter_and_only_it(
        query in any_query(),
        param in prop_oneof![Just("api_key".to_owned()), "[a-z_]{1,8}", any::<String>()],
    ) {
        let got = auth::strip_query_param(&query, &param);
        let want: Vec<&str> = query
            .split('&')
            .filter(|p| p.split_once('=').map_or(*p, |(n, _)| n) != param)
            .collect();
        match &got {
            None => prop_assert!(want.is_empty()),
            Some(s) => {
                let kept: Vec<&str> = s.split('&').collect();
                prop_assert_eq!(&kept, &want);
                for p in kept {
                    prop_assert!(p != param && !p.starts_with(&format!("{param}=")), "{p:?} kept");
                }
            }
        }
    }
}

// ---------------------------------------------------------------- 4. SSE scanner

const SSE_PIECES: &[&str] = &[
    "data:",
    "data: ",
    "data",
    "dat",
    "a:",
    ":",
    " ",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    "\r\n\r\n",
    "x",
    "{\"usage\":{\"prompt_tokens\":5}}",
    "[DONE]",
    "event: e",
    "id: 1",
    "retry: 9",
    ": keep-alive",
    "\u{feff}",
    "0123456789abcdef0123456789abcdef",
    "é",
];

/// No byte-order mark (most often), a whole one, or the start of one.
const BOMS: &[&[u8]] = &[b"", b"", b"", b"\xef\xbb\xbf", b"\xef\xbb", b"\xef"];

/// Streams: SSE-shaped text, arbitrary bytes, or both, maybe after a byte-order mark (or part).
fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    let body = prop_oneof![
        3 => pieces(SSE_PIECES, 24).prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => prop::collection::vec(
            prop_oneof![
                prop::sample::select(&b"\r\n:a "[..]),
                any::<u8>(),
            ],
            0..200,
        ),
    ];
    let bom = prop::sample::select(BOMS);
    (bom, prop::collection::vec(body, 1..3)).prop_map(|(bom, parts)| {
        let mut s = bom.to_vec();
        s.extend(parts.concat());
        s
    })
}

/// Where to cut a stream: mostly near its start (where a byte-order mark and the first event
/// are), anywhere up to 512. Not taken modulo the length, so that shrinking a stream keeps them.
fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![1 => 0usize..=4, 2 => 0usize..=64, 1 => 0usize..=512],
        0..6,
    )
}

fn cut_points(stream: &[u8], cuts: &[usize]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|c| (*c).min(stream.len())).collect();
    points.sort_unstable();
    points
}

type Blocks = Vec<(Option<Vec<u8>>, usize)>;

/// Feeds `stream` cut at `cuts` (past its end: at its end; in any order, repeats allowed: empty
/// chunks too); returns every block (`feed_blocks`) with its end offset in the whole stream, and
/// the events of `feed` alone.
fn scan(stream: &[u8], cuts: &[usize], limit: usize) -> (Blocks, Vec<(Vec<u8>, usize)>) {
    let mut points = cut_points(stream, cuts);
    points.push(stream.len());
    let (mut blocks_scanner, mut events_scanner) = (Scanner::new(limit), Scanner::new(limit));
    let (mut blocks, mut events) = (Vec::new(), Vec::new());
    let mut start = 0;
    for p in points {
        let chunk = &stream[start..p];
        blocks_scanner.feed_blocks(chunk, |d, end| {
            blocks.push((d.map(<[u8]>::to_vec), start + end))
        });
        events_scanner.feed(chunk, |d, end| events.push((d.to_vec(), start + end)));
        start = p;
    }
    (blocks, events)
}

proptest! {
    #![proptest_config(proptest_config())]

    /// One chunk or any split: the same blocks, the same data, the same end offsets; `feed` hands
    /// out exactly the blocks that have data; every end lies just past a line end, in order.
    #[test]
    fn sse_scanning_is_split_invariant_on_arbitrary_bytes(
        stream in sse_stream(),
        cuts in cuts(),
        limit in prop::sample::select(&[64usize, 1 << 20][..]),
    ) {
        let (whole, whole_events) = scan(&stream, &[], limit);
        let (split, split_events) = scan(&stream, &cuts, limit);
        let points = cut_points(&stream, &cuts);
        prop_assert_eq!(&split, &whole, "stream {:?} cut at {:?}", bytes::Bytes::from(stream.clone()), points);
        prop_assert_eq!(&split_events, &whole_events);
        let with_data: Vec<(Vec<u8>, usize)> =
            whole.iter().filter_map(|(d, e)| d.clone().map(|d| (d, *e))).collect();
        prop_assert_eq!(&whole_events, &with_data);
        let mut last = 0;
        for (_, end) in &whole {
            prop_assert!(*end > last && *end <= stream.len(), "end {end} after {last}");
            prop_assert!(matches!(stream[end - 1], b'\n' | b'\r'), "end {end} not past a line end");
            last = *end;
        }
    }

    /// With a small limit, no event handed out is larger than the limit (split or not), and
    /// scanning goes on after an oversized event.
    #[test]
    fn sse_events_never_exceed_the_limit(
        stream in sse_stream(),
        cuts in cuts(),
        limit in 1usize..=64,
        long in 0usize..200,
    ) {
        // Put one long event before the stream: it is skipped, and what follows is scanned.
        let mut s = format!("data: {}\n\n", "x".repeat(long)).into_bytes();
        s.extend(&stream);
        let (blocks, events) = scan(&s, &cuts, limit);
        for (d, end) in blocks.iter().filter_map(|(d, e)| d.as_ref().map(|d| (d, e))) {
            prop_assert!(d.len() <= limit, "{} bytes ending at {end} > limit {limit}", d.len());
        }
        for (d, _) in &events {
            prop_assert!(d.len() <= limit);
        }
        let first_fits = 6 + long <= limit;
        prop_assert_eq!(
            blocks.first().map(|(d, _)| d.is_some()),
            Some(first_fits),
            "the first event ({} data bytes, limit {}) is handed out iff it fits", long, limit
        );
        prop_assert_eq!(blocks[0].1, 6 + long + 2);
    }
}

// ---------------------------------------------------------------- 5. config units

const UNIT_PIECES: &[&str] = &[
    "0",
    "1",
    "9",
    "10",
    "007",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    " ",
    "\t",
    "/",
    "off",
    "OFF",
    "ms",
    "s",
    "m",
    "h",
    "d",
    "min",
    "sec",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "KiB",
    "K",
    "k",
    "MiB",
    "M",
    "GiB",
    "G",
    "KB",
    "kB",
    "MB",
    "GB",
    "B",
    "b",
    "-",
    "+",
    ".",
    "é",
    "٣",
    "\u{a0}",
];

fn any_unit_string() -> impl Strategy<Value = String> {
    prop_oneof![pieces(UNIT_PIECES, 6), any::<String>(), "[ -~]{0,16}"]
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("b", 1),
    ("KiB", 1 << 10),
    ("K", 1 << 10),
    ("k", 1 << 10),
    ("MiB", 1 << 20),
    ("M", 1 << 20),
    ("GiB", 1 << 30),
    ("G", 1 << 30),
    ("KB", 1_000),
    ("kB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
];

const DURATION_UNITS: &[(&str, u64)] = &[
    ("s", 1),
    ("sec", 1),
    ("m", 60),
    ("min", 60),
    ("h", 3600),
    ("hour", 3600),
    ("d", 86400),
    ("day", 86400),
];

const RATE_UNITS: &[(&str, u64)] = &[
    ("s", 1),
    ("sec", 1),
    ("second", 1),
    ("m", 60),
    ("min", 60),
    ("minute", 60),
    ("h", 3600),
    ("hour", 3600),
    ("d", 86400),
    ("day", 86400),
];

/// Numbers of every size: small, near the overflow edges, anything.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..100_000,
        any::<u64>(),
        (0u32..64).prop_map(|s| 1u64 << s),
        (0u64..1000).prop_map(|d| u64::MAX - d),
        (0u64..1000).prop_map(|d| (u64::MAX / 86400).wrapping_add(d).wrapping_sub(500)),
    ]
}

fn pad() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["", " ", "\t", "  "][..])
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn units_never_panic_on_arbitrary_strings(s in any_unit_string()) {
        let _ = Rate::parse(&s);
        let _ = ByteSize::parse(&s);
        let _ = parse_duration(&s);
    }

    /// `"<n><unit>"` is n times the unit's factor, or an error when that overflows a u64.
    #[test]
    fn sizes_are_n_times_the_unit_and_overflow_is_an_error(
        n in number(),
        (unit, factor) in prop::sample::select(SIZE_UNITS),
        (l, mid, r) in (pad(), pad(), pad()),
    ) {
        let s = format!("{l}{n}{mid}{unit}{r}");
        match n.checked_mul(factor) {
            Some(v) => prop_assert_eq!(ByteSize::parse(&s), Ok(ByteSize(v)), "{:?}", s),
            None => prop_assert!(ByteSize::parse(&s).is_err(), "{s:?} overflows"),
        }
        // More digits than a u64 holds is an error too.
        let too_long = format!("{n}0000000000000000000000{unit}");
        prop_assert!(n == 0 || ByteSize::parse(&too_long).is_err(), "{too_long:?}");
    }

    #[test]
    fn durations_are_n_times_the_unit_and_overflow_is_an_error(
        n in number(),
        (unit, factor) in prop::sample::select(DURATION_UNITS),
        (l, r) in (pad(), pad()),
    ) {
        let s = format!("{l}{n}{unit}{r}");
        match n.checked_mul(factor) {
            Some(secs) => prop_assert_eq!(parse_duration(&s), Ok(Duration::from_secs(secs)), "{:?}", s),
            None => prop_assert!(parse_duration(&s).is_err(), "{s:?} overflows"),
        }
        prop_assert_eq!(parse_duration(&format!("{l}{n}ms{r}")), Ok(Duration::from_millis(n)));
        // A bare number is refused (seconds or milliseconds?), and so is a spaced unit.
        let (bare, spaced) = (n.to_string(), format!("{n} {unit}"));
        prop_assert!(parse_duration(&bare).is_err(), "{bare:?}");
        prop_assert!(parse_duration(&spaced).is_err(), "{spaced:?}");
    }

    /// `"<n>/<unit>"` is n per the unit's period (n ≥ 1 and fitting a u32); it prints back as
    /// something that parses to the same rate; `0/<unit>` is refused, pointing at "off".
    #[test]
    fn rates_round_trip_zero_is_refused_and_off_is_off(
        n in prop_oneof![1u64..1000, any::<u32>().prop_map(u64::from), number()],
        (unit, secs) in prop::sample::select(RATE_UNITS),
        (l, a, b, r) in (pad(), pad(), pad(), pad()),
        off_case in prop::collection::vec(any::<bool>(), 3),
    ) {
        let s = format!("{l}{n}{a}/{b}{unit}{r}");
        match u32::try_from(n) {
            Ok(0) => {
                let e = Rate::parse(&s).unwrap_err();
                prop_assert!(e.contains("off"), "{e}");
            }
            Ok(m) => {
                let rate = Rate::parse(&s);
                let want = Rate::Limit {
                    n: std::num::NonZeroU32::new(m).unwrap(),
                    period: Duration::from_secs(secs),
                };
                prop_assert_eq!(rate.clone(), Ok(want), "{:?}", s);
                prop_assert_eq!(Rate::parse(&want.to_string()), Ok(want));
            }
            Err(_) => prop_assert!(Rate::parse(&s).is_err(), "{s:?} overflows a u32"),
        }
        let off: String = "off"
            .chars()
            .zip(&off_case)
            .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
            .collect();
        prop_assert_eq!(Rate::parse(&format!("{l}{off}{r}")), Ok(Rate::Off));
        prop_assert_eq!(Rate::parse(&Rate::Off.to_string()), Ok(Rate::Off));
    }
}

// ---------------------------------------------------------------- 6. user names

/// Bytes a user name may hold (SPEC §8 `user_header`).
fn is_user_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b':' | b'-')
}

const USER_BYTES: &[u8] = b"abcxyzABCXYZ0189._@:-";

/// Byte strings around the edges of a user name: allowed bytes only (of every length up to past
/// 128), one other byte among them, and anything at all.
fn user_bytes() -> impl Strategy<Value = Vec<u8>> {
    let allowed = || prop::collection::vec(prop::sample::select(USER_BYTES), 0..140);
    prop_oneof![
        3 => allowed(),
        3 => (allowed(), any::<u8>(), any::<prop::sample::Index>()).prop_map(|(mut v, b, at)| {
            v.insert(at.index(v.len() + 1), b);
            v
        }),
        1 => prop::collection::vec(any::<u8>(), 0..140),
        1 => (120usize..136).prop_map(|n| vec![b'a'; n]),
    ]
}

proptest! {
    #![proptest_config(proptest_config())]

    /// `auth::valid_user` accepts exactly 1 to 128 bytes of `[A-Za-z0-9._@:-]`, and then
    /// returns the input itself.
    #[test]
    fn a_user_name_is_1_to_128_allowed_bytes_returned_unchanged(bytes in user_bytes()) {
        let want = (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| is_user_byte(*b));
        match auth::valid_user(&bytes) {
            Some(s) => {
                prop_assert!(want, "accepted {:?}", String::from_utf8_lossy(&bytes));
                prop_assert_eq!(s.as_bytes(), &bytes[..]);
            }
            None => prop_assert!(!want, "refused {:?}", String::from_utf8_lossy(&bytes)),
        }
    }
}

// ---------------------------------------------------------------- 7. WebSocket frames

/// The text messages `scanner` finds in `chunks`, fed one after the other.
fn ws_messages(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, u64) {
    let mut s = portcullis::proxy::frames::Scanner::default();
    let mut got = Vec::new();
    for c in chunks {
        let stopped = s.feed(c, |m| {
            got.push(m.to_vec());
            portcullis::proxy::frames::Flow::Continue
        });
        assert_eq!(stopped, None);
    }
    (got, s.unscanned)
}

/// A server frame: FIN, opcode, optional mask, with a 7-, 16- or 64-bit length as its size
/// needs.
fn ws_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xffff => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        None => f.extend_from_slice(payload),
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
    }
    f
}

proptest! {
    #![proptest_config(proptest_config())]

    /// `proxy::frames::Scanner` (the realtime session's watcher, fed by the upstream) never
    /// panics on arbitrary bytes, and finds the same messages whichever way they are split.
    #[test]
    fn the_frame_scanner_is_split_invariant_on_any_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        at in any::<prop::sample::Index>(),
    ) {
        let at = at.index(bytes.len() + 1);
        prop_assert_eq!(ws_messages(&[&bytes]), ws_messages(&[&bytes[..at], &bytes[at..]]));
    }

    /// Well-formed frames give back exactly their text messages, fragmented or not, masked or
    /// not, with control and binary frames between them, at any split.
    #[test]
    fn the_frame_scanner_returns_each_text_message(
        msgs in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..300), 1usize..4, any::<bool>(), any::<[u8; 4]>()),
            0..6,
        ),
        at in any::<prop::sample::Index>(),
    ) {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (payload, parts, masked, key) in &msgs {
            let mask = masked.then_some(*key);
            let size = payload.len().div_ceil(*parts).max(1);
            let pieces: Vec<&[u8]> = if payload.is_empty() {
                vec![&[][..]]
            } else {
                payload.chunks(size).collect()
            };
            for (i, piece) in pieces.iter().enumerate() {
                let last = i + 1 == pieces.len();
                stream.extend(ws_frame(last, if i == 0 { 1 } else { 0 }, piece, mask));
                if !last {
                    stream.extend(ws_frame(true, 9, b"ping", None));
                }
            }
            stream.extend(ws_frame(true, 2, payload, None));
            want.push(payload.clone());
        }
        let at = at.index(stream.len() + 1);
        let got = ws_messages(&[&stream[..at], &stream[at..]]);
        prop_assert_eq!(got, (want, 0));
    }
}
