//! Usage from responses (SPEC §7 "Usage"): the `usage` object of a JSON response, or of the last
//! SSE event that carries one, read as the body passes — never delaying it. JSON bodies are
//! copied aside up to 1 MiB and parsed at their end; streams are scanned event by event with
//! [`Scanner`](super::sse::Scanner), one event (at most 1 MiB) in memory at a time.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;

use super::sse::Scanner;

/// At most this much of one JSON body or one SSE event is held for parsing.
pub const MAX_PARSED: usize = 1 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What an OpenRouter-style upstream says the request cost, in USD.
    pub cost: Option<f64>,
}

impl Usage {
    /// Prompt and completion tokens together (each is at most 10^9, see [`from_json`]).
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// What a response said about its usage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Reading {
    /// No usage (or none the gateway reads): `usage_source: "none"`.
    #[default]
    Absent,
    Valid(Usage),
    /// A usage object with a negative, non-finite, fractional or absurd figure, or a body that
    /// names `usage` but does not parse: `usage_source: "invalid"`, charged as if absent.
    Invalid,
}

impl Reading {
    pub fn usage(&self) -> Option<Usage> {
        match self {
            Reading::Valid(u) => Some(*u),
            _ => None,
        }
    }

    pub fn source(&self) -> &'static str {
        match self {
            Reading::Absent => "none",
            Reading::Valid(_) => "upstream",
            Reading::Invalid => "invalid",
        }
    }
}

/// Above this, a token count or a cost is not believed (SPEC §7: usage is untrusted input).
const MAX_FIGURE: f64 = 1e9;

/// Reads `usage` from one JSON document: a whole response, or one SSE event. The shapes are
/// recognized from the body, not the path (bridges mount APIs anywhere):
/// - OpenAI chat/completions, completions and embeddings, and OpenRouter: a top-level `usage`
///   with `prompt_tokens`, `completion_tokens` and OpenRouter's `cost`;
/// - OpenAI Responses: a top-level `usage` with `input_tokens`, `output_tokens` (JSON), or the
///   `response.completed` event's `response.usage` (SSE);
/// - Anthropic Messages: a top-level `usage` with `input_tokens`, `output_tokens`, and cache
///   tokens (`cache_creation_input_tokens`, `cache_read_input_tokens`) counted as prompt (JSON),
///   or `message_start`'s `message.usage` (SSE; see [`Reported::note`] for `message_delta`).
///
/// Usage is untrusted input (a compromised or buggy upstream, or a user-uploaded file served
/// back): a token count must be a whole number from 0 to 10^9 and a cost a finite number from 0
/// to 10^9, else the whole reading is invalid — a negative cost must never refund a budget.
pub fn from_json(v: &serde_json::Value) -> Reading {
    let usage = match v.get("type").and_then(|t| t.as_str()) {
        // The Responses API's last stream event; a realtime session's end of one response.
        Some("response.completed" | "response.done") => v.pointer("/response/usage"),
        Some("message_start") => v.pointer("/message/usage"),
        _ => v.get("usage"),
    };
    match usage {
        None | Some(serde_json::Value::Null) => Reading::Absent,
        Some(u) => read_usage(u),
    }
}

/// The usage of one realtime response (SPEC §8): `Some` when `message`, a server-to-client text
/// message of a realtime session, is a `response.done` event; its `response.usage` gives
/// `input_tokens` and `output_tokens`. Any other message, or one that is not JSON, is `None`.
pub fn realtime_done(message: &[u8]) -> Option<Reading> {
    match realtime_event(message)? {
        RealtimeEvent::Done(r) => Some(r),
        RealtimeEvent::Created => None,
    }
}

/// The events of a realtime session that metering follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RealtimeEvent {
    /// `response.created`: a response began (charged its reservation if the session ends before
    /// its `response.done`).
    Created,
    /// `response.done`, with its usage.
    Done(Reading),
}

/// `message` as a [`RealtimeEvent`], if it is one.
pub fn realtime_event(message: &[u8]) -> Option<RealtimeEvent> {
    // Most messages are deltas: a substring search keeps them from being parsed.
    let done = memchr::memmem::find(message, b"response.done").is_some();
    if !done && memchr::memmem::find(message, b"response.created").is_none() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(message).ok()?;
    match v.get("type")?.as_str()? {
        "response.done" => Some(RealtimeEvent::Done(from_json(&v))),
        "response.created" => Some(RealtimeEvent::Created),
        _ => None,
    }
}

