//! One HTTP/1.1 server connection, driven in its own task without spawning.
//!
//! The loop: wait until the socket is readable (holding no buffer: an idle keep-alive
//! connection costs its task and its socket, nothing more), read and parse a head, call
//! the service while reading the request body on its behalf and watching for the client
//! going away, write the response, and either go round again or close.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use super::body::{Body, BodyError, Pipe, Want};
use super::chunked::{Decoder, Event};
use super::head::{self, Framing, Meta, Refusal};

/// A connection the HTTP/1.1 server can run on.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves when a read may make progress. Waiting here instead of in a read is what
    /// lets an idle connection hold no buffer; streams that buffer internally (TLS)
    /// answer at once and are read into a buffer.
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Io for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Io for tokio_rustls::server::TlsStream<TcpStream> {}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Largest request head (request line and headers); larger gets 431.
    pub max_head: usize,
    /// Most request headers; more gets 431.
    pub max_headers: usize,
    /// Time from a head's first bytes to its end.
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this long.
    pub idle_timeout: Duration,
}

/// First read buffer of a request; grows for larger heads and bodies.
const READ_BUF: usize = 4096;
/// Read size while a body streams.
const BODY_READ: usize = 16 * 1024;
/// Data frames at least this large are written as they are, not copied.
const COPY_LIMIT: usize = 16 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Closing with unread input makes the kernel reset the connection, which can destroy a
/// response the client has not read yet: read and discard this much, this long, first.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// In a request's extensions when it asked to upgrade: the connection, once a `101` has
/// been written.
/// (Shared, because request extensions must be `Clone`; the first taker gets it.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<std::sync::Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    pub async fn upgraded(self) -> Option<Upgraded> {
        let rx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        rx.await.ok()
    }
}

