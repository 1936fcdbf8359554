//! mTLS between sidecars: the sidecar's own identity (a key generated here, a certificate
//! signed by tern-control's CA, renewed before it expires), the mesh's trust bundle, and
//! the rustls configs built from both.
//!
//! Identity is on when the control plane's pushes carry a trust bundle. From then on,
//! endpoints with an expected identity are reached over mTLS (TLS 1.3 only, ALPN `h2`;
//! `http/1.1` for upgrades, `tern-opaque` for TCP), and the inbound listener terminates
//! mTLS and hands the client's SPIFFE ID to authorization, rate limiting and metrics.
//! A new certificate or bundle builds new configs, used by new connections at once;
//! connections already open keep the one they were made with.

pub mod certify;
pub mod control_plane;
pub mod verify;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tern_config::identity::SpiffeId;
use tern_config::snapshot::EndpointIdentity;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_OPAQUE: &[u8] = b"tern-opaque";

/// A TLS handshake gets this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a mesh connection carries, as negotiated by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
    Opaque,
}

impl Alpn {
    fn bytes(self) -> &'static [u8] {
        match self {
            Alpn::H2 => ALPN_H2,
            Alpn::Http1 => ALPN_HTTP1,
            Alpn::Opaque => ALPN_OPAQUE,
        }
    }

    fn of(proto: Option<&[u8]>) -> Option<Alpn> {
        match proto? {
            ALPN_H2 => Some(Alpn::H2),
            ALPN_HTTP1 => Some(Alpn::Http1),
            ALPN_OPAQUE => Some(Alpn::Opaque),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate yet: waiting for the control plane's CA")]
    NoIdentity,
    #[error("TLS handshake failed ({reason}): {source}")]
    Handshake {
        reason: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("peer is {got}, expected {expected}")]
    IdentityMismatch { expected: String, got: String },
    #[error("peer certificate carries no SPIFFE ID")]
    NoPeerIdentity,
    #[error("peer negotiated no usable ALPN protocol")]
    NoAlpn,
    #[error("invalid trust bundle: {0}")]
    BadTrust(String),
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    #[error("building the TLS config: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::NoIdentity => "no_identity",
            TlsError::Handshake { reason, .. } => reason,
            TlsError::Timeout => "timeout",
            TlsError::IdentityMismatch { .. } => "identity_mismatch",
            TlsError::NoPeerIdentity => "no_peer_identity",
            TlsError::NoAlpn => "no_alpn",
            TlsError::BadTrust(_) | TlsError::BadCertificate(_) | TlsError::Config(_) => "config",
        }
    }
}

/// The mesh's trust, as the control plane last sent it.
#[derive(Debug)]
pub struct Trust {
    pub trust_domain: String,
    pub anchors: Vec<CertificateDer<'static>>,
    pub roots: Arc<RootCertStore>,
    /// The control plane's current issuer; a certificate from another one is renewed.
    pub issuer_id: String,
}

impl Trust {
    pub fn new(
        trust_domain: &str,
        anchors_der: &[Vec<u8>],
        issuer_id: &str,
    ) -> Result<Trust, TlsError> {
        let anchors: Vec<CertificateDer<'static>> = anchors_der
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect();
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(anchors.iter().cloned());
        if added == 0 || added != anchors.len() {
            return Err(TlsError::BadTrust(format!(
                "{added} of {} trust anchors are usable certificates",
                anchors.len()
            )));
        }
        Ok(Trust {
            trust_domain: trust_domain.to_owned(),
            anchors,
            roots: Arc::new(roots),
            issuer_id: issuer_id.to_owned(),
        })
    }

    fn same_as(&self, other: &Trust) -> bool {
        self.trust_domain == other.trust_domain
            && self.anchors == other.anchors
            && self.issuer_id == other.issuer_id
    }
}

/// The sidecar's certificate and key.
#[derive(Debug)]
pub struct Credentials {
    pub id: SpiffeId,
    /// Leaf first, then the issuer.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: i64,
    pub not_after: i64,
    /// When this sidecar got it (Unix seconds): renewal counts from here, since CAs
    /// backdate `not_before` for clock skew.
    pub received: i64,
    /// The `issuer_id` of the trust in force when it was issued.
    pub issuer_id: String,
}

struct Configs {
    server: Arc<ServerConfig>,
    h2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    opaque: Arc<ClientConfig>,
}

