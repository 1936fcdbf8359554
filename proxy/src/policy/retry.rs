//! Retries: what may be retried, how long to wait, and the replayable copy of a request.
//!
//! The loop itself is in [`crate::outbound`]; this file holds its rules:
//! - after a request may have reached the upstream, only idempotent methods are retried,
//!   unless the route allows others; an attempt that never reached it (connect failure,
//!   a refused HTTP/2 stream) is always safe to send elsewhere;
//! - bodies are buffered up to a limit so they can be replayed; a larger body is streamed
//!   once and its request is not retried;
//! - waits are exponential with full jitter, and a `Retry-After` is honoured.

use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use http::{HeaderMap, Method, Request};
use http_body_util::BodyExt;
use tern_config::snapshot::RetryPolicy;

use crate::body::{ClientBody, ClientBodyError, RequestBody};

/// Without a route `retry`, a connect failure is retried this many times, on other
/// endpoints.
pub const CONNECT_RETRIES: u32 = 2;

/// A `Retry-After` longer than this is not waited for: the response goes to the client.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// RFC 9110 section 9.2.2.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a response asks for a retry under `policy`: its status is one of the codes,
/// or its `grpc-status` (trailers-only responses carry it in the headers) is.
pub fn wants_retry(policy: &RetryPolicy, status: u16, headers: &HeaderMap) -> bool {
    if policy.codes.contains(&status) {
        return true;
    }
    !policy.grpc_codes.is_empty()
        && headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u8>().ok())
            .is_some_and(|code| policy.grpc_codes.contains(&code))
}

/// The wait before retry number `retry` (1 for the first): uniform in
/// [0, min(base x 2^(retry-1), 10 x base)] ("full jitter").
pub fn backoff(base: Duration, retry: u32) -> Duration {
    let cap = base.saturating_mul(10);
    let ceiling = base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(cap);
    let ms = ceiling.as_micros() as u64;
    Duration::from_micros(fastrand::u64(0..=ms))
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 section 10.2.3).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The request of a retry loop, kept where every attempt sends it from (`upstream::send`
/// borrows it): whole, for another attempt, when its body is buffered or empty.
pub struct Kept(pub Request<RequestBody>);

impl Drop for Kept {
    /// The header map goes to the thread's spares, for the next request's head.
    fn drop(&mut self) {
        crate::h1::spare::give_map(std::mem::take(self.0.headers_mut()));
    }
}

/// What buffering made of a request.
pub enum Buffered {
    /// The request with its body in memory (and no extensions).
    Replayable(Request<RequestBody>),
    /// The body is larger than the buffer: sent once, as it comes.
    TooLarge(Request<RequestBody>),
}

/// Reads the body of `req` into memory if it fits in `limit` bytes. A declared
/// Content-Length over the limit is not read at all.
pub async fn buffer(req: Request<ClientBody>, limit: usize) -> Result<Buffered, ClientBodyError> {
    let (mut parts, mut body) = req.into_parts();
    let declared = http_body::Body::size_hint(&body).exact();
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(Buffered::TooLarge(Request::from_parts(
            parts,
            RequestBody::Stream(body),
        )));
    }
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    let body = RequestBody::Prefixed {
                        prefix: Some(data.freeze()),
                        rest: body,
                    };
                    return Ok(Buffered::TooLarge(Request::from_parts(parts, body)));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    parts.extensions.clear();
    let body = RequestBody::Buffered {
        data: (!data.is_empty()).then(|| data.freeze()),
        trailers,
    };
    Ok(Buffered::Replayable(Request::from_parts(parts, body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let base = Duration::from_millis(100);
        for retry in 1..20 {
            let ceiling = base * (1u32 << (retry - 1).min(16));
            let d = backoff(base, retry);
            assert!(d <= ceiling.min(base * 10), "{retry}: {d:?}");
        }
        // Jitter: not always the ceiling.
        let samples: Vec<Duration> = (0..50).map(|_| backoff(base, 3)).collect();
        assert!(samples.iter().any(|d| *d < Duration::from_millis(300)));
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, SystemTime::now()), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(
            retry_after(&h, SystemTime::now()),
            Some(Duration::from_secs(3))
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(5));
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(5)));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn grpc_status_in_headers() {
        let policy = RetryPolicy {
            attempts: 2,
            backoff: Duration::from_millis(25),
            codes: vec![],
            grpc_codes: vec![14],
            non_idempotent: true,
        };
        let mut h = HeaderMap::new();
        assert!(!wants_retry(&policy, 200, &h));
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(wants_retry(&policy, 200, &h));
        h.insert("grpc-status", HeaderValue::from_static("2"));
        assert!(!wants_retry(&policy, 200, &h));
    }
}
