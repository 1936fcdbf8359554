//! The body of a request read by Tern's HTTP/1.1 server.
//!
//! Most requests need no machinery: no body, or a body that arrived with the head. A
//! body still on the wire is read by the connection's task, which owns the socket, and
//! handed over through a one-slot [`Pipe`]: the reader asks (which is also when an
//! `Expect: 100-continue` client is told to go ahead), the connection fills the slot.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client closed the connection before the request body ended")]
    Incomplete,
    #[error("malformed request body: {0}")]
    Framing(#[from] super::chunked::ChunkError),
    #[error("reading the request body: {0}")]
    Io(#[from] std::io::Error),
    #[error("request body not read in time")]
    Timeout,
}

pub struct Body {
    kind: Kind,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Streaming { pipe: Arc<Pipe>, hint: SizeHint },
}

impl Body {
    pub fn empty() -> Self {
        Body { kind: Kind::Empty }
    }

    pub fn full(data: Bytes) -> Self {
        Body {
            kind: Kind::Full(Some(data)),
        }
    }

    /// The whole body when it is already here: `Some(None)` for none, `None` while
    /// (part of) it is still on the wire.
    pub fn complete(&self) -> Option<Option<&Bytes>> {
        match &self.kind {
            Kind::Empty | Kind::Full(None) => Some(None),
            Kind::Full(Some(d)) => Some(Some(d)),
            Kind::Streaming { .. } => None,
        }
    }

    /// A body still to be read by the connection; `length` when declared.
    pub(super) fn streaming(length: Option<u64>) -> (Self, Arc<Pipe>) {
        let pipe = Arc::new(Pipe::default());
        let hint = length.map_or_else(SizeHint::new, SizeHint::with_exact);
        let body = Body {
            kind: Kind::Streaming {
                pipe: pipe.clone(),
                hint,
            },
        };
        (body, pipe)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Streaming { pipe, .. } => pipe.poll_take(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty | Kind::Full(None) => true,
            Kind::Full(Some(_)) => false,
            Kind::Streaming { pipe, .. } => pipe.lock().is_drained(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty | Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Streaming { hint, .. } => *hint,
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Kind::Streaming { pipe, .. } = &self.kind {
            let mut s = pipe.lock();
            s.reader_gone = true;
            wake(&mut s.writer);
        }
    }
}

/// One frame in flight between the connection (writer) and the body (reader).
#[derive(Default)]
pub(super) struct Pipe {
    state: Mutex<PipeState>,
}

#[derive(Default)]
struct PipeState {
    slot: Option<Result<Frame<Bytes>, BodyError>>,
    /// The writer sent its last frame.
    ended: bool,
    /// The reader has asked for data at least once.
    asked: bool,
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl PipeState {
    fn is_drained(&self) -> bool {
        self.slot.is_none() && self.ended
    }
}

/// What the connection may do next with the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// The slot is free and the reader has asked: read and send a frame.
    Frame,
    /// The body was dropped before its end; what remains is unread.
    Gone,
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl Pipe {
    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut s = self.lock();
        if let Some(item) = s.slot.take() {
            wake(&mut s.writer);
            return Poll::Ready(Some(item));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        if !s.asked {
            s.asked = true;
            wake(&mut s.writer);
        }
        park(&mut s.reader, cx);
        Poll::Pending
    }

    /// Whether the connection should produce the next frame now.
    pub(super) fn poll_want(&self, cx: &mut Context<'_>) -> Poll<Want> {
        let mut s = self.lock();
        if s.reader_gone {
            return Poll::Ready(Want::Gone);
        }
        if s.asked && s.slot.is_none() {
            return Poll::Ready(Want::Frame);
        }
        park(&mut s.writer, cx);
        Poll::Pending
    }

    pub(super) fn send(&self, item: Result<Frame<Bytes>, BodyError>, last: bool) {
        let mut s = self.lock();
        s.slot = Some(item);
        s.ended |= last;
        wake(&mut s.reader);
    }

    /// The body ended with nothing more to send (after its last frame was taken).
    pub(super) fn finish(&self) {
        let mut s = self.lock();
        s.ended = true;
        wake(&mut s.reader);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn frames_flow_only_when_asked_for() {
        let (body, pipe) = Body::streaming(Some(6));
        let waker = futures_noop();
        let mut cx = Context::from_waker(&waker);
        // Nobody asked yet: an Expect: 100-continue client is not told to send.
        assert!(pipe.poll_want(&mut cx).is_pending());
        let reader = tokio::spawn(async move { body.collect().await.map(|b| b.to_bytes()) });
        tokio::task::yield_now().await;
        let want = std::future::poll_fn(|cx| pipe.poll_want(cx)).await;
        assert_eq!(want, Want::Frame);
        pipe.send(Ok(Frame::data(Bytes::from_static(b"abc"))), false);
        assert_eq!(
            std::future::poll_fn(|cx| pipe.poll_want(cx)).await,
            Want::Frame
        );
        pipe.send(Ok(Frame::data(Bytes::from_static(b"def"))), true);
        assert_eq!(reader.await.unwrap().unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn a_dropped_body_is_reported() {
        let (body, pipe) = Body::streaming(None);
        drop(body);
        assert_eq!(
            std::future::poll_fn(|cx| pipe.poll_want(cx)).await,
            Want::Gone
        );
    }

    fn futures_noop() -> Waker {
        Waker::noop().clone()
    }
}
