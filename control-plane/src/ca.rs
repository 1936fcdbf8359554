//! The mesh CA: trust anchors and an issuer (an intermediate signed by one of them) that
//! signs the sidecars' certificate requests.
//!
//! A CA directory (`--ca-dir`) holds `anchors.pem` (one or more root certificates, two
//! during a rotation), `issuer.crt` and `issuer.key` (PEM). [`Ca::load`] checks that the
//! issuer is a CA certificate, valid now, that its key matches, and that it chains to one
//! of the anchors; [`watch`] reloads the directory when it changes and keeps the last good
//! CA when a change does not pass these checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest as _, Sha256};
use tern_api::v1::Trust;
use tern_config::identity::SpiffeId;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::metrics::Metrics;

pub const ANCHORS_FILE: &str = "anchors.pem";
pub const ANCHOR_KEY_FILE: &str = "anchor.key";
pub const ISSUER_CERT_FILE: &str = "issuer.crt";
pub const ISSUER_KEY_FILE: &str = "issuer.key";

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default lifetime of a sidecar certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A leaf's not_before is this far in the past, for clocks that lag a little.
const BACKDATE: Duration = Duration::from_secs(60);
/// How often [`watch`] looks at the CA directory.
pub const POLL: Duration = Duration::from_secs(1);

/// Why a CA directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{file}: no certificate in it")]
    NoCertificate { file: &'static str },
    #[error("{file}: certificate {index} does not parse: {reason}")]
    BadCertificate {
        file: &'static str,
        index: usize,
        reason: String,
    },
    #[error("{file}: certificate {index} ({subject}) is not a CA certificate")]
    NotCa {
        file: &'static str,
        index: usize,
        subject: String,
    },
    #[error("{file} ({subject}) is not valid now: valid from {not_before} to {not_after}")]
    NotValidNow {
        file: &'static str,
        subject: String,
        not_before: String,
        not_after: String,
    },
    #[error("issuer.crt ({subject}) may not sign certificates (its key usage lacks keyCertSign)")]
    CannotSign { subject: String },
    #[error("issuer.key: {0}")]
    Key(rcgen::Error),
    #[error("issuer.key does not match the public key of issuer.crt")]
    KeyMismatch,
    #[error(
        "issuer.crt ({subject}, issued by {issuer}) does not chain to any certificate of anchors.pem"
    )]
    NotChained { subject: String, issuer: String },
    #[error("invalid trust domain: {0}")]
    TrustDomain(#[from] tern_config::identity::SpiffeError),
    #[error("generating the CA: {0}")]
    Generate(rcgen::Error),
    #[error("{path} already exists: pick an empty directory")]
    Exists { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a certificate request was refused: INVALID_ARGUMENT for the CSR's faults
/// ([`CsrError::is_callers_fault`]), FAILED_PRECONDITION for the CA's.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR does not parse or its signature is wrong: {0}")]
    Parse(rcgen::Error),
    #[error("the CSR must carry exactly one SAN, the URI {want}; it carries {got}")]
    Sans { want: String, got: String },
    #[error(
        "the issuer certificate expired (not_after {not_after_unix}): replace issuer.crt and issuer.key"
    )]
    IssuerExpired { not_after_unix: i64 },
    #[error("signing: {0}")]
    Sign(rcgen::Error),
}

impl CsrError {
    /// True when the request itself is wrong (not the CA).
    pub fn is_callers_fault(&self) -> bool {
        matches!(self, CsrError::Parse(_) | CsrError::Sans { .. })
    }
}

/// A loaded, checked CA.
pub struct Ca {
    trust_domain: String,
    lifetime: Duration,
    anchors_der: Vec<Vec<u8>>,
    issuer_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    issuer_id: String,
    /// The issuer certificate's not_after, seconds since the Unix epoch.
    issuer_not_after: i64,
    /// Hash of everything a sidecar trusts (see [`Ca::trust_hash`]).
    trust_hash: [u8; 32],
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("anchors", &self.anchors_der.len())
            .field("issuer_id", &self.issuer_id)
            .field("issuer_not_after", &self.issuer_not_after)
            .finish_non_exhaustive()
    }
}

/// The three files of a CA directory, as read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CaFiles {
    pub anchors: Vec<u8>,
    pub issuer_cert: Vec<u8>,
    pub issuer_key: Vec<u8>,
}

