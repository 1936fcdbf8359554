//! Listeners and workers. Each worker thread runs a current-thread runtime with its own
//! SO_REUSEPORT listeners, so the kernel spreads connections across workers and a
//! connection never migrates between cores. Drain: stop accepting, let connections
//! finish (HTTP/1.1 after the request in flight, HTTP/2 after GOAWAY), up to a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::metrics::Direction;
use crate::server;
use crate::state::Shared;
use crate::worker::Worker;

/// Binds a listening socket. `reuse_port` lets every worker bind its own.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

pub struct WorkerListeners {
    pub outbound: std::net::TcpListener,
    pub inbound: std::net::TcpListener,
}

pub fn spawn_worker(
    id: usize,
    shared: Arc<Shared>,
    listeners: WorkerListeners,
    drain: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("tern-worker-{id}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(%err, "cannot start worker runtime");
                    return;
                }
            };
            rt.block_on(run_worker(shared, listeners, drain));
        })
}

async fn run_worker(
    shared: Arc<Shared>,
    listeners: WorkerListeners,
    mut drain: watch::Receiver<bool>,
) {
    let (outbound, inbound) = match (
        TcpListener::from_std(listeners.outbound),
        TcpListener::from_std(listeners.inbound),
    ) {
        (Ok(o), Ok(i)) => (o, i),
        (Err(err), _) | (_, Err(err)) => {
            tracing::error!(%err, "cannot register listeners");
            return;
        }
    };
    let drain_timeout = shared.settings.drain_timeout;
    let worker = Worker::new(shared);
    let tracker = TaskTracker::new();
    loop {
        let (accepted, direction) = tokio::select! {
            biased;
            _ = server::drained(&mut drain) => break,
            r = outbound.accept() => (r, Direction::Outbound),
            r = inbound.accept() => (r, Direction::Inbound),
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(server::serve(
                    worker.clone(),
                    stream,
                    peer,
                    direction,
                    drain.clone(),
                ));
            }
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%err, ?direction, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    drop(outbound);
    drop(inbound);
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = tracker.len(),
            "drain deadline reached; closing remaining connections"
        );
    }
}
