//! The control-plane client: the sidecar's config from tern-control, with static
//! stability.
//!
//! One bidirectional gRPC stream at a time (`tern.control.v1.ControlPlane/Stream`, plain
//! HTTP/2, or over TLS with `--control-plane-anchors`: see [`crate::tls::control_plane`]). The sidecar says Hello (who it is, what it calls, the control-plane
//! version it serves), then compiles every `ConfigPush` exactly as it would a config
//! directory: a push that compiles is applied (the same [`Shared::apply`] as a file
//! reload), persisted to the state dir and acknowledged; one that does not is refused
//! with its diagnostics (Nack) and the last good snapshot keeps serving. The snapshot is
//! only ever replaced by a push that compiled, so a control plane that is down or
//! unreachable never makes the sidecar forget a destination.
//!
//! When the stream ends or fails, the client moves to the next address of the list
//! (round robin) after a jittered exponential backoff (100 ms doubling to 10 s, full
//! jitter; reset once a stream has lived 10 s).
//!
//! The state dir holds the last applied push: `current` is a symlink to a directory of
//! one YAML file per document plus a `version` file (the control-plane version). A new
//! push is written to a fresh directory beside it, fsynced, and the symlink is swapped
//! with a rename, so a crash leaves either the old or the new config, never half of one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_api::v1::control_plane_client::ControlPlaneClient;
use tern_api::v1::{Ack, ConfigPush, Hello, Nack, SidecarMessage, sidecar_message};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use crate::state::Shared;

/// First reconnect delay ceiling.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Largest reconnect delay ceiling.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A stream that lived this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Connecting (TCP + HTTP/2) and opening the stream each get this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The state dir's link to the directory of the config in force.
const CURRENT: &str = "current";
/// The control-plane version file inside a persisted config.
const VERSION_FILE: &str = "version";
/// The trust bundle of the persisted push (JSON), when the mesh runs mTLS.
const TRUST_FILE: &str = "trust.json";

/// Who the sidecar is to the control plane and where it keeps its last good config.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// gRPC addresses (`host:port`) of the tern-control replicas.
    pub addresses: Vec<String>,
    /// Where the last applied push is persisted; none: nothing survives a restart.
    pub state_dir: Option<PathBuf>,
    pub workload: String,
    /// Its own Service (`ns/name`), for inbound policy; empty if none.
    pub service: String,
    /// Services it calls (`ns/name`); empty: all.
    pub calls: Vec<String>,
    pub service_account: String,
    /// File holding the bootstrap token (local mode) or a ServiceAccount token.
    pub token_file: Option<PathBuf>,
    /// TLS to the control plane; `None`: plain HTTP/2.
    pub tls: Option<Arc<crate::tls::control_plane::ControlPlaneTls>>,
}

/// Where the config being served came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    None,
    ControlPlane,
    StateDir,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::ControlPlane => "control-plane",
            Source::StateDir => "state-dir",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StatusView {
    /// The replica the stream is open to.
    pub connected: Option<String>,
    /// The control-plane version of the config in force.
    pub applied_version: Option<String>,
    pub source: Source,
    pub last_push_unix_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// The client's state, for `/ready` and `/control`.
#[derive(Debug)]
pub struct Status {
    inner: Mutex<StatusView>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            inner: Mutex::new(StatusView {
                connected: None,
                applied_version: None,
                source: Source::None,
                last_push_unix_ms: None,
                last_error: None,
            }),
        }
    }
}

