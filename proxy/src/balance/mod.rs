//! Load balancing: which endpoint of a backend gets the next attempt.
//!
//! A [`Balancer`] is built per config snapshot, but the state that learns from traffic
//! (circuits, limit counters, retry budgets) is handed over from the previous one for
//! every backend and endpoint that did not change, so a reload forgets nothing it should
//! remember.

pub mod hash;
pub mod load;
pub mod locality;
pub mod round_robin;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxHashMap;
use serde_json::Value;
use tern_config::Snapshot;
use tern_config::snapshot::{Algorithm, ConcurrencyLimit, EndpointIdentity, Rule};

use crate::metrics::Metrics;
use crate::policy::breaker::{Admit, BackendCircuits, Clock, EndpointCircuit};
use crate::policy::concurrency::Limiter;
use crate::policy::limits::Counters;
use crate::policy::retry_budget::Budget;
use hash::Table;
use load::Load;
use locality::{Place, TIER_NAMES, Tiers};

/// The runtime state of one backend (a Service port).
pub struct BackendState {
    /// The ready endpoints with their circuits, and the policy they follow.
    pub circuits: BackendCircuits,
    /// The load of each endpoint, parallel to `circuits.endpoints`.
    pub loads: Box<[Arc<Load>]>,
    /// The address of each endpoint, parallel to `circuits.endpoints`.
    pub addrs: Box<[SocketAddr]>,
    /// The identity each endpoint must present over mTLS, parallel to `addrs`.
    identities: Box<[Option<Arc<EndpointIdentity>>]>,
    /// Whether any endpoint has one (then requests are prepared for mTLS and HTTP/2).
    pub meshed: bool,
    tiers: Tiers,
    /// The consistent-hash table, for RingHash and Maglev.
    table: Option<Table>,
    cursor: AtomicUsize,
    pub limits: Arc<Counters>,
    pub budget: Arc<Budget>,
    /// Requests sent per locality tier.
    tier_requests: [Counter; 3],
    /// BackendPolicy `concurrency`.
    pub concurrency: Option<Arc<Limiter>>,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// The backend has no ready endpoint.
    NoEndpoints,
    /// Every ready endpoint's circuit is open (or half-open with its probe in flight).
    AllEjected,
}

/// An endpoint picked for one attempt. Its outcome must be recorded with
/// [`BackendState::record`]; dropped unrecorded (a cancelled request), a half-open probe
/// is released for another request.
pub struct Picked<'a> {
    pub circuit: &'a EndpointCircuit,
    /// The identity the endpoint must present, if it is a meshed sidecar.
    pub identity: Option<&'a EndpointIdentity>,
    pub load: &'a Arc<Load>,
    pub probe: bool,
    recorded: bool,
}

impl Picked<'_> {
    pub fn addr(&self) -> SocketAddr {
        self.circuit.addr
    }
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.circuit.abandon_probe();
        }
    }
}

/// Candidates tried on a consistent-hash table before falling back to round robin.
const HASH_TRIES: usize = 16;

