//! Checking peers: the SPIFFE ID in a certificate, a server verifier that checks the
//! chain against the trust bundle (the name is checked after the handshake, against the
//! identity the destination's endpoints are expected to have), and the reasons a
//! handshake failed, as metric labels.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tern_config::identity::SpiffeId;

/// The SPIFFE ID of a certificate: its only URI SAN. `None` if it has none, several, or
/// one that is not a Tern SPIFFE ID.
pub fn spiffe_of(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    SpiffeId::parse(uri).ok()
}

/// Validity of a certificate, as Unix seconds: (not before, not after).
pub fn validity_of(cert: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let v = x509.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Verifies a peer sidecar's server certificate chain against the trust bundle. The
/// server name is not checked here: the caller compares the certificate's SPIFFE ID with
/// the identity it expects once the handshake is done.
#[derive(Debug)]
pub struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl MeshServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Self {
        MeshServerVerifier { roots, provider }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Only TLS 1.3 is offered; a TLS 1.2 signature means something is wrong.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A short, bounded label for why a handshake failed.
pub fn reason(err: &Error) -> &'static str {
    match err {
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_certificate",
        Error::AlertReceived(_) => "refused_by_peer",
        Error::PeerIncompatible(_) => "incompatible",
        Error::NoApplicationProtocol => "no_alpn",
        _ => "handshake",
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if there is one.
pub fn rustls_error(err: &std::io::Error) -> Option<&Error> {
    err.get_ref()?.downcast_ref::<Error>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn reads_the_one_spiffe_uri() {
        let cert = cert_with_uris(&["spiffe://cluster.local/ns/shop/sa/web"]);
        let id = spiffe_of(&cert).unwrap();
        assert!(id.is("shop", "web"));
        let (nb, na) = validity_of(&cert).unwrap();
        assert!(na > nb);
    }

    #[test]
    fn refuses_none_or_several_uris() {
        assert!(spiffe_of(&cert_with_uris(&[])).is_none());
        assert!(
            spiffe_of(&cert_with_uris(&[
                "spiffe://cluster.local/ns/shop/sa/web",
                "spiffe://cluster.local/ns/shop/sa/other",
            ]))
            .is_none()
        );
        assert!(spiffe_of(&cert_with_uris(&["https://example.com/"])).is_none());
    }
}
