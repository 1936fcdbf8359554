//! TLS to tern-control (`--control-plane-anchors`): the sidecar checks the control plane's
//! certificate chain against the anchors of a file UNION the trust bundle the control
//! plane last pushed (so a rotated anchor does not lock it out), then that the certificate
//! names tern-control: `spiffe://<trust domain>/ns/tern-system/sa/tern-control` by
//! default, or the ID given with `--control-plane-identity`. No client certificate is
//! sent: the bootstrap token authenticates the sidecar.
//!
//! [`Connector`] is the tower service tonic's `Endpoint::connect_with_connector` calls:
//! TCP, the TLS 1.3 handshake (ALPN `h2`), the identity check, and the stream for hyper.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tern_config::identity::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{ALPN_H2, HANDSHAKE_TIMEOUT, Trust, verify};

/// The namespace and service account tern-control runs as, by default.
pub const DEFAULT_NAMESPACE: &str = "tern-system";
pub const SERVICE_ACCOUNT: &str = "tern-control";

/// How to reach the control plane over TLS.
#[derive(Debug, Clone)]
pub struct ControlPlaneTls {
    /// PEM trust anchors, read at every connection (the file may be replaced).
    pub anchors_file: PathBuf,
    /// The SPIFFE ID tern-control must present; `None`: `.../ns/tern-system/sa/tern-control`
    /// in the pushed trust domain (any trust domain before the first push).
    pub identity: Option<SpiffeId>,
}

/// The identity the control plane must present.
#[derive(Debug, Clone)]
pub struct Expected {
    /// `None`: not known yet (no push since the start): any.
    pub trust_domain: Option<String>,
    pub namespace: String,
    pub service_account: String,
}

impl Expected {
    fn matches(&self, id: &SpiffeId) -> bool {
        self.trust_domain
            .as_deref()
            .is_none_or(|td| td == id.trust_domain)
            && id.is(&self.namespace, &self.service_account)
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let td = self.trust_domain.as_deref().unwrap_or("<any trust domain>");
        write!(
            f,
            "spiffe://{td}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Why the TLS connection to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlTlsError {
    #[error("--control-plane-anchors {path}: {reason}")]
    Anchors { path: PathBuf, reason: String },
    #[error("TCP to the control plane {addr}: {source}")]
    Tcp {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS to the control plane failed: {reason} ({source})")]
    Handshake {
        reason: String,
        source: std::io::Error,
    },
    #[error("TLS to the control plane timed out")]
    Timeout,
    #[error("control plane presented {got}, expected {expected}")]
    Identity { got: String, expected: String },
    #[error("control plane negotiated no h2 (ALPN)")]
    NoAlpn,
    #[error("building the TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// The anchors of a PEM file.
pub fn read_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, ControlTlsError> {
    let bad = |reason: String| ControlTlsError::Anchors {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

/// The connector for one connection attempt: the anchors of the file and of `pushed`
/// (the trust the control plane last pushed), and the identity to expect.
pub fn connector(
    settings: &ControlPlaneTls,
    pushed: Option<&Trust>,
) -> Result<Connector, ControlTlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_anchors(&settings.anchors_file)?);
    if added == 0 {
        return Err(ControlTlsError::Anchors {
            path: settings.anchors_file.clone(),
            reason: "no usable trust anchor in it".into(),
        });
    }
    if let Some(t) = pushed {
        roots.add_parsable_certificates(t.anchors.iter().cloned());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = verify::MeshServerVerifier::new(Arc::new(roots), provider.clone());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let expected = match &settings.identity {
        Some(id) => Expected {
            trust_domain: Some(id.trust_domain.clone()),
            namespace: id.namespace.clone(),
            service_account: id.service_account.clone(),
        },
        None => Expected {
            trust_domain: pushed.map(|t| t.trust_domain.clone()),
            namespace: DEFAULT_NAMESPACE.into(),
            service_account: SERVICE_ACCOUNT.into(),
        },
    };
    Ok(Connector {
        config: Arc::new(config),
        expected: Arc::new(expected),
    })
}

/// Opens TLS to the control plane for tonic (`Endpoint::connect_with_connector`).
#[derive(Debug, Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    expected: Arc<Expected>,
}

impl Connector {
    /// TCP to `addr`, the handshake and the identity check.
    pub async fn connect(&self, addr: &str) -> Result<TlsStream<TcpStream>, ControlTlsError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ControlTlsError::Tcp {
                addr: addr.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        // The name is not checked (the SPIFFE ID is, below), but rustls wants one.
        let name = match tcp.peer_addr() {
            Ok(a) => ServerName::IpAddress(a.ip().into()),
            Err(source) => {
                return Err(ControlTlsError::Tcp {
                    addr: addr.to_string(),
                    source,
                });
            }
        };
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(self.config.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| ControlTlsError::Timeout)?
        .map_err(|source| {
            let reason = match verify::rustls_error(&source).map(verify::reason) {
                Some("unknown_ca") => "unknown CA".to_string(),
                Some(r) => r.replace('_', " "),
                None => "I/O".to_string(),
            };
            ControlTlsError::Handshake { reason, source }
        })?;
        let conn = stream.get_ref().1;
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        let peer = leaf.and_then(verify::spiffe_of);
        match peer {
            Some(id) if self.expected.matches(&id) => {}
            other => {
                return Err(ControlTlsError::Identity {
                    got: other.map_or_else(|| "no SPIFFE ID".to_string(), |id| id.to_string()),
                    expected: self.expected.to_string(),
                });
            }
        }
        if conn.alpn_protocol() != Some(ALPN_H2) {
            return Err(ControlTlsError::NoAlpn);
        }
        Ok(stream)
    }
}

impl tonic::codegen::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ControlTlsError;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, ControlTlsError>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .unwrap_or_default();
            me.connect(&addr).await.map(TokioIo::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_identity() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let any = Expected {
            trust_domain: None,
            namespace: DEFAULT_NAMESPACE.into(),
            service_account: SERVICE_ACCOUNT.into(),
        };
        assert!(any.matches(&id("spiffe://x.test/ns/tern-system/sa/tern-control")));
        assert!(!any.matches(&id("spiffe://x.test/ns/shop/sa/tern-control")));
        assert_eq!(
            any.to_string(),
            "spiffe://<any trust domain>/ns/tern-system/sa/tern-control"
        );
        let td = Expected {
            trust_domain: Some("cluster.local".into()),
            ..any
        };
        assert!(td.matches(&id("spiffe://cluster.local/ns/tern-system/sa/tern-control")));
        assert!(!td.matches(&id("spiffe://x.test/ns/tern-system/sa/tern-control")));
    }

    #[test]
    fn anchors_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tern-cp-anchors-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("anchors.pem");
        let settings = ControlPlaneTls {
            anchors_file: file.clone(),
            identity: None,
        };
        let e = connector(&settings, None).unwrap_err().to_string();
        assert!(
            e.contains("--control-plane-anchors") && e.contains("anchors.pem"),
            "{e}"
        );
        std::fs::write(&file, "not a certificate\n").unwrap();
        let e = connector(&settings, None).unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