impl CaFiles {
    pub fn read(dir: &Path) -> Result<CaFiles, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| CaError::Read { path, source })
        };
        Ok(CaFiles {
            anchors: read(ANCHORS_FILE)?,
            issuer_cert: read(ISSUER_CERT_FILE)?,
            issuer_key: read(ISSUER_KEY_FILE)?,
        })
    }
}

/// Hex of the first 8 bytes of the SHA-256 of a certificate's DER: `Trust.issuer_id`.
pub fn issuer_id(der: &[u8]) -> String {
    hex(&Sha256::digest(der)[..8])
}

pub use tern_config::hex;

/// The trust domain must be one a SPIFFE ID can carry.
fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    SpiffeId::new(trust_domain, "ns", "sa")?;
    Ok(())
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn datetime(unix_secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix_secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn certs(file: &'static str, pem: &[u8]) -> Result<Vec<Vec<u8>>, CaError> {
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| CaError::Pem {
            path: file.into(),
            reason: e.to_string(),
        })?;
        out.push(cert.as_ref().to_vec());
    }
    if out.is_empty() {
        return Err(CaError::NoCertificate { file });
    }
    Ok(out)
}

fn parse<'a>(
    file: &'static str,
    index: usize,
    der: &'a [u8],
) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CaError::BadCertificate {
            file,
            index,
            reason: e.to_string(),
        })
}

