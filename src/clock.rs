//! Wall-clock readings in the forms the records use. A leaf: every module may read the time here.

use std::time::{Duration, SystemTime};

/// Now, as RFC 3339 UTC with milliseconds (the `ts` of every audit line).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The seconds since the epoch, now (budget periods are calendar periods in UTC).
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A duration in milliseconds with one decimal (`duration_ms`, `upstream_ms`).
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}