impl Status {
    pub fn view(&self) -> StatusView {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusView> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn applied_version(&self) -> Option<String> {
        self.lock().applied_version.clone()
    }

    fn set_applied(&self, version: &str, source: Source) {
        let mut s = self.lock();
        s.applied_version = Some(version.to_string());
        s.source = source;
    }

    fn set_connected(&self, addr: Option<&str>) {
        self.lock().connected = addr.map(str::to_string);
    }

    fn set_error(&self, err: Option<String>) {
        self.lock().last_error = err;
    }

    fn pushed(&self) {
        self.lock().last_push_unix_ms = Some(unix_ms());
    }

    /// The `/ready` body when a config is served.
    pub fn ready_text(&self, serving: &str) -> String {
        let s = self.lock();
        let version = s.applied_version.as_deref().unwrap_or(serving);
        match (&s.connected, s.source) {
            (Some(addr), _) => {
                format!("ready: control plane {addr} connected, version {version}\n")
            }
            (None, Source::StateDir) => format!(
                "ready: control plane unreachable; serving version {version} from the state dir\n"
            ),
            (None, _) => format!(
                "ready: control plane unreachable; serving version {version} from its last push\n"
            ),
        }
    }

    /// The `/ready` body before any config.
    pub fn not_ready_text(&self, addresses: &[String]) -> String {
        let s = self.lock();
        match &s.last_error {
            Some(err) => format!(
                "not ready: waiting for the control plane ({}): {err}\n",
                addresses.join(",")
            ),
            None => format!(
                "not ready: waiting for the control plane ({})\n",
                addresses.join(",")
            ),
        }
    }

    pub fn json(&self, addresses: &[String]) -> serde_json::Value {
        let s = self.lock();
        serde_json::json!({
            "addresses": addresses,
            "connected": s.connected,
            "applied_version": s.applied_version,
            "source": s.source.as_str(),
            "last_push_unix_ms": s.last_push_unix_ms,
            "last_error": s.last_error,
        })
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Jittered exponential backoff: the n-th delay is uniform in [0, min(MAX, MIN * 2^n)]
/// ("full jitter"), so that many sidecars reconnecting at once spread out.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    rng: fastrand::Rng,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Backoff {
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        BACKOFF_MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX)
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self.ceiling().as_micros() as u64;
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_micros(self.rng.u64(0..=cap))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Compiles a push and, if it compiles, installs it. On refusal the reason is the
/// diagnostics, one per line, and nothing changes.
pub fn apply_push(shared: &Shared, push: &ConfigPush) -> Result<(), String> {
    match tern_config::load_sources(&push.sources()) {
        Ok(compiled) => {
            for warning in &compiled.warnings {
                tracing::warn!("config: {warning}");
            }
            let content = compiled.snapshot.version.clone();
            shared.apply(compiled.snapshot);
            shared
                .control
                .set_applied(&push.version, Source::ControlPlane);
            tracing::info!(version = %push.version, content = %content, "control-plane config applied");
            Ok(())
        }
        Err(err) => Err(err.to_string()),
    }
}

/// Loads the config persisted in the state dir, if any, and serves it at once.
pub fn boot_from_state_dir(shared: &Shared, dir: &Path) {
    if let Err(err) = std::fs::create_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), %err, "cannot create the state dir");
        return;
    }
    match load_state(dir) {
        Ok(None) => tracing::info!(dir = %dir.display(), "state dir is empty"),
        Ok(Some((version, compiled))) => {
            let content = compiled.snapshot.version.clone();
            shared.apply(compiled.snapshot);
            shared.control.set_applied(&version, Source::StateDir);
            tracing::info!(%version, %content, dir = %dir.display(), "serving the config from the state dir");
            // The trust too: a sidecar restarted while the control plane is away must not
            // fall back to plaintext. It has no certificate until the CA answers, so
            // meshed destinations fail closed (503 no-identity) meanwhile.
            match load_trust(dir) {
                Ok(None) => {}
                Ok(Some(trust)) => {
                    if let Err(err) = apply_trust(shared, Some(&trust)) {
                        tracing::warn!("state dir trust bundle not loaded: {err}");
                    }
                }
                Err(err) => tracing::warn!("state dir trust bundle not loaded: {err}"),
            }
        }
        Err(err) => {
            tracing::warn!(dir = %dir.display(), "state dir config not loaded: {err}")
        }
    }
}

/// The persisted config: its control-plane version and compiled snapshot.
pub fn load_state(dir: &Path) -> Result<Option<(String, tern_config::Compiled)>, String> {
    let current = dir.join(CURRENT);
    if std::fs::symlink_metadata(&current).is_err() {
        return Ok(None);
    }
    let version = std::fs::read_to_string(current.join(VERSION_FILE))
        .map_err(|e| format!("reading {}: {e}", current.join(VERSION_FILE).display()))?;
    let compiled = tern_config::load_dir(&current).map_err(|e| e.to_string())?;
    Ok(Some((version.trim().to_string(), compiled)))
}

