//! Opaque TCP: intercepted connections that are not HTTP.
//!
//! Outbound, a destination outside the mesh is passed through to its original address
//! untouched; a mesh destination goes to an endpoint of its Service (the one the client
//! dialled, or one the balancer picks for a cluster IP), over mTLS with ALPN
//! `tern-opaque` when that endpoint is a meshed sidecar. Inbound, the Service's
//! AuthorizationPolicies decide (a denied connection is closed), then bytes are copied to
//! the application.

use std::net::SocketAddr;

use tern_config::snapshot::{Decision, authorize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::server::Conn;
use crate::tls::Alpn;
use crate::worker::Worker;

/// Copies bytes both ways until either side closes.
async fn splice<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(err) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        tracing::debug!(%err, "opaque connection ended with an error");
    }
}

async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(std::time::Duration::from_secs(3), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(err)) => {
            tracing::debug!(%addr, %err, "opaque connect failed");
            None
        }
        Err(_) => {
            tracing::debug!(%addr, "opaque connect timed out");
            None
        }
    }
}

/// A connection to a destination the mesh does not know: forwarded as is.
pub async fn passthrough(client: TcpStream, dst: SocketAddr) {
    if let Some(upstream) = connect(dst).await {
        splice(client, upstream).await;
    }
}

/// An outbound TCP connection to a mesh destination.
pub async fn outbound(worker: &Worker, client: TcpStream, conn: &Conn) {
    let dst = conn.target();
    let shared = &worker.shared;
    let Some(active) = shared.active.load_full() else {
        return passthrough(client, dst).await;
    };
    let snapshot = &active.snapshot;
    let backend = snapshot
        .resolve_addr(dst)
        .and_then(|sp| snapshot.backend_of(&sp.service, sp.port));
    let Some(state) = backend.and_then(|b| active.balancer.backend(b.index)) else {
        return passthrough(client, dst).await;
    };
    let now = shared.clock.now_ms();
    // The endpoint the client dialled, if it dialled one; else the balancer's choice.
    let picked = if state.addrs.contains(&dst) {
        state.pick_addr(dst, now)
    } else {
        state.pick(None, now, None).ok()
    };
    let Some(picked) = picked else {
        tracing::debug!(%dst, "opaque: no endpoint admits a connection");
        return;
    };
    let addr = picked.addr();
    let Some(tcp) = connect(addr).await else {
        state.record(picked, true, shared.clock.now_ms(), &shared.metrics);
        return;
    };
    match picked.identity.filter(|_| shared.tls.enabled()) {
        Some(id) => match worker.pool.mtls(tcp, id, Alpn::Opaque).await {
            Ok(tls) => {
                state.record(picked, false, shared.clock.now_ms(), &shared.metrics);
                splice(client, tls).await;
            }
            Err(_) => state.record(picked, true, shared.clock.now_ms(), &shared.metrics),
        },
        None => {
            state.record(picked, false, shared.clock.now_ms(), &shared.metrics);
            splice(client, tcp).await;
        }
    }
}

/// An inbound TCP connection (over mTLS or plaintext) for the local application.
pub async fn inbound<S>(worker: &Worker, client: S, conn: &Conn)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shared = &worker.shared;
    if let Some(active) = shared.active.load_full()
        && let Some(sp) = active.ports_of(conn.target()).first()
    {
        match authorize(sp.authorization.as_deref(), None, conn.client_id()) {
            Decision::Unrestricted => {}
            Decision::Allowed(policy) => shared.metrics.authz(Some(&policy.name), true),
            Decision::Denied => {
                shared.metrics.authz(None, false);
                let client = conn.client.as_ref().map_or("plaintext", |c| &*c.label);
                tracing::info!(%client, service = %sp.service, "TCP connection not authorized: closed");
                return;
            }
        }
    }
    let app = conn.original_dst.unwrap_or(shared.settings.app);
    if let Some(upstream) = connect(app).await {
        splice(client, upstream).await;
    }
}
