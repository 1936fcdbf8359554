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
    _peer: std::net::SocketAddr,
) -> Response<ProxyBody> {
    let labels = || worker.unrouted(Direction::Inbound, &worker.app_label);
    let mut recorder = RequestRecorder::new(&worker.shared.metrics, labels());
    recorder.route = Some(worker.inbound_metrics(labels));
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
