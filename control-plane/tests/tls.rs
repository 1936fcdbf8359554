//! tern-control serving its gRPC API over TLS (`--serve-tls`), reached with the sidecar's
//! own client (`tern_proxy::control::connect` with `--control-plane-anchors`): Certify
//! over TLS, wrong anchors and a wrong identity refused, the pushed trust bundle used
//! with the anchors file, and the serving certificate re-issued when the issuer changes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use tern_api::v1::control_plane_client::ControlPlaneClient;
use tern_api::v1::{CertifyRequest, CertifyResponse};
use tern_config::identity::SpiffeId;
use tern_control::ca::{self, Generated, Lifetimes};
use tern_control::server::Settings;
use tern_proxy::tls::control_plane::{ControlPlaneTls, connector};

use common::*;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CONTROL_ID: &str = "spiffe://cluster.local/ns/tern-system/sa/tern-control";

struct Mesh {
    root: PathBuf,
    config: PathBuf,
    ca_dir: PathBuf,
    tokens: PathBuf,
    /// The CA the directory starts with.
    first: Generated,
    /// A second CA whose anchor is trusted too (for an issuer change).
    second: Generated,
    web: String,
}

fn generate() -> Generated {
    ca::generate("cluster.local", Lifetimes::default(), SystemTime::now()).unwrap()
}

/// A config directory, a CA directory trusting two anchors (issuer of the first), and a
/// token for shop/web.
fn mesh(tag: &str) -> Mesh {
    let root = temp_dir(tag);
    let (first, second) = (generate(), generate());
    let f = identity_files(&root, &first);
    write_atomic(
        &f.ca_dir.join(ca::ANCHORS_FILE),
        &format!("{}{}", first.anchor_cert, second.anchor_cert),
    );
    Mesh {
        root,
        config: f.config,
        ca_dir: f.ca_dir,
        tokens: f.tokens,
        first,
        second,
        web: f.web,
    }
}

fn settings(m: &Mesh) -> Settings {
    Settings {
        debounce: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        ca_dir: Some(m.ca_dir.clone()),
        tokens: Some(m.tokens.clone()),
        serve_tls: true,
        ..Settings::default()
    }
}

fn tls(anchors_file: &Path, identity: Option<&str>) -> ControlPlaneTls {
    ControlPlaneTls {
        anchors_file: anchors_file.to_path_buf(),
        identity: identity.map(|i| SpiffeId::parse(i).unwrap()),
    }
}

fn web_request(token: &str) -> CertifyRequest {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(WEB_ID.try_into().unwrap())];
    CertifyRequest {
        token: token.into(),
        workload: "web-1".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        csr_der: p.serialize_request(&key).unwrap().der().to_vec(),
    }
}

async fn certify_on(
    channel: tonic::transport::Channel,
    token: &str,
) -> Result<CertifyResponse, tonic::Status> {
    ControlPlaneClient::new(channel)
        .certify(web_request(token))
        .await
        .map(|r| r.into_inner())
}

