//! Access log: one JSON line per request on stdout, off by default (`--access-log`).
//! Nothing here runs per request unless it is on.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Request, Response};
use serde_json::json;
use tokio::time::Instant;

use crate::metrics::Direction;
use crate::rescue::TERN_ERROR;

/// What a request did beyond its status: filled in along the pipeline.
#[derive(Debug, Default)]
pub struct Trace {
    pub route: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
    /// Attempts sent (1 + retries); 0 when none was.
    pub attempts: u32,
    /// The rule has a retry policy: responses carry `tern-attempts`.
    pub retry_policy: bool,
    /// When the response (or the last attempt's failure) that answers the request came
    /// back; `None` when no attempt answered it (refused, timed out).
    pub answered: Option<Instant>,
}

/// The request line, kept from the start of a logged request.
pub struct Entry {
    started: Instant,
    method: http::Method,
    authority: String,
    path: String,
}

impl Entry {
    /// `started`: when the request began.
    pub fn start<B>(req: &Request<B>, started: Instant) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("")
            .to_string();
        Entry {
            started,
            method: req.method().clone(),
            authority,
            path: req.uri().path().to_string(),
        }
    }

    pub fn write<B>(self, direction: Direction, trace: &Trace, resp: &Response<B>) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = json!({
            "time_unix_ms": unix_ms,
            "direction": match direction {
                Direction::Outbound => "outbound",
                Direction::Inbound => "inbound",
            },
            "method": self.method.as_str(),
            "authority": self.authority,
            "path": self.path,
            "route": trace.route.as_deref(),
            "backend": trace.backend.as_deref(),
            "endpoint": trace.endpoint.map(|e| e.to_string()),
            "status": resp.status().as_u16(),
            "attempts": trace.attempts,
            "duration_ms": self.started.elapsed().as_secs_f64() * 1000.0,
            "error": resp.headers().get(TERN_ERROR).and_then(|v| v.to_str().ok()),
        });
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
    }
}
