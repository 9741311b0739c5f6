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

/// Reads `usage` from one JSON document, if it has a usable one.
pub fn from_json(v: &serde_json::Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let prompt = u.get("prompt_tokens")?.as_u64()?;
    let completion = u
        .get("completion_tokens")
        .and_then(|c| c.as_u64())
        .unwrap_or(0);
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cost: u.get("cost").and_then(|c| c.as_f64()),
    })
}

/// The `llm` fields of a `request` audit record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LlmRecord {
    pub model: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    /// `upstream`: the response carried usage; `none`: it did not.
    pub usage_source: &'static str,
    /// `upstream`, or null when the cost is unknown.
    pub cost_source: Option<&'static str>,
}

impl LlmRecord {
    pub fn new(model: Option<String>, usage: Option<Usage>) -> LlmRecord {
        match usage {
            None => LlmRecord {
                model,
                usage_source: "none",
                ..LlmRecord::default()
            },
            Some(u) => LlmRecord {
                model,
                prompt_tokens: Some(u.prompt_tokens),
                completion_tokens: Some(u.completion_tokens),
                cost_usd: u.cost,
                usage_source: "upstream",
                cost_source: u.cost.map(|_| "upstream"),
            },
        }
    }
}

/// Where a tapped body leaves the usage it found, for the audit record.
pub type UsageSlot = Arc<Mutex<Option<Usage>>>;

enum Mode {
    Sse(Box<Scanner>),
    Json(Vec<u8>, bool),
}

pin_project_lite::pin_project! {
    /// A response body that passes every frame on unchanged and notes the usage it carries.
    pub struct UsageTap<B> {
        #[pin]
        inner: B,
        mode: Mode,
        found: Option<Usage>,
        slot: UsageSlot,
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
            found: None,
            slot,
        }
    }
}

fn finish(mode: &mut Mode, found: &mut Option<Usage>, slot: &UsageSlot) {
    if let Mode::Json(buf, overflow) = mode
        && !*overflow
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(buf)
    {
        *found = from_json(&v);
    }
    if let Ok(mut s) = slot.lock() {
        *s = *found;
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
        let r = inner.as_mut().poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    match this.mode {
                        Mode::Sse(scanner) => {
                            let found = &mut *this.found;
                            scanner.feed(data, |event, _| {
                                // Cheap pre-check: most events carry no usage at all.
                                if event.windows(7).any(|w| w == b"\"usage\"")
                                    && let Ok(v) =
                                        serde_json::from_slice::<serde_json::Value>(event)
                                    && let Some(u) = from_json(&v)
                                {
                                    *found = Some(u);
                                }
                            });
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
                }
                // A body of known length may never be polled to `None`: its last frame ends it.
                if inner.is_end_stream() {
                    finish(this.mode, this.found, this.slot);
                }
            }
            Poll::Ready(None) => finish(this.mode, this.found, this.slot),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    async fn tap(chunks: Vec<&'static [u8]>, sse: bool) -> (Vec<u8>, Option<Usage>) {
        let slot: UsageSlot = Arc::default();
        let s = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let body = UsageTap::new(StreamBody::new(s), sse, slot.clone());
        let out = body.collect().await.unwrap().to_bytes().to_vec();
        let u = *slot.lock().unwrap();
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
        let _ = Full::new(Bytes::new());
    }
}