fn check_valid_at(file: &'static str, cert: &X509Certificate<'_>, now: i64) -> Result<(), CaError> {
    let v = cert.validity();
    if v.not_before.timestamp() > now || v.not_after.timestamp() < now {
        return Err(CaError::NotValidNow {
            file,
            subject: cert.subject().to_string(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    Ok(())
}

impl Ca {
    /// Loads and checks the CA of `dir`.
    pub fn load(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Ca, CaError> {
        Ca::from_files(
            &CaFiles::read(dir)?,
            trust_domain,
            lifetime,
            SystemTime::now(),
        )
    }

    /// Checks and loads a CA from the contents of its files, as of `now`.
    pub fn from_files(
        files: &CaFiles,
        trust_domain: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Ca, CaError> {
        check_trust_domain(trust_domain)?;
        let now = unix(now);
        let anchors_der = certs(ANCHORS_FILE, &files.anchors)?;
        let anchors = anchors_der
            .iter()
            .enumerate()
            .map(|(i, der)| {
                let cert = parse(ANCHORS_FILE, i + 1, der)?;
                if !cert.is_ca() {
                    return Err(CaError::NotCa {
                        file: ANCHORS_FILE,
                        index: i + 1,
                        subject: cert.subject().to_string(),
                    });
                }
                Ok(cert)
            })
            .collect::<Result<Vec<_>, _>>()?;

        let issuer_der = certs(ISSUER_CERT_FILE, &files.issuer_cert)?.remove(0);
        let cert = parse(ISSUER_CERT_FILE, 1, &issuer_der)?;
        let subject = cert.subject().to_string();
        if !cert.is_ca() {
            return Err(CaError::NotCa {
                file: ISSUER_CERT_FILE,
                index: 1,
                subject,
            });
        }
        if let Ok(Some(ku)) = cert.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(CaError::CannotSign { subject });
        }
        check_valid_at(ISSUER_CERT_FILE, &cert, now)?;
        let chained = anchors.iter().find(|a| {
            a.subject() == cert.issuer() && cert.verify_signature(Some(a.public_key())).is_ok()
        });
        let Some(anchor) = chained else {
            return Err(CaError::NotChained {
                subject,
                issuer: cert.issuer().to_string(),
            });
        };
        check_valid_at(ANCHORS_FILE, anchor, now)?;

        let key_pem = String::from_utf8_lossy(&files.issuer_key);
        let key = KeyPair::from_pem(&key_pem).map_err(CaError::Key)?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::KeyMismatch);
        }
        let issuer_not_after = cert.validity().not_after.timestamp();
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(issuer_der.as_slice()), key)
            .map_err(CaError::Key)?;
        let issuer_id = issuer_id(&issuer_der);
        let trust_hash = {
            let mut h = Sha256::new();
            h.update((trust_domain.len() as u64).to_le_bytes());
            h.update(trust_domain.as_bytes());
            h.update(issuer_id.as_bytes());
            for a in &anchors_der {
                h.update((a.len() as u64).to_le_bytes());
                h.update(a);
            }
            h.finalize().into()
        };
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            lifetime,
            anchors_der,
            issuer_der,
            issuer,
            issuer_id,
            issuer_not_after,
            trust_hash,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn issuer_id(&self) -> &str {
        &self.issuer_id
    }

    /// Lifetime of the certificates signed (before clamping to the issuer's).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }

    pub fn anchors_der(&self) -> &[Vec<u8>] {
        &self.anchors_der
    }

    /// The issuer's not_after, seconds since the Unix epoch.
    pub fn issuer_not_after(&self) -> i64 {
        self.issuer_not_after
    }

    /// SHA-256 over the trust domain, issuer_id and anchors: what goes into a push version.
    pub fn trust_hash(&self) -> &[u8; 32] {
        &self.trust_hash
    }

    /// What sidecars trust, as sent in pushes and Certify answers.
    pub fn trust(&self) -> Trust {
        Trust {
            trust_domain: self.trust_domain.clone(),
            anchors_der: self.anchors_der.clone(),
            issuer_id: self.issuer_id.clone(),
        }
    }

    /// The SPIFFE ID of `namespace`/`service_account` in this trust domain.
    pub fn spiffe_id(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, tern_config::identity::SpiffeError> {
        SpiffeId::new(&self.trust_domain, namespace, service_account)
    }

    /// Signs `csr_der` for `id`, as of `now`: the CSR's signature must verify and its only
    /// SAN must be the URI `id`. Returns `[leaf DER, issuer DER]`.
    pub fn sign(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Vec<Vec<u8>>, CsrError> {
        self.check_issuer(now)?;
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(CsrError::Parse)?;
        let want = id.to_string();
        let sans = &csr.params.subject_alt_names;
        let only_ours = matches!(sans.as_slice(), [SanType::URI(uri)] if uri.as_str() == want);
        if !only_ours {
            let got = if sans.is_empty() {
                "none".to_string()
            } else {
                sans.iter().map(describe_san).collect::<Vec<_>>().join(", ")
            };
            return Err(CsrError::Sans { want, got });
        }
        self.issue(&csr.public_key, vec![sans[0].clone()], now)
    }

    /// A certificate for tern-control itself (its TLS server): a fresh ECDSA P-256 key,
    /// the URI SAN `id` and the DNS names `dns`, signed like a sidecar's ([`Ca::sign`]).
    /// Returns `([leaf DER, issuer DER], PKCS#8 key DER)`.
    pub fn issue_own(
        &self,
        id: &SpiffeId,
        dns: &[String],
        now: SystemTime,
    ) -> Result<(Vec<Vec<u8>>, Vec<u8>), CsrError> {
        self.check_issuer(now)?;
        let key = KeyPair::generate().map_err(CsrError::Sign)?;
        let mut sans = vec![SanType::URI(
            id.to_string().try_into().map_err(CsrError::Sign)?,
        )];
        for name in dns {
            sans.push(SanType::DnsName(
                name.as_str().try_into().map_err(CsrError::Sign)?,
            ));
        }
        let chain = self.issue(&key, sans, now)?;
        Ok((chain, key.serialize_der()))
    }

    fn check_issuer(&self, now: SystemTime) -> Result<(), CsrError> {
        if unix(now) >= self.issuer_not_after {
            return Err(CsrError::IssuerExpired {
                not_after_unix: self.issuer_not_after,
            });
        }
        Ok(())
    }

    /// The one place leaves are signed: `sans` only, an empty subject, a random serial,
    /// backdated [`BACKDATE`], the configured lifetime clamped to the issuer's, usages for
    /// mTLS. Returns `[leaf DER, issuer DER]`.
    fn issue(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        sans: Vec<SanType>,
        now: SystemTime,
    ) -> Result<Vec<Vec<u8>>, CsrError> {
        let now = unix(now);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let backdate = i64::try_from(BACKDATE.as_secs()).unwrap_or(0);
        let lifetime = i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX / 2);
        params.not_before = datetime(now - backdate);
        params.not_after = datetime(now.saturating_add(lifetime).min(self.issuer_not_after));
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(CsrError::Sign)?;
        Ok(vec![leaf.der().to_vec(), self.issuer_der.clone()])
    }
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI {}", u.as_str()),
        SanType::DnsName(d) => format!("DNS {}", d.as_str()),
        SanType::Rfc822Name(e) => format!("email {}", e.as_str()),
        SanType::IpAddress(ip) => format!("IP {ip}"),
        _ => "another kind of name".to_string(),
    }
}

/// A lifetime as typed on the command line: a number and a unit, `s`, `m`, `h`, `d` or
/// `y` (365 days): `24h`, `90d`, `1y`.
pub fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a lifetime (e.g. 24h, 90d, 1y)"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        "y" => 365 * 24 * 3600,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use s, m, h, d or y)"
            ));
        }
    };
    match n.checked_mul(unit_secs) {
        Some(0) => Err(format!("{s:?}: a lifetime must be more than zero")),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(format!("{s:?} is too long")),
    }
}

