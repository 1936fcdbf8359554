//! tern-control's CA end to end in process: Certify over a real tonic client on
//! 127.0.0.1, the chain checked with rustls' webpki verifier against the anchor, refusals
//! with their codes, tokens on streams, and CA directory changes reaching a stream.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tern_api::v1::sidecar_message::Kind;
use tern_api::v1::{CertifyRequest, CertifyResponse, ConfigPush, Hello, IdentityStatus};
use tern_control::ca::{self, Generated, Lifetimes};
use tern_control::server::Settings;
use tonic::Code;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use common::*;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

struct Mesh {
    config: std::path::PathBuf,
    ca_dir: std::path::PathBuf,
    tokens: std::path::PathBuf,
    ca: Generated,
    /// A token for shop/web.
    web: String,
}

/// A config directory, a CA directory and a tokens file with a token for shop/web.
fn mesh(tag: &str) -> Mesh {
    let ca = ca::generate("cluster.local", Lifetimes::default(), SystemTime::now()).unwrap();
    let f = identity_files(&temp_dir(tag), &ca);
    Mesh {
        config: f.config,
        ca_dir: f.ca_dir,
        tokens: f.tokens,
        ca,
        web: f.web,
    }
}

fn settings(m: &Mesh, with_ca: bool) -> Settings {
    Settings {
        debounce: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        ca_dir: with_ca.then(|| m.ca_dir.clone()),
        tokens: Some(m.tokens.clone()),
        ..Settings::default()
    }
}

fn csr(sans: &[&str], dns: Option<&str>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    if let Some(d) = dns {
        p.subject_alt_names
            .push(SanType::DnsName(d.try_into().unwrap()));
    }
    p.serialize_request(&key).unwrap().der().to_vec()
}

fn request(token: &str, sa: &str, csr_der: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        token: token.into(),
        workload: "web-1".into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        csr_der,
    }
}

async fn certify(
    grpc: std::net::SocketAddr,
    req: CertifyRequest,
) -> Result<CertifyResponse, tonic::Status> {
    client(grpc)
        .await
        .certify(req)
        .await
        .map(|r| r.into_inner())
}

/// Certify, expecting a refusal with `code`.
async fn refused(grpc: std::net::SocketAddr, req: CertifyRequest, code: Code) -> String {
    let e = certify(grpc, req).await.expect_err("a refusal");
    assert_eq!(e.code(), code, "{e}");
    e.message().to_string()
}

/// A CSR for shop/web, as a sidecar makes it.
fn web_csr() -> Vec<u8> {
    csr(&[WEB_ID], None)
}

fn assert_has(text: &str, line: &str) {
    assert!(text.contains(line), "no {line:?} in:\n{text}");
}

fn web_hello(token: &str) -> Hello {
    Hello {
        token: token.into(),
        ..hello("web-1", &["shop/checkout"], "")
    }
}

