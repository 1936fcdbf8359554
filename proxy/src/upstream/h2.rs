//! Tern's HTTP/2 client, on the h2 crate directly.
//!
//! hyper's HTTP/2 client hands every request through a channel to the connection's task,
//! which spawns a task per request to await its response (callgrind: about 6,000
//! instructions per request on top of h2's own work). Here a request is put on the
//! shared connection by the caller's own task, which then awaits the response itself:
//! no channel, no task per request. A request body that streams gets a task that pipes
//! it with flow control; a complete one is queued at once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};

use crate::body::RequestBody;
use crate::policy::limits::Slot;

/// An idle connection is pinged this often, and closed when a ping goes unanswered for
/// [`KEEPALIVE_TIMEOUT`]: a peer that vanished without a FIN is found.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/2 connection's sending side, shared by every request to its endpoint.
#[derive(Clone)]
pub struct Sender {
    send: SendRequest<Bytes>,
    /// Set when the connection's task has ended.
    closed: Arc<AtomicBool>,
}

impl Sender {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Flow-control windows of a new connection.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub stream: u32,
    pub connection: u32,
}

/// The HTTP/2 handshake over `io`; the connection's task (spawned) holds the backend's
/// connection `slot` for as long as it lives.
pub async fn handshake<T>(io: T, windows: Windows, slot: Option<Slot>) -> Result<Sender, h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    tokio::spawn(async move {
        drive(conn).await;
        done.store(true, Ordering::Release);
        drop(slot);
    });
    Ok(Sender { send, closed })
}

/// Runs a connection until it closes, pinging it every [`KEEPALIVE_INTERVAL`].
async fn drive<T>(mut conn: h2::client::Connection<T, Bytes>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(mut ping) = conn.ping_pong() else {
        return ended(conn.await);
    };
    loop {
        tokio::select! {
            res = &mut conn => return ended(res),
            _ = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
        }
        let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque()));
        tokio::select! {
            res = &mut conn => return ended(res),
            answered = pong => {
                if !matches!(answered, Ok(Ok(_))) {
                    tracing::debug!("upstream HTTP/2 connection did not answer a ping: closed");
                    return;
                }
            }
        }
    }
}

fn ended(res: Result<(), h2::Error>) {
    if let Err(err) = res {
        tracing::debug!(%err, "upstream HTTP/2 connection ended with an error");
    }
}

/// A failed send: the error, and the request when it never went out.
pub struct Failed {
    pub error: h2::Error,
    pub request: Option<Request<RequestBody>>,
}

/// Sends `req` on the connection and awaits the response head.
pub async fn send(sender: Sender, req: Request<RequestBody>) -> Result<Response<Upstream>, Failed> {
    let Sender { mut send, closed } = sender;
    if let Err(error) = std::future::poll_fn(|cx| send.poll_ready(cx)).await {
        // The connection takes no new streams (the upstream sent GOAWAY, or it broke):
        // marked closed, the pool replaces it rather than handing it out until its
        // streams in flight end.
        closed.store(true, Ordering::Release);
        return Err(Failed {
            error,
            request: Some(req),
        });
    }
    let (mut parts, body) = req.into_parts();
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || has_payload_semantics(&parts.method))
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    let eos = body.is_end_stream();
    let (response, stream) = match send.send_request(Request::from_parts(parts, ()), eos) {
        Ok(sent) => sent,
        Err(error) => {
            return Err(Failed {
                error,
                request: None,
            });
        }
    };
    if !eos {
        send_body(body, stream);
    }
    match response.await {
        Ok(resp) => {
            let remaining = crate::h1::head::declared_length(resp.headers());
            Ok(resp.map(|recv| Upstream {
                recv,
                data_done: false,
                remaining,
            }))
        }
        Err(error) => Err(Failed {
            error,
            request: None,
        }),
    }
}

fn has_payload_semantics(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::DELETE
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::CONNECT
    )
}