impl BackendState {
    /// Picks the endpoint for the next attempt.
    ///
    /// 1. The algorithm's choice within the active locality tier (P2C over peak EWMA or
    ///    requests in flight, or the owner of `hash` on the consistent-hash table),
    ///    among endpoints that are not backing off (429/503 with Retry-After) and are not
    ///    `avoid` (where the previous attempt failed);
    /// 2. else the next such endpoint of the tier in round-robin order, then of the wider
    ///    tiers in order;
    /// 3. else any endpoint whose circuit admits a request, `avoid` last.
    ///
    /// Circuits are asked only about the endpoint about to be used: asking is what takes
    /// a half-open probe.
    pub fn pick(
        &self,
        avoid: Option<SocketAddr>,
        now_ms: u64,
        hash: Option<u64>,
    ) -> Result<Picked<'_>, PickError> {
        let eps = &self.circuits.endpoints;
        if eps.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let usable = |i: usize| avoid != Some(eps[i].addr) && !self.loads[i].backing_off(now_ms);
        let take = |i: usize| self.take(i, now_ms);
        let algorithm = self.circuits.policy.load_balancer.algorithm;
        if let (Some(table), Some(h)) = (&self.table, hash)
            && let Some(p) = table
                .candidates(h)
                .take(HASH_TRIES)
                .filter(|&i| usable(i))
                .find_map(take)
        {
            return Ok(p);
        }
        let (set, level) = self.tiers.active(now_ms, |i| !eps[i].is_ejected());
        if set.len() >= 2 && matches!(algorithm, Algorithm::P2CPeakEWMA | Algorithm::LeastRequest) {
            let a = fastrand::usize(..set.len());
            let mut b = fastrand::usize(..set.len() - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (set[a] as usize, set[b] as usize);
            let cost = |i: usize| match algorithm {
                Algorithm::LeastRequest => f64::from(self.loads[i].pending()),
                _ => self.loads[i].cost(now_ms),
            };
            let (first, second) = if cost(b) < cost(a) { (b, a) } else { (a, b) };
            if let Some(p) = [first, second]
                .into_iter()
                .filter(|&i| usable(i))
                .find_map(take)
            {
                return Ok(p);
            }
        }
        if let Some((_, p)) = round_robin::next(&self.cursor, set.len(), |k| {
            let i = set[k] as usize;
            if usable(i) { take(i) } else { None }
        }) {
            return Ok(p);
        }
        // The tier cannot take it (its endpoints failed since the tier was chosen, or the
        // only one is `avoid`): the next wider tiers, in order, before anywhere.
        for wider in level + 1..3 {
            if let Some(p) = self
                .tiers
                .set(wider)
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| usable(i))
                .find_map(take)
            {
                return Ok(p);
            }
        }
        // Last resort: any endpoint its circuit admits, the one to avoid last.
        let others = (0..eps.len()).filter(|&i| avoid != Some(eps[i].addr));
        let avoided = (0..eps.len()).filter(|&i| avoid == Some(eps[i].addr));
        others
            .chain(avoided)
            .find_map(take)
            .ok_or(PickError::AllEjected)
    }

    /// Endpoint `i`, if its circuit admits a request now.
    fn take(&self, i: usize, now_ms: u64) -> Option<Picked<'_>> {
        let eps = &self.circuits.endpoints;
        let probe = match eps[i].admit(now_ms) {
            Admit::Yes => false,
            Admit::Probe => true,
            Admit::No => return None,
        };
        self.tier_requests[self.tiers.tier_of[i] as usize].inc();
        Some(Picked {
            circuit: &eps[i],
            identity: self.identities[i].as_deref(),
            load: &self.loads[i],
            probe,
            recorded: false,
        })
    }

    /// The endpoint at `addr` (one a client dialled itself), if its circuit admits it.
    pub fn pick_addr(&self, addr: SocketAddr, now_ms: u64) -> Option<Picked<'_>> {
        let i = self.addrs.iter().position(|a| *a == addr)?;
        self.take(i, now_ms)
    }

    /// Records the outcome of an attempt at `picked` for its circuit.
    pub fn record(&self, mut picked: Picked<'_>, failed: bool, now_ms: u64, metrics: &Metrics) {
        picked.recorded = true;
        self.circuits
            .record(picked.circuit, failed, picked.probe, now_ms, metrics);
    }

    /// The `/circuits` view of this backend: circuits, plus each endpoint's tier and load.
    pub fn to_json(&self) -> Value {
        let mut v = self.circuits.to_json();
        let now = self.circuits.clock.now_ms();
        if let Some(Value::Array(eps)) = v.get_mut("endpoints") {
            for (i, e) in eps.iter_mut().enumerate() {
                let load = &self.loads[i];
                e["tier"] = TIER_NAMES[self.tiers.tier_of[i] as usize].into();
                e["pending"] = load.pending().into();
                e["ewma_ms"] = (load.ewma_us() / 1000.0).into();
                e["backing_off"] = load.backing_off(now).into();
            }
        }
        v["algorithm"] = format!("{:?}", self.circuits.policy.load_balancer.algorithm).into();
        v["tier"] = TIER_NAMES[self
            .tiers
            .active(now, |i| !self.circuits.endpoints[i].is_ejected())
            .1]
            .into();
        v
    }

    /// (tier, ready, ejected, connecting) counts for the endpoint gauges; connecting:
    /// never measured yet and with requests in flight.
    pub fn tier_counts(&self) -> [(usize, usize, usize); 3] {
        let mut out = [(0, 0, 0); 3];
        for (i, ep) in self.circuits.endpoints.iter().enumerate() {
            let t = &mut out[self.tiers.tier_of[i] as usize];
            t.0 += 1;
            if ep.is_ejected() {
                t.1 += 1;
            }
            if self.loads[i].ewma_us() == 0.0 && self.loads[i].pending() > 0 {
                t.2 += 1;
            }
        }
        out
    }
}

