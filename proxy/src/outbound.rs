//! The outbound pipeline: what the application sends through its sidecar.
//!
//! route (one snapshot load) -> request filters -> request timeout -> retry loop {
//! endpoint pick (balancer + circuit breakers) -> per-try timeout -> limits -> pool ->
//! upstream } -> response. Any error climbs back to `rescue` and becomes a response.

#![expect(
    clippy::manual_async_fn,
    reason = "the request path returns async blocks, not async fns: an async fn stores a by-value request twice (see `handle`)"
)]

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use tern_config::snapshot::{Backend, Protocol, Rule};
use tokio::time::Instant;

use crate::access_log::{Entry, Trace};
use crate::balance::{BackendState, PickError, hash};
use crate::body::{ClientBody, Held, ProxyBody, RequestBody};
use crate::h1::RawHead;
use crate::headers;
use crate::metrics::{Direction, Fate, Handles, RequestRecorder, RouteLabels, RouteMetrics};
use crate::policy::limits::Limit;
use crate::policy::retry::{self, Buffered, Kept};
use crate::policy::timeout::{ConnTimer, cap, within};
use crate::rescue::ProxyError;
use crate::route;
use crate::server::Conn;
use crate::state::Active;
use crate::upstream::{self, Admission, SendError, Transport, UpstreamError, pool::PooledBody};
use crate::worker::Worker;

/// Response header with the number of attempts a request took (when its route retries).
pub static TERN_ATTEMPTS: HeaderName = HeaderName::from_static("tern-attempts");

/// `tern-attempts` values for the usual counts, static: no allocation per response.
static ATTEMPT_COUNTS: [HeaderValue; 4] = [
    HeaderValue::from_static("1"),
    HeaderValue::from_static("2"),
    HeaderValue::from_static("3"),
    HeaderValue::from_static("4"),
];

/// The same as lines, for a response whose upstream lines go out as sent.
static ATTEMPT_LINES: [&[u8]; 4] = [
    b"tern-attempts: 1\r\n",
    b"tern-attempts: 2\r\n",
    b"tern-attempts: 3\r\n",
    b"tern-attempts: 4\r\n",
];

fn attempts_value(n: u32) -> HeaderValue {
    match ATTEMPT_COUNTS.get((n as usize).wrapping_sub(1)) {
        Some(v) => v.clone(),
        None => HeaderValue::from(n),
    }
}

/// Serves one request from the application: routed, sent with the route's policies, and
/// answered (an error becomes a response here).
///
/// Written as a function returning an `async move` block, here and below on the request's
/// path: an `async fn` stores a by-value argument twice in its state (the argument, and the
/// local it is moved into), and the request is 272 bytes at every level.
///
/// `local`: the connection's, when its requests come one at a time (HTTP/1.1).
pub fn handle<'a>(
    worker: &'a Worker,
    req: Request<ClientBody>,
    conn: &'a Conn,
    local: Option<&'a mut ConnLocal>,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
    async move {
        // The request's one clock read before it goes out: every step up to the first
        // wait uses it (see `Attempts::run`).
        let start = Instant::now();
        let mut recorder = RequestRecorder::new(
            &worker.shared.metrics,
            worker.unrouted(Direction::Outbound, &worker.empty),
            start,
        );
        let entry = worker
            .shared
            .settings
            .access_log
            .then(|| Entry::start(&req, start));
        let mut trace = Trace::default();
        // The one snapshot load of this request: every step below uses this version.
        let mut resp = match worker.shared.active.load_full() {
            None => ProxyError::NotReady.into_response(),
            Some(active) => {
                let served = serve(worker, &active, req, conn, local, &mut recorder, &mut trace);
                match served.await {
                    Ok(resp) => resp,
                    Err(err) => {
                        tracing::debug!(error = %err, "outbound request failed");
                        err.into_response()
                    }
                }
            }
        };
        if trace.retry_policy || trace.attempts > 1 {
            // With the upstream's lines kept as sent, one more line: no map to fill.
            let line = ATTEMPT_LINES.get((trace.attempts as usize).wrapping_sub(1));
            let added = match (resp.body_mut().raw_headers_mut(), line) {
                (Some(raw), Some(line)) => raw.try_add_line(line),
                _ => false,
            };
            if !added {
                let headers = resp.headers_mut();
                if headers.capacity() == 0 {
                    // Empty (the upstream's lines were kept as sent): a spare map, as
                    // allocating one costs more.
                    *headers = crate::h1::spare::take_map(1);
                }
                headers.insert(&TERN_ATTEMPTS, attempts_value(trace.attempts));
            }
        }
        if let Some(entry) = entry {
            entry.write(Direction::Outbound, &trace, &resp);
        }
        let answered = trace.answered.unwrap_or_else(Instant::now);
        recorder.finish(resp.status().as_u16(), answered);
        resp
    }
}

