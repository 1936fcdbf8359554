//! The outbound pipeline: what the application sends through its sidecar.
//!
//! route (one snapshot load) -> request filters -> timeouts -> balancer -> pool ->
//! upstream; any error climbs back to `rescue` and becomes a response.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tern_config::snapshot::{Backend, Protocol, Timeouts};

use crate::body::ProxyBody;
use crate::headers;
use crate::metrics::{Direction, RequestRecorder, RouteLabels};
use crate::policy;
use crate::rescue::ProxyError;
use crate::route;
use crate::state::Active;
use crate::upstream::{self, UpstreamError, pool::PooledBody};
use crate::worker::Worker;

pub async fn handle(worker: &Worker, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut recorder = RequestRecorder::new(
        &worker.shared.metrics,
        worker.unrouted(Direction::Outbound, &worker.empty),
    );
    // The one snapshot load of this request: every step below uses this version.
    let resp = match worker.shared.active.load_full() {
        None => ProxyError::NotReady.into_response(),
        Some(active) => match serve(worker, &active, req, &mut recorder).await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::debug!(error = %err, "outbound request failed");
                err.into_response()
            }
        },
    };
    recorder.finish(resp.status().as_u16());
    resp
}

async fn serve(
    worker: &Worker,
    active: &Arc<Active>,
    mut req: Request<Incoming>,
    recorder: &mut RequestRecorder<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let routed = route::route(active, &req, &worker.shared.settings.namespace)?;
    let rule = routed.matched.rule;
    let Some(backend) = route::pick_backend(rule) else {
        let labels = &mut recorder.labels;
        labels.parent_name = active.parent_label(routed.parent);
        labels.route_name = rule.route.clone();
        labels.route_rule = rule.rule_index as u32;
        return Err(ProxyError::NoEndpoints(labels.parent_name.clone()));
    };
    // Metric handles resolved once per worker, route, rule and backend.
    let key = (
        Arc::as_ptr(routed.parent) as usize,
        Arc::as_ptr(rule) as usize,
        backend.index,
    );
    recorder.route = Some(worker.route_metrics(active, key, || RouteLabels {
        direction: Direction::Outbound,
        parent_name: active.parent_label(routed.parent),
        route_name: rule.route.clone(),
        route_rule: rule.rule_index as u32,
        backend_name: backend.name.clone(),
    }));

    route::apply_request_filters(&mut req, rule, routed.matched.prefix)?;
    let upgrade = headers::is_upgrade(&req);
    headers::strip_hop_by_hop(req.headers_mut(), upgrade);

    let attempt = forward(worker, active, backend, req, upgrade);
    let mut resp = if rule.timeouts == Timeouts::default() {
        attempt.await?
    } else {
        policy::timeout::run(rule.timeouts, attempt).await?
    };

    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(resp.headers_mut(), switching);
    if !rule.response_headers.is_empty() {
        rule.response_headers.apply(resp.headers_mut());
    }
    Ok(resp.map(ProxyBody::Upstream))
}

async fn forward(
    worker: &Worker,
    active: &Active,
    backend: &Backend,
    mut req: Request<Incoming>,
    upgrade: bool,
) -> Result<Response<PooledBody>, ProxyError> {
    let addr = active
        .balancer
        .pick(backend.index)
        .ok_or_else(|| ProxyError::NoEndpoints(backend.name.clone()))?;
    // Upgrades are an HTTP/1.1 mechanism: they get an HTTP/1.1 connection of their own.
    let protocol = if upgrade {
        Protocol::Http1
    } else {
        backend.protocol
    };
    headers::for_upstream(&mut req, protocol)?;
    let sent = if upgrade {
        Box::pin(upstream::send_upgrade(&worker.pool, addr, req)).await
    } else {
        upstream::send(&worker.pool, addr, protocol, req).await
    };
    sent.map_err(|err| upstream_error(err, backend.name.clone(), addr))
}

/// Maps a failed attempt to the error a user sees: could not connect (502
/// `connect-failed`) or the upstream broke the exchange (502 `upstream-failed`).
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
            source,
        },
    }
}