/// A token count: absent, or a whole number within [`MAX_FIGURE`].
fn tokens(v: Option<&serde_json::Value>) -> Result<Option<u64>, ()> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(n) => match n.as_u64() {
            Some(t) if t as f64 <= MAX_FIGURE => Ok(Some(t)),
            _ => Err(()),
        },
    }
}

/// One `usage` object, in any of the shapes [`from_json`] names.
fn read_usage(u: &serde_json::Value) -> Reading {
    let Some(u) = u.as_object() else {
        return Reading::Invalid;
    };
    let field = |names: &[&str]| -> Result<Option<u64>, ()> {
        let mut sum: Option<u64> = None;
        for n in names {
            if let Some(t) = tokens(u.get(*n))? {
                sum = Some(sum.unwrap_or(0).saturating_add(t));
            }
        }
        Ok(sum)
    };
    // Anthropic counts cache writes and reads apart from `input_tokens`; OpenAI's cached tokens
    // are a part of its `prompt_tokens`/`input_tokens` (in `*_details`), so they are not added.
    let prompt = field(&["prompt_tokens"]).and_then(|p| match p {
        Some(p) => Ok(Some(p)),
        None => field(&[
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ]),
    });
    let completion = field(&["completion_tokens"]).and_then(|c| match c {
        Some(c) => Ok(Some(c)),
        None => field(&["output_tokens"]),
    });
    let (Ok(prompt), Ok(completion)) = (prompt, completion) else {
        return Reading::Invalid;
    };
    let cost = match u.get("cost") {
        None | Some(serde_json::Value::Null) => None,
        Some(c) => match c.as_f64() {
            Some(c) if c.is_finite() && (0.0..=MAX_FIGURE).contains(&c) => Some(c),
            _ => return Reading::Invalid,
        },
    };
    match (prompt, completion) {
        (None, None) => Reading::Absent,
        (p, c) => Reading::Valid(Usage {
            prompt_tokens: p.unwrap_or(0),
            completion_tokens: c.unwrap_or(0),
            cost,
        }),
    }
}

/// USD per million input and output tokens, and where the figure came from (`cost_source`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// `prices` (the model's `[usage.prices]` entry) or `fallback` (`usage.fallback_price`).
    pub source: &'static str,
}

impl Price {
    /// The cost of `prompt` and `completion` tokens at this price.
    pub fn cost(&self, prompt: f64, completion: f64) -> f64 {
        (prompt * self.input + completion * self.output) / 1e6
    }
}

/// The `llm` fields of a `request` audit record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LlmRecord {
    pub model: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    /// `upstream`: the response carried usage; `none`: it did not; `invalid`: it carried usage
    /// the gateway does not believe.
    pub usage_source: &'static str,
    /// `upstream`, `prices`, `fallback`, or null when the cost is unknown.
    pub cost_source: Option<&'static str>,
}

impl LlmRecord {
    /// `price`: what the request is priced at when the upstream reports no cost of its own.
    pub fn new(model: Option<String>, reading: Reading, price: Option<Price>) -> LlmRecord {
        let usage_source = reading.source();
        match reading.usage() {
            None => LlmRecord {
                model,
                usage_source,
                ..LlmRecord::default()
            },
            Some(u) => {
                let (cost_usd, cost_source) = match (u.cost, price) {
                    (Some(c), _) => (Some(c), Some("upstream")),
                    (None, Some(p)) => (
                        Some(p.cost(u.prompt_tokens as f64, u.completion_tokens as f64)),
                        Some(p.source),
                    ),
                    (None, None) => (None, None),
                };
                LlmRecord {
                    model,
                    prompt_tokens: Some(u.prompt_tokens),
                    completion_tokens: Some(u.completion_tokens),
                    cost_usd,
                    usage_source,
                    cost_source,
                }
            }
        }
    }
}

/// What a response reported: its usage, and the model it names beside it (a request that named
/// none is priced by the response's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reported {
    pub reading: Reading,
    pub model: Option<String>,
}

