//! The inbound pipeline: requests from other sidecars, forwarded to the local
//! application over the protocol they arrived in.

use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tern_config::snapshot::Protocol;

use crate::body::{Held, ProxyBody, RequestBody};
use crate::headers;
use crate::metrics::{Direction, RequestRecorder};
use crate::outbound::upstream_error;
use crate::rescue::ProxyError;
use crate::upstream;
use crate::worker::Worker;

pub async fn handle(
    worker: &Worker,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<ProxyBody> {
    let labels = || worker.unrouted(Direction::Inbound, &worker.app_label);
    let mut recorder = RequestRecorder::new(&worker.shared.metrics, labels());
    recorder.route = Some(worker.inbound_metrics(labels));
    if let Some(resp) = rate_limit(worker, &req, peer) {
        recorder.finish(resp.status().as_u16());
        return resp;
    }
    let resp = match serve(worker, req).await {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(error = %err, "inbound request failed");
            err.into_response()
        }
    };
    recorder.finish(resp.status().as_u16());
    resp
}

/// Enforces the RateLimitPolicy that covers this request, if any: a rule's (route
/// target) before its Service's. The Service and rule are found from the authority the
/// client addressed, as its outbound sidecar routed it. Costs one flag check when no
/// policy exists.
fn rate_limit<B>(
    worker: &Worker,
    req: &Request<B>,
    peer: std::net::SocketAddr,
) -> Option<Response<ProxyBody>> {
    let active = worker.shared.active.load();
    let active = active.as_ref()?;
    if active.rate_limiters.is_empty() {
        return None;
    }
    let (host, port) = headers::split_host_port(headers::authority(req)?).ok()?;
    let namespace = &worker.shared.settings.namespace;
    let sp = active.snapshot.resolve(host, port, namespace).ok()?;
    let uri = req.uri();
    let rule = sp
        .route(req.method(), uri.path(), uri.query(), req.headers())
        .map(|m| m.rule);
    let (config, rule) = match rule {
        Some(r) if r.rate_limit.is_some() => (r.rate_limit.as_ref()?, Some(&**r)),
        _ => (sp.rate_limit.as_ref()?, rule.map(|r| &**r)),
    };
    let bucket = active.rate_limiters.get(config)?;
    let key = bucket.key(rule, peer.ip(), req.headers());
    let route_name = rule.map_or("", |r| &*r.route);
    let result = bucket.check(key);
    worker
        .shared
        .metrics
        .rate_limit(&bucket.name, route_name, bucket.key_kind(), result.is_err());
    let wait = result.err()?;
    let mut resp = ProxyError::RateLimited(bucket.name.clone()).into_response();
    bucket.limited_headers(wait, resp.headers_mut());
    Some(resp)
}

async fn serve(
    worker: &Worker,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let app = worker.shared.settings.app;
    let upgrade = headers::is_upgrade(&req);
    headers::strip_hop_by_hop(req.headers_mut(), upgrade);
    let protocol = if req.version() == Version::HTTP_2 {
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
        Box::pin(upstream::send_upgrade(&worker.app_pool, app, req, None)).await
    } else {
        let req = req.map(RequestBody::Stream);
        upstream::send(&worker.app_pool, app, protocol, req, None)
            .await
            .map_err(|e| e.error)
    };
    let mut resp = sent.map_err(|err| upstream_error(err, worker.app_label.clone(), app))?;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(resp.headers_mut(), switching);
    Ok(resp.map(|b| ProxyBody::Upstream(b, Held::default())))
}