/// The trust bundle persisted with the config, if any.
fn load_trust(dir: &Path) -> Result<Option<tern_api::v1::Trust>, String> {
    let path = dir.join(CURRENT).join(TRUST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let anchors = v
        .get("anchors_der_hex")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .map(|h| h.as_str().and_then(from_hex))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("{}: bad anchors", path.display()))?;
    Ok(Some(tern_api::v1::Trust {
        trust_domain: field("trust_domain").unwrap_or_default(),
        anchors_der: anchors,
        issuer_id: field("issuer_id").unwrap_or_default(),
    }))
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes a push to the state dir atomically (see the module docs).
pub fn persist(dir: &Path, push: &ConfigPush) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("config.{stamp}.{}", std::process::id());
    let target = dir.join(&name);
    std::fs::create_dir(&target)?;
    let write = |path: PathBuf, text: &str| -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    for (i, doc) in push.documents.iter().enumerate() {
        // Keep where the document came from as a comment on its own line.
        let origin = doc.name.replace(['\n', '\r'], " ");
        write(
            target.join(format!("{:05}.yaml", i + 1)),
            &format!("# {origin}\n{}", doc.yaml),
        )?;
    }
    write(target.join(VERSION_FILE), &format!("{}\n", push.version))?;
    if let Some(t) = &push.trust {
        let json = serde_json::json!({
            "trust_domain": t.trust_domain,
            "issuer_id": t.issuer_id,
            "anchors_der_hex": t.anchors_der.iter().map(|a| tern_config::hex(a)).collect::<Vec<_>>(),
        });
        write(target.join(TRUST_FILE), &json.to_string())?;
    }
    std::fs::File::open(&target)?.sync_all()?;
    let link = dir.join(format!(".{CURRENT}.{stamp}.tmp"));
    std::os::unix::fs::symlink(&name, &link)?;
    std::fs::rename(&link, dir.join(CURRENT))?;
    std::fs::File::open(dir)?.sync_all()?;
    // Older configs are no longer referenced.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("config.") && n != name {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

fn hello(shared: &Shared, cfg: &ControlSettings) -> SidecarMessage {
    let place = &shared.settings.place;
    SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(Hello {
            workload: cfg.workload.clone(),
            namespace: shared.settings.namespace.clone(),
            service_account: cfg.service_account.clone(),
            zone: place.zone.clone().unwrap_or_default(),
            region: place.region.clone().unwrap_or_default(),
            service: cfg.service.clone(),
            calls: cfg.calls.clone(),
            applied_version: shared.control.applied_version().unwrap_or_default(),
            token: crate::tls::certify::token(cfg),
            identity: shared.tls.status(),
        })),
    }
}

/// Talks to the control plane until the process ends.
pub async fn run(shared: Arc<Shared>, cfg: ControlSettings) {
    if cfg.addresses.is_empty() {
        tracing::error!("no control-plane address");
        return std::future::pending().await;
    }
    let mut backoff = Backoff::new();
    let mut next = 0usize;
    loop {
        let addr = cfg.addresses[next % cfg.addresses.len()].clone();
        next = next.wrapping_add(1);
        let started = Instant::now();
        let result = session(&shared, &cfg, &addr).await;
        shared.control.set_connected(None);
        shared.metrics.control_connected(false);
        let err = match result {
            Ok(()) => format!("{addr}: the stream ended"),
            Err(err) => format!("{addr}: {err}"),
        };
        tracing::warn!("control plane: {err}; reconnecting");
        shared.control.set_error(Some(err));
        if started.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
        shared.metrics.control_reconnect();
    }
}

/// A gRPC channel to one replica: plain HTTP/2, or with `tls` over TLS, checked against
/// its anchors and those of `pushed` (the trust bundle the control plane last pushed).
pub async fn connect(
    addr: &str,
    tls: Option<&crate::tls::control_plane::ControlPlaneTls>,
    pushed: Option<&crate::tls::Trust>,
) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let connected = match tls {
        None => tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await,
        Some(settings) => {
            let connector = crate::tls::control_plane::connector(settings, pushed)
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect_with_connector(connector)).await
        }
    };
    connected
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {}", error_chain(&e)))
}