/// Fills `buf` from the system's secure random source.
pub fn random_bytes(buf: &mut [u8]) {
    use ring::rand::SecureRandom as _;
    // The system RNG failing is not something to recover from.
    #[allow(clippy::expect_used)]
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the system random number generator failed");
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    random_bytes(&mut b);
    // Positive, and not starting with a zero byte (DER INTEGER minimal form).
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}

/// Lifetimes of a fresh CA ([`generate`]).
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub anchor: Duration,
    pub issuer: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            anchor: Duration::from_secs(365 * 24 * 3600),
            issuer: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// PEM texts of a freshly generated anchor and issuer.
#[derive(Debug, Clone)]
pub struct Generated {
    pub anchor_cert: String,
    pub anchor_key: String,
    pub issuer_cert: String,
    pub issuer_key: String,
}

impl Generated {
    pub fn files(&self) -> CaFiles {
        CaFiles {
            anchors: self.anchor_cert.clone().into_bytes(),
            issuer_cert: self.issuer_cert.clone().into_bytes(),
            issuer_key: self.issuer_key.clone().into_bytes(),
        }
    }
}

fn ca_params(
    cn: String,
    constraints: BasicConstraints,
    now: i64,
    lifetime: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tern");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(constraints);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2);
    p.not_before = datetime(now - 60);
    p.not_after = datetime(now.saturating_add(lifetime));
    p
}

/// A fresh anchor (self-signed root) and an issuer signed by it, ECDSA P-256, as of `now`.
pub fn generate(
    trust_domain: &str,
    lifetimes: Lifetimes,
    now: SystemTime,
) -> Result<Generated, CaError> {
    check_trust_domain(trust_domain)?;
    let now = unix(now);
    let tag = {
        let mut b = [0u8; 4];
        random_bytes(&mut b);
        hex(&b)
    };
    let anchor_key = KeyPair::generate().map_err(CaError::Generate)?;
    let anchor_params = ca_params(
        format!("tern anchor {trust_domain} {tag}"),
        BasicConstraints::Unconstrained,
        now,
        lifetimes.anchor,
    );
    let anchor_cert = anchor_params
        .self_signed(&anchor_key)
        .map_err(CaError::Generate)?;
    let issuer_key = KeyPair::generate().map_err(CaError::Generate)?;
    let issuer_lifetime = lifetimes.issuer.min(lifetimes.anchor);
    let issuer_params = ca_params(
        format!("tern issuer {trust_domain} {tag}"),
        BasicConstraints::Constrained(0),
        now,
        issuer_lifetime,
    );
    let anchor = Issuer::from_params(&anchor_params, &anchor_key);
    let issuer_cert = issuer_params
        .signed_by(&issuer_key, &anchor)
        .map_err(CaError::Generate)?;
    Ok(Generated {
        anchor_cert: anchor_cert.pem(),
        anchor_key: anchor_key.serialize_pem(),
        issuer_cert: issuer_cert.pem(),
        issuer_key: issuer_key.serialize_pem(),
    })
}

/// Writes `generated` into `dir` (created if missing) as `anchors.pem`, `anchor.key`,
/// `issuer.crt` and `issuer.key`; keys are 0600. Refuses to overwrite any of them.
pub fn write_dir(dir: &Path, generated: &Generated) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let files = [
        (ANCHORS_FILE, &generated.anchor_cert, 0o644),
        (ANCHOR_KEY_FILE, &generated.anchor_key, 0o600),
        (ISSUER_CERT_FILE, &generated.issuer_cert, 0o644),
        (ISSUER_KEY_FILE, &generated.issuer_key, 0o600),
    ];
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, _, _) in &files {
        let path = dir.join(name);
        if path.exists() {
            return Err(CaError::Exists { path });
        }
    }
    for (name, text, mode) in files {
        let path = dir.join(name);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        written.map_err(|source| CaError::Write { path, source })?;
    }
    Ok(())
}

