//! Serving one client connection: protocol detection, then HTTP/1.1 or HTTP/2 with limits
//! set on purpose, graceful drain, and per-connection containment of HTTP/2 abuse.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::body::{ClientBody, ProxyBody};
use crate::h1;
use crate::metrics::Direction;
use crate::outbound::ConnLocal;
use crate::rescue::ProxyError;
use crate::tcp::Tcp;
use crate::tls::Alpn;
use crate::worker::Worker;
use crate::{boxed, inbound, opaque, outbound};

/// Limits on what a client may send. Documented in docs/architecture.md.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest HTTP/1.1 request head (request line + headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Most HTTP/1.1 request headers; more gets 431.
    pub max_headers: usize,
    /// Time allowed for a request head to arrive (also bounds protocol detection).
    pub header_read_timeout: Duration,
    /// An idle HTTP/1.1 keep-alive connection is closed after this long.
    pub idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// Streams the client may reset before the server even accepts them (h2's guard).
    pub h2_max_pending_accept_reset_streams: usize,
    /// The same on inbound, higher: a connection from another sidecar relays the
    /// cancellations of all its clients, and tripping this guard closes it for everyone
    /// (Tern's per-second cancellation guard still bounds a peer that abuses it).
    pub h2_max_pending_accept_reset_streams_inbound: usize,
    /// Streams the server may reset because of client errors before closing.
    pub h2_max_local_error_reset_streams: usize,
    /// Rapid Reset: GOAWAY a client connection whose client cancelled at least this many
    /// streams within one second, when they are at least half of the streams it opened.
    pub h2_max_cancelled_per_second: u32,
    /// The same on inbound, higher: a connection from another sidecar multiplexes many of
    /// its clients, and their cancellations travel with it.
    pub h2_max_cancelled_per_second_inbound: u32,
    /// After such a GOAWAY, streams in flight get this long before the socket is closed.
    pub h2_abuse_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            h2_max_concurrent_streams: 100,
            h2_max_header_list_size: 64 * 1024,
            h2_stream_window: 1 << 20,
            h2_connection_window: 2 << 20,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_pending_accept_reset_streams_inbound: 200,
            h2_max_local_error_reset_streams: 100,
            h2_max_cancelled_per_second: 200,
            h2_max_cancelled_per_second_inbound: 1000,
            h2_abuse_grace: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
    /// Not HTTP: proxied as TCP (only on intercepted connections).
    Opaque,
    /// A TLS ClientHello (only looked for on inbound with mTLS on).
    Tls,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An intercepted connection that has sent nothing HTTP-like by then is TCP (protocols
/// where the server speaks first send nothing at all).
const OPAQUE_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the first bytes say a connection carries: the HTTP/2 preface, an HTTP/1.1
/// request line, a TLS record when `tls` is looked for, else TCP when `opaque` is
/// allowed. Without `opaque`, anything else (or nothing before the timeout) is handed to
/// HTTP/1.1, whose parser answers garbage with a 400.
async fn detect(stream: &TcpStream, timeout: Duration, tls: bool, opaque: bool) -> Proto {
    let other = if opaque { Proto::Opaque } else { Proto::Http1 };
    let peek = async {
        let mut buf = [0u8; 24];
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Proto::Http1,
                Ok(n) => n,
            };
            let seen = &buf[..n];
            if tls && seen[0] == 0x16 {
                return Proto::Tls;
            }
            let verdict = if H2_PREFACE.starts_with(seen) {
                (n == H2_PREFACE.len()).then_some(Proto::Http2)
            } else if !opaque {
                Some(Proto::Http1)
            } else {
                looks_like_http1(seen).map(|h| if h { Proto::Http1 } else { Proto::Opaque })
            };
            if let Some(p) = verdict {
                return p;
            }
            // A partial preface or method: wait for the rest (rare: clients send it in
            // one write).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, peek).await.unwrap_or(other)
}

/// Whether `b` starts an HTTP/1.x request line (a method token of 3 to 7 capital
/// letters, then a space); `None` until there are enough bytes to tell.
fn looks_like_http1(b: &[u8]) -> Option<bool> {
    for (i, &c) in b.iter().enumerate() {
        if c == b' ' {
            return Some((3..=7).contains(&i));
        }
        if !c.is_ascii_uppercase() || i >= 7 {
            return Some(false);
        }
    }
    None
}

/// What every request of one client connection shares.
#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    /// Where the client was really going, when iptables redirected the connection here
    /// (SO_ORIGINAL_DST); `None` when it dialled the listener itself.
    pub original_dst: Option<SocketAddr>,
    /// The listener's own address.
    pub local: SocketAddr,
    /// The client sidecar's identity, on inbound mTLS.
    pub client: Option<Client>,
    /// The rate-limit key of this caller: its identity, else its IP.
    pub caller_key: u64,
}