pub struct Balancer {
    /// Indexed by `Backend::index`.
    backends: Vec<BackendState>,
    /// ConcurrencyPolicy limiters of route rules, by the rule's address in the snapshot
    /// (valid: the snapshot outlives its balancer).
    routes: FxHashMap<usize, Arc<Limiter>>,
    /// (route, rule index) of each of those, to hand limiters to the next version.
    route_keys: FxHashMap<usize, (Arc<str>, usize)>,
}

/// The limiter for `config`: the previous one when its settings are equal (so requests in
/// flight stay counted), else a new one.
fn limiter(
    previous: Option<&Arc<Limiter>>,
    config: &ConcurrencyLimit,
    scope: &'static str,
    name: &Arc<str>,
    metrics: &Metrics,
) -> Arc<Limiter> {
    match previous {
        Some(l) if l.config == *config => l.clone(),
        _ => {
            let (gauge, shed) = metrics.concurrency(scope, name);
            Arc::new(Limiter::new(config.clone(), name.clone(), gauge, shed))
        }
    }
}

/// Every rule of a snapshot, once.
pub fn rules(snapshot: &Snapshot) -> impl Iterator<Item = &Arc<Rule>> {
    let mut seen = rustc_hash::FxHashSet::default();
    snapshot
        .services
        .values()
        .flat_map(|s| s.ports.iter())
        .flat_map(|sp| {
            sp.http
                .iter()
                .map(|m| &m.rule)
                .chain(sp.grpc.iter().map(|m| &m.rule))
                .chain(sp.default_rule.iter())
        })
        .filter(move |r| seen.insert(Arc::as_ptr(r) as usize))
}

