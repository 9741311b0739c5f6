//! WebSocket pass-through (SPEC §3.2, §3.4 "Upgrades").
//!
//! The handshake goes to the upstream on a connection of its own, never a pooled one: if the
//! upstream answers anything but 101, that answer goes to the client and the connection is
//! closed after it, so a half-upgraded connection can never be reused for another client's
//! request (the upgrade-smuggling attacks on reverse proxies). The tunnel opens only after the
//! upstream's 101; bytes then flow both ways until either side closes or the tunnel is silent for
//! `stream_idle_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use tokio::io::AsyncWriteExt;

use super::body::ResponseBody;
pub use super::frames::Flow;
use super::frames::{Scanner, close_frame};
use crate::error::GatewayError;

/// Sends the handshake on a fresh connection and returns the upstream's answer.
pub async fn handshake(
    authority: &Authority,
    req: Request<ResponseBody>,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| {
            tracing::debug!(error = %e, "websocket upstream connect failed");
            GatewayError::UpstreamUnavailable
        })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, ResponseBody>(TokioIo::new(stream))
                .await
                .map_err(|_| GatewayError::UpstreamUnavailable)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender.send_request(req).await.map_err(|e| {
            tracing::debug!(error = %e, "websocket upstream handshake failed");
            GatewayError::UpstreamUnavailable
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| GatewayError::UpstreamTimeout)?
}

/// What the upstream answered a WebSocket handshake.
pub struct Opened {
    /// The answer for the client: the 101 with its `Sec-WebSocket-*` headers, or the upstream's
    /// refusal as it came.
    pub response: Response<ResponseBody>,
    pub status: u16,
    /// When the upstream switched protocols: the client's and the upstream's upgrades, for
    /// [`tunnel`].
    pub upgrades: Option<(OnUpgrade, OnUpgrade)>,
}

/// Sends the handshake `parts` (already rewritten for the upstream) and prepares the client's
/// answer (SPEC §3.4 "Upgrades": a tunnel only behind the upstream's 101).
pub async fn open(
    mut parts: http::request::Parts,
    authority: &Authority,
    timeout: Duration,
) -> Result<Opened, GatewayError> {
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();
    let offered_extensions = parts
        .headers
        .contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS);
    let mut up_req = Request::from_parts(parts, super::body::empty());
    up_req.headers_mut().remove(http::header::CONTENT_LENGTH);
    let mut resp = handshake(authority, up_req, timeout).await?;
    let status = resp.status().as_u16();
    // An extension the client did not offer (the gateway removed the offer of a metered session)
    // would leave the messages unreadable: the upstream broke the handshake.
    if accepted(&resp)
        && !offered_extensions
        && resp
            .headers()
            .contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS)
    {
        tracing::debug!("websocket upstream chose an extension that was not offered");
        return Err(GatewayError::UpstreamUnavailable);
    }
    match client_upgrade {
        Some(client) if accepted(&resp) => {
            let upstream = hyper::upgrade::on(&mut resp);
            let (mut parts, _) = resp.into_parts();
            let keep: Vec<(http::HeaderName, http::HeaderValue)> = parts
                .headers
                .iter()
                .filter(|(n, _)| n.as_str().starts_with("sec-websocket-"))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            super::headers::remove_hop_by_hop(&mut parts.headers);
            for (n, v) in keep {
                parts.headers.insert(n, v);
            }
            use http::header::{CONNECTION, HeaderValue, UPGRADE};
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts
                .headers
                .insert(UPGRADE, HeaderValue::from_static("websocket"));
            Ok(Opened {
                response: Response::from_parts(parts, super::body::empty()),
                status,
                upgrades: Some((client, upstream)),
            })
        }
        _ => {
            let (mut parts, body) = resp.into_parts();
            super::headers::remove_hop_by_hop(&mut parts.headers);
            // The client's connection speaks its own version (see `pipeline/upstream.rs`).
            parts.version = http::Version::HTTP_11;
            let body = http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                body,
                Into::into,
            ));
            Ok(Opened {
                response: Response::from_parts(parts, body),
                status,
                upgrades: None,
            })
        }
    }
}

/// Watches the upstream's text messages of a tunnel (a realtime session's `response.done`).
pub type Watch<'a> = &'a mut (dyn FnMut(&[u8]) -> Flow + Send);

/// Runs the tunnel once both sides have switched protocols. Returns when either side closes, an
/// error occurs, or nothing moved for `idle`. With `watch`, the upstream's messages to the client
/// are shown to it as they pass (unchanged and undelayed); when it says [`Flow::Stop`], the
/// client gets a close frame 1008 `budget_exceeded` right after that message and both sides are
/// closed.
pub async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    watch: Option<Watch<'_>>,
) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        _ => return,
    };
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut c = Metered {
        io: TokioIo::new(client),
        read_bytes: bytes_in,
        last: last.clone(),
        epoch,
    };
    let mut u = Metered {
        io: TokioIo::new(upstream),
        read_bytes: bytes_out,
        last: last.clone(),
        epoch,
    };
    let watchdog = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = epoch + since + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let Some(watch) = watch else {
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "websocket tunnel ended with an error");
                }
            }
            _ = watchdog => tracing::debug!("websocket tunnel idle; closed"),
        }
        return;
    };
    let (mut c_read, mut c_write) = tokio::io::split(c);
    let (mut u_read, mut u_write) = tokio::io::split(u);
    let up = async {
        tokio::io::copy(&mut c_read, &mut u_write).await?;
        u_write.shutdown().await
    };
    let down = watched(&mut u_read, &mut c_write, watch);
    tokio::select! {
        r = up => if let Err(e) = r {
            tracing::debug!(error = %e, "websocket tunnel ended with an error");
        },
        r = down => match r {
            Ok(true) => tracing::debug!("realtime session closed by the gateway: budget spent"),
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "websocket tunnel ended with an error"),
        },
        _ = watchdog => tracing::debug!("websocket tunnel idle; closed"),
    }
}

/// Copies the upstream's side to the client, showing each text message to `watch`. `Ok(true)`
/// when `watch` stopped the session (the close frame is sent); `Ok(false)` at the upstream's end.
async fn watched<R, W>(up: &mut R, client: &mut W, watch: Watch<'_>) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut scanner = Scanner::default();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = up.read(&mut buf).await?;
        if n == 0 {
            client.shutdown().await?;
            return Ok(false);
        }
        match scanner.feed(&buf[..n], &mut *watch) {
            None => client.write_all(&buf[..n]).await?,
            Some(end) => {
                client.write_all(&buf[..end]).await?;
                client.write_all(&close_frame("budget_exceeded")).await?;
                client.shutdown().await?;
                return Ok(true);
            }
        }
    }
}

/// True when the upstream accepted the upgrade.
pub fn accepted(resp: &Response<Incoming>) -> bool {
    resp.status() == StatusCode::SWITCHING_PROTOCOLS
}

/// An upgraded connection that counts what is read from it and stamps activity.
struct Metered<T> {
    io: T,
    read_bytes: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T> Metered<T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
