//! Wall-clock readings in the forms the records use. A leaf: every module may read the time here.

use std::time::{Duration, SystemTime};

/// Now, as RFC 3339 UTC with milliseconds (the `ts` of every audit line).
///
/// The date and time up to the second are formatted once a second per thread and reused: the
/// formatting machinery cost 1 % of a refused request's CPU time, and only the milliseconds
/// change between most records.
pub fn now_rfc3339() -> String {
    use std::cell::RefCell;
    thread_local! {
        /// The last second formatted, and its text up to and including the `.`.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let Ok(since) = now.duration_since(std::time::UNIX_EPOCH) else {
        return humantime::format_rfc3339_millis(now).to_string();
    };
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != secs {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            // "2026-12-01T14:13:38Z" without its "Z", then the separator of the fraction.
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            prefix.clear();
            prefix.push_str(text.trim_end_matches('Z'));
            prefix.push('.');
            *cached = secs;
        }
        let mut out = String::with_capacity(prefix.len() + 4);
        out.push_str(prefix);
        let digits = [millis / 100, millis / 10 % 10, millis % 10];
        out.extend(digits.map(|d| char::from(b'0' + d as u8)));
        out.push('Z');
        out
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_humantime() {
        for _ in 0..3 {
            let before = SystemTime::now();
            let ours = now_rfc3339();
            let after = SystemTime::now();
            let a = humantime::format_rfc3339_millis(before).to_string();
            let b = humantime::format_rfc3339_millis(after).to_string();
            assert!(a <= ours && ours <= b, "{a} <= {ours} <= {b}");
            assert_eq!(ours.len(), "2026-12-01T14:13:38.123Z".len(), "{ours}");
            assert!(humantime::parse_rfc3339(&ours).is_ok(), "{ours}");
        }
    }
}
