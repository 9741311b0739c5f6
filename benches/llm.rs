//! Criterion benchmarks of SPEC §7's own hot paths (issue 7): scanning an SSE stream for usage
//! as it passes (off, on, and on with the injected usage event removed), the ledger's batched
//! insert rate, and (§8) watching a realtime session's frames for `response.done`. Run: `cargo bench --bench llm`. The end-to-end cost of scanning through the
//! gateway is a row of `cargo bench --bench load`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use portcullis::llm::ledger::{self, Ledger, Row};
use portcullis::llm::usage::{UsageSlot, UsageTap};

const EVENTS: usize = 1000;

/// A recorded-style OpenAI stream: `EVENTS` content chunks, the usage-only chunk, `[DONE]`; one
/// event per frame, as an upstream flushes them.
fn stream() -> Vec<Bytes> {
    let mut out: Vec<Bytes> = (0..EVENTS)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"created\":1732377600,\"model\":\"openai/gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}},\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect();
    out.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":1000,\"total_tokens\":2200,\"cost\":0.00078}}\n\n"));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>;

fn body(chunks: &[Bytes]) -> StreamBody<Frames> {
    let frames: Vec<_> = chunks.iter().map(|c| Ok(Frame::data(c.clone()))).collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

/// Polls a body to its end, counting bytes (no copy), as the server would when writing it out.
async fn drain<B: http_body::Body<Data = Bytes> + Unpin>(mut b: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut n = 0;
    while let Some(f) = b.frame().await {
        n += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    n
}

fn sse_scan(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let chunks = stream();
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    let mut g = c.benchmark_group("sse_1000_events");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("scan_off", |b| b.iter(|| rt.block_on(drain(body(&chunks)))));
    g.bench_function("scan_on", |b| {
        b.iter(|| {
            let slot = UsageSlot::default();
            let n = rt.block_on(drain(UsageTap::new(body(&chunks), true, slot.clone())));
            assert!(slot.lock().unwrap().reading.usage().is_some());
            n
        })
    });
    g.bench_function("scan_on_strip_injected_usage", |b| {
        b.iter(|| {
            let slot = UsageSlot::default();
            let tap = UsageTap::new(body(&chunks), true, slot.clone()).strip_usage_event();
            let n = rt.block_on(drain(tap));
            assert!(slot.lock().unwrap().reading.usage().is_some());
            n
        })
    });
    g.finish();
}

fn row(i: u64) -> Row {
    Row {
        ts_ms: 1_763_900_000_000 + i as i64,
        request_id: format!("01JDQ5Z3W4N7X8Y9ZABCDEF{i:03}"),
        key_id: Some("phone".to_owned()),
        user: None,
        route: "bridge".to_owned(),
        model: Some("openai/gpt-4o-mini".to_owned()),
        prompt_tokens: Some(1200),
        completion_tokens: Some(300),
        cost_usd: Some(0.00036),
        usage_source: "upstream",
        charged_tokens: 1500,
        charged_cost: 0.00036,
    }
}

/// Rows queued by the request path and committed by the writer thread in batches, timed from the
/// first row queued to the last committed (`flush`).
fn ledger_insert(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let conn = ledger::open(&path).unwrap();
    let l = Ledger::start(conn, path, Duration::from_secs(365 * 86400));
    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.bench_function("insert_batched", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters {
                l.record(row(i));
                // The queue holds 65,536 rows; a bench outrunning the disk must wait, not drop.
                if i % 32_768 == 32_767 {
                    l.flush();
                }
            }
            l.flush();
            t.elapsed()
        })
    });
    g.finish();
}

/// An unmasked server text frame (RFC 6455), as a realtime upstream sends them.
fn ws_text(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// SPEC §8 realtime sessions: the watcher of a tunnel's upstream side, over 1,000 frames of a
/// voice response (`response.audio.delta`, 2 KiB of base64 audio each, as OpenAI sends them) and
/// its `response.done`, fed in 16 KiB reads as the tunnel reads them. Per frame: the scanner,
/// the copy into the message buffer and the `response.done` check.
fn realtime_frames(c: &mut Criterion) {
    let audio = "A".repeat(2048);
    let mut stream = Vec::new();
    for i in 0..EVENTS {
        stream.extend(ws_text(
            format!(
                r#"{{"type":"response.audio.delta","event_id":"event_{i}","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"{audio}"}}"#
            )
            .as_bytes(),
        ));
    }
    stream.extend(ws_text(br#"{"type":"response.done","event_id":"event_done","response":{"id":"resp_1","status":"completed","usage":{"total_tokens":1300,"input_tokens":300,"output_tokens":1000}}}"#));
    let frames = EVENTS as u64 + 1;
    let mut g = c.benchmark_group("realtime_1001_frames");
    g.throughput(Throughput::Elements(frames));
    g.bench_function("scan", |b| {
        b.iter(|| {
            let mut scanner = portcullis::proxy::frames::Scanner::default();
            let mut done = 0;
            for chunk in stream.chunks(16 << 10) {
                scanner.feed(chunk, |m| {
                    if portcullis::llm::usage::realtime_done(m).is_some() {
                        done += 1;
                    }
                    portcullis::proxy::frames::Flow::Continue
                });
            }
            assert_eq!(done, 1);
        })
    });
    g.finish();
}

criterion_group!(benches, sse_scan, ledger_insert, realtime_frames);
criterion_main!(benches);
