//! What every worker shares: the config in force (one atomic load per request), the
//! metrics, and the drain signal. State that learns from traffic lives beside the
//! snapshot, rebuilt or carried over when the snapshot changes, never inside it.

use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tern_config::Snapshot;
use tern_config::snapshot::ServicePort;

use crate::balance::locality::Place;
use crate::balance::{self, Balancer};
use crate::metrics::Metrics;
use crate::policy::breaker::Clock;
use crate::policy::rate_limit::RateLimiters;

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A directory of YAML files, watched.
    Dir(PathBuf),
    /// tern-control replicas, over the streaming API.
    ControlPlane(crate::control::ControlSettings),
}

/// The sidecar's settings, from flags and environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: ConfigSource,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub app: SocketAddr,
    pub admin: SocketAddr,
    /// The namespace bare service names resolve in first.
    pub namespace: String,
    pub workers: usize,
    pub drain_timeout: Duration,
    pub limits: crate::server::Limits,
    /// Request bodies up to this size are buffered so that a retry can replay them.
    pub retry_buffer: usize,
    /// Write one JSON line per request to stdout.
    pub access_log: bool,
    /// The sidecar's zone and region, for locality-aware load balancing.
    pub place: Place,
}

#[cfg(test)]
impl Settings {
    /// Settings for unit tests: every listener on `addr`, one worker, file mode.
    pub fn for_tests(addr: SocketAddr) -> Settings {
        Settings {
            source: ConfigSource::Dir(".".into()),
            outbound: addr,
            inbound: addr,
            app: addr,
            admin: addr,
            namespace: "default".into(),
            workers: 1,
            drain_timeout: Duration::from_secs(1),
            limits: crate::server::Limits::default(),
            retry_buffer: 64 * 1024,
            access_log: false,
            place: Default::default(),
        }
    }
}

/// A compiled snapshot plus the per-version lookup tables built from it.
pub struct Active {
    pub snapshot: Arc<Snapshot>,
    /// Per-backend runtime state (circuits, limits, budgets), carried across versions.
    pub balancer: Balancer,
    /// RateLimitPolicy buckets, carried across versions when unchanged.
    pub rate_limiters: RateLimiters,
    /// Whether any inbound policy (rate limit, authorization) exists: without one, an
    /// inbound request skips the route match.
    pub inbound_policies: bool,
    /// The Service ports each endpoint address serves (for inbound: which Services a
    /// request to this sidecar may be for).
    endpoint_ports: FxHashMap<SocketAddr, Vec<Arc<ServicePort>>>,
    /// `parent_name` metric labels (`ns/name:port`), keyed by the address of the
    /// `ServicePort` inside `snapshot` (stable: the snapshot is immutable and kept alive
    /// by this struct), so a request does not format a label.
    parent_labels: FxHashMap<usize, Arc<str>>,
    /// Unique to this `Active` in the process: addresses inside a snapshot are unique
    /// only while it lives, so what is cached by address without holding the snapshot
    /// is keyed by this too.
    pub generation: u64,
}

