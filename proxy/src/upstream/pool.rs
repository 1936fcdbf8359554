//! Upstream connections per endpoint, owned by one worker (no cross-thread contention).
//!
//! HTTP/1.1: a stack of idle keep-alive connections per endpoint; a connection goes back
//! when its response body has been read to the end. HTTP/2: one multiplexed connection
//! per endpoint, shared by all requests of the worker, replaced when it closes.

use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Admission, UpstreamError, h1, h2};
use crate::body::RequestBody;
use crate::metrics::Direction;
use crate::policy::limits::{Limit, Slot};
use crate::state::Shared;
use crate::tls::Alpn;
use tern_config::snapshot::EndpointIdentity;

pub type H1Sender = http1::SendRequest<RequestBody>;

/// An HTTP/1.1 connection as the pool holds it: its sender, and the backend's connection
/// slot it occupies (held here rather than by the connection task, so that evicting an
/// idle connection frees its slot at once).
pub struct H1Conn {
    pub sender: H1Sender,
    /// Held, never read: dropped with the connection.
    _slot: Option<Slot>,
}
/// A shared HTTP/2 connection and, over mTLS, the identity its server was verified as.
type SharedH2 = (h2::Sender, Option<EndpointIdentity>);
/// An HTTP/1.1 connection's task, over plain TCP or mTLS.
type H1Task = Pin<Box<dyn std::future::Future<Output = Result<(), hyper::Error>> + Send>>;

/// Idle HTTP/1.1 connections older than this are closed rather than reused: most servers
/// time idle keep-alive connections out after 60-75 s, and reusing one that the server is
/// closing fails the request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many idle HTTP/1.1 connections are kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            connect_timeout: Duration::from_secs(3),
            h2_stream_window: 1 << 20,
            h2_connection_window: 4 << 20,
        }
    }
}

pub struct Pool {
    settings: PoolSettings,
    /// For mTLS (the sidecar's identity) and handshake metrics.
    shared: Arc<Shared>,
    // FxHash: the keys are endpoint addresses from the config, not attacker input.
    h1_idle: IdleList<H1Conn>,
    /// Idle connections of Tern's own HTTP/1.1 client (requests with complete bodies).
    h1_inline_idle: IdleList<h1::Conn>,
    /// Shared HTTP/2 connections by endpoint and whether they are mTLS, with the
    /// identity an mTLS connection's server was verified as: a connection is only
    /// reused for the same expected identity (the config may change it).
    h2: Mutex<FxHashMap<(SocketAddr, bool), SharedH2>>,
}

