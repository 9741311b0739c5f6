//! The client's connection speaks its own protocol version whatever the upstream speaks: an
//! HTTP/1.0 upstream (Python's `http.server`, many small tool servers) must not turn a client's
//! HTTP/1.1 keep-alive connection into HTTP/1.0 closed after every response.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.0 upstream that answers each connection once and closes it; with `length`, the
/// body has a Content-Length, else it ends with the connection (HTTP/1.0's close-delimited body).
async fn http10_upstream(length: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer: &[u8] = if length {
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nok"
                };
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http10_upstream_does_not_end_the_clients_keep_alive() {
    for length in [true, false] {
        let up = http10_upstream(length).await;
        let config = format!(
            "{}[[routes]]\nname = \"tools\"\npath = \"/\"\nupstream = \"http://{up}\"\nauth = \"none\"\n",
            server_section("")
        );
        let gw = Gateway::start(&config).await;
        // One client connection, three requests in turn: each is answered in HTTP/1.1, and the
        // connection survives them all.
        let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let driver = tokio::spawn(conn);
        for i in 0..3 {
            let req = http::Request::get(format!("/file{i}"))
                .header("host", "gw.test")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = tokio::time::timeout(WAIT, sender.send_request(req))
                .await
                .expect("answered")
                .unwrap_or_else(|e| panic!("request {i} (length: {length}): {e}"));
            assert_eq!(resp.version(), http::Version::HTTP_11, "request {i}");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok", "request {i} (length: {length})");
        }
        assert!(!driver.is_finished(), "the client's connection was closed");
    }
}
