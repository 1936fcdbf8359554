//! Getting and renewing the sidecar's certificate from tern-control.
//!
//! A fresh ECDSA P-256 key is generated for every certificate; only its CSR leaves the
//! process. A certificate is renewed at about 70 % of its lifetime (±5 % of jitter, so
//! that sidecars started together do not renew together), at once when the control plane
//! names a new issuer, and retried with a jittered exponential backoff on failure. The
//! current certificate keeps serving until a new one is installed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tern_api::v1::CertifyRequest;
use tern_api::v1::control_plane_client::ControlPlaneClient;
use tern_config::identity::SpiffeId;

use super::{Credentials, TlsError, Trust, verify};
use crate::control::{Backoff, ControlSettings};
use crate::state::Shared;

/// A key and its certificate signing request, waiting for the certificate.
pub struct Pending {
    id: SpiffeId,
    key: rcgen::KeyPair,
    pub csr_der: Vec<u8>,
}

impl Pending {
    pub fn new(id: SpiffeId) -> Result<Pending, TlsError> {
        let bad = |e: rcgen::Error| TlsError::BadCertificate(e.to_string());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(bad)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(bad)?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(bad)?;
        Ok(Pending {
            id,
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    /// Checks the certificate the CA returned (our identity, our key, a chain to the
    /// trust bundle, valid now) and makes credentials of it.
    pub fn finish(self, chain_der: Vec<Vec<u8>>, trust: &Trust) -> Result<Credentials, TlsError> {
        let bad = |m: String| TlsError::BadCertificate(m);
        let chain: Vec<CertificateDer<'static>> =
            chain_der.into_iter().map(CertificateDer::from).collect();
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let id = verify::spiffe_of(leaf).ok_or_else(|| bad("no SPIFFE ID in it".into()))?;
        if id != self.id {
            return Err(bad(format!("issued for {id}, asked for {}", self.id)));
        }
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| bad(format!("unparsable: {e}")))?;
        if x509.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(bad("it does not carry this sidecar's key".into()));
        }
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &trust.roots,
            &chain[1..],
            UnixTime::now(),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| bad(format!("does not chain to the trust bundle: {e}")))?;
        let (not_before, not_after) =
            verify::validity_of(leaf).ok_or_else(|| bad("no validity".into()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        Ok(Credentials {
            id,
            chain,
            key,
            not_before,
            not_after,
            received: now_unix(),
            issuer_id: trust.issuer_id.clone(),
        })
    }
}

/// When to renew a certificate valid from `not_before` to `not_after` (Unix seconds):
/// at 70 % of its lifetime, moved by `jitter` in [-1, 1] times 5 % of it. Pass the time
/// it was received as `not_before` when that is later (a backdated `not_before` would
/// make a short-lived certificate due at once).
pub fn renew_at(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    let life = (not_after - not_before).max(0) as f64;
    let at = life * (0.70 + 0.05 * jitter.clamp(-1.0, 1.0));
    not_before + at.round() as i64
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The bootstrap token: read from the file each time (it may be rotated).
pub fn token(cfg: &ControlSettings) -> String {
    cfg.token_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Keeps the sidecar's certificate fresh, for as long as the process runs.
pub async fn run(shared: Arc<Shared>, cfg: ControlSettings) {
    let tls = &shared.tls;
    let mut backoff = Backoff::new();
    let mut next = 0usize;
    let mut rng = fastrand::Rng::new();
    loop {
        // Wait for a reason to ask: a trust bundle with no certificate, a certificate due
        // for renewal, or a new issuer.
        let due = match (tls.trust(), tls.credentials()) {
            (None, _) => None,
            (Some(_), None) => Some(0),
            (Some(t), Some(c)) if c.issuer_id != t.issuer_id => Some(0),
            (Some(_), Some(c)) => Some(renew_at(
                c.not_before.max(c.received),
                c.not_after,
                rng.f64() * 2.0 - 1.0,
            )),
        };
        let wait = due.map(|at| Duration::from_secs((at - now_unix()).max(0) as u64));
        match wait {
            Some(w) if w.is_zero() => {}
            Some(w) => {
                tokio::select! {
                    _ = tokio::time::sleep(w) => {}
                    _ = tls.renew.notified() => {}
                }
                continue;
            }
            None => {
                tls.renew.notified().await;
                continue;
            }
        }
        let Some(trust) = tls.trust() else { continue };
        let addr = cfg.addresses[next % cfg.addresses.len().max(1)].clone();
        next = next.wrapping_add(1);
        match certify(&shared, &cfg, &addr, &trust).await {
            Ok(creds) => {
                let (id, not_after) = (creds.id.to_string(), creds.not_after);
                match tls.install(creds) {
                    Ok(()) => {
                        backoff.reset();
                        shared.metrics.identity_renewal(true, not_after);
                        tracing::info!(%id, not_after, "new certificate installed");
                        continue;
                    }
                    Err(err) => tracing::warn!(%err, "installing the certificate failed"),
                }
            }
            Err(err) => tracing::warn!(%addr, "certificate request failed: {err}"),
        }
        shared.metrics.identity_renewal(false, 0);
        let delay = backoff.next_delay().max(Duration::from_millis(200));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tls.renew.notified() => {}
        }
    }
}

async fn certify(
    shared: &Shared,
    cfg: &ControlSettings,
    addr: &str,
    trust: &Trust,
) -> Result<Credentials, String> {
    let id = SpiffeId::new(
        &trust.trust_domain,
        &shared.settings.namespace,
        &cfg.service_account,
    )
    .map_err(|e| e.to_string())?;
    let pending = Pending::new(id).map_err(|e| e.to_string())?;
    let channel = crate::control::connect(addr, cfg.tls.as_deref(), Some(trust)).await?;
    let request = CertifyRequest {
        token: token(cfg),
        workload: cfg.workload.clone(),
        namespace: shared.settings.namespace.clone(),
        service_account: cfg.service_account.clone(),
        csr_der: pending.csr_der.clone(),
    };
    let resp = tokio::time::timeout(
        crate::control::CONNECT_TIMEOUT * 2,
        ControlPlaneClient::new(channel).certify(request),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
    .into_inner();
    // The response's trust is the freshest: take it when it differs.
    let fresh;
    let trust = match resp.trust {
        Some(t) if t.issuer_id != trust.issuer_id || t.anchors_der.len() != trust.anchors.len() => {
            fresh = Trust::new(&t.trust_domain, &t.anchors_der, &t.issuer_id)
                .map_err(|e| e.to_string())?;
            &fresh
        }
        _ => trust,
    };
    pending
        .finish(resp.chain_der, trust)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_seventy_percent_with_bounded_jitter() {
        let day = 86_400;
        assert_eq!(renew_at(0, day, 0.0), day * 70 / 100);
        assert_eq!(renew_at(1000, 1000 + day, -1.0), 1000 + day * 65 / 100);
        assert_eq!(renew_at(0, day, 1.0), day * 75 / 100);
        assert_eq!(renew_at(0, day, 7.0), day * 75 / 100);
    }

    fn issue(pending: &Pending, uri: &str) -> (Vec<Vec<u8>>, Trust) {
        let ca = crate::tls::testca::TestCa::new();
        (ca.sign(pending, uri), ca.trust("abc"))
    }

    #[test]
    fn accepts_its_own_certificate_and_refuses_another_identity() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let pending = Pending::new(id.clone()).unwrap();
        let (chain, trust) = issue(&pending, "spiffe://cluster.local/ns/shop/sa/web");
        let creds = pending.finish(chain, &trust).unwrap();
        assert_eq!(creds.id, id);
        assert!(creds.not_after > creds.not_before);

        let pending = Pending::new(id).unwrap();
        let (chain, trust) = issue(&pending, "spiffe://cluster.local/ns/shop/sa/admin");
        let err = pending.finish(chain, &trust).unwrap_err();
        assert!(err.to_string().contains("asked for"), "{err}");
    }
}
