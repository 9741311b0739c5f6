//! The admin listener (SPEC §5): plain HTTP, loopback by default. `GET /healthz` while the
//! process runs, `GET /readyz` 200 once serving and 503 while draining, `GET /metrics` in
//! Prometheus text, behind `Authorization: Bearer <admin.token>` when a token is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::GatewayError;
use crate::pipeline::Shared;
use crate::proxy::body::{self, ResponseBody};

pub struct Admin {
    pub shared: Arc<Shared>,
    pub metrics: Option<PrometheusHandle>,
    pub ready: Arc<AtomicBool>,
}

fn json(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(body::full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn handle(admin: &Admin, req: &Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return GatewayError::MethodNotAllowed.response();
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, "{\"status\":\"ok\"}"),
        "/readyz" if admin.ready.load(Ordering::Relaxed) => {
            json(StatusCode::OK, "{\"status\":\"ready\"}")
        }
        "/readyz" => json(
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"status\":\"unavailable\"}",
        ),
        "/metrics" => {
            let live = admin.shared.live.load();
            if let Some(token) = live.config.admin.as_ref().and_then(|a| a.token.as_ref()) {
                let presented = req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim().as_bytes());
                let ok = presented
                    .is_some_and(|p| bool::from(p.ct_eq(token.expose_secret().as_bytes())));
                if !ok {
                    return if presented.is_none() {
                        GatewayError::MissingApiKey.response()
                    } else {
                        GatewayError::InvalidApiKey.response()
                    };
                }
            }
            // Budgets roll over at period ends with or without traffic: show them as of now.
            admin.shared.publish_budgets();
            let mut text = admin
                .metrics
                .as_ref()
                .map(|m| m.render())
                .unwrap_or_default();
            text.push_str(&crate::metrics::render_key_expiry(
                live.config.keys.iter().filter_map(|k| {
                    let at = k.expires?.duration_since(std::time::UNIX_EPOCH).ok()?;
                    Some((k.id.as_str(), at.as_secs_f64()))
                }),
            ));
            let mut r = Response::new(body::full(Bytes::from(text)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => GatewayError::NoRoute.response(),
    }
}

/// SPEC §3.4 "Connections per client": the admin listener serves at most this many connections
/// at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the admin listener until `shutdown`.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot before accepting: a flood of scrapers or idle connections cannot make the
        // listener (or the process) hold more than MAX_CONNECTIONS of them.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => return },
            _ = shutdown.cancelled() => return,
        };
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    // EMFILE and friends: back off rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let resp = handle(&admin, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