impl Reported {
    /// Notes one parsed document: the last usage a stream reports wins (a `usage: null` in
    /// every chunk, as OpenAI sends with include_usage, changes nothing). An Anthropic
    /// `message_delta` carries the cumulative `output_tokens` (and, in newer versions, the input
    /// too): it updates what `message_start` reported rather than replacing it.
    fn note(&mut self, v: &serde_json::Value) {
        let delta = v.get("type").and_then(|t| t.as_str()) == Some("message_delta");
        let r = from_json(v);
        let r = match (delta, r, self.reading) {
            (true, Reading::Valid(d), Reading::Valid(mut started)) => {
                if let Some(u) = v.get("usage") {
                    if u.get("output_tokens").is_some() {
                        started.completion_tokens = d.completion_tokens;
                    }
                    if u.get("input_tokens").is_some() {
                        started.prompt_tokens = d.prompt_tokens;
                    }
                    if d.cost.is_some() {
                        started.cost = d.cost;
                    }
                }
                Reading::Valid(started)
            }
            (_, r, _) => r,
        };
        if r != Reading::Absent {
            self.reading = r;
            let model = v
                .get("model")
                .or_else(|| v.pointer("/response/model"))
                .or_else(|| v.pointer("/message/model"))
                .and_then(|m| m.as_str());
            if let Some(m) = model {
                self.model = Some(m.to_owned());
            }
        }
    }

    /// Notes one document that did not parse but names `usage`.
    fn unparsed(&mut self, raw: &[u8]) {
        if memchr::memmem::find(raw, b"\"usage\"").is_some() {
            self.reading = Reading::Invalid;
        }
    }
}

/// Where a tapped body leaves the usage it found, for the audit record.
pub type UsageSlot = Arc<Mutex<Reported>>;

enum Mode {
    Sse(Box<Scanner>),
    Json(Vec<u8>, bool),
}

/// True for the usage-only chunk that `stream_options.include_usage` makes an OpenAI-style
/// upstream send last: `"choices": []` and a `usage` object.
fn is_usage_only(v: &serde_json::Value) -> bool {
    v.get("choices")
        .and_then(|c| c.as_array())
        .is_some_and(|c| c.is_empty())
        && v.get("usage").is_some_and(|u| u.is_object())
}

pin_project_lite::pin_project! {
    /// A response body that notes the usage it carries. Frames pass on unchanged, except, when
    /// `strip` is set (the gateway itself asked for stream usage), the usage-only SSE event the
    /// client never asked for: then each event is passed on as soon as it is complete, and only
    /// that one is left out.
    pub struct UsageTap<B> {
        #[pin]
        inner: B,
        mode: Mode,
        found: Reported,
        slot: UsageSlot,
        strip: Option<Stripper>,
    }
}

impl<B> UsageTap<B> {
    pub fn new(inner: B, event_stream: bool, slot: UsageSlot) -> Self {
        UsageTap {
            inner,
            mode: if event_stream {
                Mode::Sse(Box::new(Scanner::new(MAX_PARSED)))
            } else {
                Mode::Json(Vec::new(), false)
            },
            found: Reported::default(),
            slot,
            strip: None,
        }
    }

    /// Leaves out the usage-only event (for streams where the gateway injected include_usage).
    pub fn strip_usage_event(mut self) -> Self {
        self.strip = Some(Stripper::default());
        self
    }
}

fn finish(mode: &mut Mode, found: &mut Reported, slot: &UsageSlot) {
    if let Mode::Json(buf, overflow) = mode
        && !*overflow
    {
        match serde_json::from_slice::<serde_json::Value>(buf) {
            Ok(v) => found.note(&v),
            Err(_) => found.unparsed(buf),
        }
    }
    if let Ok(mut s) = slot.lock() {
        *s = found.clone();
    }
}

/// Notes one complete event's usage, if it carries one; true when it is the usage-only event.
fn note_event(found: &mut Reported, event: &[u8]) -> bool {
    // Cheap pre-check: most events carry no usage at all.
    if memchr::memmem::find(event, b"\"usage\"").is_none() {
        return false;
    }
    match serde_json::from_slice::<serde_json::Value>(event) {
        Ok(v) => {
            found.note(&v);
            is_usage_only(&v)
        }
        Err(_) => {
            found.unparsed(event);
            false
        }
    }
}

/// Leaves the usage-only event out of a stream (see [`UsageTap::strip_usage_event`]): each block
/// up to a blank line is passed on as soon as it is complete, and only that one is dropped.
#[derive(Default)]
struct Stripper {
    /// Bytes of the event not yet complete.
    pending: Vec<u8>,
    /// When the last block ended in CR: whether an LF right after it (the rest of its CRLF) is
    /// to be emitted or dropped with it.
    carry: Option<bool>,
}

