//! The admin listener: `/metrics` (Prometheus text), `/ready`, `/live`, `/config`,
//! `/circuits`, `/control` (the control-plane client).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::state::{ConfigSource, Shared};

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(err) => {
                tracing::warn!(%err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn handle<B>(shared: &Shared, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut text = shared.metrics.encode();
            if let Some(active) = shared.active.load_full() {
                // Live gauges go before the closing `# EOF`.
                let eof = text.rfind("# EOF").unwrap_or(text.len());
                let tail = text.split_off(eof);
                active.balancer.encode_gauges(&mut text);
                text.push_str(&tail);
            }
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if shared.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if shared.tls.enabled() && !shared.tls.ready() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for a certificate from the control plane's CA\n",
                )
            } else if let ConfigSource::ControlPlane(cp) = &shared.settings.source {
                match shared.version() {
                    Some(v) if shared.is_ready() => {
                        owned_text(StatusCode::OK, shared.control.ready_text(&v))
                    }
                    _ => owned_text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        shared.control.not_ready_text(&cp.addresses),
                    ),
                }
            } else if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no valid configuration loaded yet\n",
                )
            }
        }
        "/config" => match shared.active.load_full() {
            Some(active) => json(&serde_json::json!({
                "version": active.snapshot.version,
                "config": active.snapshot.json,
            })),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no configuration loaded yet\n",
            ),
        },
        "/identity" => json(&shared.tls.json()),
        "/control" => match &shared.settings.source {
            ConfigSource::ControlPlane(cp) => json(&shared.control.json(&cp.addresses)),
            ConfigSource::Dir(dir) => json(&serde_json::json!({
                "addresses": [],
                "connected": null,
                "applied_version": null,
                "source": "config-dir",
                "config_dir": dir.display().to_string(),
                "last_push_unix_ms": null,
                "last_error": null,
            })),
        },
        "/circuits" => match shared.active.load_full() {
            Some(active) => json(&serde_json::json!({
                "version": active.snapshot.version,
                "backends": active.balancer.circuits_json(),
            })),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no configuration loaded yet\n",
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready, /live, /config, /circuits or /control\n",
        ),
    }
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    owned_text(status, body.to_string())
}

fn owned_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