/// `'r`: what the recorder may borrow, the connection's `local` among it.
fn serve<'a, 'r: 'a>(
    worker: &'a Worker,
    active: &'a Arc<Active>,
    mut req: Request<ClientBody>,
    conn: &'a Conn,
    local: Option<&'r mut ConnLocal>,
    recorder: &'a mut RequestRecorder<'r>,
    trace: &'a mut Trace,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
    async move {
        let start = recorder.started();
        let peer = conn.peer;
        let routed = route::route(
            active,
            &req,
            &worker.shared.settings.namespace,
            conn.original_dst,
        )?;
        let rule = routed.matched.rule;
        let logged = worker.shared.settings.access_log;
        if logged {
            trace.route = Some(rule.route.clone());
        }
        let Some(backend) = route::pick_backend(rule) else {
            let labels = recorder.labels_mut();
            labels.parent_name = active.parent_label(routed.parent);
            labels.route_name = rule.route.clone();
            labels.route_rule = rule.rule_index as u32;
            return Err(ProxyError::NoEndpoints(labels.parent_name.clone()));
        };
        if logged {
            trace.backend = Some(backend.name.clone());
        }
        trace.retry_policy = rule.retry.is_some();
        // Metric handles resolved once per worker, route, rule and backend, and kept by
        // an HTTP/1.1 connection for as long as its requests take the same route.
        let key = (
            Arc::as_ptr(routed.parent) as usize,
            Arc::as_ptr(rule) as usize,
            backend.index,
        );
        let resolve = || {
            worker.route_metrics(active, key, || RouteLabels {
                direction: Direction::Outbound,
                parent_name: active.parent_label(routed.parent),
                route_name: rule.route.clone(),
                route_rule: rule.rule_index as u32,
                backend_name: backend.name.clone(),
            })
        };
        let (metrics, timer) = match local {
            Some(ConnLocal { timer, route }) => {
                let key = (active.generation, key);
                // Another route than the last request's: its handles, in the same box.
                if let Some(kept) = route.as_mut().filter(|kept| kept.key != key) {
                    **kept = KeptRoute {
                        key,
                        metrics: resolve(),
                    };
                }
                let kept = route.get_or_insert_with(|| {
                    Box::new(KeptRoute {
                        key,
                        metrics: resolve(),
                    })
                });
                let metrics: &RouteMetrics = &kept.metrics;
                recorder.route = Some(Handles::Borrowed(metrics));
                (metrics, Some(timer))
            }
            // Kept by the recorder, borrowed from it (a clone is two more locked
            // instructions).
            None => (&**recorder.route.insert(Handles::Held(resolve())), None),
        };

        route::apply_request_filters(&mut req, rule, routed.matched.prefix)?;
        let upgrade = headers::is_upgrade(&req);
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        let state = active
            .balancer
            .backend(backend.index)
            .ok_or_else(|| ProxyError::NoEndpoints(backend.name.clone()))?;

        let mut resp = if upgrade {
            let hash = hash_key(backend, &req, peer);
            Box::pin(forward_upgrade(worker, backend, state, req, hash, trace)).await?
        } else {
            let mut fate = None;
            let limit = rule.timeouts.request.map(|d| within(d, start));
            let deadline = limit.map(|(_, at)| at);
            let attempts = Attempts {
                worker,
                rule,
                backend,
                state,
                metrics,
                deadline,
                peer,
                active,
            };
            // Pinned in place: the attempt future is large, and must not be copied around.
            let result = {
                let run = std::pin::pin!(attempts.run(req, start, trace, &mut fate));
                cap(limit, ProxyError::RequestTimeout, run, timer).await
            };
            if let Err(ProxyError::RequestTimeout(_)) = result {
                fate = Some(Fate::TimedOut);
            }
            if let Some(fate) = fate {
                metrics.fate(fate);
            }
            result?
        };

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(resp.headers_mut(), switching);
        if !rule.response_headers.is_empty() {
            rule.response_headers
                .apply(crate::body::full_headers(&mut resp));
        }
        Ok(resp)
    }
}

