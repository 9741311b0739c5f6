//! Units of the config file: rates, byte sizes and durations.
//!
//! Each is parsed once, at load, into a type that cannot hold an invalid value, so the request
//! path never re-parses a config string. The formats are the SPEC's (§2): `"10/min"`, `"off"`,
//! `"10MiB"`, `"500ms"`. They are small and SPEC-specific, so they are written here rather than
//! borrowed from a crate whose grammar is wider (humantime accepts "1month 2days" and friends).

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A request rate: `n` requests per `period`, GCRA with a burst of `n`; or no limit at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rate {
    Off,
    Limit { n: NonZeroU32, period: Duration },
}

impl Rate {
    pub fn parse(s: &str) -> Result<Rate, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Rate::Off);
        }
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid rate {s:?}: expected \"<n>/<unit>\" or \"off\""))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("invalid rate {s:?}: {:?} is not a whole number", n.trim()))?;
        let n = NonZeroU32::new(n).ok_or_else(|| {
            format!("invalid rate {s:?}: a rate of 0 would refuse everything; use \"off\" to disable the limit or remove the route")
        })?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            other => {
                return Err(format!(
                    "invalid rate {s:?}: unknown unit {other:?} (use s, min, hour or day)"
                ));
            }
        };
        Ok(Rate::Limit { n, period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Off => f.write_str("off"),
            Rate::Limit { n, period } => {
                let unit = match period.as_secs() {
                    1 => "s",
                    60 => "min",
                    3600 => "hour",
                    _ => "day",
                };
                write!(f, "{n}/{unit}")
            }
        }
    }
}

/// A size in bytes, written as a plain integer or `"512KiB"`, `"10MiB"`, `"1GiB"`, `"100KB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        if num.is_empty() {
            return Err(format!(
                "invalid size {s:?}: expected e.g. \"512KiB\", \"10MiB\" or a number of bytes"
            ));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: number too large"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" | "b" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"7d"`. A bare number is refused: is it seconds or
/// milliseconds? A reader of the config should not have to guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() || unit.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: expected a number and a unit, e.g. \"500ms\", \"30s\", \"5m\", \"1h\", \"7d\""
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))
    };
    // The spellings rates accept, so `"10/min"` and `"10min"` both read.
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "sec" | "second" | "seconds" => secs(1),
        "m" | "min" | "minute" | "minutes" => secs(60),
        "h" | "hour" | "hours" => secs(3600),
        "d" | "day" | "days" => secs(86400),
        other => Err(format!(
            "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, min, h or d)"
        )),
    }
}

/// A duration from the config file (serde wrapper around [`parse_duration`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_duration(v).map(ConfDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate string such as \"10/min\" or \"off\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Rate::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"10MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ByteSize(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let ok = [
            ("10/min", 10, 60),
            ("1/s", 1, 1),
            ("5/sec", 5, 1),
            ("600/minute", 600, 60),
            ("3/h", 3, 3600),
            ("100/day", 100, 86400),
            (" 7 / d ", 7, 86400),
        ];
        for (s, n, secs) in ok {
            match Rate::parse(s) {
                Ok(Rate::Limit { n: got, period }) => {
                    assert_eq!((got.get(), period.as_secs()), (n, secs), "{s}")
                }
                other => panic!("{s}: {other:?}"),
            }
        }
        assert_eq!(Rate::parse("off"), Ok(Rate::Off));
        for bad in ["0/min", "10", "10/week", "-1/s", "x/s", "10/"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert!(Rate::parse("0/min").unwrap_err().contains("off"));
    }

    #[test]
    fn sizes() {
        let ok = [
            ("512KiB", 512 * 1024),
            ("10MiB", 10 << 20),
            ("1GiB", 1 << 30),
            ("100", 100),
            ("2KB", 2000),
            ("32KiB", 32768),
        ];
        for (s, n) in ok {
            assert_eq!(ByteSize::parse(s), Ok(ByteSize(n)), "{s}");
        }
        for bad in ["", "MiB", "10 parsecs", "99999999999999999999GiB", "-5"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("7d", Duration::from_secs(7 * 86400)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for bad in ["30", "s", "1w", "1.5s", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