#[derive(Debug)]
pub struct Client {
    pub id: tern_config::identity::SpiffeId,
    /// `id` as a string, for metrics and logs.
    pub label: Arc<str>,
}

impl Conn {
    fn new(peer: SocketAddr, original_dst: Option<SocketAddr>, local: SocketAddr) -> Self {
        use crate::balance::hash::key_hash;
        let caller_key = match peer.ip() {
            std::net::IpAddr::V4(ip) => key_hash(&ip.octets()),
            std::net::IpAddr::V6(ip) => key_hash(&ip.octets()),
        };
        Conn {
            peer,
            original_dst,
            local,
            client: None,
            caller_key,
        }
    }

    fn with_client(mut self, id: tern_config::identity::SpiffeId) -> Self {
        let label: Arc<str> = Arc::from(id.to_string());
        self.caller_key = crate::balance::hash::key_hash(label.as_bytes());
        self.client = Some(Client { id, label });
        self
    }

    /// The address the connection is for: where the client was going, else this
    /// listener (whose address is what EndpointSlices name when nothing intercepts).
    pub fn target(&self) -> SocketAddr {
        self.original_dst.unwrap_or(self.local)
    }

    pub fn client_id(&self) -> Option<&tern_config::identity::SpiffeId> {
        self.client.as_ref().map(|c| &c.id)
    }
}

/// The destination an iptables REDIRECT rewrote, if it differs from the listener's own.
fn original_dst(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let dst = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (dst != local).then_some(dst)
}

/// Decrements the open-connections gauge however the connection ends.
struct OpenConnection<'a> {
    worker: &'a Worker,
    direction: Direction,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.worker.shared.metrics.connection_closed(self.direction);
    }
}

pub async fn serve(
    worker: Arc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    direction: Direction,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    worker.shared.metrics.connection_opened(direction);
    let _open = OpenConnection {
        worker: &worker,
        direction,
    };
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let original_dst = original_dst(&stream, local);
    let conn = Conn::new(peer, original_dst, local);
    // Each kind of connection's state is boxed separately, so an HTTP/1.1 connection
    // does not carry the (larger) HTTP/2 or TLS state in its task, and vice versa.
    // Detection's own box is freed before a plaintext connection is served: an idle
    // keep-alive connection holds only the state of the protocol it speaks.
    let plain = match direction {
        Direction::Outbound => Box::pin(serve_outbound(&worker, stream, conn, drain)).await,
        Direction::Inbound => Box::pin(serve_inbound(&worker, stream, conn, drain)).await,
    };
    let Some(Plain {
        proto,
        stream,
        conn,
        drain,
    }) = plain
    else {
        return;
    };
    let limits = worker.shared.settings.limits;
    match proto {
        Proto::Http2 => Box::pin(serve_h2(&worker, stream, conn, direction, limits, drain)).await,
        _ => {
            Box::pin(serve_h1(
                &worker,
                Tcp::new(stream),
                conn,
                direction,
                limits,
                drain,
            ))
            .await
        }
    }
}

