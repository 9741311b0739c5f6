//! Forwarding to upstreams: a pooled HTTP/1.1 client, and WebSocket tunnels.
//!
//! Bodies are re-framed by this client (SPEC §3.4 "Framing"): the upstream never sees the
//! client's Transfer-Encoding or chunk boundaries, only what hyper writes for the body we pass.

pub mod body;
pub mod frames;
pub mod headers;
pub mod websocket;

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::body::{BodyError, Cause, ResponseBody, find_body_error};
use crate::error::GatewayError;

type UpstreamClient = Client<HttpConnector, ResponseBody>;

/// Idle upstream connections kept per upstream and worker thread. Above the concurrency one
/// worker sees (HTTP/2 clients multiplex: 50 connections of 10 streams are 500 exchanges at
/// once), so that a busy moment's connections are reused, not closed and opened again; an idle
/// one is closed after 60 s.
const POOL_MAX_IDLE_PER_HOST: usize = 1024;

thread_local! {
    /// One upstream client, and so one connection pool, per thread. The gateway serves on worker
    /// threads with a runtime each (`server::Workers`): a pooled connection's task is spawned on
    /// the runtime that opened it, so with a pool per thread a request, its upstream connection
    /// and that connection's task stay on one thread, with no cross-thread wake-up.
    static CLIENT: UpstreamClient = client();
}

fn client() -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        // As the server side (`server::builder`): one flat buffer per write.
        .http1_writev(false)
        .build(http)
}

/// Sends requests upstream through the calling thread's connection pool.
#[derive(Default)]
pub struct Forwarder {}

impl Forwarder {
    pub fn new() -> Forwarder {
        Forwarder {}
    }

    /// Sends `req` and waits for the response head for at most `timeout`.
    pub async fn send(
        &self,
        req: Request<ResponseBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        // The request future holds its own handle on the pool: no clone of the client here.
        let sent = CLIENT.with(|client| client.request(req));
        match tokio::time::timeout(timeout, sent).await {
            Err(_) => Err(SendError {
                error: GatewayError::UpstreamTimeout,
                connected: true,
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream request failed");
                Err(SendError {
                    error: classify(&e),
                    connected: !e.is_connect(),
                })
            }
        }
    }
}

/// A failed exchange, and whether a connection to the upstream was made (SPEC §7 charges
/// nothing for a request the upstream never received).
#[derive(Debug)]
pub struct SendError {
    pub error: GatewayError,
    /// False when the connect itself failed. A timeout counts as connected: the route timeout
    /// covers connect and answer alike, and a connect slower than it is rare.
    pub connected: bool,
}

/// A failed exchange is the client's fault when its body could not be read or was cut by us.
pub fn classify(e: &(dyn std::error::Error + 'static)) -> GatewayError {
    match find_body_error(e) {
        Some(Cause::Cut(BodyError::Idle)) => GatewayError::RequestTimeout,
        Some(Cause::Cut(BodyError::TooLarge)) => GatewayError::PayloadTooLarge,
        // SPEC §3.4: a malformed chunk is 400, and the connection is closed.
        Some(Cause::ClientBody) => GatewayError::BadRequest,
        None => GatewayError::UpstreamUnavailable,
    }
}
