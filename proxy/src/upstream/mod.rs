//! The last hop: send a request to one endpoint over a pooled connection and hand back the
//! streaming response. Upgrades (WebSocket) get a dedicated connection and a byte tunnel.

pub mod pool;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tern_config::snapshot::Protocol;

use pool::{Pool, PooledBody};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

/// Sends `req` (already rewritten for `protocol`) to `addr`.
pub async fn send(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    protocol: Protocol,
    req: Request<Incoming>,
) -> Result<Response<PooledBody>, UpstreamError> {
    match protocol {
        Protocol::Http1 => send_h1(pool, addr, req).await,
        Protocol::H2c => {
            let mut sender = pool.h2(addr).await?;
            sender.ready().await.map_err(UpstreamError::Request)?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(UpstreamError::Request)?;
            Ok(resp.map(PooledBody::new))
        }
    }
}

async fn send_h1(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<PooledBody>, UpstreamError> {
    loop {
        let (mut sender, reused) = match pool.take_h1(addr) {
            Some(s) => (s, true),
            // Boxed: connecting is the cold path, and its large state would otherwise be
            // moved around with every request's future.
            None => (Box::pin(pool.connect_h1(addr, false)).await?, false),
        };
        if sender.ready().await.is_err() {
            if reused {
                continue;
            }
            return Err(UpstreamError::Connect(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection closed before the request was sent",
            )));
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                return Ok(resp.map(|b| PooledBody::returning(b, pool.clone(), addr, sender)));
            }
            Err(mut err) => match err.take_message() {
                // The request never left: a pooled connection died while idle. Try again.
                Some(r) if reused => req = r,
                _ => return Err(UpstreamError::Request(err.into_error())),
            },
        }
    }
}

/// Sends an HTTP/1.1 upgrade request on a fresh connection. On `101 Switching Protocols`,
/// spawns a tunnel that copies bytes between the client and the upstream until either
/// side closes.
pub async fn send_upgrade(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<PooledBody>, UpstreamError> {
    let client = hyper::upgrade::on(&mut req);
    let mut sender = pool.connect_h1(addr, true).await?;
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(UpstreamError::Request)?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
                return;
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%err, "upgraded tunnel closed");
            }
        });
    }
    Ok(resp.map(PooledBody::new))
}
