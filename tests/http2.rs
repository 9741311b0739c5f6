//! SPEC §3.4 "HTTP/2 limits": the rapid-reset attack (CVE-2023-44487) gets the connection closed,
//! and a client cannot open more than `http2_max_concurrent_streams` streams at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: :method GET, :scheme http, :path /, :authority gw (static-table indexes, one literal).
const HEADERS: &[u8] = &[0x82, 0x86, 0x84, 0x41, 0x02, b'g', b'w'];

fn config(up: &Upstream) -> String {
    format!(
        "{}[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        server_section(""),
        up.url()
    )
}

#[tokio::test]
async fn rapid_reset_loop_gets_the_connection_closed() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    // Open and cancel 2,000 streams in a loop, as the attack does.
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        out.extend(frame(0x1, 0x5, id, HEADERS)); // HEADERS, END_STREAM | END_HEADERS
        out.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    // The server may stop reading mid-write once it has had enough: ignore write errors.
    let _ = s.write_all(&out).await;
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(
        closed.is_ok(),
        "connection still open after a rapid-reset loop"
    );
    // A GOAWAY (type 7) says why, before the close: ENHANCE_YOUR_CALM (0xb), not a protocol error.
    let mut i = 0;
    let mut goaway = None;
    while i + 9 <= got.len() {
        let len = (got[i] as usize) << 16 | (got[i + 1] as usize) << 8 | got[i + 2] as usize;
        if got[i + 3] == 0x7 && i + 9 + 8 <= got.len() {
            let p = &got[i + 9..];
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        i += 9 + len;
    }
    assert_eq!(goaway, Some(0xb), "GOAWAY error code");
    // Far fewer than 2,000 requests reached the upstream.
    assert!(
        up.targets().len() < 2000,
        "{} requests forwarded",
        up.targets().len()
    );
}

#[tokio::test]
async fn server_settings_bound_streams_windows_and_header_list() {
    let up = upstream().await;
    let gw = Gateway::start(&config(&up)).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&out).await.unwrap();
    // The server's first frame is its SETTINGS.
    let mut head = [0u8; 9];
    tokio::time::timeout(WAIT, s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[3], 0x4, "first frame is not SETTINGS");
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    let settings: std::collections::HashMap<u16, u32> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert_eq!(
        settings.get(&0x3),
        Some(&100),
        "MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert_eq!(
        settings.get(&0x4),
        Some(&65_536),
        "INITIAL_WINDOW_SIZE: {settings:?}"
    );
    assert_eq!(
        settings.get(&0x6),
        Some(&32_768),
        "MAX_HEADER_LIST_SIZE: {settings:?}"
    );
}
