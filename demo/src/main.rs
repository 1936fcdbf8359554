//! `tern-demo-app`: a small HTTP application for Tern's local demo and end-to-end tests.
//!
//! Serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port. Every request
//! not matched by a special endpoint is echoed back as JSON (method, path, query, version,
//! headers), so tests can see what a proxy forwarded. See `--help` for the endpoints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const CHUNK: usize = 64 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "tern-demo-app",
    version,
    about = "Demo HTTP app: echo, streaming, failure and latency injection",
    after_help = "Endpoints:\n  \
        POST /echo          streams the request body back\n  \
        GET  /bytes/N       streams N bytes\n  \
        POST /sink          consumes the body, answers {\"received\": N}\n  \
        ANY  /status/CODE   answers CODE\n  \
        ANY  /sleep/MS      sleeps MS milliseconds, then 200\n  \
        GET  /control       shows fail rate and latency\n  \
        POST /control?fail=F&latency_ms=N   changes them\n  \
        anything else       200 with a JSON echo of the request"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "TERN_DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Service name reported in responses.
    #[arg(long, env = "TERN_DEMO_NAME", default_value = "demo")]
    name: String,
    /// Probability (0..=1) of answering 500 instead.
    #[arg(long, env = "TERN_DEMO_FAIL_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    fail_rate: f64,
    /// Delay before answering, in milliseconds.
    #[arg(long, env = "TERN_DEMO_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{f} is not within 0..=1"))
    }
}

/// Runtime-adjustable behaviour, shared by all connections.
struct State {
    name: String,
    fail_rate: AtomicU64,
    latency_ms: AtomicU64,
}

impl State {
    fn fail_rate(&self) -> f64 {
        f64::from_bits(self.fail_rate.load(Ordering::Relaxed))
    }
    fn set_fail_rate(&self, f: f64) {
        self.fail_rate.store(f.to_bits(), Ordering::Relaxed);
    }
    fn latency_ms(&self) -> u64 {
        self.latency_ms.load(Ordering::Relaxed)
    }
    fn control_json(&self) -> serde_json::Value {
        serde_json::json!({
            "service": self.name,
            "fail_rate": self.fail_rate(),
            "latency_ms": self.latency_ms(),
        })
    }
}

type RespBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json_response(state: &State, status: StatusCode, v: &serde_json::Value) -> Response<RespBody> {
    let mut resp = Response::new(full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    add_service_header(state, &mut resp);
    resp
}

fn add_service_header(state: &State, resp: &mut Response<RespBody>) {
    if let Ok(v) = HeaderValue::from_str(&state.name) {
        resp.headers_mut().insert("x-demo-service", v);
    }
}

/// A body of `remaining` bytes, produced in chunks of at most 64 KiB, never buffered whole.
struct ByteStream {
    remaining: u64,
    chunk: Bytes,
}

impl Body for ByteStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// The endpoint a request path selects.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Control,
    Echo,
    Bytes(u64),
    Sink,
    Status(StatusCode),
    Sleep(u64),
    Default,
}

fn classify(method: &Method, path: &str) -> Endpoint {
    if path == "/control" {
        return Endpoint::Control;
    }
    if path == "/echo" && method == Method::POST {
        return Endpoint::Echo;
    }
    if path == "/sink" && method == Method::POST {
        return Endpoint::Sink;
    }
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()) {
        return Endpoint::Bytes(n);
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        return Endpoint::Status(code);
    }
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|n| n.parse().ok()) {
        return Endpoint::Sleep(ms);
    }
    Endpoint::Default
}

/// Decodes `%XX` escapes and `+` (as a space) in a query component.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits a query string into decoded (key, value) pairs, in order.
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The settings a `POST /control` query asks for.
#[derive(Debug, Default, PartialEq)]
struct ControlUpdate {
    fail_rate: Option<f64>,
    latency_ms: Option<u64>,
}

fn parse_control(q: &str) -> Result<ControlUpdate, String> {
    let mut u = ControlUpdate::default();
    for (k, v) in parse_query(q) {
        match k.as_str() {
            "fail" | "fail_rate" => u.fail_rate = Some(parse_rate(&v)?),
            "latency_ms" | "latency" => {
                u.latency_ms = Some(v.parse().map_err(|e| format!("latency_ms {v:?}: {e}"))?)
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(u)
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

fn echo_json<B>(state: &State, req: &Request<B>) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<String> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.as_str().to_owned(), values.join(", ").into());
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        });
    serde_json::json!({
        "service": state.name,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "authority": authority,
        "version": version_str(req.version()),
        "headers": headers,
    })
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let endpoint = classify(req.method(), req.uri().path());
    if endpoint == Endpoint::Control {
        return Ok(control(&state, &req));
    }
    let latency = state.latency_ms();
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let fail = state.fail_rate();
    if fail > 0.0 && fastrand::f64() < fail {
        let v = serde_json::json!({"service": state.name, "error": "injected failure"});
        return Ok(json_response(&state, StatusCode::INTERNAL_SERVER_ERROR, &v));
    }
    let resp = match endpoint {
        Endpoint::Control => unreachable!("handled above"),
        Endpoint::Echo => {
            let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
            let mut resp = Response::new(req.into_body().boxed());
            if let Some(ct) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            add_service_header(&state, &mut resp);
            resp
        }
        Endpoint::Bytes(n) => {
            let body = ByteStream {
                remaining: n,
                chunk: Bytes::from(vec![b'x'; CHUNK]),
            };
            let mut resp = Response::new(body.map_err(|never| match never {}).boxed());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            add_service_header(&state, &mut resp);
            resp
        }
        Endpoint::Sink => {
            let mut body = req.into_body();
            let mut received: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            received += d.len() as u64;
                        }
                    }
                    Err(e) => {
                        let v = serde_json::json!({"error": e.to_string(), "received": received});
                        return Ok(json_response(&state, StatusCode::BAD_REQUEST, &v));
                    }
                }
            }
            json_response(
                &state,
                StatusCode::OK,
                &serde_json::json!({"service": state.name, "received": received}),
            )
        }
        Endpoint::Status(code) => {
            let v = serde_json::json!({"service": state.name, "status": code.as_u16()});
            json_response(&state, code, &v)
        }
        Endpoint::Sleep(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let v = serde_json::json!({"service": state.name, "slept_ms": ms});
            json_response(&state, StatusCode::OK, &v)
        }
        Endpoint::Default => json_response(&state, StatusCode::OK, &echo_json(&state, &req)),
    };
    Ok(resp)
}

