//! The gRPC API over TLS (`--serve-tls`): tern-control's own certificate, issued by its
//! CA for `spiffe://<trust domain>/ns/<namespace>/sa/tern-control` (and the DNS name
//! `tern-control.<namespace>.svc`), TLS 1.3 only, ALPN `h2`, no client certificate
//! (sidecars have none before their first Certify; their tokens authenticate them).
//!
//! The rustls config lives in an [`ArcSwap`]: [`keep_fresh`] replaces it when the CA's
//! issuer changes and before the certificate expires; a new connection takes the config
//! in force when it arrives, connections already open keep theirs. [`incoming`] accepts
//! TCP, handshakes each connection on its own task and hands the TLS streams to tonic.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tern_config::identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::ca::{Ca, CsrError};

/// The namespace tern-control runs in, by default (`--namespace`).
pub const DEFAULT_NAMESPACE: &str = "tern-system";
/// tern-control's service account: the last segment of its SPIFFE ID.
pub const SERVICE_ACCOUNT: &str = "tern-control";
/// The ALPN protocol offered: gRPC is HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// A handshake gets this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed issuance, the next try comes this much later.
const RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--namespace {namespace:?}: {source}")]
    Identity {
        namespace: String,
        source: tern_config::identity::SpiffeError,
    },
    #[error("issuing tern-control's own certificate: {0}")]
    Issue(#[from] CsrError),
    #[error("building the TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// tern-control's serving certificate as last issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub id: SpiffeId,
    pub issuer_id: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// The TLS server config in force and what its certificate is.
pub struct ServerTls {
    namespace: String,
    config: ArcSwap<ServerConfig>,
    issued: ArcSwap<Issued>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("namespace", &self.namespace)
            .field("issued", &self.issued.load())
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A certificate for tern-control from `ca` and the rustls config serving it.
fn build(ca: &Ca, namespace: &str) -> Result<(ServerConfig, Issued), TlsError> {
    let id = ca
        .spiffe_id(namespace, SERVICE_ACCOUNT)
        .map_err(|source| TlsError::Identity {
            namespace: namespace.to_string(),
            source,
        })?;
    let dns = vec![format!("{SERVICE_ACCOUNT}.{namespace}.svc")];
    let now = SystemTime::now();
    let (chain, key) = ca.issue_own(&id, &dns, now)?;
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let lifetime = i64::try_from(ca.lifetime().as_secs()).unwrap_or(i64::MAX / 2);
    let issued = Issued {
        id,
        issuer_id: ca.issuer_id().to_string(),
        not_before: unix(now),
        not_after: unix(now)
            .saturating_add(lifetime)
            .min(ca.issuer_not_after()),
    };
    Ok((config, issued))
}

impl ServerTls {
    /// A certificate from `ca` for `spiffe://<trust domain>/ns/<namespace>/sa/tern-control`.
    pub fn new(ca: &Ca, namespace: &str) -> Result<ServerTls, TlsError> {
        let (config, issued) = build(ca, namespace)?;
        tracing::info!(id = %issued.id, issuer_id = %issued.issuer_id, not_after = issued.not_after, "TLS: serving certificate issued");
        Ok(ServerTls {
            namespace: namespace.to_string(),
            config: ArcSwap::from_pointee(config),
            issued: ArcSwap::from_pointee(issued),
        })
    }

    /// The rustls config new connections get.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    pub fn issued(&self) -> Arc<Issued> {
        self.issued.load_full()
    }

    /// Issues a new certificate from `ca` and serves it to new connections.
    pub fn reissue(&self, ca: &Ca) -> Result<(), TlsError> {
        let (config, issued) = build(ca, &self.namespace)?;
        tracing::info!(id = %issued.id, issuer_id = %issued.issuer_id, not_after = issued.not_after, "TLS: serving certificate re-issued");
        self.config.store(Arc::new(config));
        self.issued.store(Arc::new(issued));
        Ok(())
    }

    /// When the certificate in force should be replaced: at 70 % of its lifetime.
    fn renew_at(&self) -> i64 {
        let i = self.issued.load();
        i.not_before + (i.not_after - i.not_before).max(0) * 7 / 10
    }
}

/// Re-issues the serving certificate whenever the CA changes (a reload with a new
/// issuer or anchors) and at 70 % of its lifetime. Runs until `cas` closes.
pub async fn keep_fresh(tls: Arc<ServerTls>, mut cas: watch::Receiver<Option<Arc<Ca>>>) {
    cas.mark_unchanged();
    let mut retry_at: Option<i64> = None;
    loop {
        let due = retry_at.unwrap_or_else(|| tls.renew_at());
        // At least a second apart: a certificate clamped to an issuer about to expire
        // is due again at once.
        let wait = Duration::from_secs(u64::try_from(due - unix(SystemTime::now())).unwrap_or(0))
            .max(Duration::from_secs(1));
        tokio::select! {
            changed = cas.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
        let Some(ca) = cas.borrow_and_update().clone() else {
            continue;
        };
        match tls.reissue(&ca) {
            Ok(()) => retry_at = None,
            Err(e) => {
                tracing::error!("TLS: {e}; the current serving certificate stays");
                retry_at = Some(unix(SystemTime::now()) + RETRY.as_secs() as i64);
            }
        }
    }
}

/// A TLS connection from a sidecar, for tonic.
#[derive(Debug)]
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.get_ref().0.connect_info()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The TLS connections of `listener`, handshaken with the config in force when each
/// arrives; failed handshakes are logged, counted and dropped. The accept task ends when
/// the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    metrics: Arc<crate::metrics::Metrics>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!("accepting a gRPC connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        metrics.tls_handshake("ok");
                        let _ = tx.send(Ok(TlsConn { inner })).await;
                    }
                    Ok(Err(e)) => {
                        metrics.tls_handshake("failed");
                        tracing::info!(%peer, "TLS handshake failed: {e}");
                    }
                    Err(_) => {
                        metrics.tls_handshake("timeout");
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{DEFAULT_CERT_LIFETIME, Lifetimes, generate};
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

    #[test]
    fn the_serving_certificate_names_tern_control() {
        let g = generate("cluster.local", Lifetimes::default(), SystemTime::now()).unwrap();
        let ca = Ca::from_files(
            &g.files(),
            "cluster.local",
            DEFAULT_CERT_LIFETIME,
            SystemTime::now(),
        )
        .unwrap();
        let id = ca.spiffe_id("tern-system", SERVICE_ACCOUNT).unwrap();
        let (chain, _key) = ca
            .issue_own(
                &id,
                &["tern-control.tern-system.svc".into()],
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(chain[1], ca.issuer_der());
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let names: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("URI {u}"),
                GeneralName::DNSName(d) => format!("DNS {d}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "URI spiffe://cluster.local/ns/tern-system/sa/tern-control",
                "DNS tern-control.tern-system.svc"
            ]
        );
        let tls = ServerTls::new(&ca, "tern-system").unwrap();
        let issued = tls.issued();
        assert_eq!(issued.issuer_id, ca.issuer_id());
        assert!(tls.renew_at() > issued.not_before && tls.renew_at() < issued.not_after);
        assert!(ServerTls::new(&ca, "Bad NS").is_err());
    }
}
