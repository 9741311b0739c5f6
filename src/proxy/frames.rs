//! Reading WebSocket messages out of a byte stream that passes through unchanged (RFC 6455 §5):
//! the server-to-client side of a realtime session, whose `response.done` messages carry usage
//! (SPEC §8). The tunnel forwards every byte as it arrives; this only watches.
//!
//! Written by hand: the WebSocket crates (tungstenite and friends) own the connection, decode into
//! new buffers and re-encode what they send, while the tunnel must pass the upstream's bytes on
//! exactly as they came and undelayed, and needs only frame boundaries and text payloads.

/// Text messages larger than this pass unscanned (their bytes are forwarded all the same).
pub const MAX_SCANNED_MESSAGE: usize = 1 << 20;
/// Above this, the message buffer is given back after use rather than kept for the next one.
const KEEP_CAPACITY: usize = 64 << 10;

/// What the watcher of the messages wants after one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop right after this message: nothing after its last byte is forwarded.
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a frame header into `head` (2 to 14 bytes).
    Head,
    /// `left` payload bytes of the current frame to go.
    Payload,
}

/// The scanner's state between chunks.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    head: [u8; 14],
    head_len: usize,
    left: u64,
    /// The current frame: its opcode, FIN bit and masking key (servers do not mask; a masked
    /// frame is unmasked all the same).
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Offset within the frame's payload (for the masking key).
    at: u64,
    /// The text message being assembled, unless it is skipped (too large, compressed, binary).
    message: Vec<u8>,
    in_text: bool,
    skip: bool,
    /// Messages that passed unscanned (over [`MAX_SCANNED_MESSAGE`], or compressed).
    pub unscanned: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Head,
            head: [0; 14],
            head_len: 0,
            left: 0,
            opcode: 0,
            fin: false,
            mask: None,
            at: 0,
            message: Vec::new(),
            in_text: false,
            skip: false,
            unscanned: 0,
        }
    }
}

