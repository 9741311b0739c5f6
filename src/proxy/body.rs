//! Body types and the one wrapper every streamed body passes through.
//!
//! [`Streamed`] counts bytes, cuts a body that is silent for longer than its idle timeout
//! (`stream_idle_timeout`: an SSE stream or an upload that stalls must not pin a connection
//! forever), enforces a byte cap mid-stream (a chunked upload has no Content-Length to check up
//! front), and tells its [`OnEnd`] guard how the body ended: read to its end, failed, cut. A
//! guard dropped without being told is a body its reader abandoned (the client went away).
//! Nothing is buffered: each frame is passed on as it arrives.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn StdError + Send + Sync>;
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: Bytes) -> ResponseBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Why the gateway cut a body. Found again in an error's source chain to pick the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// No frame for `stream_idle_timeout` (or the body read timeout).
    Idle,
    /// The body crossed its byte cap.
    TooLarge,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyError::Idle => "body idle timeout",
            BodyError::TooLarge => "body over its size cap",
        })
    }
}

impl StdError for BodyError {}

/// The client's request body failed to read (malformed chunk, connection cut): the request is
/// the client's fault, not the upstream's.
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client body: {}", self.0)
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// What in an error's source chain says whose fault a failed exchange was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Cut(BodyError),
    ClientBody,
}

/// Looks for a [`BodyError`] or [`ClientBodyError`] in `err`'s source chain.
pub fn find_body_error(err: &(dyn StdError + 'static)) -> Option<Cause> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(b) = e.downcast_ref::<BodyError>() {
            return Some(Cause::Cut(*b));
        }
        if e.is::<ClientBodyError>() {
            return Some(Cause::ClientBody);
        }
        cur = e.source();
    }
    None
}

/// Whether the HTTP layer is keeping up with a response (SPEC §3.4 "Slow readers"): set when the
/// layer was handed something (the head, a frame) it has not come back for, cleared when it asks
/// for more. hyper asks a body for its next frame only once it could write the last one (HTTP/1.1:
/// the socket took it; HTTP/2: the client's window allowed it), so a mark that stays set for
/// `send_timeout` is a client that stopped reading. The connection's watchdog reads the mark.
pub struct SendClock {
    /// Milliseconds since `epoch` when the mark was set, plus one; 0 when clear.
    pub pending_since: Arc<AtomicU64>,
    pub epoch: Instant,
}

impl SendClock {
    fn handed(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.pending_since.store(ms, Ordering::Relaxed);
    }

    fn polled(&self) {
        self.pending_since.store(0, Ordering::Relaxed);
    }
}

/// How a [`Streamed`] body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Read to its end.
    Complete,
    /// The inner body failed (an upstream reset mid-stream).
    Failed,
    /// Cut by the gateway: silent too long, or over its cap.
    Cut(BodyError),
}

/// Told once how a body ended. Dropped untold: the body was abandoned by its reader.
pub trait OnEnd: Send {
    fn ended(self: Box<Self>, how: Ended);
}

pin_project_lite::pin_project! {
    pub struct Streamed<B> {
        #[pin]
        inner: B,
        idle: Duration,
        sleep: Option<Pin<Box<Sleep>>>,
        bytes: Arc<AtomicU64>,
        limit: u64,
        guard: Option<Box<dyn OnEnd>>,
        done: bool,
        finished: Option<Arc<AtomicBool>>,
        clock: Option<SendClock>,
    }
}

impl<B> Streamed<B> {
    /// `limit` is the byte cap (`u64::MAX` for none); `guard` is dropped when the body ends.
    pub fn new(
        inner: B,
        idle: Duration,
        bytes: Arc<AtomicU64>,
        limit: u64,
        guard: Option<Box<dyn OnEnd>>,
    ) -> Self {
        Streamed {
            inner,
            idle,
            sleep: None,
            bytes,
            limit,
            guard,
            done: false,
            finished: None,
            clock: None,
        }
    }

    /// Marks the response as handed to the HTTP layer now, and keeps `clock` as the body is read.
    pub fn send_clock(mut self, clock: SendClock) -> Self {
        clock.handed();
        self.clock = Some(clock);
        self
    }

    /// Sets `flag` once the body has been read to its end (a request body that never finishes
    /// makes a timeout the client's fault, 408, not the upstream's, 504).
    pub fn finished_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.finished = Some(flag);
        self
    }
}

fn end(guard: &mut Option<Box<dyn OnEnd>>, how: Ended) {
    if let Some(g) = guard.take() {
        g.ended(how);
    }
}

impl<B> Body for Streamed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(c) = this.clock {
            c.polled();
        }
        if *this.done {
            return Poll::Ready(None);
        }
        let mut inner = this.inner;
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if total > *this.limit {
                        *this.done = true;
                        end(this.guard, Ended::Cut(BodyError::TooLarge));
                        return Poll::Ready(Some(Err(Box::new(BodyError::TooLarge))));
                    }
                }
                if let Some(s) = this.sleep.as_mut() {
                    s.as_mut().reset(Instant::now() + *this.idle);
                }
                // A body of known length may never be polled to `None`: its last frame ends it.
                if inner.is_end_stream() {
                    if let Some(f) = this.finished {
                        f.store(true, Ordering::Relaxed);
                    }
                    end(this.guard, Ended::Complete);
                } else if let Some(c) = this.clock {
                    c.handed();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                *this.done = true;
                end(this.guard, Ended::Failed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                *this.done = true;
                end(this.guard, Ended::Complete);
                if let Some(f) = this.finished {
                    f.store(true, Ordering::Relaxed);
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = *this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if sleep.as_mut().poll(cx).is_ready() {
                    *this.done = true;
                    end(this.guard, Ended::Cut(BodyError::Idle));
                    return Poll::Ready(Some(Err(Box::new(BodyError::Idle))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