/// What an HTTP/1.1 connection keeps between its requests, which come one at a time: lent
/// to each in turn, so none of it takes a lock.
#[derive(Default)]
pub struct ConnLocal {
    /// Request deadlines (see [`ConnTimer`]).
    timer: ConnTimer,
    /// The last request's metric handles (boxed: an idle connection's state stays small).
    route: Option<Box<KeptRoute>>,
}

struct KeptRoute {
    /// The config generation and the route key of [`Worker::route_metrics`].
    key: (u64, (usize, usize, usize)),
    metrics: Arc<RouteMetrics>,
}

/// Why an attempt failed before a response.
enum Failure {
    Send(SendError),
    /// The per-try timeout (`backendRequest`) expired.
    Timeout(std::time::Duration),
}

/// The retry loop of one request.
struct Attempts<'a> {
    worker: &'a Worker,
    rule: &'a Rule,
    backend: &'a Backend,
    state: &'a BackendState,
    metrics: &'a RouteMetrics,
    /// When the request timeout expires: no retry waits past it.
    deadline: Option<Instant>,
    /// The client, for source-address hashing.
    peer: std::net::SocketAddr,
    active: &'a Active,
}

impl Attempts<'_> {
    /// `start`: the clock read at the request's start, used until the first wait.
    fn run<'b>(
        &'b self,
        mut req: Request<ClientBody>,
        start: Instant,
        trace: &'b mut Trace,
        fate: &'b mut Option<Fate>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'b {
        async move {
            let shared = &self.worker.shared;
            let policy = &self.backend.policy;
            let clock = shared.clock;
            // The latest clock read: `start`, then read again after each wait.
            let mut at = start;
            let Some(slot) = self
                .state
                .limits
                .acquire(Limit::Requests, policy.limits.max_requests)
            else {
                *fate = Some(Fate::NotRetryable);
                return Err(self.overflow(Limit::Requests, policy.limits.max_requests));
            };
            let mut held = Held {
                slot: Some(slot),
                permits: [None, None],
            };
            // When each permit was granted: adaptive limits measure latency from there.
            let mut granted = [at; 2];
            let backend_limiter = self.state.concurrency.as_ref();
            let route_limiter = self.active.balancer.route_limiter(self.rule);
            for (k, (limiter, scope)) in [(backend_limiter, "backend"), (route_limiter, "route")]
                .into_iter()
                .enumerate()
            {
                let Some(limiter) = limiter else { continue };
                // Boxed: waiting in the queue is the slow path; its state stays out of the
                // request's future.
                let acquired = match limiter.try_acquire() {
                    Some(p) => Ok(p),
                    None => {
                        let queued = Box::pin(limiter.acquire()).await;
                        at = Instant::now();
                        queued
                    }
                };
                match acquired {
                    Ok(p) => {
                        held.permits[k] = Some(p);
                        granted[k] = at;
                    }
                    Err(reason) => {
                        *fate = Some(Fate::NotRetryable);
                        let name = limiter.name.clone();
                        return Err(ProxyError::Overloaded {
                            scope,
                            name,
                            reason,
                        });
                    }
                }
            }
            // The request's bookkeeping clock (ms), refreshed after each attempt.
            let mut now = clock.ms_at(at);
            self.state.budget.deposit(now);
            // Written for mTLS (HTTP/2) when the backend's endpoints are meshed sidecars, else
            // in the backend's protocol; an attempt to an endpoint of the other kind converts.
            let app_protocol = self.backend.protocol;
            let mtls = self.state.meshed && shared.tls.enabled();
            // The protocol the request is written for.
            let mut prepared = if mtls { Protocol::H2c } else { app_protocol };
            headers::for_sidecar(&mut req, prepared, app_protocol)?;
            let hash = hash_key(self.backend, &req, self.peer);

            let retry = self.rule.retry.as_ref();
            // After a request may have reached the upstream, only these may be sent again.
            let resend_ok =
                retry.is_some_and(|p| p.non_idempotent || retry::is_idempotent(req.method()));
            // Every attempt sends from `kept` (borrowed, not moved): a replayable request
            // (retries configured, body empty or buffered) stays whole there for another
            // attempt (see `upstream::send`).
            let replayable;
            let mut kept = Kept(match retry {
                Some(_) if http_body::Body::is_end_stream(req.body()) => {
                    replayable = true;
                    req.map(|_| RequestBody::EMPTY)
                }
                // Boxed: reading a body is the less common path; its state stays out of the
                // request's future.
                Some(_) => match Box::pin(retry::buffer(req, shared.settings.retry_buffer))
                    .await
                    .map_err(ProxyError::ClientBody)
                    .inspect(|_| at = Instant::now())?
                {
                    Buffered::Replayable(r) => {
                        replayable = true;
                        r
                    }
                    Buffered::TooLarge(r) => {
                        self.metrics.body_too_large();
                        replayable = false;
                        r
                    }
                },
                None => {
                    replayable = false;
                    req.map(RequestBody::Stream)
                }
            });
            // Whether `kept` may go out: not after a send that took it (not replayable),
            // unless it came back unsent.
            let mut sendable = true;
            let max_attempts = 1 + retry.map_or(retry::CONNECT_RETRIES, |p| p.attempts);
            let admission = Admission {
                counters: &self.state.limits,
                limits: policy.limits,
                endpoints: &self.state.addrs,
            };
            let mut avoid = None;
            loop {
                trace.attempts += 1;
                let n = trace.attempts;
                if !sendable {
                    // Not reached: a retry is only decided with a request to send.
                    return Err(ProxyError::NoEndpoints(self.backend.name.clone()));
                }
                let picked = match self.state.pick(avoid, now, hash) {
                    Ok(p) => p,
                    Err(err) => {
                        *fate = Some(if n > 1 {
                            Fate::RetriesExhausted
                        } else {
                            Fate::NotRetryable
                        });
                        return Err(match err {
                            PickError::NoEndpoints => {
                                ProxyError::NoEndpoints(self.backend.name.clone())
                            }
                            PickError::AllEjected => {
                                ProxyError::CircuitOpen(self.backend.name.clone())
                            }
                        });
                    }
                };
                let addr = picked.addr();
                trace.endpoint = Some(addr);
                let transport = match picked.identity {
                    Some(id) if mtls => Transport::Mtls(id),
                    _ => Transport::Plain(app_protocol),
                };
                if transport.protocol() != prepared {
                    prepared = transport.protocol();
                    headers::for_sidecar(&mut kept.0, prepared, app_protocol)?;
                }
                let in_flight = picked.load.start();
                let sent_at = at;
                let pool = &self.worker.pool;
                // Built where it is pinned: the future is a few hundred bytes.
                let send = std::pin::pin!(upstream::send(
                    pool,
                    addr,
                    transport,
                    &mut kept.0,
                    replayable,
                    Some(admission),
                    at
                ));
                sendable = replayable;
                let sent = match self.rule.timeouts.backend_request {
                    None => send.await.map_err(Failure::Send),
                    Some(limit) => match tokio::time::timeout(limit, send).await {
                        Ok(r) => r.map_err(Failure::Send),
                        Err(_) => Err(Failure::Timeout(limit)),
                    },
                };
                // One clock read for the attempt's latency and the request's bookkeeping.
                let done = Instant::now();
                at = done;
                now = clock.ms_at(done);
                // Whether to try again, and after how long; or the fate of the request.
                let verdict: Result<std::time::Duration, Fate>;
                let outcome = match sent {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let failed = policy
                            .circuit_breaker
                            .failure_status_codes
                            .contains(&status);
                        let load = picked.load;
                        load.observe((done - sent_at).as_secs_f64() * 1e6, now);
                        drop(in_flight);
                        let not_now = status == 429 || status == 503;
                        let wanted =
                            retry.is_some_and(|p| retry::wants_retry(p, status, resp.headers()));
                        // Read only when it matters (a header lookup and a clock read).
                        let after = if not_now || wanted {
                            retry::retry_after(resp.headers(), SystemTime::now())
                        } else {
                            None
                        };
                        if not_now {
                            // "Not now": steer new requests elsewhere for a while.
                            let pause = after.unwrap_or(BACK_OFF).min(MAX_BACK_OFF);
                            load.back_off(now + pause.as_millis() as u64);
                        }
                        self.state.record(picked, failed, now, &shared.metrics);
                        if !wanted {
                            *fate = Some(match (status >= 500, n) {
                                (true, _) => Fate::NotRetryable,
                                (false, 1) => Fate::SuccessFirstTry,
                                (false, _) => Fate::SuccessAfterRetry,
                            });
                            held.sample(&granted, status >= 500, done);
                            trace.answered = Some(done);
                            return Ok(resp.map(|b| ProxyBody::Upstream(b, held)));
                        }
                        verdict =
                            self.may_retry(n, max_attempts, resend_ok && sendable, after, now);
                        Ok(resp)
                    }
                    Err(Failure::Send(SendError {
                        error: UpstreamError::Overflow(limit, max),
                        ..
                    })) => {
                        // Refused here, not by the endpoint: its circuit learns nothing.
                        drop(picked);
                        *fate = Some(Fate::NotRetryable);
                        return Err(self.overflow(limit, max));
                    }
                    Err(failure) => {
                        drop(in_flight);
                        self.state.record(picked, true, now, &shared.metrics);
                        let (error, returned, reached) = match failure {
                            Failure::Timeout(limit) => {
                                (ProxyError::BackendTimeout(limit), None, true)
                            }
                            Failure::Send(err) => {
                                let reached = err.reached_upstream();
                                let error =
                                    upstream_error(err.error, self.backend.name.clone(), addr);
                                (error, err.request, reached)
                            }
                        };
                        if let Some(r) = returned {
                            // Unsent: as written for `prepared`, it can go elsewhere.
                            kept.0 = *r;
                            sendable = true;
                        }
                        let allowed = sendable && (!reached || resend_ok);
                        verdict = self.may_retry(n, max_attempts, allowed, None, now);
                        Err(error)
                    }
                };
                match verdict {
                    Ok(wait) => {
                        drop(outcome);
                        self.metrics.retried();
                        avoid = Some(addr);
                        if !wait.is_zero() {
                            Box::pin(tokio::time::sleep(wait)).await;
                            at = Instant::now();
                            now = clock.ms_at(at);
                        }
                    }
                    Err(f) => {
                        *fate = Some(f);
                        let failed = outcome
                            .as_ref()
                            .map_or(true, |r| r.status().as_u16() >= 500);
                        held.sample(&granted, failed, at);
                        trace.answered = Some(at);
                        return outcome.map(|resp| resp.map(|b| ProxyBody::Upstream(b, held)));
                    }
                }
            }
        }
    }

    /// Whether attempt `n` may be followed by another, and the wait before it: allowed by
    /// the caller, attempts left, a `Retry-After` that is short enough, time left before
    /// the request timeout, and a retry left in the budget (asked last, as it takes one).
    fn may_retry(
        &self,
        n: u32,
        max_attempts: u32,
        allowed: bool,
        retry_after: Option<std::time::Duration>,
        now_ms: u64,
    ) -> Result<std::time::Duration, Fate> {
        if !allowed {
            return Err(Fate::NotRetryable);
        }
        if n >= max_attempts {
            return Err(Fate::RetriesExhausted);
        }
        let mut wait = self
            .rule
            .retry
            .as_ref()
            .map_or(std::time::Duration::ZERO, |p| retry::backoff(p.backoff, n));
        if let Some(after) = retry_after {
            if after > retry::MAX_RETRY_AFTER {
                return Err(Fate::NotRetryable);
            }
            wait = wait.max(after);
        }
        if self.deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return Err(Fate::RetriesExhausted);
        }
        if !self.state.budget.try_withdraw(now_ms) {
            return Err(Fate::BudgetExhausted);
        }
        Ok(wait)
    }

    fn overflow(&self, limit: Limit, max: u32) -> ProxyError {
        self.worker
            .shared
            .metrics
            .overflow(&self.backend.name, limit.as_str());
        ProxyError::Overflow {
            backend: self.backend.name.clone(),
            limit,
            max,
        }
    }
}