/// Puts a request body on its stream: a complete one at once, a streaming one through a
/// task that waits for flow-control capacity before reading more from the client.
fn send_body(body: RequestBody, mut stream: SendStream<Bytes>) {
    match body {
        RequestBody::Buffered { data, trailers } => {
            // Already in memory: queued whole (h2 sends it as the window allows).
            let data = data.unwrap_or_default();
            if stream.send_data(data, trailers.is_none()).is_ok()
                && let Some(trailers) = trailers
            {
                let _ = stream.send_trailers(trailers);
            }
        }
        body => {
            tokio::spawn(Pipe { body, stream });
        }
    }
}

/// Copies a body onto an HTTP/2 stream, reading the next chunk only once the peer's
/// window has room: a slow reader holds back the writer instead of filling memory.
struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
}

impl<B> Future for Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = &mut *self;
        loop {
            me.stream.reserve_capacity(1);
            if me.stream.capacity() == 0 {
                loop {
                    match ready!(me.stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        // The stream was reset or the connection closed.
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
            } else if me.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            match ready!(Pin::new(&mut me.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let eos = me.body.is_end_stream();
                            if me.stream.send_data(data, eos).is_err() || eos {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        Err(frame) => frame,
                    };
                    if let Ok(trailers) = frame.into_trailers() {
                        me.stream.reserve_capacity(0);
                        let _ = me.stream.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(%err, "request body failed: stream reset");
                    me.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = me.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A response body from an HTTP/2 upstream. Each chunk read gives its bytes back to the
/// flow-control window.
pub struct Upstream {
    recv: RecvStream,
    data_done: bool,
    /// What `Content-Length` says is still to come.
    remaining: Option<u64>,
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = &mut *self;
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut me.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::BodyExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Windows far smaller than the bodies: nothing gets through unless both sides give
    /// capacity back as they read.
    const SMALL: Windows = Windows {
        stream: 65_535,
        connection: 65_535,
    };
    const BIG: usize = 1 << 20;

    /// An HTTP/2 server on 127.0.0.1 that reads each request body whole (giving its
    /// capacity back), then answers with the body's length in a header, `BIG` bytes of
    /// body in 16 KiB frames, and a trailer holding the request's trailer.
    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::Builder::new()
                .initial_window_size(SMALL.stream)
                .handshake::<_, Bytes>(tcp)
                .await
                .unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut len = 0;
                    while let Some(data) = body.data().await {
                        let data = data.unwrap();
                        len += data.len();
                        body.flow_control().release_capacity(data.len()).unwrap();
                    }
                    let echoed = body.trailers().await.unwrap().unwrap_or_default();
                    let resp = Response::builder()
                        .header("request-length", len)
                        .body(())
                        .unwrap();
                    let mut tx = respond.send_response(resp, false).unwrap();
                    for _ in 0..BIG / 16_384 {
                        tx.send_data(Bytes::from(vec![b'x'; 16_384]), false)
                            .unwrap();
                    }
                    tx.send_trailers(echoed).unwrap();
                });
            }
        });
        addr
    }

    async fn sender(addr: std::net::SocketAddr) -> Sender {
        let tcp = TcpStream::connect(addr).await.unwrap();
        handshake(tcp, SMALL, None).await.unwrap()
    }

    fn request(body: RequestBody) -> Request<RequestBody> {
        Request::builder()
            .method("POST")
            .uri("http://upstream/echo")
            .body(body)
            .unwrap()
    }

    fn trailers(value: &'static str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static(value));
        t
    }

    #[tokio::test]
    async fn complete_bodies_larger_than_the_windows_go_both_ways() {
        let sender = sender(server().await).await;
        let body = RequestBody::Buffered {
            data: Some(Bytes::from(vec![b'a'; 300_000])),
            trailers: Some(trailers("7")),
        };
        let resp = within(send(sender.clone(), request(body)))
            .await
            .ok()
            .unwrap();
        assert_eq!(resp.headers()["request-length"], "300000");
        let collected = within(resp.into_body().collect()).await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "7");
        assert_eq!(collected.to_bytes().len(), BIG);
        assert!(!sender.is_closed());
    }

    #[tokio::test]
    async fn a_streaming_body_is_piped_with_its_trailers() {
        let sender = sender(server().await).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        tokio::spawn(async move {
            for _ in 0..40 {
                let chunk = Frame::data(Bytes::from(vec![b'b'; 10_000]));
                tx.send(Ok(chunk)).await.unwrap();
            }
            tx.send(Ok(Frame::trailers(trailers("0")))).await.unwrap();
        });
        let body = Channel(rx);
        let (req_tx, req_rx) = tokio::sync::oneshot::channel();
        // Pipe is what `send` spawns for a streaming body; drive it against a stream
        // opened by hand.
        let mut send_req = sender.send.clone();
        std::future::poll_fn(|cx| send_req.poll_ready(cx))
            .await
            .unwrap();
        let (response, stream) = send_req
            .send_request(request(RequestBody::EMPTY).map(|_| ()), false)
            .unwrap();
        tokio::spawn(async move {
            Pipe { body, stream }.await;
            let _ = req_tx.send(());
        });
        let resp = within(response).await.unwrap();
        within(req_rx).await.unwrap();
        assert_eq!(resp.headers()["request-length"], "400000");
        let mut body = resp.into_body();
        let mut len = 0;
        while let Some(data) = within(body.data()).await {
            let data = data.unwrap();
            len += data.len();
            body.flow_control().release_capacity(data.len()).unwrap();
        }
        assert_eq!(len, BIG);
        assert_eq!(body.trailers().await.unwrap().unwrap()["grpc-status"], "0");
    }

    /// A stall (flow control never reopened) fails rather than hangs.
    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("stalled: flow-control capacity never came back")
    }

    /// A body whose frames come from a channel.
    struct Channel(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx)
        }
    }

    #[tokio::test]
    async fn a_connection_going_away_hands_the_request_back_and_is_replaced() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (answered_tx, answered_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::Builder::new()
                .handshake::<_, Bytes>(tcp)
                .await
                .unwrap();
            let (_, mut respond) = conn.accept().await.unwrap().unwrap();
            // The response's body stays open: a stream in flight keeps the connection
            // open after GOAWAY, as a long request would.
            let _body = respond.send_response(Response::new(()), false).unwrap();
            conn.graceful_shutdown();
            let _ = answered_tx.send(());
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                let _ = respond.send_response(Response::new(()), true);
            }
            std::future::pending::<()>().await;
        });
        let sender = sender(addr).await;
        let first = within(send(sender.clone(), request(RequestBody::EMPTY))).await;
        let first = first.ok().unwrap();
        assert_eq!(first.status(), 200);
        within(answered_rx).await.unwrap();
        let mut failed = None;
        for _ in 0..100 {
            match within(send(sender.clone(), request(RequestBody::EMPTY))).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(f) => {
                    failed = Some(f);
                    break;
                }
            }
        }
        let failed = failed.expect("requests kept being taken after GOAWAY");
        assert!(failed.error.is_go_away(), "{}", failed.error);
        assert!(
            failed.request.is_some(),
            "a request that never left is handed back"
        );
        // Still open (the first response's body streams), but of no use for new requests.
        assert!(sender.is_closed());
        drop(first);
    }

    #[tokio::test]
    async fn a_closed_connection_is_seen_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            // Settles the handshake, then goes away.
            let _ = tokio::time::timeout(Duration::from_millis(50), conn.accept()).await;
        });
        let sender = sender(addr).await;
        server.await.unwrap();
        let resp = send(sender.clone(), request(RequestBody::EMPTY)).await;
        assert!(resp.is_err());
        for _ in 0..100 {
            if sender.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the connection's end was not noticed");
    }
}