/// A plaintext HTTP connection, detected, for [`serve`] to serve.
struct Plain {
    proto: Proto,
    stream: TcpStream,
    conn: Arc<Conn>,
    drain: watch::Receiver<bool>,
}

/// A connection from the local application.
async fn serve_outbound(
    worker: &Arc<Worker>,
    stream: TcpStream,
    conn: Conn,
    drain: watch::Receiver<bool>,
) -> Option<Plain> {
    let limits = worker.shared.settings.limits;
    let (timeout, opaque) = match conn.original_dst {
        None => (limits.header_read_timeout, false),
        Some(dst) => {
            // Intercepted: a destination outside the mesh is passed through untouched.
            let known = worker
                .shared
                .active
                .load()
                .as_ref()
                .is_some_and(|a| a.snapshot.resolve_addr(dst).is_some());
            if !known {
                Box::pin(opaque::passthrough(stream, dst)).await;
                return None;
            }
            (OPAQUE_DETECT_TIMEOUT, true)
        }
    };
    let conn = Arc::new(conn);
    match detect(&stream, timeout, false, opaque).await {
        Proto::Opaque => {
            Box::pin(opaque::outbound(worker, stream, &conn)).await;
            None
        }
        proto => Some(Plain {
            proto,
            stream,
            conn,
            drain,
        }),
    }
}

/// A connection from another sidecar (mTLS) or a plaintext client.
async fn serve_inbound(
    worker: &Arc<Worker>,
    stream: TcpStream,
    conn: Conn,
    drain: watch::Receiver<bool>,
) -> Option<Plain> {
    let shared = &worker.shared;
    let limits = shared.settings.limits;
    let direction = Direction::Inbound;
    let tls = shared.tls.enabled();
    let (timeout, opaque) = match conn.original_dst {
        None => (limits.header_read_timeout, false),
        Some(_) => (OPAQUE_DETECT_TIMEOUT, true),
    };
    let proto = detect(&stream, timeout, tls, opaque).await;
    if proto == Proto::Tls {
        // Boxed: the handshake state is large and short-lived.
        let (stream, id, alpn) = match Box::pin(shared.tls.accept(stream)).await {
            Ok(accepted) => accepted,
            Err(err) => {
                shared.metrics.tls_handshake(direction, err.reason());
                tracing::warn!(peer = %conn.peer, reason = err.reason(), %err, "inbound mTLS refused");
                return None;
            }
        };
        shared.metrics.tls_handshake(direction, "ok");
        let conn = Arc::new(conn.with_client(id));
        shared
            .metrics
            .inbound_client(conn.client.as_ref().map(|c| &c.label));
        match alpn {
            Alpn::H2 => Box::pin(serve_h2(worker, stream, conn, direction, limits, drain)).await,
            Alpn::Http1 => Box::pin(serve_h1(worker, stream, conn, direction, limits, drain)).await,
            Alpn::Opaque => Box::pin(opaque::inbound(worker, stream, &conn)).await,
        }
        return None;
    }
    if tls && inbound::requires_mtls(worker, &conn) {
        shared.metrics.tls_handshake(direction, "plaintext_refused");
        tracing::warn!(peer = %conn.peer, target = %conn.target(), "plaintext refused: the Service's mtls-mode is strict");
        return None;
    }
    shared.metrics.inbound_client(None);
    let conn = Arc::new(conn);
    match proto {
        Proto::Opaque => {
            Box::pin(opaque::inbound(worker, stream, &conn)).await;
            None
        }
        proto => Some(Plain {
            proto,
            stream,
            conn,
            drain,
        }),
    }
}