/// The chain verifies as a client certificate against `anchors` (webpki, as the
/// sidecars' rustls does).
fn verify_chain(chain: &[Vec<u8>], anchors: &[Vec<u8>]) {
    let mut roots = rustls::RootCertStore::empty();
    for a in anchors {
        roots.add(CertificateDer::from(a.clone())).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap();
    let leaf = CertificateDer::from(chain[0].clone());
    let intermediates: Vec<CertificateDer> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    verifier
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .unwrap();
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    http_get(admin, "/metrics").await.1
}

fn anchors_of(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

/// Waits for a push whose trust differs from `old`, skipping others.
async fn next_trust_change(s: &mut Sidecar, old: &ConfigPush) -> ConfigPush {
    loop {
        let p = s.next().await;
        if p.trust != old.trust {
            return p;
        }
    }
}

fn write_file(dir: &Path, name: &str, text: &str) {
    write_atomic(&dir.join(name), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_signs_the_token_identity_and_trust_changes_reach_streams() {
    let m = mesh("ca");
    let run = start(&m.config, settings(&m, true)).await;

    // A good request: the chain verifies against the anchor and names the identity.
    let resp = certify(run.grpc, request(&m.web, "web", web_csr()))
        .await
        .unwrap();
    let trust = resp.trust.clone().unwrap();
    assert_eq!(trust.trust_domain, "cluster.local");
    assert_eq!(trust.anchors_der.len(), 1);
    assert_eq!(trust.issuer_id.len(), 16);
    assert_eq!(resp.chain_der.len(), 2);
    verify_chain(&resp.chain_der, &trust.anchors_der);
    let (_, leaf) = X509Certificate::from_der(&resp.chain_der[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        sans.value.general_names,
        vec![GeneralName::URI(WEB_ID)],
        "exactly the SPIFFE ID"
    );
    let left = leaf.validity().not_after.timestamp() - now_unix();
    assert!(
        (24 * 3600 - 120..=24 * 3600 + 5).contains(&left),
        "lifetime left: {left}s"
    );
    assert_eq!(ca::issuer_id(&resp.chain_der[1]), trust.issuer_id);

    // Refusals, each with its code and reason.
    let admin_id = "spiffe://cluster.local/ns/shop/sa/admin";
    let cases = [
        (
            request("nope", "web", web_csr()),
            Code::Unauthenticated,
            "unknown token",
        ),
        (
            request(&m.web, "admin", csr(&[admin_id], None)),
            Code::PermissionDenied,
            "service account",
        ),
        (
            request(&m.web, "web", csr(&[admin_id], None)),
            Code::InvalidArgument,
            "sa/admin",
        ),
        (
            request(&m.web, "web", csr(&[WEB_ID], Some("web.shop"))),
            Code::InvalidArgument,
            "DNS web.shop",
        ),
        (
            request(&m.web, "web", b"junk".to_vec()),
            Code::InvalidArgument,
            "does not parse",
        ),
    ];
    for (req, code, reason) in cases {
        let e = refused(run.grpc, req, code).await;
        assert!(e.contains(reason), "{e}");
    }
    let text = metrics(run.admin).await;
    assert_has(&text, "tern_control_certificates_issued_total 1");
    assert_has(
        &text,
        "tern_control_certify_refusals_total{reason=\"bad_csr\"} 3",
    );
    assert_has(
        &text,
        "tern_control_certify_refusals_total{reason=\"unauthenticated\"} 1",
    );
    assert_has(&text, "tern_control_issuer_not_after_seconds");

    // Streams need a token good for the Hello's identity.
    let e = Sidecar::connect(run.grpc, web_hello(""))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = Sidecar::connect(
        run.grpc,
        Hello {
            service_account: "admin".into(),
            ..web_hello(&m.web)
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // Pushes carry the trust; the sidecar's identity shows in /sidecars.
    let mut web = Sidecar::connect(run.grpc, web_hello(&m.web)).await.unwrap();
    let first = web.next().await;
    assert_eq!(first.trust.as_ref(), Some(&trust));
    web.send(Kind::Identity(IdentityStatus {
        spiffe_id: WEB_ID.into(),
        not_after_unix: leaf.validity().not_after.timestamp(),
        issuer_id: trust.issuer_id.clone(),
    }))
    .await;
    let s = wait_for(run.admin, |s| {
        s.len() == 1 && s[0].identity.as_ref().is_some_and(|i| i.current_issuer)
    })
    .await;
    assert_eq!(s[0].identity.as_ref().unwrap().spiffe_id, WEB_ID);

    // Rotation step 2: both anchors. A new version with the new trust reaches the stream.
    let next = ca::generate("cluster.local", Lifetimes::default(), SystemTime::now()).unwrap();
    let both = format!("{}{}", m.ca.anchor_cert, next.anchor_cert);
    assert_eq!(anchors_of(&both), 2);
    write_file(&m.ca_dir, ca::ANCHORS_FILE, &both);
    let second = next_trust_change(&mut web, &first).await;
    assert_ne!(second.version, first.version);
    let t2 = second.trust.clone().unwrap();
    assert_eq!(t2.anchors_der.len(), 2);
    assert_eq!(t2.issuer_id, trust.issuer_id);
    assert_eq!(second.documents, first.documents);

    // An invalid change (an issuer that does not match its key) is refused: the old CA
    // keeps signing with the old issuer and nothing is pushed.
    write_file(&m.ca_dir, ca::ISSUER_CERT_FILE, &next.issuer_cert);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !metrics(run.admin)
        .await
        .contains("tern_control_ca_reloads_total{result=\"error\"} 1")
    {
        assert!(tokio::time::Instant::now() < deadline, "no refused reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = certify(run.grpc, request(&m.web, "web", web_csr()))
        .await
        .unwrap();
    assert_eq!(resp.trust.as_ref(), Some(&t2));
    let quiet = tokio::time::timeout(Duration::from_millis(500), web.pushes.message()).await;
    assert!(quiet.is_err(), "no push after a refused CA change");

    // Rotation step 3: the new issuer with its key. Sidecars see a new issuer_id; the one
    // that still serves the old certificate shows as on an old issuer.
    write_file(&m.ca_dir, ca::ISSUER_KEY_FILE, &next.issuer_key);
    let third = next_trust_change(&mut web, &second).await;
    let t3 = third.trust.unwrap();
    assert_ne!(t3.issuer_id, trust.issuer_id);
    let s = sidecars(run.admin).await;
    assert!(!s[0].identity.as_ref().unwrap().current_issuer);
    let resp = certify(run.grpc, request(&m.web, "web", web_csr()))
        .await
        .unwrap();
    verify_chain(&resp.chain_der, &t3.anchors_der);
    // ... and with the new anchor only (step 4).
    verify_chain(&resp.chain_der, &[t3.anchors_der[1].clone()]);

    run.shutdown.cancel();
    run.server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_certify_is_refused_and_pushes_carry_no_trust() {
    let m = mesh("noca");
    let run = start(&m.config, settings(&m, false)).await;
    refused(
        run.grpc,
        request(&m.web, "web", web_csr()),
        Code::FailedPrecondition,
    )
    .await;
    let mut web = Sidecar::connect(run.grpc, web_hello(&m.web)).await.unwrap();
    let push = web.next().await;
    assert!(push.trust.is_none());
    // The version is the content version, as without tokens.
    let m2 = mesh("noca-plain");
    let plain = start(&m2.config, Settings::default()).await;
    let mut other = Sidecar::connect(plain.grpc, web_hello("")).await.unwrap();
    assert_eq!(other.next().await.version, push.version);
    for r in [run, plain] {
        r.shutdown.cancel();
        r.server.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_directory_stops_tern_control_from_starting() {
    let m = mesh("badca");
    std::fs::write(m.ca_dir.join(ca::ISSUER_KEY_FILE), "garbage").unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = tern_control::run(
        settings(&m, true),
        m.config.clone(),
        grpc,
        admin,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("issuer.key"), "{e}");
}
