//! Tern's HTTP/1.1 client, for requests whose body is complete when they are sent (most
//! of them: no body, a body that came with its head, or one buffered for retries).
//!
//! The request is written and the response head read in the request's own task; the
//! response body is read by whoever polls it, and the connection goes back to the pool
//! when the body ends. No connection task, no channel, no wake-up between tasks: that
//! is what hyper's client costs per request. Streaming request bodies and upgrades go
//! through hyper's client instead (they need the body sent while the response is read).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Method, Request};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::pool::{Pool, PoolId};
use crate::body::{ClientBody, RequestBody};
use crate::h1::chunked::{ChunkError, Decoder, Event};
use crate::h1::head::{self, ResponseFraming};
use crate::h1::{COPY_LIMIT, spare};
use crate::policy::limits::Slot;
use crate::tcp::Tcp;

/// Largest response head accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// First read of a response: a head and a small body fit.
const READ_BUF: usize = 4 * 1024;
/// Later reads of a body that did not fit.
const BODY_READ: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("writing the request: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] io::Error),
    #[error("the upstream closed the connection before responding")]
    ClosedEarly,
    #[error("the upstream closed the connection mid-response")]
    Truncated,
    #[error("invalid response: {0}")]
    Malformed(&'static str),
    #[error("invalid response body: {0}")]
    Body(#[from] ChunkError),
}

impl ClientError {
    /// The upstream said nothing at all: on a reused connection it was probably closing
    /// it as the request went out.
    pub fn nothing_received(&self) -> bool {
        matches!(self, ClientError::Write(_) | ClientError::ClosedEarly)
    }
}

/// An HTTP/1.1 connection to an upstream, idle in the pool or carrying one exchange.
pub struct Conn {
    io: Tcp,
    rbuf: BytesMut,
    /// The backend's connection slot, held for the connection's life.
    _slot: Option<Slot>,
}

impl Conn {
    pub fn new(io: TcpStream, slot: Option<Slot>) -> Self {
        Conn {
            io: Tcp::new(io),
            rbuf: BytesMut::new(),
            _slot: slot,
        }
    }

    /// Whether an idle connection can take a request: nothing arrived since its last
    /// response (no close, no stray bytes). Costs no system call unless the socket
    /// became readable, and takes no lock: `try_io` reads the readiness the runtime
    /// keeps, where `poll_read_ready` would register a waker under the socket's mutex.
    pub fn is_reusable(&self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        if self
            .io
            .get_ref()
            .try_io(Interest::READABLE, || Ok(()))
            .is_err()
        {
            // Not readable since the last read found it drained.
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.io.get_ref().try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// The body of `req` when it is complete now (`Some(None)`: no body); `None` when it
/// still streams, and the request must go through hyper.
fn complete_body(body: &RequestBody) -> Option<Option<&Bytes>> {
    match body {
        RequestBody::Buffered {
            data,
            trailers: None,
        } => Some(data.as_ref()),
        RequestBody::Stream(ClientBody::H1(b)) => b.complete(),
        RequestBody::Stream(ClientBody::H2(b)) if http_body::Body::is_end_stream(b) => Some(None),
        _ => None,
    }
}

/// A request as bytes: its head, and its body when there is one.
pub struct Wire {
    head: spare::WriteBuf,
    /// A body too large to copy behind the head.
    body: Option<Bytes>,
    head_request: bool,
    /// May be sent again after the upstream closed a reused connection without
    /// answering (RFC 9110 §9.2.2: idempotent and safe to repeat).
    pub resendable: bool,
}

impl Wire {
    pub fn new(req: &Request<RequestBody>) -> Option<Wire> {
        let body = complete_body(req.body())?;
        let len = body.map(Bytes::len);
        let mut head = spare::write_buf(256 + req.headers().len() * 48 + len.unwrap_or(0));
        head::encode_request(&mut head, req.method(), req.uri(), req.headers(), len);
        let body = match body {
            Some(b) if b.len() > COPY_LIMIT => Some(b.clone()),
            Some(b) => {
                head.extend_from_slice(b);
                None
            }
            None => None,
        };
        let method = req.method();
        Some(Wire {
            head,
            body,
            head_request: method == Method::HEAD,
            resendable: matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS),
        })
    }
}

/// Sends `wire` on `conn` and reads the response head.
pub async fn exchange(conn: &mut Conn, wire: &Wire) -> Result<head::ParsedResponse, ClientError> {
    conn.io
        .write_all(&wire.head)
        .await
        .map_err(ClientError::Write)?;
    if let Some(body) = &wire.body {
        conn.io.write_all(body).await.map_err(ClientError::Write)?;
    }
    let mut received = false;
    loop {
        if !conn.rbuf.is_empty() {
            received = true;
            if let Some(resp) = head::parse_response(&mut conn.rbuf, MAX_HEAD, wire.head_request)
                .map_err(ClientError::Malformed)?
            {
                // Interim responses (100 Continue, 103 Early Hints) are skipped.
                if resp.parts.status.is_informational() {
                    continue;
                }
                return Ok(resp);
            }
        }
        crate::h1::reserve(&mut conn.rbuf, READ_BUF);
        let n =
            std::future::poll_fn(|cx| poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.rbuf))
                .await
                .map_err(ClientError::Read)?;
        if n == 0 {
            return Err(if received {
                ClientError::Truncated
            } else {
                ClientError::ClosedEarly
            });
        }
    }
}

/// A response body read straight from the upstream connection, which returns to the
/// pool at the body's end.
pub struct ResponseBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    pool: PoolId,
    addr: SocketAddr,
    /// The head's header lines, when kept as sent (the response's map is then empty).
    raw: Option<head::RawHeaders>,
}

enum State {
    Decoding(Decoder),
    UntilClose,
    Done,
}

impl ResponseBody {
    pub fn new(
        conn: Conn,
        framing: ResponseFraming,
        keep_alive: bool,
        pool: PoolId,
        addr: SocketAddr,
        raw: Option<head::RawHeaders>,
    ) -> Self {
        let state = match framing {
            ResponseFraming::None => State::Done,
            ResponseFraming::Length(n) => State::Decoding(Decoder::length(n)),
            ResponseFraming::Chunked => State::Decoding(Decoder::chunked()),
            ResponseFraming::UntilClose => State::UntilClose,
        };
        let mut body = ResponseBody {
            conn: Some(conn),
            state,
            keep_alive,
            pool,
            addr,
            raw,
        };
        if matches!(body.state, State::Done) {
            body.release();
        }
        body
    }

    /// The head's header lines kept as sent, if they still are.
    pub fn raw_slot(&mut self) -> &mut Option<head::RawHeaders> {
        &mut self.raw
    }

    /// The body ended: the connection goes back to the pool if it can serve again.
    fn release(&mut self) {
        self.state = State::Done;
        if let Some(mut conn) = self.conn.take()
            && self.keep_alive
            && conn.rbuf.is_empty()
        {
            // Idle connections hold no buffer: it goes to the thread's spares.
            spare::give_read(std::mem::take(&mut conn.rbuf));
            Pool::put_h1_inline(self.pool, self.addr, conn);
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Decoding(decoder) => match decoder.decode(&mut conn.rbuf, MAX_HEAD) {
                    Ok(Some(Event::Data(data))) => {
                        if decoder.is_done() {
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Some(Event::Trailers(t))) => {
                        this.release();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Some(Event::End)) => {
                        this.release();
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                    Err(err) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(err.into())));
                    }
                },
                State::UntilClose if !conn.rbuf.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(conn.rbuf.split().freeze()))));
                }
                State::UntilClose => {}
            }
            crate::h1::reserve(&mut conn.rbuf, BODY_READ);
            match poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.rbuf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let until_close = matches!(this.state, State::UntilClose);
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(if until_close {
                        None
                    } else {
                        Some(Err(ClientError::Truncated))
                    });
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(ClientError::Read(err))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Done => SizeHint::with_exact(0),
            State::Decoding(Decoder::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::pool::{PoolSettings, PooledBody};
    use crate::upstream::{Transport, send};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tern_config::snapshot::Protocol;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    /// An upstream that answers each request (by head) on each connection with the next
    /// scripted answer; `None` closes the connection without answering. Returns its
    /// address and the number of connections it accepted.
    async fn upstream(script: Vec<Option<&'static [u8]>>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut script = script.into_iter();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mut got = Vec::new();
                'conn: loop {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    // One answer per complete head (these requests have no bodies).
                    while let Some(end) = memchr::memmem::find(&got, b"\r\n\r\n") {
                        got.drain(..end + 4);
                        match script.next().flatten() {
                            Some(answer) => s.write_all(answer).await.unwrap(),
                            // Closes the connection without answering.
                            None => break 'conn,
                        }
                    }
                }
            }
        });
        (addr, accepted)
    }

    fn pool() -> Arc<Pool> {
        let addr = "127.0.0.1:1".parse().unwrap();
        let shared = crate::Shared::new(crate::Settings::for_tests(addr));
        Pool::new(PoolSettings::default(), shared)
    }

    fn get(method: Method, path: &str) -> Request<RequestBody> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "svc")
            .body(RequestBody::Buffered {
                data: None,
                trailers: None,
            })
            .unwrap();
        *req.version_mut() = http::Version::HTTP_11;
        req
    }

    async fn call(
        pool: &Arc<Pool>,
        addr: SocketAddr,
        req: Request<RequestBody>,
    ) -> Result<(http::response::Parts, http_body_util::Collected<Bytes>), String> {
        let mut req = req;
        let sending = send(
            pool,
            addr,
            Transport::Plain(Protocol::Http1),
            &mut req,
            false,
            None,
            Instant::now(),
        );
        let mut resp = sending.await.map_err(|e| e.error.to_string())?;
        // The head's lines as a map, whether they came as lines or not.
        crate::body::full_headers(&mut resp);
        let (parts, body): (_, PooledBody) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?;
        Ok((parts, body))
    }

    #[tokio::test]
    async fn a_kept_request_comes_back_whole_for_another_attempt() {
        let (addr, accepted) = upstream(vec![
            Some(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ])
        .await;
        let pool = pool();
        let mut req = get(Method::PUT, "/a?b=c");
        *req.body_mut() = RequestBody::Buffered {
            data: Some(Bytes::from_static(b"body")),
            trailers: None,
        };
        req.headers_mut().insert("x-one", "1".parse().unwrap());
        let same = |kept: &Request<RequestBody>| {
            assert_eq!(kept.method(), Method::PUT);
            assert_eq!(kept.uri(), "/a?b=c");
            assert_eq!(kept.headers()["x-one"], "1");
            assert_eq!(kept.headers()["host"], "svc");
            assert!(
                matches!(kept.body(), RequestBody::Buffered { data: Some(d), .. } if d == "body")
            );
        };
        // No idle connection: the request goes to a new one, and a copy stays.
        let http1 = Transport::Plain(Protocol::Http1);
        let sending = send(&pool, addr, http1, &mut req, true, None, Instant::now());
        same(&req);
        let resp = sending.await.map_err(|e| e.error.to_string()).unwrap();
        assert_eq!(resp.status(), 503);
        resp.into_body().collect().await.unwrap();
        // An idle connection: only the bytes go, and the request itself stays.
        let sending = send(&pool, addr, http1, &mut req, true, None, Instant::now());
        same(&req);
        let resp = sending.await.map_err(|e| e.error.to_string()).unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        // Without `keep`, the request's header map goes to the spares.
        let sending = send(&pool, addr, http1, &mut req, false, None, Instant::now());
        assert!(req.headers().is_empty());
        assert_eq!(
            sending
                .await
                .map_err(|e| e.error.to_string())
                .unwrap()
                .status(),
            200
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
    }

    #[tokio::test]
    async fn an_upstreams_lines_become_the_map_once() {
        use crate::h1::RawHead;
        let (addr, _) = upstream(vec![Some(
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok",
        )])
        .await;
        let pool = pool();
        let http1 = Transport::Plain(Protocol::Http1);
        let mut req = get(Method::GET, "/");
        let sending = send(&pool, addr, http1, &mut req, false, None, Instant::now());
        let mut resp = sending.await.map_err(|e| e.error.to_string()).unwrap();
        // Kept as lines: the map is empty until someone asks for the headers.
        assert!(resp.headers().is_empty());
        let headers = crate::body::full_headers(&mut resp);
        assert_eq!(headers["x-a"], "1");
        headers.insert("x-a", http::HeaderValue::from_static("2"));
        // The lines left the body when parsed: the writer finds none to write again.
        assert!(resp.body_mut().take_raw_headers().is_none());
        assert_eq!(resp.headers()["x-a"], "2");
        let body = resp.into_body().collect().await.unwrap();
        assert_eq!(body.to_bytes(), "ok");
    }

    #[tokio::test]
    async fn reuses_one_connection_across_framings() {
        let (addr, accepted) = upstream(vec![
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            Some(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n"),
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
            Some(b"HTTP/1.1 204 No Content\r\n\r\n"),
        ])
        .await;
        let pool = pool();
        let (parts, body) = call(&pool, addr, get(Method::GET, "/a")).await.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(body.to_bytes(), "hello");
        let (_, body) = call(&pool, addr, get(Method::GET, "/b")).await.unwrap();
        assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(body.to_bytes(), "abc");
        let (parts, body) = call(&pool, addr, get(Method::HEAD, "/c")).await.unwrap();
        assert_eq!(parts.headers["content-length"], "99");
        assert!(body.to_bytes().is_empty());
        let (parts, _) = call(&pool, addr, get(Method::GET, "/d")).await.unwrap();
        assert_eq!(parts.status, 204);
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
    }

    #[tokio::test]
    async fn resends_a_get_once_when_a_reused_connection_was_closing() {
        // The upstream answers once, then closes the connection when the second request
        // arrives (as a server timing out an idle connection does); a new connection
        // answers.
        let (addr, accepted) = upstream(vec![
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"),
            None,
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"),
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3"),
            None,
        ])
        .await;
        let pool = pool();
        assert_eq!(
            call(&pool, addr, get(Method::GET, "/"))
                .await
                .unwrap()
                .1
                .to_bytes(),
            "1"
        );
        assert_eq!(
            call(&pool, addr, get(Method::GET, "/"))
                .await
                .unwrap()
                .1
                .to_bytes(),
            "2"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST is not sent twice: the failure is the caller's (whose retry policy
        // knows whether it may repeat it).
        assert_eq!(
            call(&pool, addr, get(Method::GET, "/"))
                .await
                .unwrap()
                .1
                .to_bytes(),
            "3"
        );
        let err = call(&pool, addr, get(Method::POST, "/")).await.unwrap_err();
        assert!(
            err.contains("closed the connection before responding"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_reused() {
        // Each connection answers one request and then closes while idle (as a server's
        // keep-alive timeout does): the pool must see the close before it sends on it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{n}");
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let pool = pool();
        let (_, body) = call(&pool, addr, get(Method::GET, "/")).await.unwrap();
        assert_eq!(body.to_bytes(), "1");
        // The close reaches the runtime while the connection is idle in the pool.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // A POST is never resent on a new connection: it succeeds only if the closed
        // connection was not taken.
        let (_, body) = call(&pool, addr, get(Method::POST, "/")).await.unwrap();
        assert_eq!(body.to_bytes(), "2");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn reads_a_body_delimited_by_close_and_does_not_pool_it() {
        let (addr, accepted) = upstream(vec![
            Some(b"HTTP/1.0 200 OK\r\n\r\nuntil close"),
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ])
        .await;
        let pool = pool();
        // The upstream keeps its side open here: read what came, then end with it.
        let sending = send(
            &pool,
            addr,
            Transport::Plain(Protocol::Http1),
            &mut get(Method::GET, "/"),
            false,
            None,
            Instant::now(),
        );
        let resp = sending.await.map_err(|e| e.error.to_string()).unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "until close");
        drop(body);
        assert_eq!(
            call(&pool, addr, get(Method::GET, "/"))
                .await
                .unwrap()
                .1
                .to_bytes(),
            "ok"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the first connection was not reused"
        );
    }
}