/// The client connection after `101 Switching Protocols`, with what it sent early.
pub struct Upgraded {
    io: Box<dyn Io>,
    prefix: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body still on the wire, read by the connection for the body's reader.
struct Reader {
    pipe: Arc<Pipe>,
    decoder: Decoder,
    /// Bytes of `100 Continue` written so far, while one is owed.
    continue_at: Option<usize>,
    state: ReadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Reading,
    /// The whole body was read.
    Done,
    /// The body's reader went away, or the body was malformed: the rest is unread.
    Abandoned,
}

/// The client is gone (end of stream or an error while the request was in flight).
struct Gone;

struct Conn<S> {
    io: S,
    rbuf: BytesMut,
    settings: Settings,
}

enum HeadError {
    Refused(Refusal),
    /// End of stream inside a head, a read error, or the header timeout: just close.
    Closed,
}

/// Serves HTTP/1.1 requests on `io` until the client closes, the connection idles out,
/// or `drain` is raised (open requests finish first). `service` answers requests;
/// `refuse` answers requests whose head was refused.
pub async fn serve<S, F, Fut, B, R>(
    io: S,
    settings: Settings,
    drain: &mut watch::Receiver<bool>,
    mut service: F,
    refuse: R,
) where
    S: Io,
    F: FnMut(Request<Body>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
    R: Fn(Refusal) -> Response<B>,
{
    let mut conn = Conn {
        io,
        rbuf: BytesMut::new(),
        settings,
    };
    // One timer per connection, re-armed for each wait: pushing a deadline later is an
    // atomic store, not a timer-wheel operation.
    let timer = tokio::time::sleep(settings.idle_timeout);
    tokio::pin!(timer);
    loop {
        if conn.rbuf.is_empty() {
            // Idle: give the buffer back before waiting.
            conn.rbuf = BytesMut::new();
            timer.as_mut().reset(Instant::now() + settings.idle_timeout);
            let readable = tokio::select! {
                biased;
                r = poll_fn(|cx| conn.io.poll_read_ready(cx)) => r.is_ok(),
                _ = drain.wait_for(|d| *d) => false,
                () = timer.as_mut() => false,
            };
            if !readable {
                return;
            }
        }
        let parsed = match conn.read_head(timer.as_mut()).await {
            Ok(Some(p)) => p,
            Ok(None) | Err(HeadError::Closed) => return,
            Err(HeadError::Refused(refusal)) => {
                tracing::debug!(%refusal, "request head refused");
                let resp = refuse(refusal);
                let _ = conn
                    .respond(
                        resp,
                        &Method::GET,
                        Version::HTTP_11,
                        false,
                        false,
                        &mut None,
                    )
                    .await;
                conn.close(true).await;
                return;
            }
        };
        // Boxed: the request's state (the service's future, the response) exists only
        // while a request does; an idle connection keeps only what is above.
        let next = Box::pin(conn.exchange(parsed, &mut service, drain)).await;
        match next {
            Next::Again => {}
            Next::Close { linger } => {
                Box::pin(conn.close(linger)).await;
                return;
            }
            Next::Gone => return,
            Next::Upgrade(tx) => {
                let Conn { io, rbuf, .. } = conn;
                let _ = tx.send(Upgraded {
                    io: Box::new(io),
                    prefix: rbuf.freeze(),
                });
                return;
            }
        }
    }
}

/// What the connection does after an exchange.
enum Next {
    Again,
    Close {
        linger: bool,
    },
    /// The client or the connection failed: drop it.
    Gone,
    /// A `101` was written: the connection goes to the upgrade's tunnel.
    Upgrade(oneshot::Sender<Upgraded>),
}

impl<S: Io> Conn<S> {
    /// One request and its response.
    async fn exchange<F, Fut, B>(
        &mut self,
        parsed: head::Parsed,
        service: &mut F,
        drain: &watch::Receiver<bool>,
    ) -> Next
    where
        F: FnMut(Request<Body>) -> Fut,
        Fut: Future<Output = Response<B>>,
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let meta = parsed.meta;
        let method = parsed.parts.method.clone();
        let version = parsed.parts.version;
        let (body, mut reader) = self.body(&meta);
        let mut req = Request::from_parts(parsed.parts, body);
        let mut upgrade = None;
        if meta.upgrade {
            let (tx, rx) = oneshot::channel();
            req.extensions_mut()
                .insert(OnUpgrade(Arc::new(std::sync::Mutex::new(Some(rx)))));
            upgrade = Some(tx);
        }

        let fut = service(req);
        tokio::pin!(fut);
        let resp = poll_fn(|cx| {
            if let Poll::Ready(resp) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            match self.pump(cx, &mut reader) {
                // The client went away: dropping the request cancels it upstream.
                Err(Gone) => Poll::Ready(None),
                Ok(()) => Poll::Pending,
            }
        })
        .await;
        let Some(resp) = resp else {
            return Next::Gone;
        };

        if let Some(tx) = upgrade.take_if(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
            return match self
                .respond(resp, &method, version, true, false, &mut None)
                .await
            {
                Ok(_) => Next::Upgrade(tx),
                Err(()) => Next::Gone,
            };
        }
        let keep_alive = meta.keep_alive && !*drain.borrow();
        let respond = self.respond(
            resp,
            &method,
            version,
            keep_alive,
            meta.trailers,
            &mut reader,
        );
        let Ok(kept) = respond.await else {
            return Next::Gone;
        };
        let body_unread = reader.as_ref().is_some_and(|r| r.state != ReadState::Done);
        if !kept || body_unread {
            return Next::Close {
                linger: body_unread,
            };
        }
        Next::Again
    }

    /// Reads until a whole head is buffered. `Ok(None)`: the client closed cleanly
    /// between requests.
    async fn read_head(
        &mut self,
        mut timer: Pin<&mut Sleep>,
    ) -> Result<Option<head::Parsed>, HeadError> {
        let mut armed = false;
        loop {
            if !self.rbuf.is_empty() {
                let s = &self.settings;
                match head::parse_request(&mut self.rbuf, s.max_head, s.max_headers) {
                    Ok(Some(parsed)) => return Ok(Some(parsed)),
                    Ok(None) => {}
                    Err(refusal) => return Err(HeadError::Refused(refusal)),
                }
                if !armed {
                    // Slow heads (slowloris) get a deadline; whole ones never touch it.
                    timer.as_mut().reset(Instant::now() + s.header_read_timeout);
                    armed = true;
                }
            }
            reserve(&mut self.rbuf, READ_BUF);
            let read = poll_fn(|cx| {
                if armed && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
            })
            .await;
            match read {
                Ok(0) if self.rbuf.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(_) => {}
            }
        }
    }

    /// The request's body: none, already buffered, or to be read while it is handled.
    fn body(&mut self, meta: &Meta) -> (Body, Option<Reader>) {
        let (decoder, length) = match meta.framing {
            Framing::None => return (Body::empty(), None),
            Framing::Length(n) if self.rbuf.len() as u64 >= n => {
                return (Body::full(self.rbuf.split_to(n as usize).freeze()), None);
            }
            Framing::Length(n) => (Decoder::length(n), Some(n)),
            Framing::Chunked => (Decoder::chunked(), None),
        };
        let (body, pipe) = Body::streaming(length);
        let reader = Reader {
            pipe,
            decoder,
            // A client that already sent body bytes is not waiting for the go-ahead.
            continue_at: (meta.expect_continue && self.rbuf.is_empty()).then_some(0),
            state: ReadState::Reading,
        };
        (body, Some(reader))
    }

    /// Reads the request body for its reader while the request is handled, and otherwise
    /// watches the socket for the client closing it.
    fn pump(&mut self, cx: &mut Context<'_>, reader: &mut Option<Reader>) -> Result<(), Gone> {
        loop {
            match reader {
                Some(r) if r.state == ReadState::Reading => {
                    match r.pipe.poll_want(cx) {
                        Poll::Pending => return Ok(()),
                        Poll::Ready(Want::Gone) => {
                            r.state = ReadState::Abandoned;
                            return Ok(());
                        }
                        Poll::Ready(Want::Frame) => {}
                    }
                    if let Some(at) = r.continue_at {
                        match Pin::new(&mut self.io).poll_write(cx, &CONTINUE[at..]) {
                            Poll::Ready(Ok(n)) if n > 0 => {
                                let at = at + n;
                                r.continue_at = (at < CONTINUE.len()).then_some(at);
                                if r.continue_at.is_none() {
                                    let _ = Pin::new(&mut self.io).poll_flush(cx);
                                }
                                continue;
                            }
                            Poll::Pending => return Ok(()),
                            Poll::Ready(_) => return Err(Gone),
                        }
                    }
                    match r.decoder.decode(&mut self.rbuf, self.settings.max_head) {
                        Ok(Some(Event::Data(data))) => {
                            let last = r.decoder.is_done();
                            r.pipe.send(Ok(Frame::data(data)), last);
                            if last {
                                r.state = ReadState::Done;
                            }
                        }
                        Ok(Some(Event::Trailers(t))) => {
                            r.pipe.send(Ok(Frame::trailers(t)), true);
                            r.state = ReadState::Done;
                        }
                        Ok(Some(Event::End)) => {
                            r.pipe.finish();
                            r.state = ReadState::Done;
                        }
                        Ok(None) => {
                            reserve(&mut self.rbuf, BODY_READ);
                            match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                                Poll::Ready(Ok(0)) => {
                                    r.pipe.send(Err(BodyError::Incomplete), true);
                                    r.state = ReadState::Abandoned;
                                    return Err(Gone);
                                }
                                Poll::Ready(Ok(_)) => {}
                                Poll::Ready(Err(err)) => {
                                    r.pipe.send(Err(BodyError::Io(err)), true);
                                    r.state = ReadState::Abandoned;
                                    return Err(Gone);
                                }
                                Poll::Pending => return Ok(()),
                            }
                        }
                        Err(err) => {
                            r.pipe.send(Err(BodyError::Framing(err)), true);
                            r.state = ReadState::Abandoned;
                            return Ok(());
                        }
                    }
                }
                // The rest of an abandoned body is not read: the connection closes.
                Some(r) if r.state == ReadState::Abandoned => return Ok(()),
                _ => {
                    // Nothing to read for the request: notice the client closing (what
                    // it pipelines meanwhile is kept, up to a head's worth).
                    if self.rbuf.len() >= self.settings.max_head {
                        return Ok(());
                    }
                    reserve(&mut self.rbuf, READ_BUF);
                    match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                        Poll::Ready(Ok(0) | Err(_)) => return Err(Gone),
                        Poll::Ready(Ok(_)) => {}
                        Poll::Pending => return Ok(()),
                    }
                }
            }
        }
    }

    /// Writes a response. `Ok(true)`: the connection may serve another request.
    async fn respond<B>(
        &mut self,
        resp: Response<B>,
        method: &Method,
        version: Version,
        mut keep_alive: bool,
        trailers_ok: bool,
        reader: &mut Option<Reader>,
    ) -> Result<bool, ()>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        if let Some(r) = reader.as_mut() {
            match r.continue_at {
                // Never told to go ahead, the client will not send the body: it stays
                // unread and the connection closes after this response.
                Some(0) => r.continue_at = None,
                Some(_) => return Err(()),
                None => {}
            }
        }
        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        let out = if head::bodiless(method, status) {
            Out::Nothing
        } else if let Some(n) = head::declared_length(&parts.headers) {
            Out::Length(n, false)
        } else if let Some(n) = body.size_hint().exact() {
            Out::Length(n, true)
        } else if version == Version::HTTP_11 {
            Out::Chunked
        } else {
            Out::UntilClose
        };
        if matches!(out, Out::UntilClose) || closes(&parts.headers) {
            keep_alive = false;
        }
        let framing = match out {
            Out::Length(n, _) => Framing::Length(n),
            Out::Chunked => Framing::Chunked,
            Out::Nothing | Out::UntilClose => Framing::None,
        };
        let mut wbuf = Vec::with_capacity(256 + parts.headers.len() * 48);
        head::encode_response(
            &mut wbuf,
            status,
            &parts.headers,
            framing,
            matches!(out, Out::Length(_, true)),
            !keep_alive,
            keep_alive && version == Version::HTTP_10,
        );
        drop(parts);
        if matches!(out, Out::Nothing) {
            drop(body);
            self.write(&wbuf).await?;
            return Ok(keep_alive);
        }

        let mut written = 0u64;
        let mut trailers = None;
        let mut pumping = true;
        loop {
            let step = poll_fn(|cx| {
                if pumping && self.pump(cx, reader).is_err() {
                    pumping = false;
                }
                match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(frame) => Poll::Ready(Some(frame)),
                    // Before waiting on the body, send what is ready.
                    Poll::Pending if !wbuf.is_empty() => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            let frame = match step {
                None => {
                    self.write(&wbuf).await?;
                    wbuf.clear();
                    continue;
                }
                Some(None) => break,
                Some(Some(Err(err))) => {
                    tracing::debug!(%err, "response body failed; closing the connection");
                    let _ = self.write(&wbuf).await;
                    return Err(());
                }
                Some(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            written += data.len() as u64;
            match out {
                Out::Length(n, _) if written > n => {
                    tracing::debug!("response body longer than its Content-Length");
                    return Err(());
                }
                Out::Chunked => {
                    let mut hex = [0u8; 16];
                    wbuf.extend_from_slice(hex_len(data.len(), &mut hex));
                    wbuf.extend_from_slice(b"\r\n");
                }
                _ => {}
            }
            if data.len() >= COPY_LIMIT {
                self.write(&wbuf).await?;
                wbuf.clear();
                self.write(&data).await?;
            } else {
                wbuf.extend_from_slice(&data);
            }
            if matches!(out, Out::Chunked) {
                wbuf.extend_from_slice(b"\r\n");
            }
        }
        match out {
            Out::Chunked => {
                wbuf.extend_from_slice(b"0\r\n");
                head::encode_trailers(&mut wbuf, trailers.as_ref().filter(|_| trailers_ok));
            }
            Out::Length(n, _) if written != n => {
                tracing::debug!("response body shorter than its Content-Length");
                let _ = self.write(&wbuf).await;
                return Err(());
            }
            _ => {}
        }
        self.write(&wbuf).await?;
        Ok(keep_alive && pumping)
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), ()> {
        if data.is_empty() {
            return Ok(());
        }
        self.io.write_all(data).await.map_err(|_| ())?;
        self.io.flush().await.map_err(|_| ())
    }

    /// Ends the connection; with `linger`, first reads what the client may still be
    /// sending (bounded) so that the close does not reset away the response.
    async fn close(mut self, linger: bool) {
        let _ = tokio::time::timeout(LINGER_TIME, self.io.shutdown()).await;
        if !linger {
            return;
        }
        let discard = async {
            let mut scratch = vec![0u8; 8192];
            let mut total = 0;
            while total < LINGER_BYTES {
                match self.io.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, discard).await;
    }
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy)]
enum Out {
    Nothing,
    /// A length; `true` when Tern adds the `content-length` header.
    Length(u64, bool),
    Chunked,
    /// HTTP/1.0 without a length: the body ends when the connection does.
    UntilClose,
}

/// Whether a response's `Connection` header says the connection closes after it.
fn closes(headers: &http::HeaderMap) -> bool {
    headers.get_all(http::header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

fn hex_len(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Makes room for a read of at least `want` bytes.
fn reserve(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
}
