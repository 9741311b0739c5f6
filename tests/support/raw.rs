//! Raw HTTP/1.1 over a plain TCP connection, for requests whose exact bytes matter, and readers
//! for the raw answers (status, a header, the JSON error code).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// Sends raw bytes and reads until the server closes or `WAIT` passes; returns the text.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Status code of the first response in a raw answer.
pub fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `GET target` on a fresh connection with `Connection: close`; returns the status.
pub async fn raw_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n");
    let r = raw(addr, req.as_bytes()).await;
    (status_of(&r), r)
}

/// A raw HTTP/1.1 request with `Connection: close`; `headers` are "Name: value" lines.
pub async fn send(addr: SocketAddr, method: &str, target: &str, headers: &[&str]) -> (u16, String) {
    let mut r = format!("{method} {target} HTTP/1.1\r\nHost: gw.test\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if method == "POST" || method == "PUT" {
        r.push_str("Content-Length: 0\r\n");
    }
    r.push_str("Connection: close\r\n\r\n");
    let resp = raw(addr, r.as_bytes()).await;
    (status_of(&resp), resp)
}

/// The value of header `name` in a raw response (case-insensitive), if present.
pub fn header_of(resp: &str, name: &str) -> Option<String> {
    let head = resp.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// The JSON error code in a raw response body.
pub fn code_of(resp: &str) -> String {
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}