impl Active {
    /// Builds the tables for `snapshot`, taking over the runtime state of `previous`.
    pub fn new(
        snapshot: Snapshot,
        previous: Option<&Active>,
        metrics: &Metrics,
        clock: Clock,
        place: &Place,
    ) -> Self {
        let balancer = Balancer::new(
            &snapshot,
            previous.map(|p| &p.balancer),
            metrics,
            clock,
            place,
        );
        let limits = snapshot
            .services
            .values()
            .flat_map(|s| s.ports.iter())
            .filter_map(|sp| sp.rate_limit.as_ref())
            .chain(balance::rules(&snapshot).filter_map(|r| r.rate_limit.as_ref()));
        let rate_limiters = RateLimiters::new(limits, previous.map(|p| &p.rate_limiters));
        let authz = snapshot
            .services
            .values()
            .flat_map(|s| s.ports.iter())
            .any(|sp| sp.authorization.is_some())
            || balance::rules(&snapshot).any(|r| r.authorization.is_some());
        let inbound_policies = authz || !rate_limiters.is_empty();
        let mut endpoint_ports: FxHashMap<SocketAddr, Vec<Arc<ServicePort>>> = FxHashMap::default();
        for b in &snapshot.backends {
            let Some(sp) = snapshot
                .services
                .get(&b.service)
                .and_then(|s| s.ports.iter().find(|p| p.port == b.port))
            else {
                continue;
            };
            for e in &b.endpoints {
                let ports = endpoint_ports.entry(e.addr).or_default();
                if !ports.iter().any(|p| Arc::ptr_eq(p, sp)) {
                    ports.push(sp.clone());
                }
            }
        }
        let mut parent_labels = FxHashMap::default();
        for svc in snapshot.services.values() {
            for sp in &svc.ports {
                parent_labels.insert(
                    Arc::as_ptr(sp) as usize,
                    Arc::from(format!("{}:{}", sp.service, sp.port)),
                );
            }
        }
        Active {
            snapshot: Arc::new(snapshot),
            balancer,
            rate_limiters,
            inbound_policies,
            endpoint_ports,
            parent_labels,
            generation: {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
        }
    }

    /// The Service ports whose endpoints include `addr` (empty: none).
    pub fn ports_of(&self, addr: SocketAddr) -> &[Arc<ServicePort>] {
        self.endpoint_ports.get(&addr).map_or(&[], Vec::as_slice)
    }

    /// The Service port a connection to `addr` (a cluster IP or an endpoint address) is
    /// for; `None` when `addr` is no Service's. An endpoint may serve several Service
    /// ports: then the one `named` gives (the request's authority) if it is among them,
    /// else the snapshot's deterministic choice. So a client cannot pick another
    /// Service's (laxer) policies by naming it, and `named` runs only when it matters.
    pub fn port_at<'a>(
        &'a self,
        addr: SocketAddr,
        named: impl FnOnce() -> Option<&'a Arc<ServicePort>>,
    ) -> Option<&'a Arc<ServicePort>> {
        let candidates = self.ports_of(addr);
        if candidates.len() > 1
            && let Some(sp) = named()
            && candidates.iter().any(|c| Arc::ptr_eq(c, sp))
        {
            return Some(sp);
        }
        self.snapshot.resolve_addr(addr)
    }

    pub fn parent_label(&self, sp: &Arc<ServicePort>) -> Arc<str> {
        self.parent_labels
            .get(&(Arc::as_ptr(sp) as usize))
            .cloned()
            .unwrap_or_else(|| Arc::from(format!("{}:{}", sp.service, sp.port)))
    }
}

pub struct Shared {
    pub settings: Settings,
    pub active: ArcSwapOption<Active>,
    pub metrics: Metrics,
    /// The clock circuits and budgets count time on.
    pub clock: Clock,
    /// The control-plane client's state (unused with a config dir).
    pub control: crate::control::Status,
    /// The sidecar's identity and the mesh's trust (mTLS).
    pub tls: crate::tls::Tls,
    /// Serialises snapshot installs, so that each new version takes over from the last.
    installing: std::sync::Mutex<()>,
    draining: AtomicBool,
}

impl Shared {
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Shared {
            settings,
            active: ArcSwapOption::empty(),
            metrics: Metrics::new(),
            clock: Clock::new(),
            control: crate::control::Status::default(),
            tls: crate::tls::Tls::default(),
            installing: std::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
        })
    }

    /// Installs a new snapshot unless it has the version already in force. Requests in
    /// flight keep the `Arc<Active>` they loaded and finish on their version.
    pub fn apply(&self, snapshot: Snapshot) -> bool {
        let _installing = self.installing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.active.load_full();
        if let Some(current) = &current
            && current.snapshot.version == snapshot.version
        {
            return false;
        }
        self.metrics.config_version(&snapshot.version);
        let active = Active::new(
            snapshot,
            current.as_deref(),
            &self.metrics,
            self.clock,
            &self.settings.place,
        );
        self.active.store(Some(Arc::new(active)));
        true
    }

    pub fn version(&self) -> Option<String> {
        self.active
            .load()
            .as_ref()
            .map(|a| a.snapshot.version.clone())
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.active.load().is_some()
    }

    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