/// The length of a frame header given its first two bytes.
fn head_size(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

impl Scanner {
    /// Watches `chunk`, the next bytes of the stream, calling `on_text` with each complete text
    /// message (at most [`MAX_SCANNED_MESSAGE`] bytes, uncompressed). Returns the offset just
    /// past the message for which `on_text` said [`Flow::Stop`], or `None`.
    pub fn feed(&mut self, chunk: &[u8], mut on_text: impl FnMut(&[u8]) -> Flow) -> Option<usize> {
        let mut i = 0;
        while i < chunk.len() {
            match self.state {
                State::Head => {
                    self.head[self.head_len] = chunk[i];
                    self.head_len += 1;
                    i += 1;
                    if self.head_len >= 2 && self.head_len == head_size(self.head[1]) {
                        self.start_frame();
                        if self.left == 0 && self.end_frame(&mut on_text) == Flow::Stop {
                            return Some(i);
                        }
                    }
                }
                State::Payload => {
                    let n = (chunk.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    self.take(&chunk[i..i + n]);
                    i += n;
                    self.left -= n as u64;
                    if self.left == 0 && self.end_frame(&mut on_text) == Flow::Stop {
                        return Some(i);
                    }
                }
            }
        }
        None
    }

    fn start_frame(&mut self) {
        let (b0, b1) = (self.head[0], self.head[1]);
        let len7 = u64::from(b1 & 0x7f);
        let (left, rest) = match len7 {
            126 => (
                u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                4,
            ),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (n, 2),
        };
        self.mask = (b1 & 0x80 != 0).then(|| {
            let mut m = [0u8; 4];
            m.copy_from_slice(&self.head[rest..rest + 4]);
            m
        });
        self.left = left;
        self.at = 0;
        self.fin = b0 & 0x80 != 0;
        self.opcode = b0 & 0x0f;
        let compressed = b0 & 0x40 != 0;
        match self.opcode {
            // A text message starts.
            1 => {
                self.in_text = true;
                self.message.clear();
                self.skip = compressed;
            }
            // A continuation belongs to the message in progress (text or not).
            0 => {}
            // Binary messages and control frames are not scanned.
            _ => {}
        }
        if self.collecting() && self.message.len() as u64 + left > MAX_SCANNED_MESSAGE as u64 {
            self.skip = true;
            self.message = Vec::new();
        }
        self.head_len = 0;
        self.state = State::Payload;
    }

    /// Whether the current frame's payload belongs to a text message being assembled.
    fn collecting(&self) -> bool {
        self.in_text && !self.skip && matches!(self.opcode, 0 | 1)
    }

    fn take(&mut self, bytes: &[u8]) {
        if self.collecting() {
            let from = self.message.len();
            self.message.extend_from_slice(bytes);
            if let Some(m) = self.mask {
                for (k, b) in self.message[from..].iter_mut().enumerate() {
                    *b ^= m[((self.at + k as u64) % 4) as usize];
                }
            }
        }
        self.at += bytes.len() as u64;
    }

    fn end_frame(&mut self, on_text: &mut impl FnMut(&[u8]) -> Flow) -> Flow {
        self.state = State::Head;
        // Control frames (close, ping, pong) may come between a message's fragments.
        if self.opcode >= 8 || !self.fin {
            return Flow::Continue;
        }
        let was_text = std::mem::take(&mut self.in_text) && matches!(self.opcode, 0 | 1);
        let mut flow = Flow::Continue;
        if was_text {
            if self.skip {
                self.unscanned += 1;
            } else {
                flow = on_text(&self.message);
            }
        }
        self.skip = false;
        self.message.clear();
        if self.message.capacity() > KEEP_CAPACITY {
            self.message = Vec::new();
        }
        flow
    }
}

/// A close frame from server to client (unmasked): status 1008, policy violation, with `reason`
/// (at most 123 bytes, RFC 6455 §5.5).
pub fn close_frame(reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut f = vec![0x88, (2 + reason.len()) as u8];
    f.extend_from_slice(&1008u16.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a server writes it (or masked, as a client does).
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            None => f.extend_from_slice(payload),
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
        }
        f
    }

    fn messages(stream: &[u8], split: usize) -> (Vec<Vec<u8>>, u64) {
        let mut s = Scanner::default();
        let mut got = Vec::new();
        for part in [&stream[..split], &stream[split..]] {
            assert_eq!(
                s.feed(part, |m| {
                    got.push(m.to_vec());
                    Flow::Continue
                }),
                None
            );
        }
        (got, s.unscanned)
    }

    #[test]
    fn text_messages_are_found_whole_at_every_split() {
        let big = vec![b'x'; 70_000];
        let mut stream = Vec::new();
        stream.extend(frame(true, 1, br#"{"type":"session.created"}"#, None));
        // A fragmented text message with a ping between its fragments.
        stream.extend(frame(false, 1, br#"{"type":"resp"#, None));
        stream.extend(frame(true, 9, b"ping", None));
        stream.extend(frame(true, 0, br#"onse.done"}"#, None));
        stream.extend(frame(true, 2, b"\x00\x01binary", None));
        stream.extend(frame(true, 1, &big, None));
        stream.extend(frame(true, 1, b"masked", Some([1, 2, 3, 4])));
        stream.extend(frame(true, 1, b"", None));
        let want: Vec<Vec<u8>> = vec![
            br#"{"type":"session.created"}"#.to_vec(),
            br#"{"type":"response.done"}"#.to_vec(),
            big.clone(),
            b"masked".to_vec(),
            Vec::new(),
        ];
        for split in 0..=stream.len() {
            // Every split of the small frames; the big one at a few places.
            if split > 200 && split < stream.len() - 200 && split % 997 != 0 {
                continue;
            }
            assert_eq!(messages(&stream, split), (want.clone(), 0), "split {split}");
        }
    }

    #[test]
    fn a_message_over_the_bound_or_compressed_passes_unscanned() {
        let huge = vec![b'y'; MAX_SCANNED_MESSAGE + 1];
        let mut stream = frame(true, 1, &huge, None);
        let mut compressed = frame(true, 1, b"\x01\x02", None);
        compressed[0] |= 0x40;
        stream.extend(compressed);
        stream.extend(frame(true, 1, b"after", None));
        let (got, unscanned) = messages(&stream, 3);
        assert_eq!(got, vec![b"after".to_vec()]);
        assert_eq!(unscanned, 2);
    }

    #[test]
    fn stop_returns_the_offset_just_past_the_message() {
        let first = frame(true, 1, b"one", None);
        let mut stream = first.clone();
        stream.extend(frame(true, 1, b"two", None));
        let mut s = Scanner::default();
        assert_eq!(s.feed(&stream, |_| Flow::Stop), Some(first.len()));
    }

    #[test]
    fn the_close_frame_says_1008_and_why() {
        assert_eq!(
            close_frame("budget_exceeded"),
            [&[0x88, 17, 0x03, 0xf0][..], b"budget_exceeded"].concat()
        );
    }
}