impl Balancer {
    /// Builds the state for `snapshot`, taking over from `previous` what is unchanged:
    /// limit counters by backend name; the retry budget when its settings are equal; an
    /// endpoint's load (latency estimate) by address, and its circuit when the endpoint
    /// (address and zone) and the circuit-breaker settings are equal. Metric series of
    /// endpoints that are gone are removed.
    pub fn new(
        snapshot: &Snapshot,
        previous: Option<&Balancer>,
        metrics: &Metrics,
        clock: Clock,
        place: &Place,
    ) -> Self {
        let old: HashMap<&str, &BackendState> = previous
            .map(|p| p.backends.iter().map(|b| (&*b.circuits.name, b)).collect())
            .unwrap_or_default();
        let now = clock.now_ms();
        let backends: Vec<BackendState> = snapshot
            .backends
            .iter()
            .map(|b| {
                let prev = old.get(&*b.name).copied();
                let policy = &b.policy;
                let same_breaker = prev
                    .is_some_and(|p| p.circuits.policy.circuit_breaker == policy.circuit_breaker);
                let ready: Vec<usize> = (0..b.endpoints.len())
                    .filter(|&i| b.endpoints[i].ready)
                    .collect();
                let previous_index = |addr: SocketAddr| {
                    prev.and_then(|p| p.circuits.endpoints.iter().position(|c| c.addr == addr))
                };
                let mut endpoints = Vec::with_capacity(ready.len());
                let mut loads = Vec::with_capacity(ready.len());
                for &i in &ready {
                    let e = &b.endpoints[i];
                    let old_i = previous_index(e.addr);
                    let kept = old_i
                        .filter(|_| same_breaker)
                        .map(|j| &prev.unwrap().circuits.endpoints[j])
                        .filter(|c| c.zone == e.zone);
                    endpoints.push(match kept {
                        Some(c) => c.clone(),
                        None => Arc::new(EndpointCircuit::new(
                            e.addr,
                            e.zone.clone(),
                            &policy.circuit_breaker,
                            metrics.circuit(&b.name, e.addr, e.zone.as_ref()),
                            now,
                        )),
                    });
                    loads.push(match old_i {
                        Some(j) => prev.unwrap().loads[j].clone(),
                        None => Arc::default(),
                    });
                }
                let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                let identities: Box<[_]> = ready
                    .iter()
                    .map(|&i| b.endpoints[i].identity.clone())
                    .collect();
                let meshed = identities.iter().any(Option::is_some);
                let lb = &policy.load_balancer;
                let table = match (lb.algorithm, &lb.hash) {
                    (Algorithm::RingHash, Some(_)) => Some(Table::ring(&addrs)),
                    (Algorithm::Maglev, Some(_)) => Some(Table::maglev(&addrs)),
                    _ => None,
                };
                let start = if endpoints.is_empty() {
                    0
                } else {
                    // Sidecars restarted together should not all start on the same endpoint.
                    fastrand::usize(..endpoints.len())
                };
                BackendState {
                    circuits: BackendCircuits {
                        name: b.name.clone(),
                        policy: policy.clone(),
                        endpoints: endpoints.into(),
                        clock,
                    },
                    loads: loads.into(),
                    addrs: addrs.clone().into(),
                    identities,
                    meshed,
                    tiers: Tiers::new(&b.endpoints, &ready, place, lb.locality),
                    table,
                    cursor: AtomicUsize::new(start),
                    limits: prev.map_or_else(Default::default, |p| p.limits.clone()),
                    budget: match prev {
                        Some(p) if p.budget.settings == policy.retry_budget => p.budget.clone(),
                        _ => Arc::new(Budget::new(policy.retry_budget)),
                    },
                    tier_requests: TIER_NAMES.map(|tier| metrics.tier_requests(&b.name, tier)),
                    concurrency: policy.concurrency.as_ref().map(|c| {
                        let kept = prev.and_then(|p| p.concurrency.as_ref());
                        limiter(kept, c, "backend", &b.name, metrics)
                    }),
                }
            })
            .collect();
        if let Some(previous) = previous {
            let kept: std::collections::HashSet<(&str, SocketAddr)> = backends
                .iter()
                .flat_map(|b| {
                    b.circuits
                        .endpoints
                        .iter()
                        .map(move |e| (&*b.circuits.name, e.addr))
                })
                .collect();
            for b in &previous.backends {
                for e in b.circuits.endpoints.iter() {
                    if !kept.contains(&(&*b.circuits.name, e.addr)) {
                        e.forget_metrics(metrics);
                    }
                }
            }
        }
        let old_routes: HashMap<(&str, usize), &Arc<Limiter>> = previous
            .map(|p| {
                p.route_keys
                    .iter()
                    .filter_map(|(ptr, key)| Some(((&*key.0, key.1), p.routes.get(ptr)?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut routes = FxHashMap::default();
        let mut route_keys = FxHashMap::default();
        // One limiter per route rule, shared by the copies of the rule on each port the
        // route attaches to.
        let mut by_rule: HashMap<(Arc<str>, usize), Arc<Limiter>> = HashMap::new();
        for rule in rules(snapshot) {
            if let Some(c) = &rule.concurrency {
                let key = (rule.route.clone(), rule.rule_index);
                let shared = by_rule.entry(key.clone()).or_insert_with(|| {
                    let name: Arc<str> = format!("{}#{}", rule.route, rule.rule_index).into();
                    let kept = old_routes.get(&(&*rule.route, rule.rule_index)).copied();
                    limiter(kept, c, "route", &name, metrics)
                });
                let ptr = Arc::as_ptr(rule) as usize;
                routes.insert(ptr, shared.clone());
                route_keys.insert(ptr, key);
            }
        }
        Balancer {
            backends,
            routes,
            route_keys,
        }
    }

    /// The ConcurrencyPolicy limiter of `rule`, if it has one.
    pub fn route_limiter(&self, rule: &Rule) -> Option<&Arc<Limiter>> {
        // Most rules have none: no hash lookup for them.
        rule.concurrency.as_ref()?;
        self.routes.get(&(rule as *const Rule as usize))
    }

    pub fn backend(&self, index: usize) -> Option<&BackendState> {
        self.backends.get(index)
    }

    /// Appends the `tern_balancer_endpoints` gauges (computed at scrape time from the
    /// live state) in Prometheus text format.
    pub fn encode_gauges(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str(
            "# HELP tern_balancer_endpoints Ready endpoints per backend and locality tier: \
             ready, ejected (circuit not closed), connecting (first request in flight).\n\
             # TYPE tern_balancer_endpoints gauge\n",
        );
        for b in &self.backends {
            if b.circuits.endpoints.is_empty() {
                continue;
            }
            for (tier, (ready, ejected, connecting)) in b.tier_counts().iter().enumerate() {
                if *ready == 0 {
                    continue;
                }
                for (state, n) in [
                    ("ready", ready),
                    ("ejected", ejected),
                    ("connecting", connecting),
                ] {
                    let _ = writeln!(
                        out,
                        "tern_balancer_endpoints{{backend_name=\"{}\",tier=\"{}\",state=\"{state}\"}} {n}",
                        b.circuits.name, TIER_NAMES[tier]
                    );
                }
            }
        }
    }

    /// The `/circuits` document: every backend with endpoints, and each endpoint's circuit.
    pub fn circuits_json(&self) -> Vec<Value> {
        self.backends
            .iter()
            .filter(|b| !b.circuits.endpoints.is_empty())
            .map(BackendState::to_json)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_config::snapshot::{Backend, BackendPolicy, Endpoint, ObjectRef, Protocol};

    fn snapshot(addrs: &[(&str, bool)], policy: BackendPolicy) -> Snapshot {
        let backend = Backend {
            index: 0,
            name: "ns/web:80".into(),
            service: ObjectRef {
                namespace: "ns".into(),
                name: "web".into(),
            },
            port: 80,
            protocol: Protocol::Http1,
            endpoints: addrs
                .iter()
                .map(|(a, ready)| Endpoint {
                    addr: a.parse().unwrap(),
                    ready: *ready,
                    zone: None,
                    region: None,
                    identity: None,
                })
                .collect(),
            policy: Arc::new(policy),
        };
        Snapshot {
            version: "v".into(),
            services: Default::default(),
            by_name: Default::default(),
            backends: vec![Arc::new(backend)],
            backend_ids: Default::default(),
            by_addr: Default::default(),
            json: Value::Null,
        }
    }

    fn trip(b: &BackendState, addr: &str, m: &Metrics) {
        let addr: SocketAddr = addr.parse().unwrap();
        let ep = b
            .circuits
            .endpoints
            .iter()
            .find(|e| e.addr == addr)
            .unwrap();
        for _ in 0..5 {
            b.circuits.record(ep, true, false, 0, m);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn skips_ejected_and_not_ready_endpoints() {
        let m = Metrics::new();
        let s = snapshot(
            &[
                ("127.0.0.1:1", true),
                ("127.0.0.1:2", true),
                ("127.0.0.1:3", false),
            ],
            BackendPolicy::default(),
        );
        let bal = Balancer::new(&s, None, &m, Clock::new(), &Place::default());
        let b = bal.backend(0).unwrap();
        assert_eq!(b.circuits.endpoints.len(), 2);
        trip(b, "127.0.0.1:1", &m);
        for _ in 0..4 {
            assert_eq!(b.pick(None, 0, None).unwrap().addr().port(), 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn avoids_the_endpoint_that_just_failed_when_it_can() {
        let m = Metrics::new();
        let s = snapshot(
            &[("127.0.0.1:1", true), ("127.0.0.1:2", true)],
            BackendPolicy::default(),
        );
        let bal = Balancer::new(&s, None, &m, Clock::new(), &Place::default());
        let b = bal.backend(0).unwrap();
        let avoid = Some("127.0.0.1:1".parse().unwrap());
        for _ in 0..4 {
            assert_eq!(b.pick(avoid, 0, None).unwrap().addr().port(), 2);
        }
        // With one endpoint, the retry goes to it again.
        let s = snapshot(&[("127.0.0.1:1", true)], BackendPolicy::default());
        let bal = Balancer::new(&s, None, &m, Clock::new(), &Place::default());
        assert_eq!(
            bal.backend(0)
                .unwrap()
                .pick(avoid, 0, None)
                .unwrap()
                .addr()
                .port(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_is_an_error_not_a_hang() {
        let m = Metrics::new();
        let mut policy = BackendPolicy::default();
        policy.circuit_breaker.ejection.max_ejected_percent = 100;
        let s = snapshot(&[("127.0.0.1:1", true), ("127.0.0.1:2", true)], policy);
        let bal = Balancer::new(&s, None, &m, Clock::new(), &Place::default());
        let b = bal.backend(0).unwrap();
        trip(b, "127.0.0.1:1", &m);
        trip(b, "127.0.0.1:2", &m);
        assert_eq!(b.pick(None, 0, None).err(), Some(PickError::AllEjected));
        let empty = snapshot(&[("127.0.0.1:1", false)], BackendPolicy::default());
        let bal = Balancer::new(&empty, None, &m, Clock::new(), &Place::default());
        assert_eq!(
            bal.backend(0).unwrap().pick(None, 0, None).err(),
            Some(PickError::NoEndpoints)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reload_keeps_the_state_of_unchanged_endpoints() {
        let m = Metrics::new();
        let clock = Clock::new();
        let s1 = snapshot(
            &[
                ("127.0.0.1:1", true),
                ("127.0.0.1:2", true),
                ("127.0.0.1:3", true),
            ],
            BackendPolicy::default(),
        );
        let bal1 = Balancer::new(&s1, None, &m, clock, &Place::default());
        trip(bal1.backend(0).unwrap(), "127.0.0.1:1", &m);
        // Endpoint 3 leaves, 4 arrives; 1 and 2 are unchanged.
        let s2 = snapshot(
            &[
                ("127.0.0.1:1", true),
                ("127.0.0.1:2", true),
                ("127.0.0.1:4", true),
            ],
            BackendPolicy::default(),
        );
        let bal2 = Balancer::new(&s2, Some(&bal1), &m, clock, &Place::default());
        let b2 = bal2.backend(0).unwrap();
        assert_eq!(b2.circuits.ejected(), 1);
        assert!(Arc::ptr_eq(&b2.limits, &bal1.backend(0).unwrap().limits));
        let text = m.encode();
        assert!(!text.contains("127.0.0.1:3"), "{text}");
        assert!(text.contains("endpoint=\"127.0.0.1:4\""));
        // A changed breaker policy starts its circuits afresh.
        let mut policy = BackendPolicy::default();
        policy.circuit_breaker.consecutive_failures = Some(9);
        let s3 = snapshot(&[("127.0.0.1:1", true), ("127.0.0.1:2", true)], policy);
        let bal3 = Balancer::new(&s3, Some(&bal2), &m, clock, &Place::default());
        assert_eq!(bal3.backend(0).unwrap().circuits.ejected(), 0);
    }

    fn backend_with(policy: BackendPolicy, n: u16) -> (Balancer, Metrics) {
        let addrs: Vec<String> = (1..=n).map(|p| format!("127.0.0.1:{p}")).collect();
        let eps: Vec<(&str, bool)> = addrs.iter().map(|a| (a.as_str(), true)).collect();
        let m = Metrics::new();
        let bal = Balancer::new(
            &snapshot(&eps, policy),
            None,
            &m,
            Clock::new(),
            &Place::default(),
        );
        (bal, m)
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_steers_away_from_a_slow_endpoint() {
        let (bal, _m) = backend_with(BackendPolicy::default(), 3);
        let b = bal.backend(0).unwrap();
        // Endpoint 1 answers in 10 ms, the others in 1 ms.
        let mut to_slow = 0;
        for k in 0..1_000u64 {
            let p = b.pick(None, k, None).unwrap();
            let rtt = if p.addr().port() == 1 {
                10_000.0
            } else {
                1_000.0
            };
            if p.addr().port() == 1 {
                to_slow += 1;
            }
            p.load.observe(rtt, k);
            drop(p);
        }
        // P2C never picks the worse of two: the slow one only wins against itself.
        assert!(to_slow < 50, "{to_slow} of 1000 to the slow endpoint");
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_prefers_idle_endpoints() {
        let mut policy = BackendPolicy::default();
        policy.load_balancer.algorithm = Algorithm::LeastRequest;
        let (bal, _m) = backend_with(policy, 2);
        let b = bal.backend(0).unwrap();
        let busy = b.loads[0].start();
        for k in 0..20 {
            assert_eq!(
                b.pick(None, k, None).unwrap().addr(),
                b.circuits.endpoints[1].addr
            );
        }
        drop(busy);
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_backing_off_are_passed_over_unless_alone() {
        let (bal, _m) = backend_with(BackendPolicy::default(), 2);
        let b = bal.backend(0).unwrap();
        b.loads[0].back_off(1_000);
        for k in 0..20 {
            assert_eq!(b.pick(None, k, None).unwrap().addr().port(), 2);
        }
        b.loads[1].back_off(1_000);
        assert!(b.pick(None, 0, None).is_ok());
        assert!(b.pick(None, 1_000, None).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn hashing_keeps_a_key_on_its_endpoint_and_falls_over_when_ejected() {
        for algorithm in [Algorithm::RingHash, Algorithm::Maglev] {
            let mut policy = BackendPolicy::default();
            policy.load_balancer.algorithm = algorithm;
            policy.load_balancer.hash = Some(tern_config::snapshot::HashKey::SourceIP);
            let (bal, m) = backend_with(policy, 5);
            let b = bal.backend(0).unwrap();
            let key = hash::key_hash(b"user-42");
            let owner = b.pick(None, 0, Some(key)).unwrap().addr();
            for k in 0..20 {
                assert_eq!(b.pick(None, k, Some(key)).unwrap().addr(), owner);
            }
            trip(b, &owner.to_string(), &m);
            let other = b.pick(None, 0, Some(key)).unwrap().addr();
            assert_ne!(other, owner);
            // The fallback is stable too.
            assert_eq!(b.pick(None, 1, Some(key)).unwrap().addr(), other);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn locality_keeps_traffic_in_zone_until_it_fails() {
        let zoned = |port: u16, zone: &str, region: &str| Endpoint {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            ready: true,
            zone: Some(zone.into()),
            region: Some(region.into()),
            identity: None,
        };
        let mut s = snapshot(&[], BackendPolicy::default());
        let backend = Arc::get_mut(&mut s.backends[0]).unwrap();
        backend.endpoints = vec![
            zoned(1, "a1", "a"),
            zoned(2, "a2", "a"),
            zoned(3, "b1", "b"),
        ];
        let m = Metrics::new();
        let place = Place {
            zone: Some("a1".into()),
            region: Some("a".into()),
        };
        let bal = Balancer::new(&s, None, &m, Clock::new(), &place);
        let b = bal.backend(0).unwrap();
        for k in 0..20 {
            assert_eq!(b.pick(None, k, None).unwrap().addr().port(), 1);
        }
        trip(b, "127.0.0.1:1", &m);
        // After the cached choice expires, the region takes over.
        for k in 0..20 {
            assert_eq!(b.pick(None, 200 + k, None).unwrap().addr().port(), 2);
        }
        assert!(m.encode().contains("tier=\"region\"} 20"));
    }
}
