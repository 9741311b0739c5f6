//! `POST /.portcullis/token` (SPEC §10): a key's holder asks for a short-lived token for one of
//! its routes. The request has passed steps 4 to 8 like any other (IP lists, lockout, the per-IP
//! limit, CORS, the key, the per-key limit) on the route `[tokens]` adds; here its body is read
//! and the token minted. Nothing is forwarded.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use secrecy::ExposeSecret;

use super::{Answer, Ctx};
use crate::config::runtime::{AuthMode, TOKEN_PATH};
use crate::error::GatewayError;
use crate::live::Live;
use crate::proxy::body;

/// A token's lifetime when the request names none.
const DEFAULT_TTL: Duration = Duration::from_secs(60);

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    route: String,
    ttl: Option<String>,
}

pub(super) async fn answer(
    live: &Live,
    ctx: &mut Ctx,
    key_index: Option<usize>,
    req: Request<Incoming>,
) -> Result<Answer, GatewayError> {
    let cfg = &live.config;
    let (Some(tokens), Some(k)) = (&cfg.tokens, key_index) else {
        return Err(GatewayError::NoRoute);
    };
    if req.uri().path() != TOKEN_PATH {
        return Err(GatewayError::NoRoute);
    }
    let limited = http_body_util::Limited::new(req.into_body(), 4096);
    let bytes = match tokio::time::timeout(cfg.server.request_timeout, limited.collect()).await {
        Err(_) => return Err(GatewayError::RequestTimeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::PayloadTooLarge);
        }
        Ok(Err(_)) => return Err(GatewayError::BadRequest),
        Ok(Ok(c)) => c.to_bytes(),
    };
    ctx.record
        .bytes_in
        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let ask: Ask = serde_json::from_slice(&bytes).map_err(|_| GatewayError::BadRequest)?;
    let ttl = match ask.ttl.as_deref() {
        None => DEFAULT_TTL.min(tokens.max_ttl),
        Some(t) => crate::config::units::parse_duration(t).map_err(|_| GatewayError::BadRequest)?,
    };
    // Tokens expire on whole seconds: a lifetime under one would be no lifetime at all.
    if ttl < Duration::from_secs(1) || ttl > tokens.max_ttl {
        return Err(GatewayError::BadRequest);
    }
    let Some(target) = cfg.routes.iter().find(|r| {
        r.name == ask.route && !r.mint && matches!(r.auth, AuthMode::Key | AuthMode::KeyOrJwt)
    }) else {
        return Err(GatewayError::BadRequest);
    };
    let key = &cfg.keys[k];
    if !key.allows(&target.name) {
        return Err(GatewayError::KeyNotAllowed);
    }
    let now = std::time::SystemTime::now();
    let mut expires = now + ttl;
    // A token never outlives its key.
    if let Some(e) = key.expires {
        expires = expires.min(e);
    }
    // Rounded up to the second, so a token lives at least the `ttl` it was asked for.
    let exp = expires
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            (d.as_secs() + u64::from(d.subsec_nanos() > 0)) as i64
        });
    let token = crate::tokens::mint(
        tokens.secret.expose_secret().as_bytes(),
        &crate::tokens::Claims {
            key_id: key.id.clone(),
            key_fp: crate::tokens::fingerprint(&key.hash.0),
            route: target.name.clone(),
            exp,
        },
    );
    let expires_at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(exp.max(0) as u64),
    )
    .to_string();
    let json = serde_json::json!({ "token": token, "expires_at": expires_at });
    let mut resp = Response::new(body::full(Bytes::from(json.to_string())));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // A credential: no cache along the way may keep it.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    ctx.minted = true;
    Ok((resp, None))
}
