//! One worker: a single-threaded runtime with its own listeners (SO_REUSEPORT) and its
//! own upstream pools, so a request stays on one core from accept to upstream and back.

use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxHashMap;
use tern_config::snapshot::AuthorizationPolicy;

use crate::metrics::{Direction, RouteLabels, RouteMetrics, Unrouted};
use crate::state::{Active, Shared};
use crate::upstream::pool::{Pool, PoolSettings};

pub struct Worker {
    pub shared: Arc<Shared>,
    /// Connections to other sidecars and upstreams (outbound).
    pub pool: Arc<Pool>,
    /// Connections to the local application (inbound).
    pub app_pool: Arc<Pool>,
    /// The empty label value, shared so an unrouted request allocates nothing.
    pub empty: Arc<str>,
    pub app_label: Arc<str>,
    /// Resolved metric handles for this worker, for the config version in `active`.
    metrics_cache: Mutex<MetricsCache>,
    /// The inbound requests' handles (one label set per sidecar), read without a lock.
    inbound: OnceLock<RouteMetrics>,
}

#[derive(Default)]
struct MetricsCache {
    /// Held so that the addresses used as keys stay valid (and unique) while cached.
    active: Option<Arc<Active>>,
    /// (service port, rule, backend index) addresses in `active`'s snapshot.
    routes: FxHashMap<(usize, usize, usize), Arc<RouteMetrics>>,
    /// AuthorizationPolicy addresses in `active`'s snapshot -> their "allow" counter.
    authz_allowed: FxHashMap<usize, Counter>,
}

impl MetricsCache {
    /// The cache for `active`: emptied when the config version changed.
    fn of(&mut self, active: &Arc<Active>) -> &mut Self {
        if !self.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, active)) {
            self.active = Some(active.clone());
            self.routes.clear();
            self.authz_allowed.clear();
        }
        self
    }
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Worker {
            pool: Pool::new(PoolSettings::default(), shared.clone()),
            app_pool: Pool::new(PoolSettings::default(), shared.clone()),
            shared,
            empty: Arc::from(""),
            app_label: Arc::from("app"),
            metrics_cache: Mutex::default(),
            inbound: OnceLock::new(),
        })
    }

    /// Labels of a request before (or without) routing: no parent, route or rule.
    pub fn unrouted<'a>(&'a self, direction: Direction, backend: &'a Arc<str>) -> Unrouted<'a> {
        Unrouted {
            direction,
            empty: &self.empty,
            backend,
        }
    }

    /// The metric handles of a routed outbound request; `labels` builds the label set
    /// on the first request of this route, rule and backend under this config version.
    pub fn route_metrics(
        &self,
        active: &Arc<Active>,
        key: (usize, usize, usize),
        labels: impl FnOnce() -> RouteLabels,
    ) -> Arc<RouteMetrics> {
        let mut cache = self.metrics_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .of(active)
            .routes
            .entry(key)
            .or_insert_with(|| Arc::new(self.shared.metrics.route(labels())))
            .clone()
    }

    /// Counts a request `policy` (of `active`'s snapshot) let in.
    pub fn authz_allowed(&self, active: &Arc<Active>, policy: &AuthorizationPolicy) {
        let mut cache = self.metrics_cache.lock().unwrap_or_else(|e| e.into_inner());
        let key = std::ptr::from_ref(policy) as usize;
        cache
            .of(active)
            .authz_allowed
            .entry(key)
            .or_insert_with(|| self.shared.metrics.authz_counter(Some(&policy.name), true))
            .inc();
    }

    /// The metric handles of inbound requests (one label set per sidecar).
    pub fn inbound_metrics(&self, labels: impl FnOnce() -> RouteLabels) -> &RouteMetrics {
        self.inbound
            .get_or_init(|| self.shared.metrics.route(labels()))
    }
}
