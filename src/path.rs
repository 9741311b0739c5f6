//! Request-path normalization (SPEC §3.1).
//!
//! Routing and authorization decide on exactly the path the upstream will receive, so the
//! upstream and the gateway can never disagree about which route a request is for (the classic
//! `/public/..%2fadmin` and `/admin%2f` bypasses of path-prefix ACLs). The path is normalized per
//! RFC 3986: percent-encoded unreserved characters are decoded (§6.2.2.2), other escapes are kept
//! with upper-case hex (§6.2.2.1), dot segments are removed (§5.2.4), and runs of `/` are merged
//! (as nginx's `merge_slashes` does). What remains ambiguous after that is refused, never guessed:
//! an encoded `/` or `\`, an encoded dot segment, NUL or other control bytes, invalid
//! percent-encoding, raw backslashes, and any byte RFC 3986 does not allow in a path.

use std::fmt;

/// Why a path was refused. Every variant is answered with 400 `bad_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathReject {
    NotOriginForm,
    IllegalByte,
    Backslash,
    BadPercent,
    EncodedSeparator,
    EncodedControl,
    EncodedDotSegment,
    DotSegmentParams,
}

impl fmt::Display for PathReject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathReject::NotOriginForm => "the path must start with '/'",
            PathReject::IllegalByte => {
                "the path holds a character that is not allowed in a URL path"
            }
            PathReject::Backslash => "the path holds a backslash",
            PathReject::BadPercent => "the path holds an invalid percent-encoding",
            PathReject::EncodedSeparator => "the path holds an encoded '/' or '\\'",
            PathReject::EncodedControl => "the path holds an encoded control character",
            PathReject::EncodedDotSegment => "the path holds an encoded dot segment",
            PathReject::DotSegmentParams => {
                "the path holds a dot segment with parameters (\"..;\")"
            }
        })
    }
}

/// RFC 3986 §2.3 unreserved characters.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §3.3 `pchar` minus `%` (handled separately), plus `/`.
fn is_path_byte(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes an origin-form request path (no query). See the module docs for the rules.
pub fn normalize(raw: &str) -> Result<String, PathReject> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathReject::NotOriginForm);
    }
    // Fast path: most paths are already normal (no '%', no dot segment, no '//').
    if is_plainly_normal(bytes)? {
        return Ok(raw.to_owned());
    }

    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for seg in raw[1..].split('/') {
        let (decoded, had_encoded_dot) = decode_segment(seg)?;
        trailing_slash = false;
        // "..;x" is a dot segment to Tomcat/Spring (path parameters are stripped before
        // resolving) but a plain name to RFC 3986: ambiguous, so refused.
        if decoded.starts_with(".;") || decoded.starts_with("..;") {
            return Err(PathReject::DotSegmentParams);
        }
        match decoded.as_str() {
            "." | ".." if had_encoded_dot => return Err(PathReject::EncodedDotSegment),
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(decoded),
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Checks every byte; returns true when the path needs no rewriting at all.
fn is_plainly_normal(bytes: &[u8]) -> Result<bool, PathReject> {
    let mut plain = true;
    let mut prev_slash = false;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\\' {
            return Err(PathReject::Backslash);
        }
        if b != b'%' && !is_path_byte(b) {
            return Err(PathReject::IllegalByte);
        }
        match b {
            b'%' | b';' => plain = false,
            b'/' if prev_slash => plain = false,
            b'.' if prev_slash || i == 0 => {
                // "/." or "/.." starting a segment: maybe a dot segment.
                let rest = &bytes[i..];
                let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
                if matches!(&rest[..seg_end], b"." | b"..") {
                    plain = false;
                }
            }
            _ => {}
        }
        prev_slash = b == b'/';
    }
    Ok(plain)
}