async fn serve_h1<S: h1::Io>(
    worker: &Arc<Worker>,
    stream: S,
    conn: Arc<Conn>,
    direction: Direction,
    limits: Limits,
    drain: watch::Receiver<bool>,
) {
    let settings = h1::Settings {
        max_head: limits.max_header_bytes,
        max_headers: limits.max_headers,
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
    };
    let conn = &*conn;
    let refuse = |refusal| refuse(worker, direction, refusal);
    // One connection loop per direction: each request's future is then a known type,
    // built inside the exchange's box (one allocation per request, not two).
    match direction {
        Direction::Outbound => {
            let service = OutboundH1 {
                worker,
                conn,
                local: ConnLocal::default(),
            };
            h1::serve(stream, settings, &drain, service, refuse).await;
        }
        Direction::Inbound => {
            let handle = |req: http::Request<h1::Body>| {
                inbound::handle(worker, req.map(ClientBody::H1), conn)
            };
            h1::serve(stream, settings, &drain, handle, refuse).await;
        }
    }
}

/// An HTTP/1.1 connection's outbound requests, with what it keeps between them.
struct OutboundH1<'a> {
    worker: &'a Worker,
    conn: &'a Conn,
    local: ConnLocal,
}

impl h1::Service for OutboundH1<'_> {
    type Body = ProxyBody;

    fn call(
        &mut self,
        req: http::Request<h1::Body>,
    ) -> impl Future<Output = http::Response<ProxyBody>> + Send {
        outbound::handle(
            self.worker,
            req.map(ClientBody::H1),
            self.conn,
            Some(&mut self.local),
        )
    }
}

async fn serve_h2<S>(
    worker: &Arc<Worker>,
    stream: S,
    conn: Arc<Conn>,
    direction: Direction,
    limits: Limits,
    mut drain: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let (threshold, pending_resets) = match direction {
        Direction::Outbound => (
            limits.h2_max_cancelled_per_second,
            limits.h2_max_pending_accept_reset_streams,
        ),
        Direction::Inbound => (
            limits.h2_max_cancelled_per_second_inbound,
            limits.h2_max_pending_accept_reset_streams_inbound,
        ),
    };
    let guard = Arc::new(ResetGuard::new(threshold));
    let w = worker.clone();
    let g = guard.clone();
    let svc = service_fn(move |req| {
        let w = w.clone();
        let conn = conn.clone();
        let stream = StreamGuard::new(g.clone());
        // Boxed: hyper spawns every HTTP/2 stream as a task, and moving the (large)
        // request future into it and through the task's stages costs more than one
        // allocation (callgrind: ~5,000 instructions of memcpy per request). The request's
        // own future is boxed inside, by `dispatch`.
        Box::pin(async move {
            // hyper polls a stream's service before looking for a reset of the stream, and
            // the client's RST_STREAM is often read already (rapid reset sends both at once):
            // yielding once lets hyper drop the stream before anything is routed or sent
            // upstream, where a HEADERS and RST_STREAM pair would count against the
            // upstream's own reset limit on a connection other clients share.
            yield_once().await;
            let mut resp = dispatch(&w, direction, &conn, req.map(ClientBody::H2)).await;
            // HTTP/2 writes headers from the map: an HTTP/1.1 upstream's lines go into it.
            crate::body::full_headers(&mut resp);
            stream.finish();
            Ok::<_, Infallible>(resp)
        })
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.h2_max_header_list_size)
        .initial_stream_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        .max_pending_accept_reset_streams(pending_resets)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => log_end(res),
        _ = guard.tripped() => {
            tracing::warn!(
                ?direction,
                "closing HTTP/2 connection: client cancelled too many streams (rapid reset)"
            );
            // GOAWAY: no new streams. Streams in flight may finish (on a connection
            // from another sidecar they belong to innocent clients); after the grace
            // period the socket is closed whatever remains.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.h2_abuse_grace, conn.as_mut()).await;
        }
        _ = drained(&mut drain) => {
            conn.as_mut().graceful_shutdown();
            log_end(conn.await);
        }
    }
}