/// Reads the CA directory every [`POLL`] and, when its files changed, loads and checks
/// them: a good CA is handed to `on_change` (on a blocking thread), a bad one is logged
/// and counted while the last good one keeps serving. `seen`: the files as last loaded.
/// Runs until aborted.
pub async fn watch(
    dir: PathBuf,
    trust_domain: String,
    lifetime: Duration,
    mut seen: CaFiles,
    metrics: Arc<Metrics>,
    on_change: Arc<dyn Fn(Arc<Ca>) + Send + Sync>,
) {
    // The last refusal, so that a broken directory is reported once, not every second.
    let mut refused: Option<String> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let d = dir.clone();
        let unchanged = seen.clone();
        let read = tokio::task::spawn_blocking(move || match CaFiles::read(&d) {
            Ok(files) if files == unchanged => Ok(files),
            _ => read_settled(&d),
        });
        let Ok(read) = read.await else {
            return;
        };
        let loaded = match read {
            Ok(files) if files == seen => continue,
            Ok(files) => Ca::from_files(&files, &trust_domain, lifetime, SystemTime::now())
                .map(|ca| (files, ca)),
            Err(e) => Err(e),
        };
        match loaded {
            Ok((files, ca)) => {
                seen = files;
                refused = None;
                metrics.ca_reload(true);
                tracing::info!(
                    issuer_id = ca.issuer_id(),
                    anchors = ca.anchors_der().len(),
                    "CA reloaded"
                );
                let f = on_change.clone();
                let ca = Arc::new(ca);
                if tokio::task::spawn_blocking(move || f(ca)).await.is_err() {
                    tracing::error!("applying a CA reload failed");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if refused.as_deref() != Some(text.as_str()) {
                    metrics.ca_reload(false);
                    tracing::error!("CA directory refused; still serving the last good CA: {e}");
                    refused = Some(text);
                }
            }
        }
    }
}

