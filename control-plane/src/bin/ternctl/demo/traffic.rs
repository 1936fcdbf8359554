//! The in-process traffic generator: it plays `web`'s application.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

/// What the generator saw, from the client side.
#[derive(Debug, Default, Clone)]
pub struct GenStats {
    pub sent: u64,
    /// Answers with a status below 400.
    pub ok: u64,
    /// Answers with a status of 400 or more.
    pub http_errors: u64,
    /// Requests that got no answer (connect/IO errors, timeouts).
    pub transport_errors: u64,
    /// The latest `tern-error` header value and status seen from the proxy.
    pub last_tern_error: Option<(u16, String)>,
    /// The latest transport error.
    pub last_transport_error: Option<String>,
    /// Requests not started because too many were in flight.
    pub skipped: u64,
    /// Answers whose `tern-attempts` header says the proxy needed more than one attempt.
    pub retried: u64,
}

/// Settings for [`run`].
#[derive(Debug, Clone)]
pub struct Generator {
    /// The `web` sidecar's outbound listener.
    pub target: SocketAddr,
    pub rps: u32,
}

/// A request the generator sends: the Host it names, its path and its headers.
#[derive(Debug, PartialEq, Eq)]
pub struct Planned {
    pub host: &'static str,
    pub path: String,
    pub canary: bool,
}

/// Picks the next request: 50% checkout `/api/...` (a fifth of those with `x-canary: 1`),
/// 25% catalog, 25% inventory. `r` is uniform in 0..1000, `item` any number.
pub fn plan_request(r: u32, item: u32) -> Planned {
    let item = item % 500 + 1;
    if r < 100 {
        Planned {
            host: "checkout.shop:8080",
            path: format!("/api/items/{item}"),
            canary: true,
        }
    } else if r < 500 {
        let path = if r.is_multiple_of(5) {
            format!("/api/cart?item={item}")
        } else {
            format!("/api/items/{item}")
        };
        Planned {
            host: "checkout.shop:8080",
            path,
            canary: false,
        }
    } else if r < 750 {
        Planned {
            host: "catalog.shop:8080",
            path: format!("/products/{item}"),
            canary: false,
        }
    } else {
        Planned {
            host: "inventory.shop:8080",
            path: format!("/stock/{item}"),
            canary: false,
        }
    }
}

/// Requests in flight at most; beyond it, ticks are skipped (and counted).
const MAX_IN_FLIGHT: usize = 64;

type Conn = http1::SendRequest<Empty<Bytes>>;

/// Runs until `stop` turns true: starts a request every `1/rps` seconds whatever the
/// latency (so slowing one service down does not slow the traffic to the others), on
/// keep-alive connections reused from a pool, with at most [`MAX_IN_FLIGHT`] in flight.
pub async fn run(g: Generator, stats: Arc<Mutex<GenStats>>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs_f64(1.0 / f64::from(g.rps.max(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let pool: Arc<Mutex<Vec<Conn>>> = Arc::default();
    // Dropping the set at the end aborts whatever is still in flight.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            stats.lock().expect("stats lock").skipped += 1;
            continue;
        };
        let planned = plan_request(fastrand::u32(0..1000), fastrand::u32(..));
        let (pool, stats, target) = (pool.clone(), stats.clone(), g.target);
        tasks.spawn(async move {
            one(target, &pool, &planned, &stats).await;
            drop(permit);
        });
    }
}

async fn one(
    target: SocketAddr,
    pool: &Mutex<Vec<Conn>>,
    planned: &Planned,
    stats: &Mutex<GenStats>,
) {
    let result = tokio::time::timeout(Duration::from_secs(15), async {
        let idle = {
            let mut idle = pool.lock().expect("pool lock");
            std::iter::from_fn(|| idle.pop()).find(|c| !c.is_closed())
        };
        let mut sender = match idle {
            Some(c) => c,
            None => {
                let stream = TcpStream::connect(target)
                    .await
                    .with_context(|| format!("connecting to web's sidecar at {target}"))?;
                let _ = stream.set_nodelay(true);
                let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                sender
            }
        };
        sender.ready().await?;
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(&planned.path)
            .header(header::HOST, planned.host)
            .header(header::USER_AGENT, "ternctl-demo");
        if planned.canary {
            req = req.header("x-canary", "1");
        }
        let resp = sender.send_request(req.body(Empty::new())?).await?;
        let status = resp.status();
        let tern_error = resp
            .headers()
            .get("tern-error")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let attempts = attempts(resp.headers());
        // Read the whole body so the connection can carry the next request.
        resp.into_body().collect().await?;
        pool.lock().expect("pool lock").push(sender);
        anyhow::Ok((status, tern_error, attempts))
    })
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 15s")));
    let mut s = stats.lock().expect("stats lock");
    s.sent += 1;
    match result {
        Ok((status, tern_error, attempts)) => {
            if attempts > 1 {
                s.retried += 1;
            }
            if status.as_u16() < 400 {
                s.ok += 1;
            } else {
                s.http_errors += 1;
            }
            if let Some(e) = tern_error {
                s.last_tern_error = Some((status.as_u16(), e));
            }
        }
        Err(e) => {
            s.transport_errors += 1;
            s.last_transport_error = Some(format!("{e:#}"));
        }
    }
}

/// The `tern-attempts` response header (set on routes with a retry policy); 1 without it.
fn attempts(headers: &http::HeaderMap) -> u32 {
    headers
        .get("tern-attempts")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_mix() {
        let mut canary = 0;
        let mut checkout = 0;
        let mut catalog = 0;
        let mut inventory = 0;
        for r in 0..1000 {
            let p = plan_request(r, r * 7);
            assert!(p.path.starts_with('/'));
            match p.host {
                "checkout.shop:8080" => {
                    assert!(p.path.starts_with("/api/"));
                    checkout += 1;
                    canary += usize::from(p.canary);
                }
                "catalog.shop:8080" => {
                    assert!(!p.canary);
                    catalog += 1;
                }
                "inventory.shop:8080" => {
                    assert!(!p.canary && p.path.starts_with("/stock/"));
                    inventory += 1;
                }
                other => panic!("unexpected host {other}"),
            }
        }
        assert_eq!((checkout, catalog, inventory, canary), (500, 250, 250, 100));
    }
}
