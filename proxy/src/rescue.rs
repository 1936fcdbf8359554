//! Every failure becomes a response: a status, a `tern-error` header a human can act on,
//! and a metric label. Nothing is silently dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use tern_config::snapshot::LookupError;

use crate::body::ProxyBody;
use crate::policy::concurrency::Shed;
use crate::policy::limits::Limit;

/// The response header that carries the reason of a proxy-generated error.
pub const TERN_ERROR: &str = "tern-error";

/// Why the proxy answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no Host header or :authority")]
    MissingAuthority,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("more than {0} request headers")]
    TooManyHeaders(usize),
    #[error("{0}")]
    UnknownService(#[from] LookupError),
    #[error("no rule of {parent} matches {method} {path}")]
    NoRoute {
        parent: Arc<str>,
        method: http::Method,
        path: String,
    },
    #[error("no ready endpoint for {0}")]
    NoEndpoints(Arc<str>),
    #[error("connecting to {addr} for {backend}: {source}")]
    Connect {
        backend: Arc<str>,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {addr} for {backend} failed: {source}")]
    Upstream {
        backend: Arc<str>,
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("mTLS to {addr} for {backend}: {source}")]
    Tls {
        backend: Arc<str>,
        addr: SocketAddr,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("{client} is not allowed to call {target}")]
    Unauthorized { client: Arc<str>, target: Arc<str> },
    #[error("request timeout of {0:?} expired")]
    RequestTimeout(Duration),
    #[error("backend request timeout of {0:?} expired")]
    BackendTimeout(Duration),
    #[error("the proxy has no valid configuration yet")]
    NotReady,
    #[error("backend {backend} is at its {} limit ({max})", .limit.field())]
    Overflow {
        backend: Arc<str>,
        limit: Limit,
        max: u32,
    },
    #[error("every endpoint of {0} is ejected (circuit open)")]
    CircuitOpen(Arc<str>),
    #[error("{scope} {name} is at its concurrency limit ({})", match .reason {
        Shed::QueueFull => "queue full",
        Shed::QueueTimeout => "queue timeout",
    })]
    Overloaded {
        scope: &'static str,
        name: Arc<str>,
        reason: Shed,
    },
    #[error("rate limit of {0} exceeded")]
    RateLimited(Arc<str>),
    #[error("reading the request body: {0}")]
    ClientBody(#[source] crate::body::ClientBodyError),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingAuthority
            | ProxyError::BadRequest(_)
            | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge(_) | ProxyError::TooManyHeaders(_) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UnknownService(_) | ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints(_)
            | ProxyError::NotReady
            | ProxyError::Overflow { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::CircuitOpen(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Tls {
                source: crate::tls::TlsError::NoIdentity,
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::Tls { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Unauthorized { .. } => StatusCode::FORBIDDEN,
            ProxyError::RequestTimeout(_) | ProxyError::BackendTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// A stable, machine-readable code: the first word of the `tern-error` header.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::MissingAuthority
            | ProxyError::BadRequest(_)
            | ProxyError::ClientBody(_) => "bad-request",
            ProxyError::HeadTooLarge(_) | ProxyError::TooManyHeaders(_) => "headers-too-large",
            ProxyError::UnknownService(_) => "unknown-service",
            ProxyError::NoRoute { .. } => "no-route",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::Connect { .. } => "connect-failed",
            ProxyError::Upstream { .. } => "upstream-failed",
            ProxyError::Tls {
                source: crate::tls::TlsError::NoIdentity,
                ..
            } => "no-identity",
            ProxyError::Tls { .. } => "tls-failed",
            ProxyError::Unauthorized { .. } => "unauthorized",
            ProxyError::RequestTimeout(_) => "request-timeout",
            ProxyError::BackendTimeout(_) => "backend-timeout",
            ProxyError::NotReady => "not-ready",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::CircuitOpen(_) => "circuit-open",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::RateLimited(_) => "rate-limited",
        }
    }

    /// The response for this error: `tern-error: <code>: <reason>`, the same text as body.
    pub fn into_response(self) -> Response<ProxyBody> {
        let text = format!("{}: {}", self.code(), self);
        let shed = matches!(
            self,
            ProxyError::Overloaded { .. } | ProxyError::Overflow { .. }
        );
        let header =
            HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(self.code()));
        let mut body = text.into_bytes();
        body.push(b'\n');
        let mut resp = Response::new(ProxyBody::local(Bytes::from(body)));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(TERN_ERROR, header);
        if shed {
            // Load shedding says when to come back.
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_carries_code_and_reason() {
        let resp = ProxyError::NoEndpoints("shop/checkout:8080".into()).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            resp.headers()[TERN_ERROR],
            "no-endpoints: no ready endpoint for shop/checkout:8080"
        );
    }

    #[test]
    fn unprintable_reason_falls_back_to_code() {
        let err = ProxyError::NoRoute {
            parent: "ns/a:80".into(),
            method: http::Method::GET,
            path: "/\u{7f}".into(),
        };
        let resp = err.into_response();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()[TERN_ERROR], "no-route");
    }
}
