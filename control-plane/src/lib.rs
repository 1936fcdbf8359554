//! tern-control: Tern's control plane.
//!
//! Sources ([`file`]) write config documents into an [`index::Index`], which validates
//! and publishes snapshots. The [`server`] debounces them, computes each distinct
//! sidecar [`scope`] once per change and streams the scoped config to every sidecar over
//! gRPC, recording their ACKs and NACKs; [`admin`] serves `/metrics` and `/sidecars`.
//! With a [`ca`] and an [`auth`]enticator it also signs the sidecars' certificates and
//! pushes the trust bundle with every config.

pub mod admin;
pub mod auth;
pub mod ca;
pub mod debounce;
pub mod file;
pub mod index;
pub mod metrics;
pub mod scope;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::auth::{Authenticator, TokenFile};
use crate::ca::Ca;
use crate::file::{FileSource, Source as _};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::server::{ControlPlane, Service, Settings};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error(transparent)]
    Source(#[from] file::SourceError),
    #[error("--ca-dir: {0}")]
    Ca(#[from] ca::CaError),
    #[error("--tokens: {0}")]
    Tokens(#[from] auth::TokensError),
    #[error("--serve-tls needs a CA (--ca-dir) to issue tern-control's certificate")]
    TlsWithoutCa,
    #[error("--serve-tls: {0}")]
    Tls(#[from] tls::TlsError),
}

/// A control plane on bound listeners, until `shutdown` is cancelled: the file source on
/// `config_dir`, the gRPC server on `grpc` (over TLS with `settings.serve_tls`), the admin
/// endpoint on `admin` (plain HTTP).
pub async fn run(
    settings: Settings,
    config_dir: PathBuf,
    grpc: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    // The token and CA watchers, stopped when this returns.
    let mut background = Vec::new();
    let auth = match &settings.tokens {
        Some(path) => {
            let tokens = Arc::new(TokenFile::load(path)?);
            tracing::info!(path = %path.display(), tokens = tokens.len(), "tokens loaded");
            background.push(AbortOnDropHandle::new(tokio::spawn(
                tokens.clone().watch(ca::POLL),
            )));
            Some(tokens as Arc<dyn Authenticator>)
        }
        None => None,
    };
    let ca = match &settings.ca_dir {
        Some(dir) => {
            let files = ca::CaFiles::read(dir)?;
            let loaded = Ca::from_files(
                &files,
                &settings.trust_domain,
                settings.cert_lifetime,
                std::time::SystemTime::now(),
            )?;
            metrics.ca_reload(true);
            tracing::info!(dir = %dir.display(), issuer_id = loaded.issuer_id(), anchors = loaded.anchors_der().len(), "CA loaded");
            Some((dir.clone(), files, Arc::new(loaded)))
        }
        None => None,
    };
    let cp = ControlPlane::with_identity(
        settings.clone(),
        metrics.clone(),
        shutdown.clone(),
        auth,
        ca.as_ref().map(|(_, _, ca)| ca.clone()),
    );
    if let Some((dir, files, _)) = ca {
        let target = cp.clone();
        background.push(AbortOnDropHandle::new(tokio::spawn(ca::watch(
            dir,
            settings.trust_domain.clone(),
            settings.cert_lifetime,
            files,
            metrics.clone(),
            Arc::new(move |ca| target.set_ca(ca)),
        ))));
    }
    // tern-control's own certificate, re-issued as the CA changes.
    let server_tls = if settings.serve_tls {
        let Some(ca) = cp.ca() else {
            return Err(RunError::TlsWithoutCa);
        };
        let tls = Arc::new(tls::ServerTls::new(&ca, &settings.namespace)?);
        background.push(AbortOnDropHandle::new(tokio::spawn(tls::keep_fresh(
            tls.clone(),
            cp.watch_ca(),
        ))));
        Some(tls)
    } else {
        None
    };
    let index = Index::new();
    let published = index.subscribe();
    let source = FileSource::new(config_dir, metrics);
    let mut source_task = tokio::spawn(source.run(index));
    tokio::spawn(cp.clone().run_distributor(published));
    tokio::spawn(admin::serve(cp.clone(), admin, shutdown.clone()));
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(Service(cp.clone()).into_server());
    let stop = shutdown.clone().cancelled_owned();
    let grpc: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match server_tls {
            Some(tls) => {
                let incoming = tls::incoming(grpc, tls, cp.metrics.clone());
                Box::pin(server.serve_with_incoming_shutdown(incoming, stop))
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
                Box::pin(server.serve_with_incoming_shutdown(incoming, stop))
            }
        };
    tokio::select! {
        served = grpc => served?,
        ended = &mut source_task => {
            shutdown.cancel();
            match ended {
                Ok(result) => result?,
                Err(e) => return Err(file::SourceError::Task(e).into()),
            }
        }
    }
    source_task.abort();
    drop(background);
    Ok(())
}

/// Binds both listeners (for the binary; tests bind port 0 themselves).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
