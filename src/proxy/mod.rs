//! Forwarding to upstreams: pooled HTTP/1.1 connections, and WebSocket tunnels.
//!
//! Bodies are re-framed by this client (SPEC §3.4 "Framing"): the upstream never sees the
//! client's Transfer-Encoding or chunk boundaries, only what hyper writes for the body we pass.

pub mod body;
pub mod frames;
pub mod headers;
mod pool;
pub mod websocket;

use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};

use self::body::{BodyError, Cause, ResponseBody, find_body_error};
pub use self::pool::Pooled;
use crate::error::GatewayError;

/// Sends requests upstream through the calling thread's connection pool (`pool.rs`).
#[derive(Default)]
pub struct Forwarder {}

impl Forwarder {
    pub fn new() -> Forwarder {
        Forwarder {}
    }

    /// Sends `req` to `upstream` and waits for the response head for at most `timeout`.
    pub async fn send(
        &self,
        upstream: &Authority,
        req: Request<ResponseBody>,
        timeout: Duration,
    ) -> Result<Response<Pooled>, SendError> {
        match tokio::time::timeout(timeout, pool::send(upstream, req)).await {
            Err(_) => Err(SendError {
                error: GatewayError::UpstreamTimeout,
                connected: true,
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(pool::Failed::Connect(e))) => {
                tracing::debug!(error = %e, "upstream connect failed");
                Err(SendError {
                    error: GatewayError::UpstreamUnavailable,
                    connected: false,
                })
            }
            Ok(Err(pool::Failed::Exchange(e))) => {
                tracing::debug!(error = %e, "upstream request failed");
                Err(SendError {
                    error: classify(&e),
                    connected: true,
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
