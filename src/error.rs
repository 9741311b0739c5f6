//! Every response the gateway makes itself (SPEC §3.3).
//!
//! One enum, matched exhaustively, so a new error cannot be added without choosing its status,
//! code and message. The body is the OpenAI error shape so OpenAI clients show the message. No
//! message names an upstream address, a file path, a key or a stack.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use std::time::Duration;

use crate::proxy::body::{self, ResponseBody};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayError {
    MissingApiKey,
    InvalidApiKey,
    ExpiredApiKey,
    /// A short-lived token (SPEC §10) that fails verification: a bad tag, expired, another
    /// route's, or its key gone.
    InvalidToken,
    KeyNotAllowed,
    ModelNotAllowed,
    IpDenied,
    OriginNotAllowed,
    LockedOut {
        retry_after: Duration,
    },
    RateLimited {
        retry_after: Duration,
    },
    BudgetExceeded {
        retry_after: Duration,
    },
    PayloadTooLarge,
    RequestTimeout,
    NoRoute,
    MethodNotAllowed,
    BadRequest,
    HeadersTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
    /// A gateway-wide bound is reached (`limits.max_buffered_bytes`).
    Overloaded,
}

impl GatewayError {
    pub fn status(self) -> StatusCode {
        use GatewayError::*;
        match self {
            MissingApiKey | InvalidApiKey | ExpiredApiKey | InvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            KeyNotAllowed | ModelNotAllowed | IpDenied | OriginNotAllowed => StatusCode::FORBIDDEN,
            LockedOut { .. } | RateLimited { .. } | BudgetExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            NoRoute => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BadRequest => StatusCode::BAD_REQUEST,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The SPEC code; also the audit `outcome`.
    pub fn code(self) -> &'static str {
        use GatewayError::*;
        match self {
            MissingApiKey => "missing_api_key",
            InvalidApiKey => "invalid_api_key",
            ExpiredApiKey => "expired_api_key",
            InvalidToken => "invalid_token",
            KeyNotAllowed => "key_not_allowed",
            ModelNotAllowed => "model_not_allowed",
            IpDenied => "ip_denied",
            OriginNotAllowed => "origin_not_allowed",
            LockedOut { .. } => "locked_out",
            RateLimited { .. } => "rate_limited",
            BudgetExceeded { .. } => "budget_exceeded",
            PayloadTooLarge => "payload_too_large",
            RequestTimeout => "request_timeout",
            NoRoute => "no_route",
            MethodNotAllowed => "method_not_allowed",
            BadRequest => "bad_request",
            HeadersTooLarge => "headers_too_large",
            UpstreamTimeout => "upstream_timeout",
            UpstreamUnavailable => "upstream_unavailable",
            Overloaded => "overloaded",
        }
    }

    pub fn message(self) -> &'static str {
        use GatewayError::*;
        match self {
            MissingApiKey => "No API key was presented. Send it as 'Authorization: Bearer <key>'.",
            InvalidApiKey => "The API key is not valid.",
            ExpiredApiKey => "The API key has expired.",
            InvalidToken => "The token is not valid (expired, for another route, or revoked).",
            KeyNotAllowed => "The API key is not allowed to use this route.",
            ModelNotAllowed => "The API key is not allowed to use this model.",
            IpDenied => "Requests from this address are not allowed on this route.",
            OriginNotAllowed => "This origin is not allowed.",
            LockedOut { .. } => {
                "Too many failed API key attempts from this address; try again later."
            }
            RateLimited { .. } => "Rate limit exceeded; try again later.",
            BudgetExceeded { .. } => {
                "The usage budget for this period is spent; try again when the period ends."
            }
            PayloadTooLarge => "The request body is too large.",
            RequestTimeout => "The request body was not received in time.",
            NoRoute => "No route matches this request.",
            MethodNotAllowed => "This method is not allowed on this route.",
            BadRequest => "The request is malformed or ambiguous.",
            HeadersTooLarge => "The request headers are too large.",
            UpstreamTimeout => "The upstream service did not answer in time.",
            UpstreamUnavailable => "The upstream service is unavailable.",
            Overloaded => "The gateway is busy; try again in a moment.",
        }
    }

