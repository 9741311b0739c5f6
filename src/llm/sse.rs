//! An incremental Server-Sent-Events scanner (WHATWG HTML §9.2.6 "Interpreting an event stream").
//!
//! Fed the response body chunk by chunk as it passes, it finds each event's `data` without
//! delaying or copying the stream: lines end in `\n`, `\r\n` or `\r` (a `\r` at the end of one
//! chunk and a `\n` at the start of the next are one line end), `data:` lines of one event are
//! joined with `\n`, comments (`:`) and other fields are skipped, and events may be split across
//! any chunk boundary. Memory is bounded per stream: an event whose data grows past `limit` is
//! passed over (its bytes still flow to the client untouched) and scanning resumes at the next.

/// Scans an SSE byte stream; calls back with the data of each complete event.
pub struct Scanner {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The current event has outgrown `limit`: ignore it up to its end.
    oversized: bool,
    last_cr: bool,
    /// No line has ended yet: the first may start with a byte-order mark, to be dropped (it may
    /// arrive split across chunks, so it is looked for in the assembled line).
    first_line: bool,
    limit: usize,
}

impl Scanner {
    pub fn new(limit: usize) -> Scanner {
        Scanner {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            oversized: false,
            last_cr: false,
            first_line: true,
            limit,
        }
    }

    /// Feeds one chunk. `on_event(data, end)` is called for every event that completes in it,
    /// with the byte offset in `chunk` just past the event's terminating blank line.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&[u8], usize)) {
        self.feed_blocks(chunk, |data, end| {
            if let Some(d) = data {
                on_event(d, end)
            }
        })
    }

    /// Like [`feed`](Self::feed), but called at *every* blank line, with the event's data when it
    /// has any (comments and empty blocks give `None`): the boundaries a filter can cut at.
    pub fn feed_blocks(&mut self, chunk: &[u8], mut on_event: impl FnMut(Option<&[u8]>, usize)) {
        let input = chunk;
        // Whole runs between line ends are copied at once (memchr), not byte by byte.
        let mut i = 0;
        while i < input.len() {
            if self.last_cr {
                self.last_cr = false;
                if input[i] == b'\n' {
                    // The LF of a CRLF whose CR ended the line already.
                    i += 1;
                    continue;
                }
            }
            match memchr::memchr2(b'\r', b'\n', &input[i..]) {
                None => {
                    self.push_line(&input[i..]);
                    break;
                }
                Some(p) => {
                    self.push_line(&input[i..i + p]);
                    self.last_cr = input[i + p] == b'\r';
                    self.end_line(i + p + 1, &mut on_event);
                    i += p + 1;
                }
            }
        }
    }

    /// Appends to the current line up to `limit`; past it the event is marked oversized.
    fn push_line(&mut self, s: &[u8]) {
        let room = self.limit.saturating_sub(self.line.len());
        if s.len() > room {
            self.line.extend_from_slice(&s[..room]);
            self.oversized = true;
        } else {
            self.line.extend_from_slice(s);
        }
    }

    fn end_line(&mut self, at: usize, on_event: &mut impl FnMut(Option<&[u8]>, usize)) {
        if std::mem::take(&mut self.first_line) && self.line.starts_with("\u{feff}".as_bytes()) {
            self.line.drain(..3);
        }
        if self.line.is_empty() {
            // Blank line: dispatch.
            if self.has_data && !self.oversized {
                on_event(Some(&self.data), at);
            } else {
                on_event(None, at);
            }
            self.data.clear();
            self.has_data = false;
            self.oversized = false;
            return;
        }
        if !self.oversized {
            let line = &self.line;
            let (field, value) = match memchr::memchr(b':', line) {
                Some(0) => (&line[..0], None), // comment
                Some(p) => {
                    let v = &line[p + 1..];
                    (&line[..p], Some(v.strip_prefix(b" ").unwrap_or(v)))
                }
                None => (&line[..], Some(&line[line.len()..])),
            };
            if field == b"data"
                && let Some(v) = value
            {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(v);
                self.has_data = true;
                if self.data.len() > self.limit {
                    self.oversized = true;
                    self.data = Vec::new();
                }
            }
        }
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = Scanner::new(1024);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |d, _| out.push(String::from_utf8_lossy(d).into_owned()));
        }
        out
    }

    #[test]
    fn line_endings_multiline_data_and_comments() {
        assert_eq!(events(&[b"data: a\n\n"]), ["a"]);
        assert_eq!(events(&[b"data: a\r\n\r\n"]), ["a"]);
        assert_eq!(events(&[b"data: a\r\r"]), ["a"]);
        assert_eq!(events(&[b"data: a\ndata: b\n\n"]), ["a\nb"]);
        assert_eq!(events(&[b": comment\ndata:x\nid: 1\nevent: e\n\n"]), ["x"]);
        assert_eq!(events(&[b"data\n\n"]), [""]);
        assert_eq!(events(&[b"id: 1\n\n"]), Vec::<String>::new());
        assert_eq!(events(&[b"\xef\xbb\xbfdata: bom\n\n"]), ["bom"]);
        // Found by the property tests: a mark split across chunks is dropped all the same.
        assert_eq!(events(&[b"\xef", b"\xbb\xbfdata: bom\n\n"]), ["bom"]);
        assert_eq!(events(&[b"\xef\xbb", b"\xbfdata: bom\n\n"]), ["bom"]);
        // CR at the end of one chunk, LF at the start of the next: one line end.
        assert_eq!(events(&[b"data: a\r", b"\n\r", b"\n"]), ["a"]);
    }

    #[test]
    fn every_split_point_of_a_recorded_stream_parses_the_same() {
        let stream: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n: keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\r\rdata: [DONE]\n\n";
        let whole = events(&[stream]);
        assert_eq!(whole.len(), 4);
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let (a, rest) = stream.split_at(i);
                let (b, c) = rest.split_at(j - i);
                assert_eq!(events(&[a, b, c]), whole, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn oversized_events_are_skipped_and_scanning_resumes() {
        let mut s = Scanner::new(16);
        let mut out = Vec::new();
        s.feed(b"data: 0123456789abcdefghij\n\ndata: ok\n\n", |d, _| {
            out.push(d.to_vec())
        });
        assert_eq!(out, [b"ok".to_vec()]);
        let mut out = Vec::new();
        s.feed(
            b"data: 0123456789\ndata: 0123456789\n\ndata: ok2\n\n",
            |d, _| out.push(d.to_vec()),
        );
        assert_eq!(out, [b"ok2".to_vec()]);
    }

    #[test]
    fn end_offsets_point_past_the_blank_line() {
        let mut s = Scanner::new(64);
        let mut ends = Vec::new();
        s.feed(b"data: a\n\ndata: b\r\n\r\n", |_, e| ends.push(e));
        // A CRLF blank line ends at its CR; the LF after it is a separate (empty) terminator.
        assert_eq!(ends, [9, 19]);
    }
}
