//! Bodies the proxy passes along. Enums rather than boxed trait objects: no allocation per
//! request, and streams pass through untouched (trailers included).
//!
//! - [`ProxyBody`], toward the client: an upstream's streaming response (holding the
//!   backend's request-limit slot until it ends), or a small local one for errors.
//! - [`ClientBody`], from the client: read by Tern's HTTP/1.1 server or by hyper's
//!   HTTP/2 server.
//! - [`RequestBody`], toward an upstream: the client's stream, a buffered copy that a
//!   retry can replay, or what was read while trying to buffer followed by the rest.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::h1::{RawHead, RawHeaders};
use crate::policy::concurrency::Permit;
use crate::policy::limits::Slot;
use crate::upstream::pool::{PooledBody, UpstreamBodyError};

/// A response's body as the proxy hands it back.
#[expect(
    clippy::large_enum_variant,
    reason = "the large variant is every proxied response's: boxing it would allocate per request"
)]
pub enum ProxyBody {
    /// With what the request holds until its response body ends or is dropped.
    Upstream(PooledBody, Held),
    Local(Option<Bytes>),
}

/// What a request holds while its response streams: the backend's `maxRequests` slot and
/// its concurrency permits (backend, route), so that limits count whole exchanges.
#[derive(Default)]
pub struct Held {
    pub slot: Option<Slot>,
    /// Backend, route. (Not boxed: a permit is one pointer, and a box would be an
    /// allocation per request.)
    pub permits: [Option<Permit>; 2],
}

impl Held {
    /// Feeds the response (failed or not; its headers came at `at`) to adaptive limits.
    /// `started`: when each permit was granted.
    pub fn sample(
        &self,
        started: &[tokio::time::Instant; 2],
        failed: bool,
        at: tokio::time::Instant,
    ) {
        for (p, &s) in self.permits.iter().zip(started) {
            if let Some(p) = p {
                p.sample(s, failed, at);
            }
        }
    }
}

impl ProxyBody {
    pub fn local(bytes: Bytes) -> Self {
        ProxyBody::Local(Some(bytes))
    }

    pub fn empty() -> Self {
        ProxyBody::Local(None)
    }
}

impl RawHead for ProxyBody {
    fn raw_slot(&mut self) -> Option<&mut Option<RawHeaders>> {
        match self {
            ProxyBody::Upstream(b, _) => b.raw_slot(),
            ProxyBody::Local(_) => None,
        }
    }
}

/// A response's headers, complete: lines an upstream's head kept as sent (see
/// [`RawHeaders`]) are parsed into the map first. Whatever reads or changes the headers
/// of a response that may have come from an upstream goes through here.
pub fn full_headers<B: RawHead>(resp: &mut Response<B>) -> &mut HeaderMap {
    if let Some(raw) = resp.body_mut().take_raw_headers() {
        raw.into_map(resp.headers_mut());
    }
    resp.headers_mut()
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b, held) => {
                let polled = Pin::new(b).poll_frame(cx);
                if matches!(polled, Poll::Ready(None)) {
                    *held = Held::default();
                }
                polled
            }
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b, _) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b, _) => b.size_hint(),
            ProxyBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Local(None) => SizeHint::with_exact(0),
        }
    }
}

/// A request body as the client sends it.
pub enum ClientBody {
    H1(crate::h1::Body),
    H2(Incoming),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error(transparent)]
    H1(#[from] crate::h1::BodyError),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

pub enum RequestBody {
    Stream(ClientBody),
    /// A complete body held in memory: data, then trailers.
    Buffered {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// The part read before the body proved too large to buffer, then the rest.
    Prefixed {
        prefix: Option<Bytes>,
        rest: ClientBody,
    },
}

impl RequestBody {
    /// A complete, empty body.
    pub const EMPTY: RequestBody = RequestBody::Buffered {
        data: None,
        trailers: None,
    };
}

/// A copy of `req`, whose body is buffered or empty (any other body copies as empty).
/// Extensions are not copied.
pub fn copy_complete(req: &Request<RequestBody>) -> Request<RequestBody> {
    let body = match req.body() {
        RequestBody::Buffered { data, trailers } => RequestBody::Buffered {
            data: data.clone(),
            trailers: trailers.clone(),
        },
        _ => RequestBody::EMPTY,
    };
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            RequestBody::Stream(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Buffered { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            RequestBody::Prefixed { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(b) => b.is_end_stream(),
            RequestBody::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            RequestBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(b) => b.size_hint(),
            RequestBody::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + p);
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper + p);
                }
                hint
            }
        }
    }
}