impl Stripper {
    /// What of `data` can go to the client now.
    fn filter(&mut self, scanner: &mut Scanner, found: &mut Reported, data: &[u8]) -> Vec<u8> {
        let mut emit = Vec::with_capacity(data.len() + self.pending.len());
        let mut ends = Vec::new();
        scanner.feed_blocks(data, |event, end| {
            let drop_it = event.is_some_and(|e| note_event(found, e));
            ends.push((end, drop_it));
        });
        let mut start = 0;
        for (end, drop_it) in ends {
            let mut block = &data[start..end];
            self.settle_lf(&mut block, &mut emit);
            if drop_it {
                self.pending.clear();
            } else {
                emit.append(&mut self.pending);
                emit.extend_from_slice(block);
            }
            self.carry = (data[end - 1] == b'\r').then_some(!drop_it);
            start = end;
        }
        let mut rest = &data[start..];
        if !rest.is_empty() {
            self.settle_lf(&mut rest, &mut emit);
        }
        self.pending.extend_from_slice(rest);
        // Bound the held-back bytes: an event this large passes on unfiltered.
        if self.pending.len() > MAX_PARSED {
            emit.append(&mut self.pending);
        }
        emit
    }

    /// The LF finishing a CRLF that ended the previous block belongs to that block.
    fn settle_lf(&mut self, block: &mut &[u8], emit: &mut Vec<u8>) {
        if self.pending.is_empty()
            && let Some(keep) = self.carry.take()
            && block.first() == Some(&b'\n')
        {
            if keep {
                emit.push(b'\n');
            }
            *block = &block[1..];
        }
    }
}

