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
use super::{COPY_LIMIT, RawHead, spare};
use crate::boxed;
use crate::quiet::QuietSleep;

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

impl Io for crate::tcp::Tcp {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().poll_read_ready(cx)
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

/// Answers the requests of one connection, one at a time: `&mut self` lets what a
/// connection keeps between its requests (a timer, caches) go without a lock.
pub trait Service {
    type Body: HttpBody<Data = Bytes> + RawHead + Unpin;

    fn call(&mut self, req: Request<Body>) -> impl Future<Output = Response<Self::Body>> + Send;
}

impl<F, Fut, B> Service for F
where
    F: FnMut(Request<Body>) -> Fut,
    Fut: Future<Output = Response<B>> + Send,
    B: HttpBody<Data = Bytes> + RawHead + Unpin,
{
    type Body = B;

    fn call(&mut self, req: Request<Body>) -> impl Future<Output = Response<B>> + Send {
        self(req)
    }
}

/// Whether drain has been raised, read without the watch's lock (`borrow` takes it). A
/// connection's receiver has seen only the initial `false`, so any newer version is the
/// raise; a closed channel means the process is going away.
fn raised(drain: &watch::Receiver<bool>) -> bool {
    drain.has_changed().unwrap_or(true)
}

/// Serves HTTP/1.1 requests on `io` until the client closes, the connection idles out,
/// or `drain` is raised (open requests finish first). `service` answers requests;
/// `refuse` answers requests whose head was refused.
pub async fn serve<S, F, R>(
    io: S,
    settings: Settings,
    drain: &watch::Receiver<bool>,
    mut service: F,
    refuse: R,
) where
    S: Io,
    F: Service,
    <F::Body as HttpBody>::Error: std::fmt::Display,
    R: Fn(Refusal) -> Response<F::Body>,
{
    let mut conn = Conn {
        io,
        rbuf: BytesMut::new(),
        settings,
    };
    // One timer per connection. An idle wait does not move it (a reset is a few locked
    // instructions, on every request): when it fires before the wait's own deadline, it
    // is moved then, once per idle timeout at most.
    let timer = tokio::time::sleep(settings.idle_timeout);
    tokio::pin!(timer);
    let mut timer = QuietSleep::new(timer);
    // One drain watch per connection too: once registered it stays registered across
    // idle waits (a fresh wait on each would register and unregister once per request).
    let mut watching = drain.clone();
    let drained = async move {
        let _ = watching.wait_for(|d| *d).await;
    };
    tokio::pin!(drained);
    // Polled again only once drain is raised: a poll takes the watch's lock, and the
    // waker its first poll left stays registered (the same task's).
    let mut watched = false;
    let mut drained = poll_fn(move |cx| {
        if watched && !raised(drain) {
            return Poll::Pending;
        }
        watched = true;
        drained.as_mut().poll(cx)
    });
    loop {
        if conn.rbuf.is_empty() {
            // Idle: give the buffer back before waiting (to the thread's spares, for
            // the next request on any connection).
            spare::give_read(std::mem::take(&mut conn.rbuf));
            let idle_until = Instant::now() + settings.idle_timeout;
            if timer.deadline() > idle_until {
                // A head's deadline (the header timeout) may lie beyond this one.
                timer.reset(idle_until);
            }
            let readable = loop {
                tokio::select! {
                    biased;
                    r = poll_fn(|cx| conn.io.poll_read_ready(cx)) => break r.is_ok(),
                    () = &mut drained => break false,
                    () = poll_fn(|cx| timer.poll_fired(cx)) => {
                        if Instant::now() >= idle_until {
                            break false;
                        }
                        timer.reset(idle_until);
                    }
                }
            };
            if !readable {
                return;
            }
        }
        let parsed = match conn.read_head(&mut timer).await {
            Ok(Some(p)) => p,
            Ok(None) | Err(HeadError::Closed) => return,
            Err(HeadError::Refused(refusal)) => {
                tracing::debug!(%refusal, "request head refused");
                // Boxed, as are the other rare paths: an idle connection's task is as
                // large as its largest state.
                Box::pin(conn.refuse(refuse(refusal))).await;
                return;
            }
        };
        // Boxed: the request's state (the service's future, the response) exists only
        // while a request does; an idle connection keeps only what is above.
        let next = boxed::future(|| conn.exchange(parsed, &mut service, drain)).await;
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
    /// Answers a refused head and closes.
    async fn refuse<B>(mut self, mut resp: Response<B>)
    where
        B: HttpBody<Data = Bytes> + RawHead + Unpin,
        B::Error: std::fmt::Display,
    {
        let _ = self
            .respond(
                &mut resp,
                &Method::GET,
                Version::HTTP_11,
                false,
                false,
                &mut None,
            )
            .await;
        self.close(true).await;
    }

    /// One request and its response.
    async fn exchange<F>(
        &mut self,
        parsed: head::Parsed,
        service: &mut F,
        drain: &watch::Receiver<bool>,
    ) -> Next
    where
        F: Service,
        <F::Body as HttpBody>::Error: std::fmt::Display,
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

        // Scoped: the service's future ends with its response, so the response's writing
        // below reuses its room in this future.
        let resp = {
            let mut fut = std::pin::pin!(service.call(req));
            poll_fn(|cx| {
                if let Poll::Ready(resp) = fut.as_mut().poll(cx) {
                    return Poll::Ready(Some(resp));
                }
                match self.pump(cx, &mut reader) {
                    // The client went away: dropping the request cancels it upstream.
                    Err(Gone) => Poll::Ready(None),
                    Ok(()) => Poll::Pending,
                }
            })
            .await
        };
        let Some(mut resp) = resp else {
            return Next::Gone;
        };

        if let Some(tx) = upgrade.take_if(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
            return match self
                .respond(&mut resp, &method, version, true, false, &mut None)
                .await
            {
                Ok(_) => Next::Upgrade(tx),
                Err(()) => Next::Gone,
            };
        }
        let keep_alive = meta.keep_alive && !raised(drain);
        let respond = self.respond(
            &mut resp,
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
        timer: &mut QuietSleep<&mut Sleep>,
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
                    timer.reset(Instant::now() + s.header_read_timeout);
                    armed = true;
                }
            }
            reserve(&mut self.rbuf, READ_BUF);
            let read = poll_fn(|cx| {
                if armed && timer.poll_fired(cx).is_ready() {
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
    ///
    /// Borrowed, not moved: a response is a few hundred bytes, copied at every move.
    /// Its header map goes back to the thread's spares once written.
    async fn respond<B>(
        &mut self,
        resp: &mut Response<B>,
        method: &Method,
        version: Version,
        mut keep_alive: bool,
        trailers_ok: bool,
        reader: &mut Option<Reader>,
    ) -> Result<bool, ()>
    where
        B: HttpBody<Data = Bytes> + RawHead + Unpin,
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
        let raw = resp.body_mut().take_raw_headers();
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let body = resp.body_mut();
        let mut add_head_length = None;
        let out = if head::bodiless(*method == Method::HEAD, status) {
            // A HEAD answered locally still says how long the body would be.
            let n = body.size_hint().exact().unwrap_or(0);
            if n > 0 && *method == Method::HEAD && head::declared_length(&headers).is_none() {
                add_head_length = Some(n);
            }
            Out::Nothing
        } else if let Some(n) = head::declared_length(&headers) {
            Out::Length(n, false)
        } else if let Some(n) = body.size_hint().exact() {
            Out::Length(n, true)
        } else if version == Version::HTTP_11 {
            Out::Chunked
        } else {
            Out::UntilClose
        };
        if matches!(out, Out::UntilClose) || closes(&headers) {
            keep_alive = false;
        }
        let framing = match out {
            Out::Nothing => add_head_length.map_or(Framing::None, Framing::Length),
            Out::Length(n, _) => Framing::Length(n),
            Out::Chunked => Framing::Chunked,
            Out::UntilClose => Framing::None,
        };
        // Room for the head and a body small enough to go in the same write.
        let inline_body = body.size_hint().exact().filter(|&n| n < COPY_LIMIT as u64);
        let raw_len = raw.as_ref().map_or(0, |r| r.byte_len());
        let capacity = 256 + raw_len + headers.len() * 48 + inline_body.unwrap_or(0) as usize;
        let mut wbuf = spare::write_buf(capacity);
        head::encode_response(
            &mut wbuf,
            status,
            raw.as_ref(),
            &headers,
            framing,
            matches!(out, Out::Length(_, true)) || add_head_length.is_some(),
            !keep_alive,
            keep_alive && version == Version::HTTP_10,
        );
        // Written: the head's lines and values let go of the upstream's read buffer, which
        // can then be reused.
        drop(raw);
        spare::give_map(headers);
        if matches!(out, Out::Nothing) {
            self.write(&wbuf).await?;
            return Ok(keep_alive);
        }

        let mut written = 0u64;
        let mut trailers = None;
        let mut pumping = true;
        loop {
            // The client is read (`pump`) only before a wait, not on every step: a poll
            // of its socket that finds nothing registers the task under the socket's
            // waiter lock, two locked instructions each time.
            let step = poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
                // Before waiting on the body, send what is ready.
                Poll::Pending if !wbuf.is_empty() => Poll::Ready(None),
                Poll::Pending => {
                    if pumping && self.pump(cx, reader).is_err() {
                        pumping = false;
                    }
                    Poll::Pending
                }
            })
            .await;
            let frame = match step {
                None => {
                    self.write_pumping(&wbuf, reader, &mut pumping).await?;
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
                self.write_pumping(&wbuf, reader, &mut pumping).await?;
                wbuf.clear();
                self.write_pumping(&data, reader, &mut pumping).await?;
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
        self.write_pumping(&wbuf, reader, &mut pumping).await?;
        Ok(keep_alive && pumping)
    }

    /// Writes while still reading the request body for its reader: a client may send
    /// its whole body before it reads any of a response that is already streaming back
    /// (an echo), and both sides would otherwise wait on each other.
    async fn write_pumping(
        &mut self,
        mut data: &[u8],
        reader: &mut Option<Reader>,
        pumping: &mut bool,
    ) -> Result<(), ()> {
        while !data.is_empty() {
            let n = poll_fn(|cx| match Pin::new(&mut self.io).poll_write(cx, data) {
                // Waiting for the client to read: read what it sends meanwhile.
                Poll::Pending => {
                    if *pumping && self.pump(cx, reader).is_err() {
                        *pumping = false;
                    }
                    Poll::Pending
                }
                written => written,
            })
            .await
            .map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            data = &data[n..];
        }
        self.io.flush().await.map_err(|_| ())
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
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| head::tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close")))
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
pub(crate) fn reserve(buf: &mut BytesMut, want: usize) {
    if buf.capacity() == 0
        && let Some(spare) = spare::take_read(want)
    {
        *buf = spare;
    }
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::net::TcpListener;

    type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

    impl RawHead for TestBody {}

    fn settings() -> Settings {
        Settings {
            max_head: 1024,
            max_headers: 20,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }

    fn full(s: impl Into<Bytes>) -> TestBody {
        Full::new(s.into()).map_err(|e| match e {}).boxed_unsync()
    }

    /// The test service: `/echo` answers the body it read (and its trailers' names),
    /// `/stream` answers a body of unknown length with a trailer, `/upgrade` switches
    /// protocols, `/hang` never answers; anything else answers method and path.
    async fn service(req: Request<Body>, dropped: Arc<AtomicBool>) -> Response<TestBody> {
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        match req.uri().path() {
            "/echo" => {
                let collected = req.into_body().collect().await;
                let text = match collected {
                    Ok(c) => {
                        let t = c.trailers().map(|t| t.len()).unwrap_or(0);
                        format!("{}|{}", String::from_utf8_lossy(&c.to_bytes()), t)
                    }
                    Err(e) => format!("error: {e}"),
                };
                Response::new(full(text))
            }
            "/stream" => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let frames = Frames(
                    [
                        Frame::data(Bytes::from_static(b"abc")),
                        Frame::data(Bytes::from_static(b"defgh")),
                        Frame::trailers(trailers),
                    ]
                    .into(),
                );
                Response::new(frames.boxed_unsync())
            }
            "/upgrade" => {
                let on = req.extensions().get::<OnUpgrade>().cloned().unwrap();
                tokio::spawn(async move {
                    let mut io = on.upgraded().await.unwrap();
                    let mut buf = [0u8; 5];
                    io.read_exact(&mut buf).await.unwrap();
                    io.write_all(&buf).await.unwrap();
                });
                Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("connection", "upgrade")
                    .header("upgrade", "echo")
                    .body(full(""))
                    .unwrap()
            }
            // The request body streamed back as it arrives.
            "/duplex" => Response::new(req.into_body().boxed_unsync()),
            "/hang" => {
                let _guard = OnDrop(dropped);
                std::future::pending::<()>().await;
                unreachable!()
            }
            path => Response::new(full(format!("{} {path}", req.method()))),
        }
    }

    /// A body of unknown length, frame by frame.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(Ok))
        }
    }

    async fn start() -> (std::net::SocketAddr, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        let d = dropped.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let d = d.clone();
                tokio::spawn(async move {
                    let (_tx, drain) = watch::channel(false);
                    serve(
                        stream,
                        settings(),
                        &drain,
                        |req| service(req, d.clone()),
                        |refusal| {
                            Response::builder()
                                .status(match refusal {
                                    Refusal::TooLarge => 431,
                                    _ => 400,
                                })
                                .header("connection", "close")
                                .body(full(refusal.to_string()))
                                .unwrap()
                        },
                    )
                    .await;
                });
            }
        });
        (addr, dropped)
    }

    /// Sends `raw`, then reads until `want` responses (or the end of the connection) have
    /// arrived; returns everything read and whether the server closed.
    async fn exchange(stream: &mut TcpStream, raw: &[u8], want: usize) -> (String, bool) {
        stream.write_all(raw).await.unwrap();
        read_responses(stream, want).await
    }

    async fn read_responses(stream: &mut TcpStream, want: usize) -> (String, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if complete_responses(&got) >= want {
                return (String::from_utf8_lossy(&got).into_owned(), false);
            }
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("response timed out")
                .unwrap_or(0);
            if n == 0 {
                return (String::from_utf8_lossy(&got).into_owned(), true);
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// How many whole final responses `b` holds (content-length or chunked bodies).
    fn complete_responses(mut b: &[u8]) -> usize {
        let mut count = 0;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(len)) = resp.parse(b) else {
                return count;
            };
            let code = resp.code.unwrap();
            let mut length = 0;
            let mut chunked = false;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value).unwrap().parse().unwrap();
                }
                chunked |= h.name.eq_ignore_ascii_case("transfer-encoding");
            }
            b = &b[len..];
            if code == 100 || code == 101 {
                count += usize::from(code == 101);
                continue;
            }
            if chunked {
                let Some(end) = memchr::memmem::find(b, b"0\r\n") else {
                    return count;
                };
                let Some(tail) = memchr::memmem::find(&b[end..], b"\r\n\r\n") else {
                    return count;
                };
                b = &b[end + tail + 4..];
            } else {
                if b.len() < length {
                    return count;
                }
                b = &b[length..];
            }
            count += 1;
        }
    }

    #[tokio::test]
    async fn keeps_alive_and_answers_pipelined_requests_in_order() {
        let (addr, _) = start().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (out, closed) = exchange(
            &mut c,
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            2,
        )
        .await;
        assert!(!closed);
        let a = out.find("GET /a").unwrap();
        let b = out.find("GET /b").unwrap();
        assert!(a < b, "{out}");
        assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
        assert!(out.contains("content-length: 6\r\n"), "{out}");
        assert!(out.contains("date: "), "{out}");
        // Still open for a third.
        c.write_all(b"HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed");
            got.extend_from_slice(&buf[..n]);
        }
        let out = String::from_utf8(got).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        // A HEAD response has the length of the GET's body and no body.
        assert!(
            out.contains("content-length: 7\r\n") && out.ends_with("\r\n\r\n"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_closes_when_drain_is_raised() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, drain) = watch::channel(false);
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let dropped = Arc::new(AtomicBool::new(false));
            serve(
                stream,
                settings(),
                &drain,
                |req| service(req, dropped.clone()),
                |_| Response::new(full("refused")),
            )
            .await;
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Two requests: the second idle wait reuses the watch the first registered.
        for path in ["/a", "/b"] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let (out, closed) = exchange(&mut c, raw.as_bytes(), 1).await;
            assert!(!closed && out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the idle connection was not closed on drain")
            .unwrap();
        assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    }

    #[tokio::test]
    async fn reads_length_and_chunked_bodies_with_trailers() {
        let (addr, _) = start().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (out, _) = exchange(
            &mut c,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            1,
        )
        .await;
        assert!(out.ends_with("\r\n\r\nhello|0"), "{out}");
        // A chunked body in pieces, the last with trailers.
        c.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (out, closed) = exchange(&mut c, b"2\r\nde\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n", 1).await;
        assert!(!closed);
        assert!(out.ends_with("\r\n\r\nabcde|2"), "{out}");
        // A body larger than one read, by length.
        let big = vec![b'z'; 100_000];
        let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".to_vec();
        req.extend_from_slice(&big);
        let (out, _) = exchange(&mut c, &req, 1).await;
        assert!(out.ends_with(&format!("{}|0", "z".repeat(100_000))));
    }

    #[tokio::test]
    async fn sends_100_continue_only_when_the_body_is_read() {
        let (addr, _) = start().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let head =
            b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        c.write_all(head).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
        let (out, _) = exchange(&mut c, b"abc", 1).await;
        assert!(
            out.starts_with("HTTP/1.1 200 OK") && out.ends_with("abc|0"),
            "{out}"
        );
        // A request whose handler never reads the body gets no 100, and the connection
        // closes after the response (the body was never sent).
        let (out, closed) = exchange(
            &mut c,
            b"PUT /skip HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            1,
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 200 OK") && !out.contains("100 Continue"),
            "{out}"
        );
        assert!(out.contains("PUT /skip"), "{out}");
        let (_, closed_after) = read_responses(&mut c, 1).await;
        assert!(closed || closed_after);
    }

    #[tokio::test]
    async fn streams_chunked_responses_with_trailers_when_accepted() {
        let (addr, _) = start().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (out, _) = exchange(
            &mut c,
            b"GET /stream HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
            1,
        )
        .await;
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(
            out.ends_with("\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\ngrpc-status: 0\r\n\r\n"),
            "{out}"
        );
        let (out, _) = exchange(&mut c, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
        assert!(
            out.ends_with("0\r\n\r\n") && !out.contains("grpc-status"),
            "{out}"
        );
        // HTTP/1.0: no chunking; the body ends with the connection.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (out, closed) = exchange(&mut c, b"GET /stream HTTP/1.0\r\n\r\n", 2).await;
        assert!(closed);
        assert!(
            out.contains("connection: close\r\n") && out.ends_with("\r\n\r\nabcdefgh"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn refuses_bad_heads_and_closes() {
        let (addr, _) = start().await;
        for (raw, status) in [
            (&b"GARBAGE\r\n\r\n"[..], "400"),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "400",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "400",
            ),
        ] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let path = if raw.starts_with(b"POST / HTTP/1.1\r\nTransfer") {
                // Framing is fine; the body is not: the handler sees the error.
                let raw = [&b"POST /echo"[..], &raw[6..]].concat();
                let (out, closed) = exchange(&mut c, &raw, 2).await;
                assert!(out.contains("error: malformed request body"), "{out}");
                assert!(closed);
                continue;
            } else {
                raw
            };
            let (out, closed) = exchange(&mut c, path, 2).await;
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
            assert!(out.contains("connection: close"), "{out}");
            assert!(closed);
        }
        let mut c = TcpStream::connect(addr).await.unwrap();
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        let (out, closed) = exchange(&mut c, big.as_bytes(), 2).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        assert!(closed);
    }

    #[tokio::test]
    async fn a_client_going_away_cancels_its_request() {
        let (addr, dropped) = start().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(c);
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the request was not cancelled");
    }

    #[tokio::test]
    async fn hands_the_connection_to_an_upgrade() {
        let (addr, _) = start().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (out, _) = exchange(
            &mut c,
            b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nhel",
            1,
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{out}"
        );
        c.write_all(b"lo").await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[tokio::test]
    async fn reads_the_body_while_a_response_streams_back() {
        // A response that is the request body, streamed back while it still arrives
        // (the pipe's reader is the response writer itself); the client sends all 4 MB
        // before it reads anything, which the socket buffers absorb.
        let (addr, _) = start().await;
        let c = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = c.into_split();
        const N: usize = 4 << 20;
        let writer = tokio::spawn(async move {
            let head = format!("POST /duplex HTTP/1.1\r\nHost: x\r\nContent-Length: {N}\r\n\r\n");
            wr.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'q'; 64 * 1024];
            for _ in 0..N / chunk.len() {
                wr.write_all(&chunk).await.unwrap();
            }
            wr
        });
        let _wr = tokio::time::timeout(Duration::from_secs(20), writer)
            .await
            .expect("the upload stalled")
            .unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        while got < N {
            let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            if head.is_empty() || !head.ends_with(b"\r\n\r\n") {
                let mut i = 0;
                while i < n && !head.ends_with(b"\r\n\r\n") {
                    head.push(buf[i]);
                    i += 1;
                }
                got += n - i;
            } else {
                got += n;
            }
        }
        assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(got, N);
    }
}