impl Pool {
    pub fn new(settings: PoolSettings, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Pool {
            settings,
            shared,
            h1_idle: Mutex::default(),
            h1_inline_idle: Mutex::default(),
            h2: Mutex::default(),
        })
    }

    /// An idle HTTP/1.1 connection to `addr` that can take a request now.
    ///
    /// Closed and stale connections are dropped. A connection that is open but not ready
    /// stays in the list: it went back when its response ended while its request body was
    /// still streaming (the upstream answered early), and waiting for it could stall this
    /// request behind a slow client.
    pub fn take_h1(&self, addr: SocketAddr) -> Option<H1Conn> {
        let mut idle = self.h1_idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        // Most recently returned first; busy ones are set aside (no allocation unless met).
        let mut busy = Vec::new();
        let found = loop {
            let Some((conn, since)) = list.pop() else {
                break None;
            };
            if conn.sender.is_closed() || now.duration_since(since) >= IDLE_TIMEOUT {
                continue;
            }
            if conn.sender.is_ready() {
                break Some(conn);
            }
            busy.push((conn, since));
        };
        list.extend(busy);
        found
    }

    /// An idle connection of Tern's own client to `addr` that can take a request now
    /// (`now`: the caller's clock read, to skip connections idle too long).
    pub fn take_h1_inline(&self, addr: SocketAddr, now: Instant) -> Option<h1::Conn> {
        let mut idle = self
            .h1_inline_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some((conn, since)) = list.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }

    pub(super) fn put_h1_inline(&self, addr: SocketAddr, conn: h1::Conn) {
        push_idle(&self.h1_inline_idle, addr, conn);
    }

    /// A new connection for Tern's own client, within the backend's limits.
    pub async fn connect_h1_inline(
        &self,
        addr: SocketAddr,
        admission: Option<Admission<'_>>,
    ) -> Result<h1::Conn, UpstreamError> {
        let (_pending, slot) = self.connecting_slots(admission)?;
        let tcp = self.connect_tcp(addr).await?;
        Ok(h1::Conn::new(tcp, slot))
    }

    fn put_h1(&self, addr: SocketAddr, conn: H1Conn) {
        if !conn.sender.is_closed() {
            push_idle(&self.h1_idle, addr, conn);
        }
    }

    /// Closes the oldest idle HTTP/1.1 connection to one of `addrs`, freeing its slot.
    fn evict_idle(&self, addrs: &[SocketAddr]) -> bool {
        fn oldest<C>(idle: &IdleList<C>, addrs: &[SocketAddr]) -> bool {
            let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
            addrs.iter().any(|addr| {
                idle.get_mut(addr)
                    .filter(|list| !list.is_empty())
                    .map(|list| drop(list.remove(0)))
                    .is_some()
            })
        }
        oldest(&self.h1_inline_idle, addrs) || oldest(&self.h1_idle, addrs)
    }

    /// The slots a new connection takes: a pending-request slot while it connects, and a
    /// connection slot for as long as it lives. With every connection slot taken, an
    /// idle connection of the same backend (in this worker) is closed to make room:
    /// idle connections must not lock out the endpoints that have none.
    fn connecting_slots(
        &self,
        admission: Option<Admission<'_>>,
    ) -> Result<(Option<Slot>, Option<Slot>), UpstreamError> {
        let Some(a) = admission else {
            return Ok((None, None));
        };
        let pending = a.acquire(Limit::Pending)?;
        let slot = match a.acquire(Limit::Connections) {
            Ok(s) => s,
            Err(err) => {
                if !self.evict_idle(a.endpoints) {
                    return Err(err);
                }
                a.acquire(Limit::Connections)?
            }
        };
        Ok((Some(pending), Some(slot)))
    }

    /// A new HTTP/1.1 connection, within the backend's limits when `admission` is given;
    /// over mTLS when `mtls` names the identity the endpoint must have (upgrades only:
    /// other requests between sidecars go over HTTP/2).
    pub async fn connect_h1(
        &self,
        addr: SocketAddr,
        upgrades: bool,
        mtls: Option<&EndpointIdentity>,
        admission: Option<Admission<'_>>,
    ) -> Result<H1Conn, UpstreamError> {
        let (_pending, slot) = self.connecting_slots(admission)?;
        let tcp = self.connect_tcp(addr).await?;
        let (sender, conn) = match mtls {
            None => {
                let (sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(UpstreamError::Handshake)?;
                (sender, Box::pin(conn.with_upgrades()) as H1Task)
            }
            Some(expected) => {
                let tls = self.mtls(tcp, expected, Alpn::Http1).await?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(UpstreamError::Handshake)?;
                (sender, Box::pin(conn.with_upgrades()) as H1Task)
            }
        };
        if upgrades {
            // The tunnel outlives the sender: the connection task holds the slot.
            tokio::spawn(async move {
                let _ = conn.await;
                drop(slot);
            });
            return Ok(H1Conn {
                sender,
                _slot: None,
            });
        }
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H1Conn {
            sender,
            _slot: slot,
        })
    }

    /// The shared HTTP/2 connection to `addr` (mTLS when `mtls` names the identity the
    /// endpoint must have), connecting if there is none open.
    pub async fn h2(
        &self,
        addr: SocketAddr,
        mtls: Option<&EndpointIdentity>,
        admission: Option<Admission<'_>>,
    ) -> Result<h2::Sender, UpstreamError> {
        let key = (addr, mtls.is_some());
        {
            let mut map = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((s, verified)) = map.get(&key) {
                if !s.is_closed() && verified.as_ref() == mtls {
                    return Ok(s.clone());
                }
                // Closed, or verified as another identity than now expected: replaced
                // (requests in flight on the old one finish there).
                map.remove(&key);
            }
        }
        Box::pin(self.connect_h2(addr, mtls, admission)).await
    }

    /// The cold part of [`Pool::h2`], kept out of the per-request future.
    async fn connect_h2(
        &self,
        addr: SocketAddr,
        mtls: Option<&EndpointIdentity>,
        admission: Option<Admission<'_>>,
    ) -> Result<h2::Sender, UpstreamError> {
        let (_pending, slot) = self.connecting_slots(admission)?;
        let tcp = self.connect_tcp(addr).await?;
        let windows = h2::Windows {
            stream: self.settings.h2_stream_window,
            connection: self.settings.h2_connection_window,
        };
        let sender = match mtls {
            None => h2::handshake(tcp, windows, slot).await,
            Some(expected) => {
                let tls = self.mtls(tcp, expected, Alpn::H2).await?;
                h2::handshake(tls, windows, slot).await
            }
        }
        .map_err(UpstreamError::H2)?;
        self.h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((addr, mtls.is_some()), (sender.clone(), mtls.cloned()));
        Ok(sender)
    }

    /// mTLS over a new connection to another sidecar, counted by result.
    pub async fn mtls(
        &self,
        tcp: TcpStream,
        expected: &EndpointIdentity,
        alpn: Alpn,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
        let result = self.shared.tls.connect(tcp, expected, alpn).await;
        let label = result.as_ref().map_or_else(|e| e.reason(), |_| "ok");
        self.shared
            .metrics
            .tls_handshake(Direction::Outbound, label);
        if let Err(err) = &result {
            tracing::warn!(%err, "mTLS to another sidecar failed");
        }
        result.map_err(UpstreamError::Tls)
    }

    pub async fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                UpstreamError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(UpstreamError::Connect)?;
        stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
        Ok(stream)
    }
}