/// Installs the trust a push carries (none: the mesh runs without mTLS).
fn apply_trust(shared: &Shared, trust: Option<&tern_api::v1::Trust>) -> Result<(), String> {
    let Some(t) = trust else {
        if shared.tls.enabled() {
            tracing::warn!(
                "the control plane stopped sending a trust bundle; keeping the last one"
            );
        }
        return Ok(());
    };
    let trust = crate::tls::Trust::new(&t.trust_domain, &t.anchors_der, &t.issuer_id)
        .map_err(|e| e.to_string())?;
    if shared.tls.set_trust(trust).map_err(|e| e.to_string())? {
        tracing::info!(
            trust_domain = %t.trust_domain,
            anchors = t.anchors_der.len(),
            issuer = %t.issuer_id,
            "trust bundle installed"
        );
    }
    Ok(())
}

/// One stream to one replica, until it ends.
async fn session(shared: &Arc<Shared>, cfg: &ControlSettings, addr: &str) -> Result<(), String> {
    let channel = connect(addr, cfg.tls.as_deref(), shared.tls.trust().as_deref()).await?;
    let mut client = ControlPlaneClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<SidecarMessage>(8);
    let _ = tx.send(hello(shared, cfg)).await;
    let response = tokio::time::timeout(CONNECT_TIMEOUT, client.stream(ReceiverStream::new(rx)))
        .await
        .map_err(|_| "opening the stream timed out".to_string())?
        .map_err(|s| format!("opening the stream: {s}"))?;
    let mut pushes = response.into_inner();
    tracing::info!(%addr, "control plane connected");
    shared.control.set_connected(Some(addr));
    shared.control.set_error(None);
    shared.metrics.control_connected(true);
    let mut installed = shared.tls.installed.subscribe();
    installed.mark_unchanged();
    loop {
        let push = tokio::select! {
            push = pushes.message() => push.map_err(|s| format!("stream: {s}"))?,
            Ok(()) = installed.changed() => {
                let status = shared.tls.status();
                let msg = SidecarMessage { kind: status.map(sidecar_message::Kind::Identity) };
                if tx.send(msg).await.is_err() {
                    return Err("the stream closed".into());
                }
                continue;
            }
        };
        let Some(push) = push else { break };
        shared.control.pushed();
        let version = push.version.clone();
        let current = shared.control.applied_version();
        if current.as_deref() == Some(version.as_str()) && shared.active.load().is_some() {
            // Already in force (a replica re-sending after a reconnect, or the state dir
            // at boot): only the trust, which the state dir does not keep, may be new.
            if let Err(err) = apply_trust(shared, push.trust.as_ref()) {
                tracing::error!("trust bundle refused: {err}");
            }
            shared.metrics.control_push(true);
            shared.control.set_applied(&version, Source::ControlPlane);
            let ack = sidecar_message::Kind::Ack(Ack { version });
            if tx.send(SidecarMessage { kind: Some(ack) }).await.is_err() {
                return Err("the stream closed".into());
            }
            continue;
        }
        let s = shared.clone();
        let state_dir = cfg.state_dir.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let result = apply_trust(&s, push.trust.as_ref()).and_then(|()| apply_push(&s, &push));
            if result.is_ok()
                && let Some(dir) = state_dir
                && let Err(err) = persist(&dir, &push)
            {
                tracing::error!(dir = %dir.display(), %err, "persisting the config failed");
            }
            result
        })
        .await
        .map_err(|e| format!("apply task: {e}"))?;
        let reply = match outcome {
            Ok(()) => {
                shared.metrics.control_push(true);
                sidecar_message::Kind::Ack(Ack { version })
            }
            Err(reason) => {
                shared.metrics.control_push(false);
                tracing::error!(
                    %version,
                    "control-plane config refused; still serving version {}:\n{reason}",
                    shared.control.applied_version().as_deref().unwrap_or("(none)")
                );
                sidecar_message::Kind::Nack(Nack { version, reason })
            }
        };
        if tx.send(SidecarMessage { kind: Some(reply) }).await.is_err() {
            return Err("the stream closed".into());
        }
    }
    Ok(())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::v1::Document;

    fn shared() -> Arc<Shared> {
        let addr = "127.0.0.1:1".parse().unwrap();
        Shared::new(crate::Settings::for_tests(addr))
    }

    fn service(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  ports:\n  - name: http\n    port: {port}\n"
        )
    }

    fn push(version: &str, docs: &[String]) -> ConfigPush {
        ConfigPush {
            version: version.into(),
            documents: docs
                .iter()
                .enumerate()
                .map(|(i, y)| Document {
                    name: format!("mesh.yaml#{}", i + 1),
                    yaml: y.clone(),
                })
                .collect(),
            trust: None,
        }
    }

    #[test]
    fn backoff_stays_within_bounds() {
        let mut b = Backoff::new();
        let mut ceilings = Vec::new();
        for _ in 0..40 {
            let cap = b.ceiling();
            let d = b.next_delay();
            assert!(d <= cap, "{d:?} > {cap:?}");
            assert!(cap >= BACKOFF_MIN && cap <= BACKOFF_MAX);
            ceilings.push(cap);
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(ceilings[6], Duration::from_millis(6400));
        assert_eq!(ceilings[7], BACKOFF_MAX);
        assert_eq!(ceilings[39], BACKOFF_MAX);
        b.reset();
        assert_eq!(b.ceiling(), BACKOFF_MIN);
        // Full jitter: the delays spread over the whole range.
        let mut b = Backoff::new();
        for _ in 0..10 {
            b.next_delay();
        }
        let delays: Vec<_> = (0..200).map(|_| b.next_delay()).collect();
        assert!(delays.iter().any(|d| *d < Duration::from_secs(3)));
        assert!(delays.iter().any(|d| *d > Duration::from_secs(7)));
    }

    #[test]
    fn a_nack_keeps_the_old_snapshot() {
        let s = shared();
        apply_push(&s, &push("cp-1", &[service("a", 80), service("b", 80)])).unwrap();
        let good = s.version().unwrap();
        assert_eq!(s.control.applied_version().as_deref(), Some("cp-1"));

        let bad = push(
            "cp-2",
            &[service("a", 80), "kind: Service\nmetadata: [\n".into()],
        );
        let reason = apply_push(&s, &bad).unwrap_err();
        assert!(reason.contains("mesh.yaml#2"), "{reason}");
        assert_eq!(s.version().unwrap(), good);
        assert_eq!(s.control.applied_version().as_deref(), Some("cp-1"));
        let snap = s.active.load_full().unwrap();
        assert!(snap.snapshot.resolve("b", Some(80), "default").is_ok());

        apply_push(&s, &push("cp-3", &[service("a", 80)])).unwrap();
        assert_ne!(s.version().unwrap(), good);
        assert_eq!(s.control.applied_version().as_deref(), Some("cp-3"));
    }

    #[test]
    fn the_state_dir_round_trips() {
        let dir =
            std::env::temp_dir().join(format!("tern-state-{}-{}", std::process::id(), unix_ms()));
        assert!(load_state(&dir).unwrap().is_none());
        let s = shared();
        let first = push("cp-1", &[service("a", 80), service("b", 8080)]);
        apply_push(&s, &first).unwrap();
        persist(&dir, &first).unwrap();
        let (version, compiled) = load_state(&dir).unwrap().unwrap();
        assert_eq!(version, "cp-1");
        assert_eq!(compiled.snapshot.version, s.version().unwrap());

        // A second push replaces the first and leaves one config directory behind.
        let second = push("cp-2", &[service("c", 80)]);
        apply_push(&s, &second).unwrap();
        persist(&dir, &second).unwrap();
        let (version, compiled) = load_state(&dir).unwrap().unwrap();
        assert_eq!(version, "cp-2");
        assert_eq!(compiled.snapshot.version, s.version().unwrap());
        let configs = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("config."))
            .count();
        assert_eq!(configs, 1);

        // Booting from it serves it at once.
        let booted = shared();
        boot_from_state_dir(&booted, &dir);
        assert_eq!(booted.version(), s.version());
        let view = booted.control.view();
        assert_eq!(view.source, Source::StateDir);
        assert_eq!(view.applied_version.as_deref(), Some("cp-2"));
        assert!(
            booted
                .control
                .ready_text("x")
                .contains("from the state dir")
        );
        assert!(!booted.tls.enabled(), "no trust was pushed");

        // With a trust bundle: it is kept too, so a restarted sidecar stays on mTLS
        // (failing closed until it has a certificate) rather than falling to plaintext.
        let ca = crate::tls::testca::TestCa::new();
        let t = ca.trust("i1");
        let mut third = push("cp-3", &[service("c", 80)]);
        third.trust = Some(tern_api::v1::Trust {
            trust_domain: t.trust_domain.clone(),
            anchors_der: t.anchors.iter().map(|a| a.to_vec()).collect(),
            issuer_id: t.issuer_id.clone(),
        });
        persist(&dir, &third).unwrap();
        let booted = shared();
        boot_from_state_dir(&booted, &dir);
        let trust = booted.tls.trust().expect("trust restored");
        assert!(booted.tls.enabled() && !booted.tls.ready());
        assert_eq!(trust.anchors, t.anchors);
        assert_eq!(trust.issuer_id, "i1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff];
        assert_eq!(from_hex(&tern_config::hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }

    /// A fake control plane: pushes the given configs one after the other, reporting
    /// what the sidecar sends.
    struct Fake {
        pushes: Vec<ConfigPush>,
        seen: tokio::sync::mpsc::UnboundedSender<SidecarMessage>,
    }

    #[tonic::async_trait]
    impl tern_api::v1::control_plane_server::ControlPlane for Fake {
        type StreamStream = ReceiverStream<Result<ConfigPush, tonic::Status>>;

        async fn certify(
            &self,
            _request: tonic::Request<tern_api::v1::CertifyRequest>,
        ) -> Result<tonic::Response<tern_api::v1::CertifyResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("no CA"))
        }

        async fn stream(
            &self,
            request: tonic::Request<tonic::Streaming<SidecarMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let mut incoming = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let (pushes, seen) = (self.pushes.clone(), self.seen.clone());
            tokio::spawn(async move {
                // Hello first, then one push per answer.
                let hello = incoming.message().await.unwrap().unwrap();
                seen.send(hello).unwrap();
                for push in pushes {
                    tx.send(Ok(push)).await.unwrap();
                    let answer = incoming.message().await.unwrap().unwrap();
                    seen.send(answer).unwrap();
                }
                // Keep the stream open until the client goes.
                while let Ok(Some(_)) = incoming.message().await {}
            });
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        }
    }

    async fn next(
        seen: &mut tokio::sync::mpsc::UnboundedReceiver<SidecarMessage>,
    ) -> sidecar_message::Kind {
        tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .unwrap()
            .unwrap()
            .kind
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_and_nacks_over_the_stream_and_fails_over() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Nothing listens on the first address: the client moves on to the second.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let fake = Fake {
            pushes: vec![
                push("cp-1", &[service("a", 80)]),
                push(
                    "cp-2",
                    &[service("a", 80), "kind: Service\nmetadata: [\n".into()],
                ),
            ],
            seen: seen_tx,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(tern_api::v1::control_plane_server::ControlPlaneServer::new(
                    fake,
                ))
                .serve_with_incoming(
                    tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener),
                ),
        );
        let s = shared();
        let cfg = ControlSettings {
            addresses: vec![dead_addr, addr.clone()],
            state_dir: None,
            workload: "w-1".into(),
            service: "default/a".into(),
            calls: vec!["default/b".into()],
            service_account: "sa".into(),
            token_file: None,
            tls: None,
        };
        tokio::spawn(run(s.clone(), cfg));
        let sidecar_message::Kind::Hello(hello) = next(&mut seen).await else {
            panic!("expected Hello")
        };
        assert_eq!(hello.workload, "w-1");
        assert_eq!(hello.calls, vec!["default/b".to_string()]);
        assert_eq!(hello.applied_version, "");
        let sidecar_message::Kind::Ack(ack) = next(&mut seen).await else {
            panic!("expected Ack")
        };
        assert_eq!(ack.version, "cp-1");
        let good = s.version().unwrap();
        let sidecar_message::Kind::Nack(nack) = next(&mut seen).await else {
            panic!("expected Nack")
        };
        assert_eq!(nack.version, "cp-2");
        assert!(nack.reason.contains("mesh.yaml#2"), "{}", nack.reason);
        assert_eq!(s.version().unwrap(), good);
        let view = s.control.view();
        assert_eq!(view.applied_version.as_deref(), Some("cp-1"));
        assert_eq!(view.connected.as_deref(), Some(addr.as_str()));
        assert!(
            s.control
                .ready_text(&good)
                .contains("connected, version cp-1")
        );
        let metrics = s.metrics.encode();
        assert!(metrics.contains("tern_control_pushes_total{result=\"applied\"} 1"));
        assert!(metrics.contains("tern_control_pushes_total{result=\"refused\"} 1"));
        assert!(metrics.contains("tern_control_connected 1"));
    }
}
