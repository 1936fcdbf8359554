//! Prometheus metrics (prometheus-client). One `tern_` prefix, base units, counters end
//! in `_total`, Gateway API label names. Label values are `Arc<str>` taken from the
//! snapshot, so recording a request allocates nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl EncodeLabelValue for Direction {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        })
    }
}

/// Where a request went. Empty strings where routing did not get that far.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: Direction,
    pub parent_name: Arc<str>,
    pub route_name: Arc<str>,
    pub route_rule: u32,
    pub backend_name: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    #[prometheus(flatten)]
    route: RouteLabels,
    status_code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// One endpoint of one backend: the labels of its circuit metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub backend_name: Arc<str>,
    pub endpoint: String,
    pub zone: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CircuitStateLabels {
    #[prometheus(flatten)]
    endpoint: EndpointLabels,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    #[prometheus(flatten)]
    endpoint: EndpointLabels,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend_name: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverflowLabels {
    backend_name: Arc<str>,
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
    name: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    scope: &'static str,
    name: Arc<str>,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLimitLabels {
    policy: Arc<str>,
    route_name: String,
    key_kind: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    backend_name: Arc<str>,
    tier: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FateLabels {
    #[prometheus(flatten)]
    route: RouteLabels,
    fate: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: Direction,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    policy: Arc<str>,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    tls: &'static str,
    client_id: Arc<str>,
}

/// The empty label value, allocated once.
fn empty_label() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

const STATES: [&str; 3] = ["closed", "open", "half_open"];

/// What finally happened to a request, as far as retries go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    SuccessFirstTry,
    SuccessAfterRetry,
    RetriesExhausted,
    BudgetExhausted,
    NotRetryable,
    TimedOut,
}

impl Fate {
    pub const ALL: [Fate; 6] = [
        Fate::SuccessFirstTry,
        Fate::SuccessAfterRetry,
        Fate::RetriesExhausted,
        Fate::BudgetExhausted,
        Fate::NotRetryable,
        Fate::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fate::SuccessFirstTry => "success_first_try",
            Fate::SuccessAfterRetry => "success_after_retry",
            Fate::RetriesExhausted => "retries_exhausted",
            Fate::BudgetExhausted => "budget_exhausted",
            Fate::NotRetryable => "not_retryable",
            Fate::TimedOut => "timed_out",
        }
    }
}

/// Handles of one endpoint's circuit series, resolved when the circuit is created.
pub struct CircuitMetrics {
    labels: EndpointLabels,
    /// closed, open, half_open: 1 for the current state.
    states: [Gauge; 3],
    last_trip: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl CircuitMetrics {
    pub fn set_state(&self, state: &str) {
        for (name, g) in STATES.iter().zip(&self.states) {
            g.set(i64::from(*name == state));
        }
    }

    pub fn set_last_trip(&self, unix_seconds: f64) {
        self.last_trip.set(unix_seconds);
    }
}

/// Status recorded for a request whose client went away before the response (nginx's
/// convention).
pub const CLIENT_CLOSED: u16 = 499;

/// Metric handles of one route rule and backend, resolved once (per worker and config
/// version) so that recording a request hashes no label set.
pub struct RouteMetrics {
    labels: RouteLabels,
    duration: Histogram,
    /// By [`Fate`] (in `Fate::ALL` order).
    fates: [Counter; 6],
    retries: Counter,
    body_too_large: Counter,
    /// Counters by status code seen so far, found without a lock: a handful per route.
    statuses: [StatusSlot; STATUS_SLOTS],
    /// Codes beyond the slots; also held while a code is added, so adders take turns.
    more: std::sync::Mutex<Vec<(u16, Counter)>>,
}

const STATUS_SLOTS: usize = 8;

/// One status code's counter. `code` (0: free) is published after `counter` is set.
#[derive(Default)]
struct StatusSlot {
    code: std::sync::atomic::AtomicU16,
    counter: std::sync::OnceLock<Counter>,
}

impl RouteMetrics {
    pub fn fate(&self, fate: Fate) {
        self.fates[fate as usize].inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn body_too_large(&self) {
        self.body_too_large.inc();
    }

    fn record(&self, metrics: &Metrics, status: u16, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        for slot in &self.statuses {
            match slot.code.load(Ordering::Acquire) {
                0 => break,
                code if code == status => {
                    if let Some(c) = slot.counter.get() {
                        c.inc();
                        return;
                    }
                }
                _ => {}
            }
        }
        self.count_status(metrics, status);
    }

    /// Counts a code not found in the slots: it may be in `more`, or new.
    #[cold]
    fn count_status(&self, metrics: &Metrics, status: u16) {
        let mut more = self.more.lock().unwrap_or_else(|e| e.into_inner());
        // Another request may have added it since the look without the lock.
        for slot in &self.statuses {
            if slot.code.load(Ordering::Acquire) == status
                && let Some(c) = slot.counter.get()
            {
                c.inc();
                return;
            }
        }
        if let Some((_, c)) = more.iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let c = metrics.requests.get_or_create_owned(&RequestLabels {
            route: self.labels.clone(),
            status_code: status,
        });
        c.inc();
        match self
            .statuses
            .iter()
            .find(|slot| slot.code.load(Ordering::Acquire) == 0)
        {
            Some(slot) if slot.counter.set(c.clone()).is_ok() => {
                slot.code.store(status, Ordering::Release);
            }
            _ => more.push((status, c)),
        }
    }
}

/// A request's [`RouteMetrics`]: borrowed from what outlives the request (a connection's
/// cache, the worker), or held (cloning an `Arc` and dropping it are two locked
/// instructions a request).
pub enum Handles<'a> {
    Borrowed(&'a RouteMetrics),
    Held(Arc<RouteMetrics>),
}

impl std::ops::Deref for Handles<'_> {
    type Target = RouteMetrics;

    fn deref(&self) -> &RouteMetrics {
        match self {
            Handles::Borrowed(m) => m,
            Handles::Held(m) => m,
        }
    }
}

/// Records one request when it ends: at [`RequestRecorder::finish`] with its status, or
/// on drop as [`CLIENT_CLOSED`] when the client cancelled it first. Uses the resolved
/// [`RouteMetrics`] once routing has found them, the label set otherwise.
pub struct RequestRecorder<'a> {
    metrics: &'a Metrics,
    /// The label set of a request recorded without resolved handles: built from
    /// `unrouted` when first needed (most requests never need it).
    labels: Option<RouteLabels>,
    unrouted: Unrouted<'a>,
    pub route: Option<Handles<'a>>,
    start: Instant,
    done: bool,
}

/// The labels of a request not (yet) routed: borrowed until a label set is needed.
#[derive(Clone, Copy)]
pub struct Unrouted<'a> {
    pub direction: Direction,
    /// The empty label value.
    pub empty: &'a Arc<str>,
    pub backend: &'a Arc<str>,
}

