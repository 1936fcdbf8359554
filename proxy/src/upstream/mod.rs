//! The last hop: send a request to one endpoint over a pooled connection and hand back the
//! streaming response. Upgrades (WebSocket) get a dedicated connection and a byte tunnel.

pub mod h1;
pub mod h2;
pub mod pool;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tern_config::snapshot::Protocol;
use tokio::time::Instant;

use pool::{Pool, PooledBody};
use tern_config::snapshot::{EndpointIdentity, Limits};

use crate::body::{ClientBody, RequestBody, copy_complete};
use crate::policy::limits::{Counters, Limit, Slot};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Request(#[source] hyper::Error),
    /// Tern's HTTP/2 client: the handshake, or a request on the connection, failed.
    #[error("{0}")]
    H2(#[source] ::h2::Error),
    /// An exchange on Tern's own HTTP/1.1 client failed.
    #[error("{0}")]
    Exchange(#[source] h1::ClientError),
    #[error("{0}")]
    Tls(#[source] crate::tls::TlsError),
    /// A backend limit (connections or pending requests) is full: (limit, its maximum).
    #[error("{limit} limit of {max} reached", limit = .0.as_str(), max = .1)]
    Overflow(Limit, u32),
}

/// A failed send, with the request when it never left (so it can go elsewhere as is).
pub struct SendError {
    pub error: UpstreamError,
    /// Boxed: failures are rare, and the `Result` of every send stays small.
    pub request: Option<Box<Request<RequestBody>>>,
}

impl SendError {
    fn new(error: UpstreamError, request: Option<Request<RequestBody>>) -> Self {
        SendError {
            error,
            request: request.map(Box::new),
        }
    }

    /// Whether the upstream may have seen (part of) the request. Connect and handshake
    /// failures, requests handed back unsent and HTTP/2 streams the server refused
    /// (REFUSED_STREAM: not processed, RFC 9113 section 8.7) never reached it.
    pub fn reached_upstream(&self) -> bool {
        match &self.error {
            UpstreamError::Connect(_)
            | UpstreamError::Handshake(_)
            | UpstreamError::Tls(_)
            | UpstreamError::Overflow(..) => false,
            UpstreamError::Request(_) => self.request.is_none(),
            UpstreamError::H2(err) => {
                self.request.is_none() && err.reason() != Some(::h2::Reason::REFUSED_STREAM)
            }
            UpstreamError::Exchange(_) => true,
        }
    }
}

/// The backend limits a send must respect: connections and pending requests.
#[derive(Clone, Copy)]
pub struct Admission<'a> {
    pub counters: &'a Arc<Counters>,
    pub limits: Limits,
    /// The backend's endpoints, whose idle connections may be closed to make room.
    pub endpoints: &'a [SocketAddr],
}

impl Admission<'_> {
    pub(crate) fn acquire(&self, limit: Limit) -> Result<Slot, UpstreamError> {
        let max = limit.max(&self.limits);
        self.counters
            .acquire(limit, max)
            .ok_or(UpstreamError::Overflow(limit, max))
    }
}

/// How an endpoint is reached.
#[derive(Debug, Clone, Copy)]
pub enum Transport<'a> {
    /// Plain TCP in the backend's protocol.
    Plain(Protocol),
    /// mTLS and HTTP/2 to another sidecar, which must present this identity.
    Mtls(&'a EndpointIdentity),
}

impl Transport<'_> {
    /// The protocol requests are written in on the wire.
    pub fn protocol(self) -> Protocol {
        match self {
            Transport::Plain(p) => p,
            Transport::Mtls(_) => Protocol::H2c,
        }
    }
}

/// A send in progress, as [`send`] returns it.
pub type Sending<'a> =
    Pin<Box<dyn Future<Output = Result<Response<PooledBody>, SendError>> + Send + 'a>>;

