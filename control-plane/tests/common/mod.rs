//! Helpers shared by the control-plane integration tests: a tern-control on ephemeral
//! ports, a sidecar stream over a real tonic client, and the admin `/sidecars`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use tern_api::v1::control_plane_client::ControlPlaneClient;
use tern_api::v1::sidecar_message::Kind;
use tern_api::v1::{ConfigPush, Hello, SidecarMessage};
use tern_control::server::{Settings, SidecarStatus};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

pub const MESH: &str = include_str!("../data/mesh.yaml");
pub const WAIT: Duration = Duration::from_secs(10);

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tern-control-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

pub async fn sidecars(admin: std::net::SocketAddr) -> Vec<SidecarStatus> {
    let (status, body) = http_get(admin, "/sidecars").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// Polls `/sidecars` until `f` holds.
pub async fn wait_for(
    admin: std::net::SocketAddr,
    f: impl Fn(&[SidecarStatus]) -> bool,
) -> Vec<SidecarStatus> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = sidecars(admin).await;
        if f(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; /sidecars: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gRPC client of the tern-control at `addr`.
pub async fn client(addr: std::net::SocketAddr) -> ControlPlaneClient<tonic::transport::Channel> {
    ControlPlaneClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

pub struct Sidecar {
    pub tx: mpsc::Sender<SidecarMessage>,
    pub pushes: Streaming<ConfigPush>,
}

impl Sidecar {
    pub async fn connect(
        addr: std::net::SocketAddr,
        hello: Hello,
    ) -> Result<Sidecar, tonic::Status> {
        let mut client = client(addr).await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(SidecarMessage {
            kind: Some(Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let pushes = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Sidecar { tx, pushes })
    }

    pub async fn next(&mut self) -> ConfigPush {
        tokio::time::timeout(WAIT, self.pushes.message())
            .await
            .expect("no push in time")
            .unwrap()
            .expect("stream ended")
    }

    pub async fn send(&self, kind: Kind) {
        self.tx
            .send(SidecarMessage { kind: Some(kind) })
            .await
            .unwrap();
    }
}

/// What [`identity_files`] wrote.
pub struct IdentityFiles {
    pub config: PathBuf,
    pub ca_dir: PathBuf,
    pub tokens: PathBuf,
    /// A token for shop/web.
    pub web: String,
}

/// Under `root`: `config/mesh.yaml` (the test mesh), `ca/` holding `ca`, and
/// `tokens.yaml` with a token for shop/web.
pub fn identity_files(root: &std::path::Path, ca: &tern_control::ca::Generated) -> IdentityFiles {
    let config = root.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), MESH).unwrap();
    let ca_dir = root.join("ca");
    tern_control::ca::write_dir(&ca_dir, ca).unwrap();
    let tokens = root.join("tokens.yaml");
    let web = tern_control::auth::append_token(
        &tokens,
        &tern_control::auth::Subject {
            namespace: "shop".into(),
            service_account: "web".into(),
            workload: None,
        },
    )
    .unwrap();
    IdentityFiles {
        config,
        ca_dir,
        tokens,
        web,
    }
}

/// Writes a file as editors and ConfigMap updates do: a temporary file renamed in place.
pub fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn hello(workload: &str, calls: &[&str], applied: &str) -> Hello {
    Hello {
        workload: workload.into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        zone: "z1".into(),
        region: "r1".into(),
        service: "shop/web".into(),
        calls: calls.iter().map(|c| c.to_string()).collect(),
        applied_version: applied.into(),
        token: String::new(),
        identity: None,
    }
}

/// A tern-control serving `dir` on ephemeral ports, ready (its directory loaded).
pub struct Running {
    pub grpc: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<Result<(), tern_control::RunError>>,
}

pub async fn start(dir: &std::path::Path, settings: Settings) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(tern_control::run(
        settings,
        dir.to_path_buf(),
        grpc,
        admin,
        shutdown.clone(),
    ));
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(admin_addr, "/ready").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Running {
        grpc: grpc_addr,
        admin: admin_addr,
        shutdown,
        server,
    }
}