impl Unrouted<'_> {
    pub fn labels(self) -> RouteLabels {
        RouteLabels {
            direction: self.direction,
            parent_name: self.empty.clone(),
            route_name: self.empty.clone(),
            route_rule: 0,
            backend_name: self.backend.clone(),
        }
    }
}

impl<'a> RequestRecorder<'a> {
    /// When the request started (its one clock read before it goes out).
    pub fn started(&self) -> Instant {
        self.start
    }

    /// `start`: when the request began (the caller's clock read, shared with its other
    /// bookkeeping).
    pub fn new(metrics: &'a Metrics, unrouted: Unrouted<'a>, start: Instant) -> Self {
        RequestRecorder {
            metrics,
            labels: None,
            unrouted,
            route: None,
            start,
            done: false,
        }
    }

    /// The label set to record under when no handles are resolved, to fill in.
    pub fn labels_mut(&mut self) -> &mut RouteLabels {
        let unrouted = self.unrouted;
        self.labels.get_or_insert_with(|| unrouted.labels())
    }

    /// Records the request as answered with `status` at `at`.
    pub fn finish(mut self, status: u16, at: Instant) {
        self.done = true;
        self.record(status, at);
    }

    fn record(&self, status: u16, at: Instant) {
        let elapsed = at.saturating_duration_since(self.start);
        match (&self.route, &self.labels) {
            (Some(route), _) => route.record(self.metrics, status, elapsed),
            (None, Some(labels)) => self.metrics.record_request(labels, status, elapsed),
            (None, None) => {
                let labels = self.unrouted.labels();
                self.metrics.record_request(&labels, status, elapsed);
            }
        }
    }
}