/// A request's whole life, boxed once (each direction's future is several KB, and every
/// move of it would copy all of it).
fn dispatch<'a>(
    worker: &'a Worker,
    direction: Direction,
    conn: &'a Conn,
    req: http::Request<ClientBody>,
) -> Pin<Box<dyn Future<Output = http::Response<ProxyBody>> + Send + 'a>> {
    match direction {
        Direction::Outbound => boxed::future(|| outbound::handle(worker, req, conn, None)),
        Direction::Inbound => boxed::future(|| inbound::handle(worker, req, conn)),
    }
}

/// Pending once (the task is woken at once to run again), then ready.
fn yield_once() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
}

/// Resolves once the drain signal is raised.
pub async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// Answers a request whose head was refused; the connection closes after it.
fn refuse(
    worker: &Worker,
    direction: Direction,
    refusal: h1::Refusal,
) -> http::Response<ProxyBody> {
    let limits = &worker.shared.settings.limits;
    let mut resp = match refusal {
        h1::Refusal::TooLarge => ProxyError::HeadTooLarge(limits.max_header_bytes).into_response(),
        h1::Refusal::TooManyHeaders => {
            ProxyError::TooManyHeaders(limits.max_headers).into_response()
        }
        h1::Refusal::Conflict => {
            ProxyError::BadRequest("both Content-Length and Transfer-Encoding").into_response()
        }
        h1::Refusal::Malformed(why) => ProxyError::BadRequest(why).into_response(),
    };
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    let labels = worker.unrouted(direction, &worker.empty).labels();
    worker
        .shared
        .metrics
        .record_request(&labels, resp.status().as_u16(), Duration::ZERO);
    resp
}

fn log_end(res: Result<(), hyper::Error>) {
    if let Err(err) = res {
        tracing::debug!(%err, "connection ended with an error");
    }
}

/// Counts streams a client opened and cancelled before their response, per second.
struct ResetGuard {
    limit: u32,
    window: Mutex<Window>,
    notify: Notify,
}

struct Window {
    start: Instant,
    opened: u32,
    cancelled: u32,
    tripped: bool,
}

impl ResetGuard {
    fn new(limit: u32) -> Self {
        ResetGuard {
            limit,
            window: Mutex::new(Window {
                start: Instant::now(),
                opened: 0,
                cancelled: 0,
                tripped: false,
            }),
            notify: Notify::new(),
        }
    }

    fn with_window(&self, f: impl FnOnce(&mut Window)) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.elapsed() >= Duration::from_secs(1) {
            w.start = Instant::now();
            w.opened = 0;
            w.cancelled = 0;
        }
        f(&mut w);
    }

    fn opened(&self) {
        self.with_window(|w| w.opened += 1);
    }

    fn cancelled(&self) {
        let mut trip = false;
        self.with_window(|w| {
            w.cancelled += 1;
            if !w.tripped && w.cancelled >= self.limit && w.cancelled * 2 >= w.opened {
                w.tripped = true;
                trip = true;
            }
        });
        if trip {
            self.notify.notify_one();
        }
    }

    async fn tripped(&self) {
        self.notify.notified().await;
    }
}

/// Marks a stream cancelled if its handler is dropped before producing a response.
struct StreamGuard {
    guard: Option<Arc<ResetGuard>>,
}

impl StreamGuard {
    fn new(guard: Arc<ResetGuard>) -> Self {
        guard.opened();
        StreamGuard { guard: Some(guard) }
    }