fn control<B>(state: &State, req: &Request<B>) -> Response<RespBody> {
    match *req.method() {
        Method::GET => json_response(state, StatusCode::OK, &state.control_json()),
        Method::POST | Method::PUT => match parse_control(req.uri().query().unwrap_or("")) {
            Ok(u) => {
                if let Some(f) = u.fail_rate {
                    state.set_fail_rate(f);
                }
                if let Some(ms) = u.latency_ms {
                    state.latency_ms.store(ms, Ordering::Relaxed);
                }
                json_response(state, StatusCode::OK, &state.control_json())
            }
            Err(e) => json_response(
                state,
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": e}),
            ),
        },
        _ => json_response(
            state,
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "use GET or POST"}),
        ),
    }
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = Arc::new(State {
        name: args.name,
        fail_rate: AtomicU64::new(args.fail_rate.to_bits()),
        latency_ms: AtomicU64::new(args.latency_ms),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    println!("listening on {local}");

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            sig = &mut shutdown => {
                println!("{}, exiting", sig?);
                return Ok(());
            }
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    if let Err(e) = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await
                    {
                        eprintln!("connection: {e}");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_are_decoded_in_order() {
        assert_eq!(
            parse_query("a=1&b=x%20y&c&d=p+q&&e=%zz"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "".into()),
                ("d".into(), "p q".into()),
                ("e".into(), "%zz".into()),
            ]
        );
        assert!(parse_query("").is_empty());
        assert_eq!(parse_query("x=%4"), vec![("x".into(), "%4".into())]);
    }

    #[test]
    fn control_query() {
        assert_eq!(
            parse_control("fail=0.3&latency_ms=200").unwrap(),
            ControlUpdate {
                fail_rate: Some(0.3),
                latency_ms: Some(200)
            }
        );
        assert_eq!(parse_control("").unwrap(), ControlUpdate::default());
        assert_eq!(
            parse_control("latency_ms=5").unwrap(),
            ControlUpdate {
                fail_rate: None,
                latency_ms: Some(5)
            }
        );
        assert!(parse_control("fail=1.5").is_err());
        assert!(parse_control("fail=abc").is_err());
        assert!(parse_control("latency_ms=-1").is_err());
        assert!(parse_control("bogus=1").is_err());
    }

    #[test]
    fn endpoints() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(classify(&post, "/control"), Endpoint::Control);
        assert_eq!(classify(&get, "/control"), Endpoint::Control);
        assert_eq!(classify(&post, "/echo"), Endpoint::Echo);
        assert_eq!(classify(&get, "/echo"), Endpoint::Default);
        assert_eq!(classify(&post, "/sink"), Endpoint::Sink);
        assert_eq!(
            classify(&get, "/bytes/209715200"),
            Endpoint::Bytes(209_715_200)
        );
        assert_eq!(classify(&get, "/bytes/x"), Endpoint::Default);
        assert_eq!(
            classify(&get, "/status/503"),
            Endpoint::Status(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(classify(&get, "/status/42"), Endpoint::Default);
        assert_eq!(classify(&get, "/sleep/2000"), Endpoint::Sleep(2000));
        assert_eq!(classify(&get, "/api/x"), Endpoint::Default);
    }

    #[test]
    fn byte_stream_chunks_and_total() {
        let body = ByteStream {
            remaining: (CHUNK as u64) * 2 + 7,
            chunk: Bytes::from(vec![b'x'; CHUNK]),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let collected = rt.block_on(async {
            let mut body = body;
            let mut sizes = vec![];
            while let Some(f) = body.frame().await {
                sizes.push(f.unwrap().into_data().unwrap().len());
            }
            sizes
        });
        assert_eq!(collected, vec![CHUNK, CHUNK, 7]);
    }

    #[test]
    fn rate_bounds() {
        assert!(parse_rate("0").is_ok());
        assert!(parse_rate("1").is_ok());
        assert!(parse_rate("-0.1").is_err());
        assert!(parse_rate("nan").is_err());
    }
}