/// The chain tern-control serves to a new TLS connection.
async fn served_chain(grpc: std::net::SocketAddr, anchors: &Path) -> Vec<Vec<u8>> {
    let c = connector(&tls(anchors, None), None).unwrap();
    let stream = c.connect(&grpc.to_string()).await.unwrap();
    stream
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_over_tls_with_the_anchors_and_nothing_else() {
    let m = mesh("tls");
    let run = start(&m.config, settings(&m)).await;
    let addr = run.grpc.to_string();
    let anchors = m.ca_dir.join(ca::ANCHORS_FILE);

    // The sidecar's client with the CA's anchors: Certify works over TLS.
    let channel = tern_proxy::control::connect(&addr, Some(&tls(&anchors, None)), None)
        .await
        .unwrap();
    let resp = certify_on(channel, &m.web).await.unwrap();
    assert_eq!(resp.chain_der.len(), 2);
    assert_eq!(resp.chain_der[1], pem_der(&m.first.issuer_cert));
    // The config stream works over TLS too.
    let channel = tern_proxy::control::connect(&addr, Some(&tls(&anchors, None)), None)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(tern_api::v1::SidecarMessage {
        kind: Some(tern_api::v1::sidecar_message::Kind::Hello(
            tern_api::v1::Hello {
                token: m.web.clone(),
                ..hello("web-1", &["shop/checkout"], "")
            },
        )),
    })
    .await
    .unwrap();
    let mut pushes = ControlPlaneClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let push = tokio::time::timeout(WAIT, pushes.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(push.trust.is_some() && !push.documents.is_empty());
    drop(tx);
    // The server's own certificate names tern-control, issued by the same issuer.
    let chain = served_chain(run.grpc, &anchors).await;
    let id = tern_proxy::tls::verify::spiffe_of(&chain[0].clone().into()).unwrap();
    assert_eq!(id.to_string(), CONTROL_ID);
    assert_eq!(chain[1], pem_der(&m.first.issuer_cert));

    // Plain HTTP/2 gets nowhere.
    let plain = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        certify_on(ch, &m.web).await.map_err(|e| e.to_string())
    };
    assert!(
        tokio::time::timeout(WAIT, plain).await.unwrap().is_err(),
        "plaintext must fail"
    );
    // ... and is counted as a failed handshake.
    let (_, metrics) = common::http_get(run.admin, "/metrics").await;
    assert!(
        metrics.contains("tern_control_tls_handshakes_total{result=\"failed\"}"),
        "{metrics}"
    );

    // Anchors of another CA: refused, and the error says why.
    let other = generate();
    let wrong = m.root.join("other.pem");
    std::fs::write(&wrong, &other.anchor_cert).unwrap();
    let e = tern_proxy::control::connect(&addr, Some(&tls(&wrong, None)), None)
        .await
        .unwrap_err();
    assert!(
        e.contains("TLS to the control plane failed: unknown CA"),
        "{e}"
    );

    // ... unless the trust bundle the control plane pushed holds the right anchor.
    let pushed = tern_proxy::tls::Trust::new(
        "cluster.local",
        &[pem_der(&m.first.anchor_cert)],
        "whatever",
    )
    .unwrap();
    let channel = tern_proxy::control::connect(&addr, Some(&tls(&wrong, None)), Some(&pushed))
        .await
        .unwrap();
    certify_on(channel, &m.web).await.unwrap();

    // The right CA but another identity than expected.
    let expected = "spiffe://cluster.local/ns/shop/sa/tern-control";
    let e = tern_proxy::control::connect(&addr, Some(&tls(&anchors, Some(expected))), None)
        .await
        .unwrap_err();
    assert!(
        e.contains(&format!(
            "control plane presented {CONTROL_ID}, expected {expected}"
        )),
        "{e}"
    );
    // Another trust domain than the pushed one.
    let pushed =
        tern_proxy::tls::Trust::new("other.domain", &[pem_der(&m.first.anchor_cert)], "whatever")
            .unwrap();
    let e = tern_proxy::control::connect(&addr, Some(&tls(&anchors, None)), Some(&pushed))
        .await
        .unwrap_err();
    assert!(
        e.contains("expected spiffe://other.domain/ns/tern-system"),
        "{e}"
    );

    run.shutdown.cancel();
    run.server.await.unwrap().unwrap();
    std::fs::remove_dir_all(&m.root).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_follows_the_issuer() {
    let m = mesh("tls-rotate");
    let run = start(&m.config, settings(&m)).await;
    let addr = run.grpc.to_string();
    let anchors = m.ca_dir.join(ca::ANCHORS_FILE);
    let chain = served_chain(run.grpc, &anchors).await;
    assert_eq!(chain[1], pem_der(&m.first.issuer_cert));
    // A connection opened before the change.
    let before = tern_proxy::control::connect(&addr, Some(&tls(&anchors, None)), None)
        .await
        .unwrap();

    // Switch to the second issuer (its anchor is already trusted).
    write_atomic(&m.ca_dir.join(ca::ISSUER_KEY_FILE), &m.second.issuer_key);
    write_atomic(&m.ca_dir.join(ca::ISSUER_CERT_FILE), &m.second.issuer_cert);
    let new_issuer = pem_der(&m.second.issuer_cert);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let chain = served_chain(run.grpc, &anchors).await;
        if chain[1] == new_issuer {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never re-issued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before still works, and signs with the new issuer.
    let resp = certify_on(before, &m.web).await.unwrap();
    assert_eq!(resp.chain_der[1], new_issuer);

    run.shutdown.cancel();
    run.server.await.unwrap().unwrap();
    std::fs::remove_dir_all(&m.root).unwrap();
}

#[tokio::test]
async fn serve_tls_needs_a_ca() {
    let m = mesh("tls-noca");
    let settings = Settings {
        ca_dir: None,
        ..settings(&m)
    };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = tern_control::run(
        settings,
        m.config.clone(),
        grpc,
        admin,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, tern_control::RunError::TlsWithoutCa), "{e}");
    std::fs::remove_dir_all(&m.root).unwrap();
}
