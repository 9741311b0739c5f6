//! Forwarding to upstreams: a pooled HTTP/1.1 client, and WebSocket tunnels.
//!
//! Bodies are re-framed by this client (SPEC §3.4 "Framing"): the upstream never sees the
//! client's Transfer-Encoding or chunk boundaries, only what hyper writes for the body we pass.

pub mod body;
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

pub struct Forwarder {
    client: Client<HttpConnector, ResponseBody>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Forwarder {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(128)
            .build(http);
        Forwarder { client }
    }

    /// Sends `req` and waits for the response head for at most `timeout`.
    pub async fn send(
        &self,
        req: Request<ResponseBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        match tokio::time::timeout(timeout, self.client.request(req)).await {
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