/// The sidecar's identity and trust, shared by every worker.
pub struct Tls {
    provider: Arc<CryptoProvider>,
    trust: ArcSwapOption<Trust>,
    creds: ArcSwapOption<Credentials>,
    configs: ArcSwapOption<Configs>,
    /// Serialises updates of trust and credentials.
    updating: Mutex<()>,
    /// Wakes the renewal task: a new trust, or an issuer change.
    pub renew: tokio::sync::Notify,
    /// Bumped after each new certificate (the control stream reports it).
    pub installed: tokio::sync::watch::Sender<u64>,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            trust: ArcSwapOption::empty(),
            creds: ArcSwapOption::empty(),
            configs: ArcSwapOption::empty(),
            updating: Mutex::new(()),
            renew: tokio::sync::Notify::new(),
            installed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Tls {
    /// Whether the mesh uses mTLS (the control plane sent a trust bundle).
    pub fn enabled(&self) -> bool {
        self.trust.load().is_some()
    }

    /// Whether this sidecar has a certificate to use.
    pub fn ready(&self) -> bool {
        self.configs.load().is_some()
    }

    pub fn trust(&self) -> Option<Arc<Trust>> {
        self.trust.load_full()
    }

    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.creds.load_full()
    }

    /// Installs the trust the control plane sent. Returns whether it changed. A new
    /// issuer asks for a new certificate at once.
    pub fn set_trust(&self, trust: Trust) -> Result<bool, TlsError> {
        let _updating = self.updating.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .trust
            .load()
            .as_ref()
            .is_some_and(|t| t.same_as(&trust))
        {
            return Ok(false);
        }
        let stale = self.creds.load().as_ref().is_none_or(|c| {
            c.issuer_id != trust.issuer_id || c.id.trust_domain != trust.trust_domain
        });
        let trust = Arc::new(trust);
        if let Some(creds) = self.creds.load_full() {
            self.configs
                .store(Some(Arc::new(self.build(&trust, &creds)?)));
        }
        self.trust.store(Some(trust));
        if stale {
            self.renew.notify_one();
        }
        Ok(true)
    }

    /// Installs a new certificate: new connections use it at once.
    pub fn install(&self, creds: Credentials) -> Result<(), TlsError> {
        let _updating = self.updating.lock().unwrap_or_else(|e| e.into_inner());
        let trust = self.trust.load_full().ok_or(TlsError::NoIdentity)?;
        let creds = Arc::new(creds);
        self.configs
            .store(Some(Arc::new(self.build(&trust, &creds)?)));
        self.creds.store(Some(creds));
        self.installed.send_modify(|n| *n += 1);
        Ok(())
    }

    fn build(&self, trust: &Trust, creds: &Credentials) -> Result<Configs, TlsError> {
        use rustls::version::TLS13;
        let provider = &self.provider;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::BadTrust(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_OPAQUE.to_vec()];
        // No resumption: every connection verifies the peer's current chain (a resumed
        // session would skip it, past an expiry or an anchor's removal). Connections
        // between sidecars are pooled and long-lived, so handshakes are rare anyway.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let verifier = verify::MeshServerVerifier::new(trust.roots.clone(), provider.clone());
        let base = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
        let client = |alpn: Alpn| {
            let mut c = base.clone();
            c.alpn_protocols = vec![alpn.bytes().to_vec()];
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        };
        Ok(Configs {
            server: Arc::new(server),
            h2: client(Alpn::H2),
            http1: client(Alpn::Http1),
            opaque: client(Alpn::Opaque),
        })
    }

    /// The configs and trust in force, once there is a certificate.
    fn loaded(&self) -> Result<(Arc<Configs>, Arc<Trust>), TlsError> {
        match (self.configs.load_full(), self.trust.load_full()) {
            (Some(c), Some(t)) => Ok((c, t)),
            _ => Err(TlsError::NoIdentity),
        }
    }

