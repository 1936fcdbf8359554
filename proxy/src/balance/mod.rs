//! Load balancing: which endpoint of a backend gets the next attempt.
//!
//! A [`Balancer`] is built per config snapshot, but the state that learns from traffic
//! (circuits, limit counters, retry budgets) is handed over from the previous one for
//! every backend and endpoint that did not change, so a reload forgets nothing it should
//! remember.

pub mod round_robin;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use serde_json::Value;
use tern_config::Snapshot;

use crate::metrics::Metrics;
use crate::policy::breaker::{Admit, BackendCircuits, Clock, EndpointCircuit};
use crate::policy::limits::Counters;
use crate::policy::retry_budget::Budget;

/// The runtime state of one backend (a Service port).
pub struct BackendState {
    /// The ready endpoints with their circuits, and the policy they follow.
    pub circuits: BackendCircuits,
    cursor: AtomicUsize,
    pub limits: Arc<Counters>,
    pub budget: Arc<Budget>,
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
/// [`Picked::record`]; dropped unrecorded (a cancelled request), a half-open probe is
/// released for another request.
pub struct Picked<'a> {
    pub circuit: &'a EndpointCircuit,
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

impl BackendState {
    pub fn name(&self) -> &Arc<str> {
        &self.circuits.name
    }

    /// The next endpoint in round-robin order that its circuit admits, preferring one
    /// other than `avoid` (the endpoint a retry just failed on).
    pub fn pick(&self, avoid: Option<SocketAddr>, now_ms: u64) -> Result<Picked<'_>, PickError> {
        let eps = &self.circuits.endpoints;
        if eps.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let mut fallback = None;
        let found = round_robin::next(&self.cursor, eps.len(), |i| {
            let ep = &eps[i];
            if avoid == Some(ep.addr) && eps.len() > 1 {
                // Only if nothing else is admitted; checked without taking a probe.
                if fallback.is_none() && !ep.is_ejected() {
                    fallback = Some(i);
                }
                return None;
            }
            match ep.admit(now_ms) {
                Admit::Yes => Some(false),
                Admit::Probe => Some(true),
                Admit::No => None,
            }
        });
        match found.or_else(|| fallback.map(|i| (i, false))) {
            Some((i, probe)) => Ok(Picked {
                circuit: &eps[i],
                probe,
                recorded: false,
            }),
            None => Err(PickError::AllEjected),
        }
    }

    /// Records the outcome of an attempt at `picked` for its circuit.
    pub fn record(&self, mut picked: Picked<'_>, failed: bool, now_ms: u64, metrics: &Metrics) {
        picked.recorded = true;
        self.circuits
            .record(picked.circuit, failed, picked.probe, now_ms, metrics);
    }
}

pub struct Balancer {
    /// Indexed by `Backend::index`.
    backends: Vec<BackendState>,
}

impl Balancer {
    /// Builds the state for `snapshot`, taking over from `previous` what is unchanged:
    /// limit counters by backend name; the retry budget when its settings are equal; an
    /// endpoint's circuit when the endpoint (address and zone) and the circuit-breaker
    /// settings are equal. Metric series of endpoints that are gone are removed.
    pub fn new(
        snapshot: &Snapshot,
        previous: Option<&Balancer>,
        metrics: &Metrics,
        clock: Clock,
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
                let endpoints = b
                    .endpoints
                    .iter()
                    .filter(|e| e.ready)
                    .map(|e| {
                        let kept = prev.filter(|_| same_breaker).and_then(|p| {
                            p.circuits
                                .endpoints
                                .iter()
                                .find(|c| c.addr == e.addr && c.zone == e.zone)
                        });
                        match kept {
                            Some(c) => c.clone(),
                            None => Arc::new(EndpointCircuit::new(
                                e.addr,
                                e.zone.clone(),
                                &policy.circuit_breaker,
                                metrics.circuit(&b.name, e.addr, e.zone.as_ref()),
                                now,
                            )),
                        }
                    })
                    .collect::<Box<[_]>>();
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
                        endpoints,
                        clock,
                    },
                    cursor: AtomicUsize::new(start),
                    limits: prev.map_or_else(Default::default, |p| p.limits.clone()),
                    budget: match prev {
                        Some(p) if p.budget.settings == policy.retry_budget => p.budget.clone(),
                        _ => Arc::new(Budget::new(policy.retry_budget)),
                    },
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
        Balancer { backends }
    }

    pub fn backend(&self, index: usize) -> Option<&BackendState> {
        self.backends.get(index)
    }

    pub fn ready_count(&self, index: usize) -> usize {
        self.backend(index)
            .map_or(0, |b| b.circuits.endpoints.len())
    }

    /// The `/circuits` document: every backend with endpoints, and each endpoint's circuit.
    pub fn circuits_json(&self) -> Vec<Value> {
        self.backends
            .iter()
            .filter(|b| !b.circuits.endpoints.is_empty())
            .map(|b| b.circuits.to_json())
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
                })
                .collect(),
            policy: Arc::new(policy),
        };
        Snapshot {
            version: "v".into(),
            services: Default::default(),
            by_name: Default::default(),
            backends: vec![Arc::new(backend)],
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
        let bal = Balancer::new(&s, None, &m, Clock::new());
        let b = bal.backend(0).unwrap();
        assert_eq!(bal.ready_count(0), 2);
        trip(b, "127.0.0.1:1", &m);
        for _ in 0..4 {
            assert_eq!(b.pick(None, 0).unwrap().addr().port(), 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn avoids_the_endpoint_that_just_failed_when_it_can() {
        let m = Metrics::new();
        let s = snapshot(
            &[("127.0.0.1:1", true), ("127.0.0.1:2", true)],
            BackendPolicy::default(),
        );
        let bal = Balancer::new(&s, None, &m, Clock::new());
        let b = bal.backend(0).unwrap();
        let avoid = Some("127.0.0.1:1".parse().unwrap());
        for _ in 0..4 {
            assert_eq!(b.pick(avoid, 0).unwrap().addr().port(), 2);
        }
        // With one endpoint, the retry goes to it again.
        let s = snapshot(&[("127.0.0.1:1", true)], BackendPolicy::default());
        let bal = Balancer::new(&s, None, &m, Clock::new());
        assert_eq!(
            bal.backend(0)
                .unwrap()
                .pick(avoid, 0)
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
        let bal = Balancer::new(&s, None, &m, Clock::new());
        let b = bal.backend(0).unwrap();
        trip(b, "127.0.0.1:1", &m);
        trip(b, "127.0.0.1:2", &m);
        assert_eq!(b.pick(None, 0).err(), Some(PickError::AllEjected));
        let empty = snapshot(&[("127.0.0.1:1", false)], BackendPolicy::default());
        let bal = Balancer::new(&empty, None, &m, Clock::new());
        assert_eq!(
            bal.backend(0).unwrap().pick(None, 0).err(),
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
        let bal1 = Balancer::new(&s1, None, &m, clock);
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
        let bal2 = Balancer::new(&s2, Some(&bal1), &m, clock);
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
        let bal3 = Balancer::new(&s3, Some(&bal2), &m, clock);
        assert_eq!(bal3.backend(0).unwrap().circuits.ejected(), 0);
    }
}
