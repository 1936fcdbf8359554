//! The gRPC server: one bidirectional stream per sidecar.
//!
//! Published snapshots are debounced, then the push of every distinct [`Scope`] with a
//! connected sidecar is computed once and placed in that scope's watch channel. Each
//! sidecar's stream task sends what its channel holds when the version differs from what
//! it sent last; a slow sidecar only ever has the latest push pending, never a queue.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tern_api::v1::control_plane_server::{self, ControlPlaneServer};
use tern_api::v1::sidecar_message::Kind as MessageKind;
use tern_api::v1::{
    CertifyRequest, CertifyResponse, ConfigPush, Hello, IdentityStatus, SidecarMessage,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthError, Authenticator, Subject};
use crate::ca::Ca;
use crate::debounce;
use crate::index::Snapshot;
use crate::metrics::Metrics;
use crate::scope::{Lookup, Scope, scoped_push};

/// How long a new stream may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Quiet period before a change is pushed.
    pub debounce: Duration,
    /// Longest a change waits while changes keep coming.
    pub max_delay: Duration,
    /// New streams admitted per second (burst: one second's worth).
    pub admit_rate: u32,
    /// CA directory (`anchors.pem`, `issuer.crt`, `issuer.key`), watched; `None`: no CA,
    /// Certify is refused and pushes carry no trust.
    pub ca_dir: Option<PathBuf>,
    /// Tokens file (see [`crate::auth::TokenFile`]), watched; `None`: streams are not
    /// authenticated and Certify is refused.
    pub tokens: Option<PathBuf>,
    pub trust_domain: String,
    /// Lifetime of the certificates signed.
    pub cert_lifetime: Duration,
    /// Serve the gRPC API over TLS with a certificate from the CA (needs `ca_dir`).
    pub serve_tls: bool,
    /// The namespace tern-control runs in: its own SPIFFE ID is
    /// `spiffe://<trust domain>/ns/<namespace>/sa/tern-control`.
    pub namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            admit_rate: 1000,
            ca_dir: None,
            tokens: None,
            trust_domain: crate::ca::DEFAULT_TRUST_DOMAIN.to_string(),
            cert_lifetime: crate::ca::DEFAULT_CERT_LIFETIME,
            serve_tls: false,
            namespace: crate::tls::DEFAULT_NAMESPACE.to_string(),
        }
    }
}

/// A scope's current push, with when the change it carries was first seen.
#[derive(Debug)]
pub struct Push {
    pub push: ConfigPush,
    pub changed_at: Option<Instant>,
}

/// `last_nack` of a sidecar in `/sidecars`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NackStatus {
    pub version: String,
    pub reason: String,
    pub unix_ms: u64,
}

/// The certificate a sidecar serves (from its Hello and Identity messages).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityView {
    pub spiffe_id: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
    pub issuer_id: String,
    /// Whether it was signed by the control plane's current issuer (false: it should
    /// renew at once; also false when the control plane runs no CA).
    pub current_issuer: bool,
}

impl IdentityView {
    fn from_status(s: IdentityStatus) -> Option<IdentityView> {
        (!s.spiffe_id.is_empty()).then_some(IdentityView {
            spiffe_id: s.spiffe_id,
            not_after_unix: s.not_after_unix,
            issuer_id: s.issuer_id,
            current_issuer: false,
        })
    }
}

/// One connected sidecar as `/sidecars` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SidecarStatus {
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    pub zone: String,
    pub region: String,
    pub service: String,
    pub calls: Vec<String>,
    pub connected_since_unix_ms: u64,
    /// The version last sent (or, when the sidecar already had it, skipped).
    pub pushed_version: String,
    /// When it was sent; `None` when nothing was sent on this stream.
    pub pushed_unix_ms: Option<u64>,
    /// The version last ACKed (or the one the sidecar said it serves in its Hello).
    pub applied_version: String,
    pub last_ack_unix_ms: Option<u64>,
    pub last_nack: Option<NackStatus>,
    /// `synced` (applied what was pushed), `nacked` (refused what was pushed) or
    /// `pending` (waiting for its answer).
    pub state: String,
    /// The certificate it serves, if it said.
    pub identity: Option<IdentityView>,
}