    /// The JSON body: `{"error":{"message":...,"type":"gateway_error","code":...}}`.
    /// Written by hand rather than through `serde_json::json!` (a map built, then serialized: 5 %
    /// of a refused request's CPU time): the messages and codes are fixed strings with nothing
    /// to escape, which the `table` test checks for every variant.
    pub fn body(self) -> Bytes {
        let (message, code) = (self.message(), self.code());
        let mut out = String::with_capacity(64 + message.len() + code.len());
        out.push_str(r#"{"error":{"message":""#);
        out.push_str(message);
        out.push_str(r#"","type":"gateway_error","code":""#);
        out.push_str(code);
        out.push_str(r#""}}"#);
        Bytes::from(out)
    }

    pub fn response(self) -> Response<ResponseBody> {
        use GatewayError::*;
        let mut resp = Response::new(body::full(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            MissingApiKey | InvalidApiKey | ExpiredApiKey | InvalidToken => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"portcullis\""),
                );
            }
            LockedOut { retry_after }
            | RateLimited { retry_after }
            | BudgetExceeded { retry_after } => {
                h.insert(
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after)),
                );
            }
            // Connection-level failures of the request itself: do not keep the connection.
            BadRequest | HeadersTooLarge | RequestTimeout | PayloadTooLarge => {
                h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Overloaded => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            KeyNotAllowed | ModelNotAllowed | IpDenied | OriginNotAllowed | NoRoute
            | MethodNotAllowed | UpstreamTimeout | UpstreamUnavailable => {}
        }
        resp
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use GatewayError::*;

    #[test]
    fn table() {
        let d = Duration::from_millis(1500);
        let rows: &[(GatewayError, u16, &str)] = &[
            (MissingApiKey, 401, "missing_api_key"),
            (InvalidApiKey, 401, "invalid_api_key"),
            (ExpiredApiKey, 401, "expired_api_key"),
            (KeyNotAllowed, 403, "key_not_allowed"),
            (ModelNotAllowed, 403, "model_not_allowed"),
            (IpDenied, 403, "ip_denied"),
            (OriginNotAllowed, 403, "origin_not_allowed"),
            (LockedOut { retry_after: d }, 429, "locked_out"),
            (RateLimited { retry_after: d }, 429, "rate_limited"),
            (BudgetExceeded { retry_after: d }, 429, "budget_exceeded"),
            (PayloadTooLarge, 413, "payload_too_large"),
            (RequestTimeout, 408, "request_timeout"),
            (NoRoute, 404, "no_route"),
            (MethodNotAllowed, 405, "method_not_allowed"),
            (BadRequest, 400, "bad_request"),
            (HeadersTooLarge, 431, "headers_too_large"),
            (UpstreamTimeout, 504, "upstream_timeout"),
            (UpstreamUnavailable, 502, "upstream_unavailable"),
            (Overloaded, 503, "overloaded"),
        ];
        for &(e, status, code) in rows {
            assert_eq!(e.status().as_u16(), status, "{code}");
            assert_eq!(e.code(), code);
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["type"], "gateway_error");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
            // The same document serde_json makes (nothing in a message or code needed escaping),
            // its keys in the SPEC's order.
            let serde = serde_json::json!({
                "error": {"message": e.message(), "type": "gateway_error", "code": e.code()}
            });
            assert_eq!(v, serde, "{code}");
            let order = ["\"message\"", "\"type\"", "\"code\""]
                .map(|k| String::from_utf8_lossy(&e.body()).find(k));
            assert!(order[0] < order[1] && order[1] < order[2], "{code}");
        }
        let r = RateLimited { retry_after: d }.response();
        assert_eq!(r.headers()["retry-after"], "2");
        let r = MissingApiKey.response();
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"portcullis\""
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_secs(6)), 6);
        assert_eq!(retry_after_secs(Duration::from_millis(5001)), 6);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