    fn finish(mut self) {
        self.guard = None;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            g.cancelled();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_guard_trips_on_mostly_cancelled_streams() {
        let g = ResetGuard::new(10);
        for _ in 0..9 {
            g.opened();
            g.cancelled();
        }
        assert!(!g.window.lock().unwrap().tripped);
        g.opened();
        g.cancelled();
        assert!(g.window.lock().unwrap().tripped);
    }

    #[test]
    fn callers_are_keyed_by_identity_over_mtls_else_by_address() {
        use tern_config::identity::SpiffeId;
        let local: SocketAddr = "10.0.0.2:4143".parse().unwrap();
        let conn = |ip: &str| Conn::new(format!("{ip}:40000").parse().unwrap(), None, local);
        let web = || SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        // Plaintext: one bucket per source address.
        assert_eq!(conn("10.0.0.7").caller_key, conn("10.0.0.7").caller_key);
        assert_ne!(conn("10.0.0.7").caller_key, conn("10.0.0.8").caller_key);
        // mTLS: one bucket per identity, whatever address it comes from.
        let a = conn("10.0.0.7").with_client(web());
        let b = conn("10.0.0.8").with_client(web());
        assert_eq!(a.caller_key, b.caller_key);
        assert_ne!(a.caller_key, conn("10.0.0.7").caller_key);
        let other = conn("10.0.0.7")
            .with_client(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/admin").unwrap());
        assert_ne!(a.caller_key, other.caller_key);
        assert_eq!(a.client_id(), Some(&web()));
        assert_eq!(a.target(), local);
    }

    #[test]
    fn detection_tells_http_from_other_protocols() {
        assert_eq!(looks_like_http1(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http1(b"OPTIONS * HTTP/1.1"), Some(true));
        assert_eq!(looks_like_http1(b"GE"), None);
        assert_eq!(looks_like_http1(b"\x16\x03\x01"), Some(false));
        assert_eq!(looks_like_http1(b"hello\n"), Some(false));
        assert_eq!(looks_like_http1(b"SSH-2.0-OpenSSH"), Some(false));
        assert_eq!(looks_like_http1(b"AB CD"), Some(false));
        assert_eq!(looks_like_http1(b"ABCDEFGHIJ /"), Some(false));
    }

    #[test]
    fn reset_guard_tolerates_a_few_cancellations_among_many_streams() {
        let g = ResetGuard::new(10);
        for _ in 0..100 {
            g.opened();
        }
        for _ in 0..20 {
            g.cancelled();
        }
        assert!(!g.window.lock().unwrap().tripped);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Every open connection holds its task's future: keep it small. (Idle HTTP/1.1
    /// connections are the common case; the HTTP/2 state is boxed separately.)
    #[tokio::test]
    async fn connection_futures_stay_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = crate::Settings::for_tests(addr);
        let worker = Worker::new(crate::Shared::new(settings));
        let (_tx, rx) = watch::channel(false);
        let (limits, out) = (Limits::default(), Direction::Outbound);
        let stream = || TcpStream::connect(addr);

        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let conn = || Arc::new(Conn::new(peer, None, addr));
        let h1 = serve_h1(
            &worker,
            stream().await.unwrap(),
            conn(),
            out,
            limits,
            rx.clone(),
        );
        let h2 = serve_h2(
            &worker,
            stream().await.unwrap(),
            conn(),
            out,
            limits,
            rx.clone(),
        );
        let inbound = serve_inbound(
            &worker,
            stream().await.unwrap(),
            Conn::new(peer, None, addr),
            rx.clone(),
        );
        let outbound = serve_outbound(
            &worker,
            stream().await.unwrap(),
            Conn::new(peer, None, addr),
            rx.clone(),
        );
        let outer = serve(worker.clone(), stream().await.unwrap(), peer, out, rx);
        // HTTP/1.1: 1,296 bytes on 2026-11-25 (the connection's request state and quiet
        // timers added 40).
        let sizes = [
            ("HTTP/1.1 state", size_of_val(&h1), 1344),
            ("HTTP/2 state", size_of_val(&h2), 4096),
            ("inbound detection and TLS", size_of_val(&inbound), 2048),
            ("outbound detection", size_of_val(&outbound), 1024),
            ("before detection", size_of_val(&outer), 1024),
        ];
        for (what, size, limit) in sizes {
            assert!(
                size <= limit,
                "connection future {what}: {size} bytes > {limit}"
            );
        }
    }
}
