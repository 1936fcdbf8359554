//! The inbound pipeline: requests from other sidecars (over mTLS, with the caller's
//! identity) or plaintext clients, checked against the Service's AuthorizationPolicies
//! and RateLimitPolicies, then forwarded to the local application in the protocol it
//! speaks.

#![expect(
    clippy::manual_async_fn,
    reason = "the request path returns async blocks, not async fns: an async fn stores a by-value request twice (see `outbound::handle`)"
)]

use std::future::Future;

use http::{Request, Response, StatusCode, Version};
use tern_config::snapshot::{Decision, MtlsMode, Protocol, Rule, ServicePort, authorize};
use tokio::time::Instant;

use crate::body::{ClientBody, Held, ProxyBody, RequestBody};
use crate::headers;
use crate::metrics::{Direction, Handles, RequestRecorder};
use crate::outbound::upstream_error;
use crate::rescue::ProxyError;
use crate::server::Conn;
use crate::state::Active;
use crate::upstream::{self, Transport};
use crate::worker::Worker;

/// A function returning an `async move` block, not an `async fn`: see `outbound::handle`.
pub fn handle<'a>(
    worker: &'a Worker,
    req: Request<ClientBody>,
    conn: &'a Conn,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
    async move {
        let unrouted = worker.unrouted(Direction::Inbound, &worker.app_label);
        // The request's one clock read before it goes out (see `outbound::handle`).
        let start = Instant::now();
        let mut recorder = RequestRecorder::new(&worker.shared.metrics, unrouted, start);
        recorder.route = Some(Handles::Borrowed(
            worker.inbound_metrics(|| unrouted.labels()),
        ));
        if let Some(resp) = check(worker, &req, conn) {
            recorder.finish(resp.status().as_u16(), Instant::now());
            return resp;
        }
        // Built where it is pinned (as below): not moved into place.
        let served = std::pin::pin!(serve(worker, req, conn, start));
        let resp = match served.await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::debug!(error = %err, "inbound request failed");
                err.into_response()
            }
        };
        recorder.finish(resp.status().as_u16(), Instant::now());
        resp
    }
}

/// Whether plaintext to this connection's target is refused: a Service it serves is
/// strict.
pub fn requires_mtls(worker: &Worker, conn: &Conn) -> bool {
    worker.shared.active.load().as_ref().is_some_and(|a| {
        a.ports_of(conn.target())
            .iter()
            .any(|sp| sp.mtls == MtlsMode::Strict)
    })
}

/// The Service port a request is for: the one the address the connection came in on
/// (this sidecar's EndpointSlice address) serves ([`Active::port_at`]). Only when the
/// address is no Service's does the authority alone decide.
fn service_port<'a, B>(
    active: &'a Active,
    req: &Request<B>,
    conn: &Conn,
    namespace: &str,
) -> Option<&'a std::sync::Arc<ServicePort>> {
    let named = || {
        let (host, port) = headers::split_host_port(headers::authority(req)?).ok()?;
        active.snapshot.resolve(host, port, namespace).ok()
    };
    active.port_at(conn.target(), named).or_else(named)
}

/// Authorization, then rate limits: the answer when the request may not go on. Costs a
/// flag check and a map lookup when no policy applies.
fn check<B>(worker: &Worker, req: &Request<B>, conn: &Conn) -> Option<Response<ProxyBody>> {
    let active = worker.shared.active.load();
    let active = active.as_ref()?;
    if !active.inbound_policies {
        return None;
    }
    let sp = service_port(active, req, conn, &worker.shared.settings.namespace)?;
    let uri = req.uri();
    let rule = sp
        .route(req.method(), uri.path(), uri.query(), req.headers())
        .map(|m| &**m.rule);
    let metrics = &worker.shared.metrics;
    let route_authz = rule.and_then(|r| r.authorization.as_deref());
    match authorize(sp.authorization.as_deref(), route_authz, conn.client_id()) {
        Decision::Unrestricted => {}
        Decision::Allowed(policy) => worker.authz_allowed(active, policy),
        Decision::Denied => {
            metrics.authz(None, false);
            let client = conn.client.as_ref().map_or_else(
                || std::sync::Arc::from("an unauthenticated client"),
                |c| c.label.clone(),
            );
            let target = rule.map_or_else(
                || std::sync::Arc::from(sp.service.to_string()),
                |r| r.route.clone(),
            );
            tracing::info!(%client, %target, "request not authorized");
            return Some(ProxyError::Unauthorized { client, target }.into_response());
        }
    }
    rate_limit(worker, active, sp, rule, req, conn)
}

/// Enforces the RateLimitPolicy that covers this request, if any: a rule's (route
/// target) before its Service's.
fn rate_limit<B>(
    worker: &Worker,
    active: &Active,
    sp: &ServicePort,
    rule: Option<&Rule>,
    req: &Request<B>,
    conn: &Conn,
) -> Option<Response<ProxyBody>> {
    if active.rate_limiters.is_empty() {
        return None;
    }
    let config = match rule {
        Some(r) if r.rate_limit.is_some() => r.rate_limit.as_ref()?,
        _ => sp.rate_limit.as_ref()?,
    };
    let bucket = active.rate_limiters.get(config)?;
    let key = bucket.key(rule, conn.caller_key, req.headers());
    let route_name = rule.map_or(&worker.empty, |r| &r.route);
    let result = bucket.check(key);
    bucket.count(&worker.shared.metrics, route_name, result.is_err());
    let wait = result.err()?;
    let mut resp = ProxyError::RateLimited(bucket.name.clone()).into_response();
    bucket.limited_headers(wait, resp.headers_mut());
    Some(resp)
}

/// `start`: the clock read at the request's start (nothing here waits before sending).
fn serve<'a>(
    worker: &'a Worker,
    mut req: Request<ClientBody>,
    conn: &'a Conn,
    start: Instant,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
    async move {
        // Intercepted: the application port the client dialled; else the configured one.
        let app = conn.original_dst.unwrap_or(worker.shared.settings.app);
        let upgrade = headers::is_upgrade(&req);
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        // HTTP/1.1 from the calling application travels between sidecars as HTTP/2, marked.
        let protocol = if req.headers_mut().remove(&headers::ORIG_PROTO).is_some() {
            Protocol::Http1
        } else if req.version() == Version::HTTP_2 {
            Protocol::H2c
        } else {
            Protocol::Http1
        };
        if protocol == Protocol::H2c
            || req.uri().authority().is_some()
            || req.headers().contains_key(http::header::HOST)
        {
            headers::for_upstream(&mut req, protocol)?;
        }
        let sent = if upgrade {
            Box::pin(upstream::send_upgrade(
                &worker.app_pool,
                app,
                None,
                req,
                None,
            ))
            .await
        } else {
            let mut req = req.map(RequestBody::Stream);
            let transport = Transport::Plain(protocol);
            let app_pool = &worker.app_pool;
            std::pin::pin!(upstream::send(
                app_pool, app, transport, &mut req, false, None, start
            ))
            .await
            .map_err(|e| e.error)
        };
        let mut resp = sent.map_err(|err| upstream_error(err, worker.app_label.clone(), app))?;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(resp.headers_mut(), switching);
        Ok(resp.map(|b| ProxyBody::Upstream(b, Held::default())))
    }
}