impl SidecarStatus {
    fn refresh_state(&mut self) {
        self.state = if self
            .last_nack
            .as_ref()
            .is_some_and(|n| n.version == self.pushed_version)
        {
            "nacked"
        } else if self.applied_version == self.pushed_version {
            "synced"
        } else {
            "pending"
        }
        .to_string();
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A token bucket for admitting new streams.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate.max(1)),
            tokens: f64::from(rate.max(1)),
            last: Instant::now(),
        }
    }

    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Scopes {
    snapshot: Arc<Snapshot>,
    lookup: Arc<Lookup>,
    channels: HashMap<Scope, watch::Sender<Arc<Push>>>,
}

/// The control plane's shared state.
#[derive(Debug)]
pub struct ControlPlane {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    scopes: Mutex<Scopes>,
    sidecars: Mutex<BTreeMap<u64, SidecarStatus>>,
    admission: Mutex<Bucket>,
    next_id: AtomicU64,
    shutdown: CancellationToken,
    /// The CA, when one is configured; replaced on reloads.
    ca: watch::Sender<Option<Arc<Ca>>>,
    auth: Option<Arc<dyn Authenticator>>,
    /// Serializes scope updates (config distributions and CA changes).
    updating: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ControlPlane {
    pub fn new(
        settings: Settings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        ControlPlane::with_identity(settings, metrics, shutdown, None, None)
    }

    /// A control plane with an authenticator for sidecar tokens and a CA.
    pub fn with_identity(
        settings: Settings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        auth: Option<Arc<dyn Authenticator>>,
        ca: Option<Arc<Ca>>,
    ) -> Arc<Self> {
        if let Some(ca) = &ca {
            metrics.issuer_not_after.set(ca.issuer_not_after());
        }
        let snapshot = Arc::new(Snapshot::empty());
        Arc::new(ControlPlane {
            admission: Mutex::new(Bucket::new(settings.admit_rate)),
            settings,
            metrics,
            scopes: Mutex::new(Scopes {
                lookup: Arc::new(Lookup::build(&snapshot)),
                snapshot,
                channels: HashMap::new(),
            }),
            sidecars: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            shutdown,
            ca: watch::channel(ca).0,
            auth,
            updating: Mutex::new(()),
        })
    }

    /// The current CA, if any.
    pub fn ca(&self) -> Option<Arc<Ca>> {
        self.ca.borrow().clone()
    }

    /// The CA as it changes (reloads).
    pub fn watch_ca(&self) -> watch::Receiver<Option<Arc<Ca>>> {
        self.ca.subscribe()
    }

    /// Replaces the CA (after a reload) and pushes the new trust to every scope.
    pub fn set_ca(&self, ca: Arc<Ca>) {
        self.metrics.issuer_not_after.set(ca.issuer_not_after());
        self.ca.send_replace(Some(ca));
        let (snapshot, lookup) = {
            let scopes = lock(&self.scopes);
            (scopes.snapshot.clone(), scopes.lookup.clone())
        };
        if snapshot.generation > 0 {
            self.update_scopes(snapshot, lookup, Some(Instant::now()));
        }
    }

    /// `push` with the CA's trust, its version covering the trust too. Without a CA the
    /// push is unchanged.
    fn with_trust(&self, mut push: ConfigPush) -> ConfigPush {
        if let Some(ca) = self.ca.borrow().as_ref() {
            let mut h = Sha256::new();
            h.update(push.version.as_bytes());
            h.update(ca.trust_hash());
            push.version = crate::ca::hex(&h.finalize()[..8]);
            push.trust = Some(ca.trust());
        }
        push
    }

    /// True once a snapshot has been published and distributed.
    pub fn ready(&self) -> bool {
        lock(&self.scopes).snapshot.generation > 0
    }

    /// Every connected sidecar, by workload.
    pub fn sidecars(&self) -> Vec<SidecarStatus> {
        let mut all: Vec<SidecarStatus> = lock(&self.sidecars).values().cloned().collect();
        let issuer = self.ca().map(|ca| ca.issuer_id().to_string());
        for s in &mut all {
            if let Some(id) = &mut s.identity {
                id.current_issuer = issuer.as_deref() == Some(id.issuer_id.as_str());
            }
        }
        all.sort_by(|a, b| (&a.namespace, &a.workload).cmp(&(&b.namespace, &b.workload)));
        all
    }

    /// Number of distinct scopes with a channel.
    pub fn scope_count(&self) -> usize {
        lock(&self.scopes).channels.len()
    }

    /// The push channel of `scope`, created from the current snapshot if new.
    pub fn subscribe(&self, scope: Scope) -> watch::Receiver<Arc<Push>> {
        let mut scopes = lock(&self.scopes);
        if let Some(tx) = scopes.channels.get(&scope) {
            return tx.subscribe();
        }
        let push = self.with_trust(scoped_push(&scopes.snapshot, &scopes.lookup, &scope));
        let (tx, rx) = watch::channel(Arc::new(Push {
            push,
            changed_at: None,
        }));
        scopes.channels.insert(scope, tx);
        rx
    }

    /// Makes `snapshot` current and updates every scope whose push changed.
    pub fn distribute(&self, snapshot: Arc<Snapshot>) {
        let lookup = Arc::new(Lookup::build(&snapshot));
        let changed_at = snapshot.changed_at;
        self.update_scopes(snapshot, lookup, changed_at);
    }

    /// Makes `snapshot` current and recomputes every scope's push (with the current
    /// trust), updating those whose version changed.
    fn update_scopes(
        &self,
        snapshot: Arc<Snapshot>,
        lookup: Arc<Lookup>,
        changed_at: Option<Instant>,
    ) {
        let _one_at_a_time = lock(&self.updating);
        let channels: Vec<(Scope, watch::Sender<Arc<Push>>)> = {
            let mut scopes = lock(&self.scopes);
            scopes.snapshot = snapshot.clone();
            scopes.lookup = lookup.clone();
            scopes.channels.retain(|_, tx| tx.receiver_count() > 0);
            scopes
                .channels
                .iter()
                .map(|(s, tx)| (s.clone(), tx.clone()))
                .collect()
        };
        let mut changed = 0;
        for (scope, tx) in &channels {
            let push = self.with_trust(scoped_push(&snapshot, &lookup, scope));
            tx.send_if_modified(|current| {
                if current.push.version == push.version {
                    return false;
                }
                *current = Arc::new(Push { push, changed_at });
                changed += 1;
                true
            });
        }
        tracing::info!(
            generation = snapshot.generation,
            scopes = channels.len(),
            changed,
            "snapshot distributed"
        );
    }

    /// Debounces published snapshots and distributes them until the source ends or the
    /// control plane shuts down.
    pub async fn run_distributor(self: Arc<Self>, mut rx: watch::Receiver<Arc<Snapshot>>) {
        // Whatever is already published goes out at once.
        let first = rx.borrow_and_update().clone();
        if first.generation > 0 {
            self.distribute_blocking(first).await;
        }
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return,
                more = debounce::next_batch(&mut rx, self.settings.debounce, self.settings.max_delay) => more,
            };
            if !next {
                return;
            }
            let snapshot = rx.borrow_and_update().clone();
            self.distribute_blocking(snapshot).await;
        }
    }

    async fn distribute_blocking(self: &Arc<Self>, snapshot: Arc<Snapshot>) {
        let me = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || me.distribute(snapshot)).await {
            tracing::error!(%e, "distributing a snapshot failed");
        }
    }

    /// Checks `token` and that it is good for `namespace`/`service_account` (and
    /// `workload`, when the token names one). Errors carry the refusal reason label.
    async fn authenticate(
        &self,
        token: &str,
        namespace: &str,
        service_account: &str,
        workload: &str,
    ) -> Result<Subject, (&'static str, Status)> {
        let Some(auth) = &self.auth else {
            return Err((
                "unauthenticated",
                Status::unauthenticated("tern-control authenticates no tokens (no --tokens)"),
            ));
        };
        let subject = auth.authenticate(token).await.map_err(|e| match e {
            AuthError::Unknown => ("unauthenticated", Status::unauthenticated("unknown token")),
            AuthError::Unavailable(why) => (
                "unavailable",
                Status::unavailable(format!("cannot check the token now: {why}")),
            ),
        })?;
        subject
            .permits(namespace, service_account, workload)
            .map_err(|e| {
                (
                    "permission_denied",
                    Status::permission_denied(e.to_string()),
                )
            })?;
        Ok(subject)
    }

    /// Signs a sidecar's certificate request: the token decides the identity, the CSR
    /// must ask for exactly that SPIFFE ID.
    pub async fn certify(&self, req: CertifyRequest) -> Result<CertifyResponse, Status> {
        let refuse = |reason: &str, status: Status| {
            self.metrics.certify_refused(reason);
            tracing::info!(
                workload = %req.workload,
                namespace = %req.namespace,
                service_account = %req.service_account,
                reason,
                message = status.message(),
                "certificate request refused"
            );
            status
        };
        let Some(ca) = self.ca() else {
            return Err(refuse(
                "no_ca",
                Status::failed_precondition("tern-control runs without a CA (no --ca-dir)"),
            ));
        };
        let subject = match self
            .authenticate(
                &req.token,
                &req.namespace,
                &req.service_account,
                &req.workload,
            )
            .await
        {
            Ok(s) => s,
            Err((reason, status)) => return Err(refuse(reason, status)),
        };
        let id = ca
            .spiffe_id(&subject.namespace, &subject.service_account)
            .map_err(|e| refuse("bad_csr", Status::invalid_argument(e.to_string())))?;
        let chain_der = ca.sign(&req.csr_der, &id, SystemTime::now()).map_err(|e| {
            if e.is_callers_fault() {
                refuse("bad_csr", Status::invalid_argument(e.to_string()))
            } else {
                tracing::error!("the CA cannot sign: {e}");
                refuse("ca_error", Status::failed_precondition(e.to_string()))
            }
        })?;
        self.metrics.certificates_issued.inc();
        tracing::info!(workload = %req.workload, %id, issuer_id = ca.issuer_id(), "certificate issued");
        Ok(CertifyResponse {
            chain_der,
            trust: Some(ca.trust()),
        })
    }

    fn admit(&self) -> bool {
        lock(&self.admission).try_take()
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut SidecarStatus)) {
        if let Some(s) = lock(&self.sidecars).get_mut(&id) {
            f(s);
            s.refresh_state();
        }
    }

    /// One sidecar's stream, after its Hello.
    async fn session(
        self: Arc<Self>,
        hello: Hello,
        mut inbound: Streaming<SidecarMessage>,
        tx: mpsc::Sender<Result<ConfigPush, Status>>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let scope = Scope::new(hello.calls.iter().cloned(), &hello.service);
        let mut status = SidecarStatus {
            workload: hello.workload.clone(),
            namespace: hello.namespace.clone(),
            service_account: hello.service_account.clone(),
            zone: hello.zone.clone(),
            region: hello.region.clone(),
            service: hello.service.clone(),
            calls: scope.calls.iter().cloned().collect(),
            connected_since_unix_ms: now_unix_ms(),
            pushed_version: String::new(),
            pushed_unix_ms: None,
            applied_version: hello.applied_version.clone(),
            last_ack_unix_ms: None,
            last_nack: None,
            state: String::new(),
            identity: hello.identity.clone().and_then(IdentityView::from_status),
        };
        let mut updates = self.subscribe(scope);
        let current_version = updates.borrow_and_update().push.version.clone();
        // The sidecar already serves this version (booted from its state dir): skip it.
        let mut pending = hello.applied_version != current_version;
        if !pending {
            status.pushed_version = current_version;
        }
        status.refresh_state();
        lock(&self.sidecars).insert(id, status);
        self.metrics.sidecars_connected.inc();
        tracing::debug!(id, workload = %hello.workload, "sidecar connected");

        // The push last sent, and whether it carries a change made while connected.
        let mut sent: Option<(Arc<Push>, bool)> = None;
        let mut first_push = pending;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                changed = updates.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    pending = true;
                }
                permit = tx.reserve(), if pending => {
                    let Ok(permit) = permit else { break };
                    pending = false;
                    let push = updates.borrow_and_update().clone();
                    let already = sent
                        .as_ref()
                        .is_some_and(|(p, _)| p.push.version == push.push.version);
                    if already {
                        continue;
                    }
                    permit.send(Ok(push.push.clone()));
                    self.metrics.pushes.inc();
                    let version = push.push.version.clone();
                    self.update(id, |s| {
                        s.pushed_version = version;
                        s.pushed_unix_ms = Some(now_unix_ms());
                    });
                    sent = Some((push, !first_push));
                    first_push = false;
                }
                msg = inbound.message() => {
                    match msg {
                        Ok(Some(m)) => self.answer(id, m, &mut sent),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(id, %e, "sidecar stream error");
                            break;
                        }
                    }
                }
            }
        }
        lock(&self.sidecars).remove(&id);
        self.metrics.sidecars_connected.dec();
        tracing::debug!(id, workload = %hello.workload, "sidecar disconnected");
    }

    fn answer(&self, id: u64, msg: SidecarMessage, sent: &mut Option<(Arc<Push>, bool)>) {
        match msg.kind {
            Some(MessageKind::Ack(ack)) => {
                self.metrics.acks.inc();
                if let Some((push, observe)) = sent
                    && *observe
                    && push.push.version == ack.version
                {
                    if let Some(at) = push.changed_at {
                        self.metrics
                            .change_to_ack
                            .observe(at.elapsed().as_secs_f64());
                    }
                    *observe = false;
                }
                self.update(id, |s| {
                    s.applied_version = ack.version;
                    s.last_ack_unix_ms = Some(now_unix_ms());
                });
            }
            Some(MessageKind::Nack(nack)) => {
                self.metrics.nacks.inc();
                self.update(id, |s| {
                    tracing::warn!(
                        workload = %s.workload,
                        namespace = %s.namespace,
                        version = %nack.version,
                        reason = %nack.reason,
                        "sidecar refused a push (NACK)"
                    );
                    s.last_nack = Some(NackStatus {
                        version: nack.version,
                        reason: nack.reason,
                        unix_ms: now_unix_ms(),
                    });
                });
            }
            Some(MessageKind::Identity(status)) => {
                let view = IdentityView::from_status(status);
                self.update(id, |s| {
                    tracing::debug!(
                        workload = %s.workload,
                        spiffe_id = view.as_ref().map(|v| v.spiffe_id.as_str()),
                        "sidecar identity"
                    );
                    s.identity = view;
                });
            }
            Some(MessageKind::Hello(_)) | None => {
                tracing::debug!(id, "ignoring a second Hello or an empty message");
            }
        }
    }
}