/// Decodes one segment; returns it and whether a `.` in it came from `%2E`.
fn decode_segment(seg: &str) -> Result<(String, bool), PathReject> {
    let b = seg.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut had_encoded_dot = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (h, l) = match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => (h, l),
                _ => return Err(PathReject::BadPercent),
            };
            let v = h << 4 | l;
            match v {
                b'/' | b'\\' => return Err(PathReject::EncodedSeparator),
                0x00..=0x1f | 0x7f => return Err(PathReject::EncodedControl),
                _ if is_unreserved(v) => {
                    had_encoded_dot |= v == b'.';
                    out.push(v as char);
                }
                _ => {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.push('%');
                    out.push(HEX[(v >> 4) as usize] as char);
                    out.push(HEX[(v & 15) as usize] as char);
                }
            }
            i += 3;
        } else if c == b'\\' {
            return Err(PathReject::Backslash);
        } else if is_path_byte(c) {
            out.push(c as char);
            i += 1;
        } else {
            return Err(PathReject::IllegalByte);
        }
    }
    Ok((out, had_encoded_dot))
}

/// SPEC §3.4: the query is forwarded as received unless it holds controls or spaces.
pub fn query_is_acceptable(q: &str) -> bool {
    q.bytes().all(|b| b > 0x20 && b != 0x7f && b != b'#')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_pass_unchanged() {
        for p in [
            "/",
            "/v1/chat/completions",
            "/a-b_c.d~e/",
            "/v1/models/openai:gpt-4o",
            "/x/%C3%A9",
            "/a;b=c",
        ] {
            assert_eq!(normalize(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn normalizes_per_rfc3986() {
        let cases = [
            ("/a/../b", "/b"),
            ("/a/./b", "/a/b"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/v1/..", "/"),
            ("/v1/.", "/v1/"),
            ("//v1//chat", "/v1/chat"),
            ("/v1//", "/v1/"),
            ("/%76%31/x", "/v1/x"),
            ("/a%2db", "/a-b"),
            ("/x/%c3%a9", "/x/%C3%A9"),
            ("/file%2etxt", "/file.txt"),
            ("/a/b/../../../c", "/c"),
            ("/.hidden", "/.hidden"),
            ("/a/...", "/a/..."),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_ambiguous_paths() {
        let cases = [
            ("/a%2Fb", PathReject::EncodedSeparator),
            ("/a%2fb", PathReject::EncodedSeparator),
            ("/a%5Cb", PathReject::EncodedSeparator),
            ("/a\\b", PathReject::Backslash),
            ("/%2e%2e/admin", PathReject::EncodedDotSegment),
            ("/v1/%2E%2E/admin", PathReject::EncodedDotSegment),
            ("/v1/.%2e/admin", PathReject::EncodedDotSegment),
            ("/v1/%2e/x", PathReject::EncodedDotSegment),
            ("/a%00b", PathReject::EncodedControl),
            ("/a%0d%0ab", PathReject::EncodedControl),
            ("/a%zz", PathReject::BadPercent),
            ("/a%2", PathReject::BadPercent),
            ("/a%", PathReject::BadPercent),
            ("/a b", PathReject::IllegalByte),
            ("/a\"b", PathReject::IllegalByte),
            ("/a<b>", PathReject::IllegalByte),
            ("/a{b}", PathReject::IllegalByte),
            ("/a\u{0}b", PathReject::IllegalByte),
            ("/caf\u{e9}", PathReject::IllegalByte),
            ("/a#b", PathReject::IllegalByte),
            ("/a|b", PathReject::IllegalByte),
            ("/public/..;/admin", PathReject::DotSegmentParams),
            ("/public/.;x/admin", PathReject::DotSegmentParams),
            ("/public/%2e%2e;/admin", PathReject::DotSegmentParams),
            ("http://evil/x", PathReject::NotOriginForm),
            ("*", PathReject::NotOriginForm),
            ("", PathReject::NotOriginForm),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn queries() {
        assert!(query_is_acceptable("a=1&b=%20x"));
        assert!(!query_is_acceptable("a=1 2"));
        assert!(!query_is_acceptable("a=\u{1}"));
    }
}
