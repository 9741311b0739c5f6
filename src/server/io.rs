//! The client connection as hyper sees it: the accepted stream (plain or TLS) behind hyper's IO
//! traits, with two additions hyper-util's `TokioIo` lacks.
//!
//! - **Bytes read ahead** are handed to hyper first: the first bytes of a plain connection, read
//!   to tell an HTTP/2 preface from HTTP/1.1, and what a parked connection had buffered (see
//!   `park` in the parent module).
//! - **What the connection's writes are doing**, for parking: whether the last write waited on
//!   the client (bytes still in hyper's write buffer), and whether hyper asked to close. While
//!   a park is under way, hyper's close of an idle connection is not passed on to the socket,
//!   so the socket can be kept without hyper's buffers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::rt::ReadBufCursor;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// The last write waited on the client: hyper still holds bytes it could not send.
const WRITE_BLOCKED: u8 = 1;
/// hyper closed (or began closing) the connection itself.
const SHUT: u8 = 2;
/// A park is under way: hyper's close is kept from the socket.
const PARKING: u8 = 4;
/// Something was written after the park began: hyper was not idle after all.
const WROTE_PARKING: u8 = 8;

/// What the connection's IO did, shared by the IO (in hyper) and the connection's task.
#[derive(Default)]
pub(crate) struct IoState(AtomicU8);

impl IoState {
    fn set(&self, bit: u8, on: bool) {
        let old = self.0.load(Ordering::Relaxed);
        let new = if on { old | bit } else { old & !bit };
        if new != old {
            self.0.store(new, Ordering::Relaxed);
        }
    }

    fn has(&self, bit: u8) -> bool {
        self.0.load(Ordering::Relaxed) & bit != 0
    }

    /// Nothing of a response is waiting on the client and hyper has not begun to close: the
    /// connection may be parked if no request is in flight.
    pub(crate) fn quiet(&self) -> bool {
        !self.has(WRITE_BLOCKED | SHUT)
    }

    pub(crate) fn begin_park(&self) {
        self.set(PARKING, true);
        self.set(WROTE_PARKING, false);
    }

    /// Ends a park begun with `begin_park`: true when hyper wrote nothing after it began (it was
    /// idle, at a message boundary, and its close was kept from the socket).
    pub(crate) fn end_park(&self) -> bool {
        let clean = !self.has(WROTE_PARKING);
        self.set(PARKING | WROTE_PARKING | SHUT, false);
        clean
    }

    fn wrote(&self, blocked: bool) {
        let old = self.0.load(Ordering::Relaxed);
        let mut new = if blocked {
            old | WRITE_BLOCKED
        } else {
            old & !WRITE_BLOCKED
        };
        if old & PARKING != 0 {
            new |= WROTE_PARKING;
        }
        if new != old {
            self.0.store(new, Ordering::Relaxed);
        }
    }
}

/// The client stream behind hyper's IO traits (see the module's comment).
pub(crate) struct ClientIo<S> {
    io: TokioIo<S>,
    ahead: Bytes,
    state: Arc<IoState>,
}

impl<S> ClientIo<S> {
    pub(crate) fn new(stream: S, ahead: Bytes, state: Arc<IoState>) -> ClientIo<S> {
        ClientIo {
            io: TokioIo::new(stream),
            ahead,
            state,
        }
    }

    /// Puts `bytes` before whatever is still to be handed to hyper.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.ahead = if self.ahead.is_empty() {
            bytes
        } else {
            let mut b = bytes::BytesMut::with_capacity(bytes.len() + self.ahead.len());
            b.extend_from_slice(&bytes);
            b.extend_from_slice(&self.ahead);
            b.freeze()
        };
    }

    pub(crate) fn has_ahead(&self) -> bool {
        !self.ahead.is_empty()
    }

    pub(crate) fn stream(&mut self) -> &mut S {
        self.io.inner_mut()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> hyper::rt::Read for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                // An emptied slice still holds its allocation (hyper's old read buffer).
                this.ahead = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> hyper::rt::Write for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.state.wrote(r.is_pending());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.state.wrote(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        // A flush is not a write: it only says whether what was written has left.
        this.state.set(WRITE_BLOCKED, r.is_pending());
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.set(SHUT, true);
        if this.state.has(PARKING) && !this.state.has(WROTE_PARKING) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