impl Drop for RequestRecorder<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.record(CLIENT_CLOSED, Instant::now());
        }
    }
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: HistogramFamily,
    open_connections: Family<DirectionLabels, Gauge>,
    connections: Family<DirectionLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    config_info: Family<VersionLabels, Gauge>,
    fates: Family<FateLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    body_too_large: Family<RouteLabels, Counter>,
    circuit_state: Family<CircuitStateLabels, Gauge>,
    circuit_transitions: Family<TransitionLabels, Counter>,
    circuit_last_trip: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    circuit_refused: Family<BackendLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    tier_requests: Family<TierLabels, Counter>,
    concurrency_limit: Family<ScopeLabels, Gauge>,
    shed: Family<ShedLabels, Counter>,
    rate_limits: Family<RateLimitLabels, Counter>,
    control_pushes: Family<ResultLabels, Counter>,
    control_connected: Gauge,
    control_reconnects: Counter,
    handshakes: Family<HandshakeLabels, Counter>,
    renewals: Family<ResultLabels, Counter>,
    cert_expiry: Gauge,
    authz: Family<AuthzLabels, Counter>,
    inbound_clients: Family<ClientLabels, Counter>,
}

/// Latency buckets in seconds: fine below 10 ms where a sidecar hop lives.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn new_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let durations: HistogramFamily = Family::new_with_constructor(new_histogram);
        let open_connections = Family::<DirectionLabels, Gauge>::default();
        let connections = Family::<DirectionLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let config_info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "tern_requests",
            "Requests handled, by direction, route, backend and status",
            requests.clone(),
        );
        registry.register(
            "tern_request_duration_seconds",
            "Time from request received to response headers sent",
            durations.clone(),
        );
        registry.register(
            "tern_open_connections",
            "Client connections currently open",
            open_connections.clone(),
        );
        registry.register(
            "tern_connections",
            "Client connections accepted",
            connections.clone(),
        );
        registry.register(
            "tern_config_reloads",
            "Config reloads, applied or refused",
            reloads.clone(),
        );
        registry.register(
            "tern_config_info",
            "The config version in force (value 1)",
            config_info.clone(),
        );
        let fates = Family::<FateLabels, Counter>::default();
        let retries = Family::<RouteLabels, Counter>::default();
        let body_too_large = Family::<RouteLabels, Counter>::default();
        let circuit_state = Family::<CircuitStateLabels, Gauge>::default();
        let circuit_transitions = Family::<TransitionLabels, Counter>::default();
        let circuit_last_trip = Family::default();
        let circuit_refused = Family::<BackendLabels, Counter>::default();
        let overflows = Family::<OverflowLabels, Counter>::default();
        let tier_requests = Family::<TierLabels, Counter>::default();
        let concurrency_limit = Family::<ScopeLabels, Gauge>::default();
        let shed = Family::<ShedLabels, Counter>::default();
        let rate_limits = Family::<RateLimitLabels, Counter>::default();
        registry.register(
            "tern_rate_limit",
            "Requests checked against a RateLimitPolicy, by policy, route, key kind and \
             result (allowed, limited)",
            rate_limits.clone(),
        );
        registry.register(
            "tern_concurrency_limit",
            "Current concurrency limit, by scope (backend, route) and name",
            concurrency_limit.clone(),
        );
        registry.register(
            "tern_shed",
            "Requests shed with 503 overloaded, by scope, name and reason \
             (queue_full, queue_timeout)",
            shed.clone(),
        );
        registry.register(
            "tern_balancer_requests",
            "Attempts sent, by backend and locality tier (zone, region, remote)",
            tier_requests.clone(),
        );
        registry.register(
            "tern_retry_fate",
            "Requests by what retrying did for them: success_first_try, success_after_retry, \
             retries_exhausted, budget_exhausted, not_retryable, timed_out",
            fates.clone(),
        );
        registry.register(
            "tern_retries",
            "Retries sent (attempts after the first)",
            retries.clone(),
        );
        registry.register(
            "tern_retry_body_too_large",
            "Requests not retryable because their body exceeds the replay buffer",
            body_too_large.clone(),
        );
        registry.register(
            "tern_circuit_state",
            "Circuit state of each endpoint: 1 for its current state (closed, open, half_open)",
            circuit_state.clone(),
        );
        registry.register(
            "tern_circuit_transitions",
            "Circuit transitions by reason (consecutive, rate, probe_failed, probe_succeeded)",
            circuit_transitions.clone(),
        );
        registry.register(
            "tern_circuit_last_trip_timestamp_seconds",
            "Unix time of the endpoint's last trip",
            circuit_last_trip.clone(),
        );
        registry.register(
            "tern_circuit_ejections_refused",
            "Trips not ejected because maxEjectedPercent of the backend was already out",
            circuit_refused.clone(),
        );
        registry.register(
            "tern_overflow",
            "Requests refused with 503 overflow, by backend and limit \
             (connections, pending, requests)",
            overflows.clone(),
        );
        let control_pushes = Family::<ResultLabels, Counter>::default();
        let control_connected = Gauge::default();
        let control_reconnects = Counter::default();
        registry.register(
            "tern_control_pushes",
            "Config pushes from the control plane, applied (ACK) or refused (NACK)",
            control_pushes.clone(),
        );
        registry.register(
            "tern_control_connected",
            "1 while a stream to a control-plane replica is open",
            control_connected.clone(),
        );
        registry.register(
            "tern_control_reconnects",
            "Reconnections to the control plane after a stream ended or failed",
            control_reconnects.clone(),
        );
        for result in ["applied", "refused"] {
            let _ = control_pushes.get_or_create(&ResultLabels { result });
        }
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let renewals = Family::<ResultLabels, Counter>::default();
        let cert_expiry = Gauge::default();
        let authz = Family::<AuthzLabels, Counter>::default();
        let inbound_clients = Family::<ClientLabels, Counter>::default();
        registry.register(
            "tern_tls_handshakes",
            "mTLS handshakes between sidecars, by direction and result (ok, or why it \
             failed: unknown_ca, expired, identity_mismatch, no_certificate, ...)",
            handshakes.clone(),
        );
        registry.register(
            "tern_identity_renewals",
            "Certificate requests to the control plane's CA, by result (ok, failed)",
            renewals.clone(),
        );
        registry.register(
            "tern_identity_certificate_expiry_timestamp_seconds",
            "Unix time the sidecar's certificate expires (0: none yet)",
            cert_expiry.clone(),
        );
        registry.register(
            "tern_authz",
            "Inbound requests and connections checked by AuthorizationPolicies, by the \
             policy that allowed them (empty when denied) and decision (allow, deny)",
            authz.clone(),
        );
        registry.register(
            "tern_inbound_clients",
            "Inbound connections by transport (mtls, plaintext) and client SPIFFE ID",
            inbound_clients.clone(),
        );
        // Make the reload counters visible at zero.
        for result in ["applied", "refused"] {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        Metrics {
            registry,
            requests,
            durations,
            open_connections,
            connections,
            reloads,
            config_info,
            fates,
            retries,
            body_too_large,
            circuit_state,
            circuit_transitions,
            circuit_last_trip,
            circuit_refused,
            overflows,
            tier_requests,
            concurrency_limit,
            shed,
            rate_limits,
            control_pushes,
            control_connected,
            control_reconnects,
            handshakes,
            renewals,
            cert_expiry,
            authz,
            inbound_clients,
        }
    }

    /// Counts one mTLS handshake: `result` is `ok` or a failure reason.
    pub fn tls_handshake(&self, direction: Direction, result: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    /// Counts one certificate request; `not_after` is the new certificate's expiry.
    pub fn identity_renewal(&self, ok: bool, not_after: i64) {
        let result = if ok { "ok" } else { "failed" };
        self.renewals.get_or_create(&ResultLabels { result }).inc();
        if ok {
            self.cert_expiry.set(not_after);
        }
    }

    /// Counts one authorization decision where a policy applies.
    pub fn authz(&self, policy: Option<&Arc<str>>, allowed: bool) {
        self.authz_counter(policy, allowed).inc();
    }

    /// The counter of one authorization decision (callers on the request path keep it).
    pub fn authz_counter(&self, policy: Option<&Arc<str>>, allowed: bool) -> Counter {
        let policy = policy.cloned().unwrap_or_else(empty_label);
        let decision = if allowed { "allow" } else { "deny" };
        self.authz
            .get_or_create_owned(&AuthzLabels { policy, decision })
    }

    /// Counts one inbound connection by transport and client identity.
    pub fn inbound_client(&self, client: Option<&Arc<str>>) {
        let (tls, client_id) = match client {
            Some(id) => ("mtls", id.clone()),
            None => ("plaintext", empty_label()),
        };
        self.inbound_clients
            .get_or_create(&ClientLabels { tls, client_id })
            .inc();
    }

    /// Counts one control-plane push, applied (ACK) or refused (NACK).
    pub fn control_push(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.control_pushes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn control_connected(&self, connected: bool) {
        self.control_connected.set(i64::from(connected));
    }

    pub fn control_reconnect(&self) {
        self.control_reconnects.inc();
    }

    /// The counters (allowed, limited) of one RateLimitPolicy's decisions on one route.
    pub fn rate_limit(
        &self,
        policy: &Arc<str>,
        route: &str,
        key_kind: &'static str,
    ) -> [Counter; 2] {
        ["allowed", "limited"].map(|result| {
            self.rate_limits.get_or_create_owned(&RateLimitLabels {
                policy: policy.clone(),
                route_name: route.to_string(),
                key_kind,
                result,
            })
        })
    }

    /// The limit gauge and shed counters (queue_full, queue_timeout) of one limiter.
    pub fn concurrency(&self, scope: &'static str, name: &Arc<str>) -> (Gauge, [Counter; 2]) {
        let gauge = self.concurrency_limit.get_or_create_owned(&ScopeLabels {
            scope,
            name: name.clone(),
        });
        let shed = ["queue_full", "queue_timeout"].map(|reason| {
            self.shed.get_or_create_owned(&ShedLabels {
                scope,
                name: name.clone(),
                reason,
            })
        });
        (gauge, shed)
    }

    pub fn tier_requests(&self, backend: &Arc<str>, tier: &'static str) -> Counter {
        self.tier_requests.get_or_create_owned(&TierLabels {
            backend_name: backend.clone(),
            tier,
        })
    }

    /// Resolves the series of one endpoint's circuit (created closed).
    pub fn circuit(
        &self,
        backend: &Arc<str>,
        addr: std::net::SocketAddr,
        zone: Option<&Arc<str>>,
    ) -> CircuitMetrics {
        let labels = EndpointLabels {
            backend_name: backend.clone(),
            endpoint: addr.to_string(),
            zone: zone.cloned().unwrap_or_else(|| Arc::from("")),
        };
        let states = STATES.map(|state| {
            self.circuit_state.get_or_create_owned(&CircuitStateLabels {
                endpoint: labels.clone(),
                state,
            })
        });
        CircuitMetrics {
            last_trip: self.circuit_last_trip.get_or_create_owned(&labels),
            labels,
            states,
        }
    }

    pub fn circuit_transition(&self, circuit: &CircuitMetrics, reason: &'static str) {
        self.circuit_transitions
            .get_or_create(&TransitionLabels {
                endpoint: circuit.labels.clone(),
                reason,
            })
            .inc();
    }

    pub fn circuit_refused(&self, backend: &Arc<str>) {
        self.circuit_refused
            .get_or_create(&BackendLabels {
                backend_name: backend.clone(),
            })
            .inc();
    }

    /// Drops the series of an endpoint that left the config.
    pub fn forget_circuit(&self, circuit: &CircuitMetrics) {
        for state in STATES {
            self.circuit_state.remove(&CircuitStateLabels {
                endpoint: circuit.labels.clone(),
                state,
            });
        }
        for reason in ["consecutive", "rate", "probe_failed", "probe_succeeded"] {
            self.circuit_transitions.remove(&TransitionLabels {
                endpoint: circuit.labels.clone(),
                reason,
            });
        }
        self.circuit_last_trip.remove(&circuit.labels);
    }

    pub fn overflow(&self, backend: &Arc<str>, limit: &'static str) {
        self.overflows
            .get_or_create(&OverflowLabels {
                backend_name: backend.clone(),
                limit,
            })
            .inc();
    }

    pub fn record_request(&self, route: &RouteLabels, status: u16, elapsed: Duration) {
        self.durations
            .get_or_create(route)
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                status_code: status,
            })
            .inc();
    }

    /// Resolves the handles of one route rule and backend (see [`RouteMetrics`]).
    pub fn route(&self, labels: RouteLabels) -> RouteMetrics {
        RouteMetrics {
            duration: self.durations.get_or_create_owned(&labels),
            fates: Fate::ALL.map(|fate| {
                self.fates.get_or_create_owned(&FateLabels {
                    route: labels.clone(),
                    fate: fate.as_str(),
                })
            }),
            retries: self.retries.get_or_create_owned(&labels),
            body_too_large: self.body_too_large.get_or_create_owned(&labels),
            labels,
            statuses: Default::default(),
            more: std::sync::Mutex::default(),
        }
    }

    pub fn connection_opened(&self, direction: Direction) {
        let labels = DirectionLabels { direction };
        self.connections.get_or_create(&labels).inc();
        self.open_connections.get_or_create(&labels).inc();
    }

    pub fn connection_closed(&self, direction: Direction) {
        self.open_connections
            .get_or_create(&DirectionLabels { direction })
            .dec();
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn config_version(&self, version: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&VersionLabels {
                version: version.to_string(),
            })
            .set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_with_gateway_labels() {
        let m = Metrics::new();
        let route = RouteLabels {
            direction: Direction::Outbound,
            parent_name: "shop/checkout:8080".into(),
            route_name: "shop/checkout-split".into(),
            route_rule: 1,
            backend_name: "shop/checkout-v1:8080".into(),
        };
        m.record_request(&route, 200, Duration::from_millis(3));
        m.record_request(&route, 200, Duration::from_millis(3));
        m.config_version("abc");
        m.config_version("def");
        let text = m.encode();
        assert!(text.contains(
            "tern_requests_total{direction=\"outbound\",parent_name=\"shop/checkout:8080\",route_name=\"shop/checkout-split\",route_rule=\"1\",backend_name=\"shop/checkout-v1:8080\",status_code=\"200\"} 2"
        ), "{text}");
        assert!(text.contains("tern_request_duration_seconds_bucket"));
        assert!(text.contains("tern_config_info{version=\"def\"} 1"));
        assert!(!text.contains("version=\"abc\""));
        assert!(text.contains("tern_config_reloads_total{result=\"refused\"} 0"));
    }

    /// The labels of an inbound request to the application, not routed.
    fn inbound<'a>(empty: &'a Arc<str>, app: &'a Arc<str>) -> Unrouted<'a> {
        Unrouted {
            direction: Direction::Inbound,
            empty,
            backend: app,
        }
    }

    #[test]
    fn a_dropped_request_counts_as_client_closed() {
        let m = Metrics::new();
        let (empty, app): (Arc<str>, Arc<str>) = ("".into(), "app".into());
        let unrouted = inbound(&empty, &app);
        let now = Instant::now();
        drop(RequestRecorder::new(&m, unrouted, now));
        RequestRecorder::new(&m, unrouted, now).finish(200, now);
        // Through resolved handles: the same series.
        let mut r = RequestRecorder::new(&m, unrouted, now);
        r.route = Some(Handles::Held(Arc::new(m.route(unrouted.labels()))));
        r.finish(200, now);
        // Labels filled in before failing (a route without endpoints): their own series.
        let mut r = RequestRecorder::new(&m, unrouted, now);
        r.labels_mut().route_name = "r".into();
        r.finish(503, now);
        let text = m.encode();
        assert!(
            text.contains("backend_name=\"app\",status_code=\"499\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("backend_name=\"app\",status_code=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "route_name=\"r\",route_rule=\"0\",backend_name=\"app\",status_code=\"503\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_status_counts_through_the_slots_and_beyond_them() {
        let m = Metrics::new();
        let (empty, app): (Arc<str>, Arc<str>) = ("".into(), "app".into());
        let unrouted = inbound(&empty, &app);
        let route = m.route(unrouted.labels());
        // More codes than slots, from several threads at once: each code is added once
        // (one series) and every request is counted.
        let codes: Vec<u16> = (0..STATUS_SLOTS as u16 + 4).map(|i| 200 + i).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        for &code in &codes {
                            route.record(&m, code, Duration::from_millis(1));
                        }
                    }
                });
            }
        });
        let text = m.encode();
        for code in codes {
            let line = format!("backend_name=\"app\",status_code=\"{code}\"}} 200");
            assert_eq!(text.matches(&line).count(), 1, "{code}: {text}");
        }
        assert!(
            route
                .statuses
                .iter()
                .all(|s| s.code.load(Ordering::Relaxed) != 0)
        );
        assert_eq!(route.more.lock().unwrap().len(), 4);
    }
}