/// The tonic service over a [`ControlPlane`].
#[derive(Debug, Clone)]
pub struct Service(pub Arc<ControlPlane>);

impl Service {
    pub fn into_server(self) -> ControlPlaneServer<Service> {
        ControlPlaneServer::new(self)
    }
}

type PushStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ConfigPush, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl control_plane_server::ControlPlane for Service {
    type StreamStream = PushStream;

    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let cp = &self.0;
        cp.certify(request.into_inner()).await.map(Response::new)
    }

    async fn stream(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let cp = &self.0;
        if !cp.ready() {
            // Never push an empty config to a sidecar that may hold a good one.
            return Err(Status::unavailable(
                "tern-control has no valid config yet: retry after a backoff",
            ));
        }
        if !cp.admit() {
            cp.metrics.rejected_streams.inc();
            return Err(Status::resource_exhausted(
                "tern-control is admitting new streams at its rate limit: retry after a backoff",
            ));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(MessageKind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a stream must be a Hello",
                ));
            }
        };
        if cp.auth.is_some() {
            cp.authenticate(
                &hello.token,
                &hello.namespace,
                &hello.service_account,
                &hello.workload,
            )
            .await
            .map_err(|(_, status)| status)?;
        }
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(cp.clone().session(hello, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn admission_is_rate_limited() {
        let mut b = Bucket::new(10);
        let admitted = (0..100).filter(|_| b.try_take()).count();
        assert_eq!(admitted, 10);
        tokio::time::advance(Duration::from_millis(500)).await;
        let admitted = (0..100).filter(|_| b.try_take()).count();
        assert_eq!(admitted, 5);
    }

    fn snapshot_of(text: &str) -> Arc<Snapshot> {
        let mut index = crate::index::Index::new();
        crate::file::sync_index(&mut index, &[("mesh.yaml".into(), text.into())]).unwrap();
        index.current()
    }

    #[tokio::test]
    async fn only_changed_scopes_are_updated_and_slow_readers_see_the_latest() {
        let mesh = include_str!("../tests/data/mesh.yaml");
        let cp = ControlPlane::new(
            Settings::default(),
            Arc::new(Metrics::new()),
            CancellationToken::new(),
        );
        assert!(!cp.ready());
        cp.distribute(snapshot_of(mesh));
        assert!(cp.ready());
        let checkout = Scope::new(["shop/checkout".to_string()], "");
        let catalog = Scope::new(["shop/catalog".to_string()], "");
        let mut a = cp.subscribe(checkout.clone());
        let mut a2 = cp.subscribe(checkout);
        let mut b = cp.subscribe(catalog);
        assert_eq!(cp.scope_count(), 2);
        let v0 = a.borrow_and_update().push.version.clone();
        b.borrow_and_update();
        a2.borrow_and_update();

        for w in [80, 70, 60] {
            cp.distribute(snapshot_of(
                &mesh.replace("weight: 90", &format!("weight: {w}")),
            ));
        }
        // A reader that fell behind sees one change: the latest push.
        assert!(a.has_changed().unwrap());
        let latest = a.borrow_and_update().clone();
        assert_ne!(latest.push.version, v0);
        assert!(
            latest
                .push
                .documents
                .iter()
                .any(|d| d.yaml.contains("weight: 60"))
        );
        assert!(latest.changed_at.is_some());
        assert!(!a.has_changed().unwrap());
        assert_eq!(a2.borrow_and_update().push.version, latest.push.version);
        // The catalog scope did not change.
        assert!(!b.has_changed().unwrap());

        // Scopes nobody listens to are dropped at the next distribution.
        drop((a, a2));
        cp.distribute(snapshot_of(mesh));
        assert_eq!(cp.scope_count(), 1);
    }

    /// A mesh of `n` Services, each with an EndpointSlice and a route to itself.
    fn big_mesh(n: usize) -> String {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: shop}}\nspec:\n  ports: [{{name: http, port: 8080}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}\n  namespace: shop\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: [{{name: http, port: 9000}}]\nendpoints:\n- addresses: [\"127.0.0.1\"]\n---\n\
                 apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: s{i}, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: s{i}, port: 8080}}]\n  rules:\n  - backendRefs: [{{name: s{i}, port: 8080}}]\n---\n"
            ));
        }
        text
    }

    /// Distribution cost at the scale: 1,000 Services, 1,000 distinct scopes of
    /// 10 Services each. `cargo test -p tern-control --release -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn distribution_at_scale() {
        let t = std::time::Instant::now();
        let snap = snapshot_of(&big_mesh(1000));
        println!("index + validation of 3000 documents: {:?}", t.elapsed());
        let cp = ControlPlane::new(
            Settings::default(),
            Arc::new(Metrics::new()),
            CancellationToken::new(),
        );
        cp.distribute(snap.clone());
        let rxs: Vec<_> = (0..1000)
            .map(|i| {
                let calls = (0..10).map(|k| format!("shop/s{}", (i + k * 97) % 1000));
                cp.subscribe(Scope::new(calls, &format!("shop/s{i}")))
            })
            .collect();
        let t = std::time::Instant::now();
        cp.distribute(snap);
        println!("distribute to {} scopes: {:?}", rxs.len(), t.elapsed());
    }

    #[test]
    fn states() {
        let mut s = SidecarStatus {
            workload: "w".into(),
            namespace: "n".into(),
            service_account: String::new(),
            zone: String::new(),
            region: String::new(),
            service: String::new(),
            calls: vec![],
            connected_since_unix_ms: 0,
            pushed_version: "v1".into(),
            pushed_unix_ms: Some(1),
            applied_version: String::new(),
            last_ack_unix_ms: None,
            last_nack: None,
            state: String::new(),
            identity: None,
        };
        s.refresh_state();
        assert_eq!(s.state, "pending");
        s.applied_version = "v1".into();
        s.refresh_state();
        assert_eq!(s.state, "synced");
        s.pushed_version = "v2".into();
        s.last_nack = Some(NackStatus {
            version: "v2".into(),
            reason: "bad".into(),
            unix_ms: 2,
        });
        s.refresh_state();
        assert_eq!(s.state, "nacked");
    }
}
