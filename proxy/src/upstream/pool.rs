//! Upstream connections per endpoint, owned by one worker (no cross-thread contention).
//!
//! HTTP/1.1: a stack of idle keep-alive connections per endpoint; a connection goes back
//! when its response body has been read to the end. HTTP/2: one multiplexed connection
//! per endpoint, shared by all requests of the worker, replaced when it closes.
//!
//! The connections are kept in thread-locals, by pool and endpoint: a worker is one
//! thread, its requests never leave it, and so its pools need no lock (a lock and its
//! release are two locked instructions, twice a request). A pool used from several
//! threads (tests on a multi-threaded runtime) keeps a separate set in each. Dropping a
//! connection touches no pool, so connections are dropped where they are taken out.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::thread::LocalKey;
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

/// Which pool a connection belongs to: a worker has two (to other sidecars and
/// upstreams, and to its application).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolId(u64);

/// Idle connections of one kind, by pool and endpoint, most recently returned last.
// FxHash: the keys are endpoint addresses from the config, not attacker input.
type Idle<C> = FxHashMap<(PoolId, SocketAddr), Vec<(C, Instant)>>;

thread_local! {
    /// Idle connections of hyper's HTTP/1.1 client (streaming request bodies).
    static H1_IDLE: RefCell<Idle<H1Conn>> = RefCell::default();
    /// Idle connections of Tern's own HTTP/1.1 client (requests with complete bodies).
    static INLINE_IDLE: RefCell<Idle<h1::Conn>> = RefCell::default();
    /// Shared HTTP/2 connections by pool, endpoint and whether they are mTLS, with the
    /// identity an mTLS connection's server was verified as: a connection is only
    /// reused for the same expected identity (the config may change it).
    static H2_SHARED: RefCell<FxHashMap<(PoolId, SocketAddr, bool), SharedH2>> =
        RefCell::default();
}

pub struct Pool {
    id: PoolId,
    settings: PoolSettings,
    /// For mTLS (the sidecar's identity) and handshake metrics.
    shared: Arc<Shared>,
}

impl Drop for Pool {
    /// Closes the pool's connections kept in this thread (a worker's pools end with it).
    fn drop(&mut self) {
        let id = self.id;
        let _ = H1_IDLE.try_with(|m| m.borrow_mut().retain(|k, _| k.0 != id));
        let _ = INLINE_IDLE.try_with(|m| m.borrow_mut().retain(|k, _| k.0 != id));
        let _ = H2_SHARED.try_with(|m| m.borrow_mut().retain(|k, _| k.0 != id));
    }
}

impl Pool {
    pub fn new(settings: PoolSettings, shared: Arc<Shared>) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Arc::new(Pool {
            id: PoolId(NEXT.fetch_add(1, Ordering::Relaxed)),
            settings,
            shared,
        })
    }

    pub fn id(&self) -> PoolId {
        self.id
    }

    /// An idle HTTP/1.1 connection to `addr` that can take a request now.
    ///
    /// Closed and stale connections are dropped. A connection that is open but not ready
    /// stays in the list: it went back when its response ended while its request body was
    /// still streaming (the upstream answered early), and waiting for it could stall this
    /// request behind a slow client.
    pub fn take_h1(&self, addr: SocketAddr) -> Option<H1Conn> {
        H1_IDLE.with_borrow_mut(|idle| {
            let list = idle.get_mut(&(self.id, addr))?;
            let now = Instant::now();
            // Most recently returned first; busy ones are set aside (no allocation unless
            // met).
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
        })
    }

    /// An idle connection of Tern's own client to `addr` that can take a request now
    /// (`now`: the caller's clock read, to skip connections idle too long).
    pub fn take_h1_inline(&self, addr: SocketAddr, now: Instant) -> Option<h1::Conn> {
        INLINE_IDLE.with_borrow_mut(|idle| {
            let list = idle.get_mut(&(self.id, addr))?;
            while let Some((conn, since)) = list.pop() {
                if now.duration_since(since) < IDLE_TIMEOUT && conn.is_reusable() {
                    return Some(conn);
                }
            }
            None
        })
    }

    /// Parks an idle connection of Tern's own client for pool `id` (in this thread).
    pub(super) fn put_h1_inline(id: PoolId, addr: SocketAddr, conn: h1::Conn) {
        push_idle(&INLINE_IDLE, id, addr, conn);
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

    fn put_h1(id: PoolId, addr: SocketAddr, conn: H1Conn) {
        if !conn.sender.is_closed() {
            push_idle(&H1_IDLE, id, addr, conn);
        }
    }

    /// Closes the oldest idle HTTP/1.1 connection to one of `addrs`, freeing its slot.
    fn evict_idle(&self, addrs: &[SocketAddr]) -> bool {
        let id = self.id;
        fn oldest<C: 'static>(
            idle: &'static LocalKey<RefCell<Idle<C>>>,
            id: PoolId,
            addrs: &[SocketAddr],
        ) -> bool {
            idle.with_borrow_mut(|idle| {
                addrs.iter().any(|addr| {
                    idle.get_mut(&(id, *addr))
                        .filter(|list| !list.is_empty())
                        .map(|list| drop(list.remove(0)))
                        .is_some()
                })
            })
        }
        oldest(&INLINE_IDLE, id, addrs) || oldest(&H1_IDLE, id, addrs)
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
        let key = (self.id, addr, mtls.is_some());
        let open = H2_SHARED.with_borrow_mut(|map| match map.get(&key) {
            Some((s, verified)) if !s.is_closed() && verified.as_ref() == mtls => Some(s.clone()),
            // Closed, or verified as another identity than now expected: replaced
            // (requests in flight on the old one finish there).
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        });
        if let Some(sender) = open {
            return Ok(sender);
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
        H2_SHARED.with_borrow_mut(|map| {
            map.insert(
                (self.id, addr, mtls.is_some()),
                (sender.clone(), mtls.cloned()),
            )
        });
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

/// Parks an idle connection in this thread, unless its endpoint already has as many as
/// are kept.
fn push_idle<C: 'static>(
    idle: &'static LocalKey<RefCell<Idle<C>>>,
    id: PoolId,
    addr: SocketAddr,
    conn: C,
) {
    idle.with_borrow_mut(|idle| {
        let list = idle.entry((id, addr)).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((conn, Instant::now()));
        }
    });
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
    pool: PoolId,
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

    pub fn returning(inner: Incoming, pool: PoolId, addr: SocketAddr, conn: H1Conn) -> Self {
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
        Pool::put_h1(r.pool, r.addr, r.conn);
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