impl<B: Body<Data = Bytes>> Body for UsageTap<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        loop {
            let frame = match inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    finish(this.mode, this.found, this.slot);
                    if let Some(s) = this.strip
                        && !s.pending.is_empty()
                    {
                        // An unterminated last event: pass it on as it came.
                        let rest = std::mem::take(&mut s.pending);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                    return Poll::Ready(None);
                }
                other => return other,
            };
            let Some(data) = frame.data_ref() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            let mut out: Option<Vec<u8>> = None;
            match this.mode {
                Mode::Sse(scanner) => {
                    let before = this.found.reading;
                    match this.strip {
                        Some(s) => out = Some(s.filter(scanner, this.found, data)),
                        None => scanner.feed(data, |event, _| {
                            note_event(this.found, event);
                        }),
                    }
                    // Published as soon as seen: a stream cut or abandoned after its usage event
                    // is charged that usage, not its reservation.
                    if this.found.reading != before
                        && let Ok(mut s) = this.slot.lock()
                    {
                        *s = this.found.clone();
                    }
                }
                Mode::Json(buf, overflow) => {
                    if buf.len() + data.len() > MAX_PARSED {
                        *overflow = true;
                        *buf = Vec::new();
                    } else if !*overflow {
                        buf.extend_from_slice(data);
                    }
                }
            }
            // A body of known length may never be polled to `None`: its last frame ends it.
            let ended = inner.is_end_stream();
            if ended {
                finish(this.mode, this.found, this.slot);
            }
            let Some(mut bytes) = out else {
                return Poll::Ready(Some(Ok(frame)));
            };
            if ended && let Some(s) = this.strip {
                bytes.append(&mut s.pending);
            }
            if bytes.is_empty() && !ended {
                continue;
            }
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.strip.as_ref().is_none_or(|s| s.pending.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        if self.strip.is_some() {
            // The stripped body is shorter than the upstream's: no exact length to promise.
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    async fn tap(chunks: Vec<&'static [u8]>, sse: bool) -> (Vec<u8>, Option<Usage>) {
        let slot: UsageSlot = Arc::default();
        let s = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let body = UsageTap::new(StreamBody::new(s), sse, slot.clone());
        let out = body.collect().await.unwrap().to_bytes().to_vec();
        let u = slot.lock().unwrap().reading.usage();
        (out, u)
    }

    #[tokio::test]
    async fn json_and_sse_usage_pass_bytes_through_untouched() {
        let json: &[u8] = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"cost":0.0021}}"#;
        let (out, u) = tap(vec![&json[..20], &json[20..]], false).await;
        assert_eq!(out, json);
        assert_eq!(
            u,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 30,
                cost: Some(0.0021)
            })
        );

        let sse: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
        let (out, u) = tap(vec![&sse[..30], &sse[30..70], &sse[70..]], true).await;
        assert_eq!(out, sse);
        assert_eq!(
            u,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                cost: None
            })
        );

        let (_, u) = tap(vec![b"data: {\"choices\":[]}\n\n"], true).await;
        assert_eq!(u, None);
        let (_, u) = tap(vec![b"not json"], false).await;
        assert_eq!(u, None);
    }

    async fn strip(chunks: Vec<&[u8]>) -> (Vec<u8>, Option<Usage>) {
        let slot: UsageSlot = Arc::default();
        let owned: Vec<Bytes> = chunks.into_iter().map(Bytes::copy_from_slice).collect();
        let s = futures_util::stream::iter(
            owned
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
        );
        let body = UsageTap::new(StreamBody::new(s), true, slot.clone()).strip_usage_event();
        let out = body.collect().await.unwrap().to_bytes().to_vec();
        let u = slot.lock().unwrap().reading.usage();
        (out, u)
    }

    #[tokio::test]
    async fn the_injected_usage_event_is_removed_at_every_split_point() {
        for (with, without) in [
            (
                &b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n: ping\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n"[..],
                &b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n: ping\n\ndata: [DONE]\n\n"[..],
            ),
            (
                &b"data: {\"choices\":[{\"delta\":{}}]}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\r\n\r\ndata: [DONE]\r\n\r\n"[..],
                &b"data: {\"choices\":[{\"delta\":{}}]}\r\n\r\ndata: [DONE]\r\n\r\n"[..],
            ),
        ] {
            for i in 0..=with.len() {
                let (out, u) = strip(vec![&with[..i], &with[i..]]).await;
                assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(without), "split at {i}");
                assert_eq!(u, Some(Usage { prompt_tokens: 5, completion_tokens: 7, cost: None }), "split at {i}");
            }
        }
    }

    /// Recorded answers of each API shape (written from the providers' API references), each
    /// with the usage it must be read as, at every split point of its bytes.
    #[tokio::test]
    async fn every_api_shape_is_metered_at_every_split_point() {
        let fixture = |name: &str| {
            let path = format!("{}/tests/fixtures/usage/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let u = |p, c, cost| Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cost,
        };
        for (name, sse, want, model) in [
            (
                "chat.sse",
                true,
                u(12, 3, Some(0.0000063)),
                "openai/gpt-4o-mini",
            ),
            (
                "completions.json",
                false,
                u(5, 7, None),
                "gpt-3.5-turbo-instruct",
            ),
            (
                "embeddings.json",
                false,
                u(8, 0, None),
                "text-embedding-3-small",
            ),
            (
                "responses.json",
                false,
                u(36, 87, None),
                "gpt-4.1-2025-04-14",
            ),
            ("responses.sse", true, u(37, 11, None), "gpt-4.1-2025-04-14"),
            // Cache writes and reads count as prompt: 2095 + 100 + 50.
            (
                "messages.json",
                false,
                u(2245, 503, None),
                "claude-sonnet-4-20250514",
            ),
            // message_start's input (25 + 10 cached) and message_delta's cumulative output.
            (
                "messages.sse",
                true,
                u(35, 15, None),
                "claude-sonnet-4-20250514",
            ),
        ] {
            let bytes = fixture(name);
            for i in 0..=bytes.len() {
                let slot: UsageSlot = Arc::default();
                let chunks = [
                    Bytes::copy_from_slice(&bytes[..i]),
                    Bytes::copy_from_slice(&bytes[i..]),
                ];
                let s = futures_util::stream::iter(
                    chunks
                        .into_iter()
                        .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
                );
                let out = UsageTap::new(StreamBody::new(s), sse, slot.clone())
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(out, bytes, "{name}: bytes changed (split at {i})");
                let got = slot.lock().unwrap().clone();
                assert_eq!(got.reading, Reading::Valid(want), "{name} split at {i}");
                assert_eq!(got.model.as_deref(), Some(model), "{name} split at {i}");
            }
        }
    }

    #[test]
    fn untrusted_figures_in_any_shape_are_invalid() {
        let read = |s: &str| from_json(&serde_json::from_str(s).unwrap());
        for bad in [
            r#"{"usage":{"prompt_tokens":-5,"completion_tokens":3}}"#,
            r#"{"usage":{"input_tokens":2000000000,"output_tokens":3}}"#,
            r#"{"usage":{"input_tokens":5,"output_tokens":1.5}}"#,
            r#"{"usage":{"input_tokens":5,"cache_read_input_tokens":-1}}"#,
            r#"{"usage":{"prompt_tokens":5,"cost":-1e9}}"#,
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":"5"}}}"#,
            r#"{"usage":"lots"}"#,
        ] {
            assert_eq!(read(bad), Reading::Invalid, "{bad}");
        }
        for absent in [
            r#"{"usage":null}"#,
            r#"{"usage":{}}"#,
            r#"{"type":"response.created","response":{"usage":null}}"#,
        ] {
            assert_eq!(read(absent), Reading::Absent, "{absent}");
        }
    }
}
