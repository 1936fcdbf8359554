//! tern-proxy: Tern's sidecar.
//!
//! One request, in the order the code runs it (one module each):
//! [`listen`] (workers, SO_REUSEPORT, drain) -> [`server`] (protocol detection, then
//! [`h1`], Tern's HTTP/1.1 server on [`tcp`] sockets, or hyper's HTTP/2, with limits and
//! abuse containment) ->
//! [`outbound`] / [`inbound`] pipelines ->
//! [`route`] (one snapshot load, Gateway API match, weighted backend, filters) ->
//! [`policy`] (timeouts) -> [`balance`] (endpoint choice) -> [`upstream`] (pooled
//! connections) -> the upstream. Errors climb back to [`rescue`], which answers with a
//! status and a `tern-error` reason. Config arrives through [`reload`] (a directory) or
//! [`control`] (tern-control) into [`state::Shared`]; [`admin`] and [`metrics`] make it all visible; [`resident`] keeps
//! the process's resident set small.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod body;
pub mod boxed;
pub mod control;
pub mod h1;
pub mod headers;
pub mod inbound;
pub mod init;
pub mod listen;
pub mod metrics;
pub mod opaque;
pub mod outbound;
pub mod policy;
pub mod quiet;
pub mod reload;
pub mod rescue;
pub mod resident;
pub mod route;
pub mod server;
pub mod state;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod worker;

use std::net::SocketAddr;

pub use server::Limits;
pub use state::{ConfigSource, Settings, Shared};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("config directory {path}: {source}")]
    ConfigDir {
        path: std::path::PathBuf,
        #[source]
        source: tern_config::ConfigError,
    },
    #[error("watching the config directory: {0}")]
    Watch(#[from] notify::Error),
    #[error("starting a runtime or thread: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Runs the sidecar until SIGTERM or SIGINT, then drains and returns.
pub fn run(settings: Settings) -> Result<(), StartError> {
    let shared = Shared::new(settings.clone());

    // The first snapshot. A missing directory is fatal; invalid content is not: the
    // proxy starts unready and applies the first valid change. With a control plane, the
    // last good config of the state dir serves until the control plane answers.
    match &settings.source {
        ConfigSource::Dir(dir) => match tern_config::load_dir(dir) {
            Err(source @ tern_config::ConfigError::Io { .. }) => {
                return Err(StartError::ConfigDir {
                    path: dir.clone(),
                    source,
                });
            }
            result => reload::apply(&shared, result),
        },
        ConfigSource::ControlPlane(cp) => match &cp.state_dir {
            Some(dir) => control::boot_from_state_dir(&shared, dir),
            None => tracing::warn!(
                "no --state-dir: the config is not persisted, and a restart while the \
                 control plane is unreachable leaves this sidecar without one"
            ),
        },
    }

    let bind =
        |addr, reuse| listen::bind(addr, reuse).map_err(|source| StartError::Bind { addr, source });
    let workers = settings.workers.max(1);
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers {
        listeners.push(listen::WorkerListeners {
            outbound: bind(settings.outbound, true)?,
            inbound: bind(settings.inbound, true)?,
        });
    }
    let admin = bind(settings.admin, false)?;

    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(workers);
    for (id, l) in listeners.into_iter().enumerate() {
        threads.push(
            listen::spawn_worker(id, shared.clone(), l, drain_rx.clone())
                .map_err(StartError::Runtime)?,
        );
    }
    tracing::info!(
        outbound = %settings.outbound,
        inbound = %settings.inbound,
        admin = %settings.admin,
        app = %settings.app,
        workers,
        version = shared.version().as_deref().unwrap_or("(none)"),
        "tern-proxy started"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    rt.block_on(async move {
        let admin = tokio::net::TcpListener::from_std(admin).map_err(StartError::Runtime)?;
        tokio::spawn(admin::serve(shared.clone(), admin));
        let watcher = match &shared.settings.source {
            ConfigSource::Dir(dir) => tokio::spawn(reload::watch(shared.clone(), dir.clone())),
            ConfigSource::ControlPlane(cp) => {
                let (shared, cp) = (shared.clone(), cp.clone());
                tokio::spawn(tls::certify::run(shared.clone(), cp.clone()));
                tokio::spawn(async move {
                    control::run(shared, cp).await;
                    Ok(())
                })
            }
        };
        // Start-up is done (flags, the first config, listeners, runtimes): its code
        // need not stay resident.
        let released = resident::release_code();
        tracing::debug!(kib = released >> 10, "start-up code let go of");
        tokio::select! {
            _ = shutdown_signal() => {}
            res = watcher => {
                // The watcher only ends on error.
                if let Ok(Err(err)) = res {
                    return Err(StartError::Watch(err));
                }
            }
        }
        tracing::info!(deadline = ?shared.settings.drain_timeout, "draining");
        shared.start_drain();
        let _ = drain_tx.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!("drained; exiting");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