/// Sends `req` (already rewritten for `transport`'s protocol) to `addr`. `admission`: the
/// backend's limits, when it has any (the local application has none).
///
/// Decided before the first poll: an HTTP/1.1 request whose body is complete, with an idle
/// pooled connection to `addr` (the steady state), is encoded now, and the returned future
/// holds only that connection and the request's bytes (a few hundred bytes, not the
/// request and every path's state). Every other path is boxed.
///
/// The request is borrowed, not moved: it stays where the caller keeps it (moving a
/// request costs a 350-byte copy at every level). With `keep` (its body must be buffered
/// or empty) it is left complete, for another attempt: as it was when only its bytes go
/// out, else as a copy while the original goes. Without `keep` its header map goes back
/// to the thread's spares, or the whole request goes out; the caller must not send it
/// again.
///
/// `now`: the caller's clock read (the request's clock is read once per step, not per
/// layer).
pub fn send<'a>(
    pool: &'a Arc<Pool>,
    addr: SocketAddr,
    transport: Transport<'a>,
    req: &mut Request<RequestBody>,
    keep: bool,
    admission: Option<Admission<'a>>,
    now: Instant,
) -> impl Future<Output = Result<Response<PooledBody>, SendError>> + Send + use<'a> {
    let wire = match transport {
        Transport::Plain(Protocol::Http1) => h1::Wire::new(req),
        _ => None,
    };
    let path = match (wire, transport) {
        (Some(wire), _) => match pool.take_h1_inline(addr, now.into_std()) {
            Some(conn) => {
                // Only the request's bytes in `wire` go on.
                if !keep {
                    crate::h1::spare::give_map(std::mem::take(req.headers_mut()));
                }
                Path::Pooled(conn, wire)
            }
            None => {
                let req = outgoing(req, keep);
                Path::Other(Box::pin(connect_h1_inline(
                    pool, addr, req, wire, admission,
                )))
            }
        },
        (None, transport) => {
            let req = outgoing(req, keep);
            let sending: Sending<'a> = match transport {
                Transport::Plain(Protocol::Http1) => {
                    Box::pin(send_h1_hyper(pool, addr, req, admission))
                }
                Transport::Plain(Protocol::H2c) => {
                    Box::pin(send_h2(pool, addr, None, req, admission))
                }
                Transport::Mtls(id) => Box::pin(send_h2(pool, addr, Some(id), req, admission)),
            };
            Path::Other(sending)
        }
    };
    async move {
        match path {
            Path::Pooled(conn, wire) => {
                exchange_h1_inline(pool, addr, conn, wire, true, admission).await
            }
            Path::Other(sending) => sending.await,
        }
    }
}

/// The request that goes out when it must go whole: with `keep`, the original (with its
/// extensions), leaving a copy in its place; else the request itself, leaving an empty one.
fn outgoing(req: &mut Request<RequestBody>, keep: bool) -> Request<RequestBody> {
    let left = if keep {
        copy_complete(req)
    } else {
        Request::new(RequestBody::EMPTY)
    };
    std::mem::replace(req, left)
}

enum Path<'a> {
    /// An idle connection taken from the pool, and the encoded request.
    Pooled(h1::Conn, h1::Wire),
    Other(Sending<'a>),
}

/// HTTP/2 (plain, or mTLS to another sidecar when `mtls` names its identity).
async fn send_h2(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    mtls: Option<&EndpointIdentity>,
    mut req: Request<RequestBody>,
    admission: Option<Admission<'_>>,
) -> Result<Response<PooledBody>, SendError> {
    let mut again = true;
    loop {
        let sender = match pool.h2(addr, mtls, admission).await {
            Ok(s) => s,
            Err(err) => return Err(SendError::new(err, Some(req))),
        };
        match h2::send(sender, req).await {
            Ok(resp) => return Ok(resp.map(PooledBody::h2)),
            // The shared connection took no new stream (the upstream is going away, as
            // in a rolling restart): once more, on a new connection.
            Err(h2::Failed {
                request: Some(r), ..
            }) if again => {
                req = r;
                again = false;
            }
            Err(failed) => {
                return Err(SendError::new(
                    UpstreamError::H2(failed.error),
                    failed.request,
                ));
            }
        }
    }
}