/// An HTTP/1.1 upgrade (WebSocket): one attempt on a connection of its own, never retried
/// (the client's side of the tunnel cannot be replayed).
async fn forward_upgrade(
    worker: &Worker,
    backend: &Backend,
    state: &BackendState,
    mut req: Request<ClientBody>,
    hash: Option<u64>,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    let shared = &worker.shared;
    let policy = &backend.policy;
    let overflow = |limit: Limit, max| {
        shared.metrics.overflow(&backend.name, limit.as_str());
        ProxyError::Overflow {
            backend: backend.name.clone(),
            limit,
            max,
        }
    };
    let slot = state
        .limits
        .acquire(Limit::Requests, policy.limits.max_requests)
        .ok_or_else(|| overflow(Limit::Requests, policy.limits.max_requests))?;
    let picked = state
        .pick(None, shared.clock.now_ms(), hash)
        .map_err(|err| match err {
            PickError::NoEndpoints => ProxyError::NoEndpoints(backend.name.clone()),
            PickError::AllEjected => ProxyError::CircuitOpen(backend.name.clone()),
        })?;
    let addr = picked.addr();
    trace.attempts = 1;
    trace.endpoint = Some(addr);
    headers::for_upstream(&mut req, Protocol::Http1)?;
    let mtls = picked.identity.filter(|_| shared.tls.enabled());
    let admission = Admission {
        counters: &state.limits,
        limits: policy.limits,
        endpoints: &state.addrs,
    };
    let sent: Result<Response<PooledBody>, UpstreamError> =
        upstream::send_upgrade(&worker.pool, addr, mtls, req, Some(admission)).await;
    let now = shared.clock.now_ms();
    match sent {
        Ok(resp) => {
            let failed = policy
                .circuit_breaker
                .failure_status_codes
                .contains(&resp.status().as_u16());
            state.record(picked, failed, now, &shared.metrics);
            let held = Held {
                slot: Some(slot),
                permits: [None, None],
            };
            Ok(resp.map(|b| ProxyBody::Upstream(b, held)))
        }
        Err(UpstreamError::Overflow(limit, max)) => Err(overflow(limit, max)),
        Err(err) => {
            state.record(picked, true, now, &shared.metrics);
            Err(upstream_error(err, backend.name.clone(), addr))
        }
    }
}