/// Idle connections of one kind, by endpoint, most recently returned last.
type IdleList<C> = Mutex<FxHashMap<SocketAddr, Vec<(C, Instant)>>>;

/// Parks an idle connection, unless its endpoint already has as many as are kept.
fn push_idle<C>(idle: &IdleList<C>, addr: SocketAddr, conn: C) {
    let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
    let list = idle.entry(addr).or_default();
    if list.len() < MAX_IDLE_PER_ENDPOINT {
        list.push((conn, Instant::now()));
    }
}

/// An upstream response body: from Tern's HTTP/2 client, from hyper's HTTP/1.1 client
/// (streaming requests and upgrades; the connection returns to the pool at the body's
/// end), or from Tern's own HTTP/1.1 client.
pub struct PooledBody {
    kind: Kind,
}

enum Kind {
    Hyper {
        inner: Incoming,
        release: Option<Release>,
    },
    Inline(h1::ResponseBody),
    H2(h2::Upstream),
}

/// Why an upstream response body failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    H1(#[from] h1::ClientError),
    /// Not transparent: hyper looks for an `h2::Error` among the sources to pick the
    /// reason it resets the client's stream with.
    #[error("{0}")]
    H2(#[source] ::h2::Error),
}

struct Release {
    pool: Arc<Pool>,
    addr: SocketAddr,
    conn: H1Conn,
}

impl PooledBody {
    pub fn new(inner: Incoming) -> Self {
        PooledBody {
            kind: Kind::Hyper {
                inner,
                release: None,
            },
        }
    }

    pub fn h2(body: h2::Upstream) -> Self {
        PooledBody {
            kind: Kind::H2(body),
        }
    }

    pub fn inline(body: h1::ResponseBody) -> Self {
        PooledBody {
            kind: Kind::Inline(body),
        }
    }

    pub fn returning(inner: Incoming, pool: Arc<Pool>, addr: SocketAddr, conn: H1Conn) -> Self {
        let end = inner.is_end_stream();
        let mut release = Some(Release { pool, addr, conn });
        if end {
            release_now(&mut release);
        }
        PooledBody {
            kind: Kind::Hyper { inner, release },
        }
    }
}

fn release_now(release: &mut Option<Release>) {
    if let Some(r) = release.take() {
        r.pool.put_h1(r.addr, r.conn);
    }
}

impl crate::h1::RawHead for PooledBody {
    fn raw_slot(&mut self) -> Option<&mut Option<crate::h1::RawHeaders>> {
        match &mut self.kind {
            Kind::Inline(body) => Some(body.raw_slot()),
            Kind::Hyper { .. } | Kind::H2(_) => None,
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        match &mut self.kind {
            Kind::Inline(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Kind::H2(b) => Pin::new(b).poll_frame(cx).map_err(UpstreamBodyError::H2),
            Kind::Hyper { inner, release } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => release_now(release),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => release_now(release),
                    // A broken body means a broken connection: never pool it.
                    Poll::Ready(Some(Err(_))) => *release = None,
                    _ => {}
                }
                polled.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inline(b) => b.is_end_stream(),
            Kind::H2(b) => b.is_end_stream(),
            Kind::Hyper { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inline(b) => b.size_hint(),
            Kind::H2(b) => b.size_hint(),
            Kind::Hyper { inner, .. } => inner.size_hint(),
        }
    }
}