    /// Opens mTLS to another sidecar over `tcp` and checks that the server is `expected`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        expected: &EndpointIdentity,
        alpn: Alpn,
    ) -> Result<client::TlsStream<TcpStream>, TlsError> {
        let (configs, trust) = self.loaded()?;
        let config = match alpn {
            Alpn::H2 => configs.h2.clone(),
            Alpn::Http1 => configs.http1.clone(),
            Alpn::Opaque => configs.opaque.clone(),
        };
        let name = match tcp.peer_addr() {
            Ok(a) => ServerName::IpAddress(a.ip().into()),
            Err(source) => {
                return Err(TlsError::Handshake {
                    reason: "connect",
                    source,
                });
            }
        };
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| TlsError::Timeout)?
        .map_err(handshake_error)?;
        let conn = stream.get_ref().1;
        let peer = peer_id(conn)?;
        if peer.trust_domain != trust.trust_domain || !expected.matches(&peer) {
            return Err(TlsError::IdentityMismatch {
                expected: format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    trust.trust_domain, expected.namespace, expected.service_account
                ),
                got: peer.to_string(),
            });
        }
        if Alpn::of(conn.alpn_protocol()) != Some(alpn) {
            return Err(TlsError::NoAlpn);
        }
        Ok(stream)
    }

    /// Terminates mTLS from another sidecar: the stream, the client's identity and what
    /// the connection carries.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(server::TlsStream<TcpStream>, SpiffeId, Alpn), TlsError> {
        let (configs, trust) = self.loaded()?;
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsAcceptor::from(configs.server.clone()).accept(tcp),
        )
        .await
        .map_err(|_| TlsError::Timeout)?
        .map_err(handshake_error)?;
        let conn = stream.get_ref().1;
        let peer = peer_id(conn)?;
        if peer.trust_domain != trust.trust_domain {
            return Err(TlsError::IdentityMismatch {
                expected: format!("an identity in {}", trust.trust_domain),
                got: peer.to_string(),
            });
        }
        let alpn = Alpn::of(conn.alpn_protocol()).ok_or(TlsError::NoAlpn)?;
        Ok((stream, peer, alpn))
    }

    /// The certificate in force, for the control plane and `/identity`.
    pub fn status(&self) -> Option<tern_api::v1::IdentityStatus> {
        let c = self.creds.load_full()?;
        Some(tern_api::v1::IdentityStatus {
            spiffe_id: c.id.to_string(),
            not_after_unix: c.not_after,
            issuer_id: c.issuer_id.clone(),
        })
    }

    pub fn json(&self) -> serde_json::Value {
        let trust = self.trust.load_full();
        let creds = self.creds.load_full();
        serde_json::json!({
            "enabled": trust.is_some(),
            "trust_domain": trust.as_ref().map(|t| t.trust_domain.clone()),
            "trust_anchors": trust.as_ref().map_or(0, |t| t.anchors.len()),
            "issuer_id": trust.as_ref().map(|t| t.issuer_id.clone()),
            "spiffe_id": creds.as_ref().map(|c| c.id.to_string()),
            "not_before_unix": creds.as_ref().map(|c| c.not_before),
            "not_after_unix": creds.as_ref().map(|c| c.not_after),
            "certificate_issuer_id": creds.as_ref().map(|c| c.issuer_id.clone()),
        })
    }
}

/// The SPIFFE ID of the peer's leaf certificate.
fn peer_id(conn: &rustls::CommonState) -> Result<SpiffeId, TlsError> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(verify::spiffe_of)
        .ok_or(TlsError::NoPeerIdentity)
}

fn handshake_error(source: std::io::Error) -> TlsError {
    let reason = verify::rustls_error(&source).map_or("io", verify::reason);
    TlsError::Handshake { reason, source }
}