/// How long an endpoint that answered 429/503 without `Retry-After` is passed over.
const BACK_OFF: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest back-off a `Retry-After` can ask for.
const MAX_BACK_OFF: std::time::Duration = std::time::Duration::from_secs(30);

/// The consistent-hash key of a request, when its backend balances by one.
fn hash_key<B>(backend: &Backend, req: &Request<B>, peer: std::net::SocketAddr) -> Option<u64> {
    use tern_config::snapshot::{Algorithm, HashKey};
    let lb = &backend.policy.load_balancer;
    if !matches!(lb.algorithm, Algorithm::RingHash | Algorithm::Maglev) {
        return None;
    }
    match lb.hash.as_ref()? {
        HashKey::Header(name) => req
            .headers()
            .get(name)
            .map(|v| hash::key_hash(v.as_bytes())),
        HashKey::Cookie(name) => req
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| hash::key_hash(v.as_bytes()))
            }),
        HashKey::SourceIP => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash::key_hash(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash::key_hash(&ip.octets()),
        }),
    }
}

/// Maps a failed attempt to the error a user sees: could not connect (502
/// `connect-failed`), the upstream broke the exchange (502 `upstream-failed`), or a
/// backend limit is full (503 `overflow`).
pub fn upstream_error(
    err: UpstreamError,
    backend: std::sync::Arc<str>,
    addr: std::net::SocketAddr,
) -> ProxyError {
    match err {
        UpstreamError::Connect(source) => ProxyError::Connect {
            backend,
            addr,
            source,
        },
        UpstreamError::Handshake(source) | UpstreamError::Request(source) => ProxyError::Upstream {
            backend,
            addr,
            source: source.into(),
        },
        UpstreamError::H2(source) => ProxyError::Upstream {
            backend,
            addr,
            source: source.into(),
        },
        UpstreamError::Exchange(source) => ProxyError::Upstream {
            backend,
            addr,
            source: source.into(),
        },
        UpstreamError::Tls(source) => ProxyError::Tls {
            backend,
            addr,
            source,
        },
        UpstreamError::Overflow(limit, max) => ProxyError::Overflow {
            backend,
            limit,
            max,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::attempts_value;

    #[test]
    fn attempt_counts_are_written_in_decimal() {
        for n in [0, 1, 2, 4, 5, 12, 1000] {
            assert_eq!(attempts_value(n), n.to_string().as_str(), "{n}");
        }
    }
}