/// Reads the CA files until two reads 100 ms apart agree, so files being copied one
/// after the other are not loaded half-changed (bounded: at most 10 tries).
fn read_settled(dir: &Path) -> Result<CaFiles, CaError> {
    let mut last = CaFiles::read(dir)?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let next = CaFiles::read(dir)?;
        if next == last {
            break;
        }
        last = next;
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn fresh() -> Generated {
        generate(TD, Lifetimes::default(), SystemTime::now()).unwrap()
    }

    fn load(files: &CaFiles) -> Result<Ca, CaError> {
        Ca::from_files(files, TD, DEFAULT_CERT_LIFETIME, SystemTime::now())
    }

    fn csr(sans: Vec<SanType>) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        let csr = p.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_fresh_ca_loads_and_signs_its_identity_only() {
        let g = fresh();
        let ca = load(&g.files()).unwrap();
        assert_eq!(ca.issuer_id().len(), 16);
        assert_eq!(ca.trust().anchors_der.len(), 1);
        let id = ca.spiffe_id("shop", "web").unwrap();
        let (_, good) = csr(vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
        let now = SystemTime::now();
        let chain = ca.sign(&good, &id, now).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.issuer_der());
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let (_, issuer) = X509Certificate::from_der(&chain[1]).unwrap();
        leaf.verify_signature(Some(issuer.public_key())).unwrap();
        assert!(!leaf.is_ca());
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, 24 * 3600 + 60);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);

        for (sans, what) in [
            (vec![], "none"),
            (
                vec![uri("spiffe://cluster.local/ns/shop/sa/admin")],
                "sa/admin",
            ),
            (
                vec![
                    uri("spiffe://cluster.local/ns/shop/sa/web"),
                    SanType::DnsName("web.shop".try_into().unwrap()),
                ],
                "DNS web.shop",
            ),
            (
                vec![uri("spiffe://other.domain/ns/shop/sa/web")],
                "other.domain",
            ),
        ] {
            let (_, bad) = csr(sans);
            let e = ca.sign(&bad, &id, now).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let e = ca.sign(b"not a csr", &id, now).unwrap_err();
        assert!(matches!(e, CsrError::Parse(_)), "{e}");
    }

    #[test]
    fn leaf_lifetime_is_clamped_to_the_issuer() {
        let g = generate(
            TD,
            Lifetimes {
                anchor: Duration::from_secs(3600),
                issuer: Duration::from_secs(600),
            },
            SystemTime::now(),
        )
        .unwrap();
        let ca = load(&g.files()).unwrap();
        let id = ca.spiffe_id("shop", "web").unwrap();
        let (_, good) = csr(vec![uri(&id.to_string())]);
        let chain = ca.sign(&good, &id, SystemTime::now()).unwrap();
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        assert_eq!(leaf.validity().not_after.timestamp(), ca.issuer_not_after());
    }

    #[test]
    fn bad_directories_are_refused_with_the_reason() {
        let a = fresh();
        let b = fresh();
        // The issuer of b does not chain to a's anchor.
        let mut f = a.files();
        f.issuer_cert = b.issuer_cert.clone().into_bytes();
        f.issuer_key = b.issuer_key.clone().into_bytes();
        let e = load(&f).unwrap_err();
        assert!(matches!(e, CaError::NotChained { .. }), "{e}");
        // Both anchors: it chains.
        f.anchors = format!("{}{}", a.anchor_cert, b.anchor_cert).into_bytes();
        let ca = load(&f).unwrap();
        assert_eq!(ca.anchors_der().len(), 2);
        // The key of another issuer.
        let mut f = a.files();
        f.issuer_key = b.issuer_key.clone().into_bytes();
        assert!(matches!(load(&f).unwrap_err(), CaError::KeyMismatch));
        // A leaf is not an issuer: use the anchor as a non-CA... a self-signed leaf.
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x.test".into()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let mut f = a.files();
        f.issuer_cert = leaf.pem().into_bytes();
        f.issuer_key = leaf_key.serialize_pem().into_bytes();
        assert!(matches!(load(&f).unwrap_err(), CaError::NotCa { .. }));
        // Not valid any more.
        let later = SystemTime::now() + Duration::from_secs(400 * 24 * 3600);
        let e = Ca::from_files(&a.files(), TD, DEFAULT_CERT_LIFETIME, later).unwrap_err();
        assert!(matches!(e, CaError::NotValidNow { .. }), "{e}");
        // A CA loaded while valid stops signing once its issuer expired.
        let ca = load(&a.files()).unwrap();
        let id = ca.spiffe_id("shop", "web").unwrap();
        let (_, good) = csr(vec![uri(&id.to_string())]);
        let e = ca.sign(&good, &id, later).unwrap_err();
        assert!(matches!(e, CsrError::IssuerExpired { .. }) && !e.is_callers_fault());
        // Empty and garbage files.
        let mut f = a.files();
        f.anchors = b"".to_vec();
        assert!(matches!(
            load(&f).unwrap_err(),
            CaError::NoCertificate { .. }
        ));
        let mut f = a.files();
        f.issuer_key = b"garbage".to_vec();
        assert!(matches!(load(&f).unwrap_err(), CaError::Key(_)));
        // A trust domain that cannot be in a SPIFFE ID.
        let e = Ca::from_files(
            &a.files(),
            "Bad Domain",
            DEFAULT_CERT_LIFETIME,
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(matches!(e, CaError::TrustDomain(_)), "{e}");
    }

    #[test]
    fn issuer_id_and_trust_hash_follow_the_files() {
        let a = fresh();
        let ca = load(&a.files()).unwrap();
        assert_eq!(ca.issuer_id(), issuer_id(ca.issuer_der()));
        let again = load(&a.files()).unwrap();
        assert_eq!(ca.trust_hash(), again.trust_hash());
        let b = fresh();
        let mut f = a.files();
        f.anchors = format!("{}{}", a.anchor_cert, b.anchor_cert).into_bytes();
        let both = load(&f).unwrap();
        assert_eq!(both.issuer_id(), ca.issuer_id());
        assert_ne!(both.trust_hash(), ca.trust_hash());
    }

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_lifetime("90d"), Ok(Duration::from_secs(90 * 86400)));
        assert_eq!(parse_lifetime("1y"), Ok(Duration::from_secs(365 * 86400)));
        assert_eq!(parse_lifetime("30m"), Ok(Duration::from_secs(1800)));
        assert!(parse_lifetime("0h").is_err());
        assert!(parse_lifetime("24").is_err());
        assert!(parse_lifetime("1w").is_err());
    }

    #[test]
    fn write_dir_writes_private_keys_0600_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("tern-ca-{}", fastrand::u64(..)));
        let g = fresh();
        write_dir(&dir, &g).unwrap();
        let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(ISSUER_KEY_FILE), 0o600);
        assert_eq!(mode(ANCHOR_KEY_FILE), 0o600);
        assert!(Ca::load(&dir, TD, DEFAULT_CERT_LIFETIME).is_ok());
        assert!(matches!(write_dir(&dir, &g), Err(CaError::Exists { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