#[cfg(test)]
pub(crate) mod testca {
    //! A throwaway CA for tests: anchor -> issuer -> leaf, as tern-control issues them.
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};

    pub struct TestCa {
        anchor: rcgen::Certificate,
        issuer_cert: rcgen::Certificate,
        issuer: rcgen::Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub fn new() -> Self {
            // Names unique per CA, as `ternctl ca init` makes them.
            let tag = fastrand::u64(..);
            let ca_params = |cn: &str| {
                let mut p = CertificateParams::default();
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p.distinguished_name = rcgen::DistinguishedName::new();
                p.distinguished_name
                    .push(rcgen::DnType::CommonName, format!("{cn} {tag:x}"));
                p
            };
            let anchor_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let p = ca_params("test anchor");
            let anchor = p.self_signed(&anchor_key).unwrap();
            let anchor_issuer = rcgen::Issuer::new(p, anchor_key);
            let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let p = ca_params("test issuer");
            let issuer_cert = p.signed_by(&issuer_key, &anchor_issuer).unwrap();
            TestCa {
                anchor,
                issuer_cert,
                issuer: rcgen::Issuer::new(p, issuer_key),
            }
        }

        pub fn trust(&self, issuer_id: &str) -> Trust {
            Trust::new("cluster.local", &[self.anchor.der().to_vec()], issuer_id).unwrap()
        }

        /// Signs the CSR of `pending` for `uri`: [leaf, issuer].
        pub fn sign(&self, pending: &certify::Pending, uri: &str) -> Vec<Vec<u8>> {
            let csr =
                rcgen::CertificateSigningRequestParams::from_der(&pending.csr_der.clone().into())
                    .unwrap();
            let mut params = csr.params;
            params.subject_alt_names = vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(uri).unwrap(),
            )];
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let leaf = params.signed_by(&csr.public_key, &self.issuer).unwrap();
            vec![leaf.der().to_vec(), self.issuer_cert.der().to_vec()]
        }

        /// A sidecar's TLS state holding a certificate for `ns/sa` from this CA.
        pub fn sidecar(&self, ns: &str, sa: &str) -> Tls {
            let id = SpiffeId::new("cluster.local", ns, sa).unwrap();
            let pending = certify::Pending::new(id.clone()).unwrap();
            let chain = self.sign(&pending, &id.to_string());
            let tls = Tls::default();
            tls.set_trust(self.trust("i1")).unwrap();
            let creds = pending.finish(chain, &self.trust("i1")).unwrap();
            tls.install(creds).unwrap();
            tls
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testca::TestCa;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn expect(ns: &str, sa: &str) -> EndpointIdentity {
        EndpointIdentity {
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    /// Runs one handshake over loopback: the client's result and the server's.
    async fn handshake(
        client: &Tls,
        server: &Tls,
        expected: EndpointIdentity,
    ) -> (Result<(), TlsError>, Result<(SpiffeId, Alpn), TlsError>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (c, s) = tokio::join!(
            async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut tls = client.connect(tcp, &expected, Alpn::H2).await?;
                tls.write_all(b"ping").await.unwrap();
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"pong");
                Ok(())
            },
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                let (mut tls, id, alpn) = server.accept(tcp).await?;
                let mut buf = [0u8; 4];
                // The client may hang up after checking the identity.
                if tls.read_exact(&mut buf).await.is_ok() {
                    tls.write_all(b"pong").await.unwrap();
                    tls.flush().await.unwrap();
                }
                Ok((id, alpn))
            }
        );
        (c, s)
    }

    #[tokio::test]
    async fn mutual_tls_carries_both_identities() {
        let ca = TestCa::new();
        let (web, checkout) = (ca.sidecar("shop", "web"), ca.sidecar("shop", "checkout"));
        let (c, s) = handshake(&web, &checkout, expect("shop", "checkout")).await;
        c.unwrap();
        let (id, alpn) = s.unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(alpn, Alpn::H2);
    }

    #[tokio::test]
    async fn the_client_refuses_an_unexpected_server_identity() {
        let ca = TestCa::new();
        let (web, other) = (ca.sidecar("shop", "web"), ca.sidecar("shop", "other"));
        let (c, _) = handshake(&web, &other, expect("shop", "checkout")).await;
        let err = c.unwrap_err();
        assert_eq!(err.reason(), "identity_mismatch", "{err}");
        assert!(err.to_string().contains("sa/other"), "{err}");
    }

    #[tokio::test]
    async fn the_server_refuses_a_client_from_another_ca() {
        let (ca, rogue_ca) = (TestCa::new(), TestCa::new());
        let (rogue, checkout) = (
            rogue_ca.sidecar("shop", "web"),
            ca.sidecar("shop", "checkout"),
        );
        let (c, s) = handshake(&rogue, &checkout, expect("shop", "checkout")).await;
        // Each side distrusts the other's chain: the client sees an unknown CA first.
        let err = c.unwrap_err();
        assert_eq!(err.reason(), "unknown_ca", "{err}");
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn a_sidecar_without_a_certificate_refuses_to_connect() {
        let ca = TestCa::new();
        let bare = Tls::default();
        bare.set_trust(ca.trust("i1")).unwrap();
        assert!(bare.enabled() && !bare.ready());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let err = bare
            .connect(tcp, &expect("shop", "web"), Alpn::H2)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "no_identity");
    }

    #[tokio::test]
    async fn a_new_issuer_asks_for_renewal_and_keeps_serving_meanwhile() {
        let ca = TestCa::new();
        let web = ca.sidecar("shop", "web");
        let renew = web.renew.notified();
        tokio::pin!(renew);
        renew.as_mut().enable();
        assert!(web.set_trust(ca.trust("i2")).unwrap());
        assert!(
            !web.set_trust(ca.trust("i2")).unwrap(),
            "unchanged trust is no change"
        );
        tokio::time::timeout(std::time::Duration::from_secs(1), renew)
            .await
            .expect("renewal asked for");
        // The old certificate still serves until a new one is installed.
        let checkout = ca.sidecar("shop", "checkout");
        let (c, s) = handshake(&checkout, &web, expect("shop", "web")).await;
        c.unwrap();
        s.unwrap();
    }
}