/// A request whose body is complete, on Tern's own HTTP/1.1 client, when no idle
/// connection was there: connect first (a failure hands the request back, unsent).
async fn connect_h1_inline(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    req: Request<RequestBody>,
    wire: h1::Wire,
    admission: Option<Admission<'_>>,
) -> Result<Response<PooledBody>, SendError> {
    let conn = match pool.connect_h1_inline(addr, admission).await {
        Ok(c) => c,
        Err(err) => return Err(SendError::new(err, Some(req))),
    };
    crate::h1::spare::give_map(req.into_parts().0.headers);
    exchange_h1_inline(pool, addr, conn, wire, false, admission).await
}

/// One exchange on Tern's own HTTP/1.1 client. A `reused` connection that the upstream
/// was closing as the request went out gets the request once more, on a new connection.
async fn exchange_h1_inline(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    mut conn: h1::Conn,
    wire: h1::Wire,
    mut reused: bool,
    admission: Option<Admission<'_>>,
) -> Result<Response<PooledBody>, SendError> {
    loop {
        match h1::exchange(&mut conn, &wire).await {
            Ok(resp) => {
                let (framing, keep_alive) = (resp.framing, resp.keep_alive);
                let body =
                    h1::ResponseBody::new(conn, framing, keep_alive, pool.id(), addr, resp.raw);
                return Ok(Response::from_parts(resp.parts, PooledBody::inline(body)));
            }
            Err(err) if reused && err.nothing_received() && wire.resendable => {
                conn = match Box::pin(pool.connect_h1_inline(addr, admission)).await {
                    Ok(c) => c,
                    Err(err) => return Err(SendError::new(err, None)),
                };
                reused = false;
            }
            Err(err) => return Err(SendError::new(UpstreamError::Exchange(err), None)),
        }
    }
}

/// A request whose body still streams, on hyper's HTTP/1.1 client (the body is sent
/// while the response is read).
async fn send_h1_hyper(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    mut req: Request<RequestBody>,
    admission: Option<Admission<'_>>,
) -> Result<Response<PooledBody>, SendError> {
    loop {
        let (mut conn, reused) = match pool.take_h1(addr) {
            Some(s) => (s, true),
            // Boxed: connecting is the cold path, and its large state would otherwise be
            // moved around with every request's future.
            None => match Box::pin(pool.connect_h1(addr, false, None, admission)).await {
                Ok(s) => (s, false),
                Err(err) => return Err(SendError::new(err, Some(req))),
            },
        };
        if conn.sender.ready().await.is_err() {
            if reused {
                continue;
            }
            let closed = std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection closed before the request was sent",
            );
            return Err(SendError::new(UpstreamError::Connect(closed), Some(req)));
        }
        match conn.sender.try_send_request(req).await {
            Ok(resp) => {
                return Ok(resp.map(|b| PooledBody::returning(b, pool.id(), addr, conn)));
            }
            Err(mut err) => match err.take_message() {
                // The request never left: a pooled connection died while idle. Try again.
                Some(r) if reused => req = r,
                r => return Err(SendError::new(UpstreamError::Request(err.into_error()), r)),
            },
        }
    }
}

/// Sends an HTTP/1.1 upgrade request on a fresh connection. On `101 Switching Protocols`,
/// spawns a tunnel that copies bytes between the client and the upstream until either
/// side closes.
pub async fn send_upgrade(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    mtls: Option<&EndpointIdentity>,
    mut req: Request<ClientBody>,
    admission: Option<Admission<'_>>,
) -> Result<Response<PooledBody>, UpstreamError> {
    let client = req.extensions_mut().remove::<crate::h1::OnUpgrade>();
    let req = req.map(RequestBody::Stream);
    let mut conn = pool.connect_h1(addr, true, mtls, admission).await?;
    let mut resp = conn
        .sender
        .send_request(req)
        .await
        .map_err(UpstreamError::Request)?;
    if let Some(client) = client.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Some(mut client), Ok(upstream)) = tokio::join!(client.upgraded(), upstream) else {
                return;
            };
            let mut upstream = TokioIo::new(upstream);
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%err, "upgraded tunnel closed");
            }
        });
    }
    Ok(resp.map(PooledBody::new))
}
