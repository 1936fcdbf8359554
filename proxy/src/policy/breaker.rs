//! Per-endpoint circuit breakers (outlier ejection), shared by every worker.
//!
//! Closed: requests flow; failures are counted in a row and over a window. Open: the
//! endpoint is out of load balancing until its ejection time ends; the time doubles with
//! each repeated trip, up to a maximum, plus jitter. Half-open: the next request (one
//! only) probes it; success closes the circuit, failure reopens it for longer.
//!
//! The state lives outside the config snapshot ([`crate::balance`] hands the same
//! `EndpointCircuit` to the next snapshot when the endpoint and its policy are unchanged),
//! and the hot path is atomics only: the mutex guards the details of a transition.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tern_config::snapshot::{BackendPolicy, CircuitBreaker};

use crate::metrics::{CircuitMetrics, Metrics};
use crate::policy::window::Window;

/// Wall-clock anchor for a monotonic clock: breakers count milliseconds since `origin`
/// (a tokio instant, pausable in tests) and report Unix times to people.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: tokio::time::Instant,
    origin_unix_ms: u64,
}

impl Clock {
    pub fn new() -> Self {
        let origin_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock {
            origin: tokio::time::Instant::now(),
            origin_unix_ms,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.ms_at(tokio::time::Instant::now())
    }

    /// `at`, in this clock's milliseconds.
    pub fn ms_at(&self, at: tokio::time::Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    pub fn unix_ms(&self, ms: u64) -> u64 {
        self.origin_unix_ms + ms
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// Why the last transition happened (the `reason` label of transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Consecutive,
    Rate,
    ProbeFailed,
    ProbeSucceeded,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Consecutive => "consecutive",
            Reason::Rate => "rate",
            Reason::ProbeFailed => "probe_failed",
            Reason::ProbeSucceeded => "probe_succeeded",
        }
    }
}

/// What the balancer may do with an endpoint right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, and this request is the half-open probe: its outcome decides the circuit.
    Probe,
    No,
}

pub struct EndpointCircuit {
    pub addr: SocketAddr,
    pub zone: Option<Arc<str>>,
    state: AtomicU8,
    consecutive: AtomicU32,
    /// While open: when the ejection ends (ms on the backend's clock).
    open_until: AtomicU64,
    probing: AtomicBool,
    /// (successes, failures).
    window: Window,
    detail: Mutex<Detail>,
    metrics: CircuitMetrics,
}

#[derive(Debug, Default)]
struct Detail {
    reason: Option<Reason>,
    since_ms: u64,
    trips: u32,
    closed_at_ms: u64,
}

impl EndpointCircuit {
    pub fn new(
        addr: SocketAddr,
        zone: Option<Arc<str>>,
        cb: &CircuitBreaker,
        metrics: CircuitMetrics,
        now_ms: u64,
    ) -> Self {
        let interval = cb
            .failure_rate
            .map_or(Duration::from_secs(10), |r| r.interval);
        metrics.set_state(State::Closed.as_str());
        EndpointCircuit {
            addr,
            zone,
            state: AtomicU8::new(State::Closed as u8),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            window: Window::new(interval),
            detail: Mutex::new(Detail {
                since_ms: now_ms,
                ..Detail::default()
            }),
            metrics,
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Whether a request may go to this endpoint now. An open circuit whose ejection has
    /// ended turns half-open and admits exactly one probe.
    pub fn admit(&self, now_ms: u64) -> Admit {
        match self.state() {
            State::Closed => Admit::Yes,
            State::Open => {
                if now_ms < self.open_until.load(Ordering::Relaxed) {
                    return Admit::No;
                }
                let mut d = self.lock();
                if self.state() != State::Open {
                    drop(d);
                    return self.admit(now_ms);
                }
                self.state.store(State::HalfOpen as u8, Ordering::Relaxed);
                self.probing.store(true, Ordering::Relaxed);
                d.since_ms = now_ms;
                self.metrics.set_state(State::HalfOpen.as_str());
                Admit::Probe
            }
            State::HalfOpen => {
                if self
                    .probing
                    .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    Admit::Probe
                } else {
                    Admit::No
                }
            }
        }
    }

    /// A probe that ended without an outcome (the client went away): let another request
    /// probe.
    pub fn abandon_probe(&self) {
        self.probing.store(false, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (successes, failures) over the recent window.
    pub fn recent(&self, now_ms: u64) -> (u64, u64) {
        self.window.sum(now_ms)
    }

    /// Removes this circuit's series (its endpoint left the config).
    pub fn forget_metrics(&self, metrics: &Metrics) {
        metrics.forget_circuit(&self.metrics);
    }

    pub fn is_ejected(&self) -> bool {
        self.state() != State::Closed
    }

    fn set(&self, d: &mut Detail, state: State, reason: Reason, now_ms: u64, metrics: &Metrics) {
        self.state.store(state as u8, Ordering::Relaxed);
        d.reason = Some(reason);
        d.since_ms = now_ms;
        self.metrics.set_state(state.as_str());
        metrics.circuit_transition(&self.metrics, reason.as_str());
    }
}

/// The circuits of one backend's ready endpoints, with the policy they follow.
pub struct BackendCircuits {
    pub name: Arc<str>,
    pub policy: Arc<BackendPolicy>,
    pub endpoints: Box<[Arc<EndpointCircuit>]>,
    pub clock: Clock,
}

impl BackendCircuits {
    /// How many endpoints may be ejected at once: `maxEjectedPercent` of them, at least
    /// one when the percentage is not zero, never all unless it is 100.
    pub fn max_ejected(&self) -> usize {
        let n = self.endpoints.len();
        let pct = self.policy.circuit_breaker.ejection.max_ejected_percent as usize;
        match pct {
            0 => 0,
            100.. => n,
            _ => (n * pct / 100).max(1).min(n.saturating_sub(1)),
        }
    }

    pub fn ejected(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_ejected()).count()
    }

    /// Records the outcome of one attempt at `ep`. `probe`: this attempt was admitted as
    /// the half-open probe.
    pub fn record(
        &self,
        ep: &EndpointCircuit,
        failed: bool,
        probe: bool,
        now_ms: u64,
        metrics: &Metrics,
    ) {
        let cb = &self.policy.circuit_breaker;
        if !failed {
            ep.window.add(now_ms, 1, 0);
            if ep.consecutive.load(Ordering::Relaxed) != 0 {
                ep.consecutive.store(0, Ordering::Relaxed);
            }
            if probe {
                let mut d = ep.lock();
                if ep.state() == State::HalfOpen {
                    ep.set(
                        &mut d,
                        State::Closed,
                        Reason::ProbeSucceeded,
                        now_ms,
                        metrics,
                    );
                    d.closed_at_ms = now_ms;
                }
                ep.probing.store(false, Ordering::Relaxed);
            }
            return;
        }
        ep.window.add(now_ms, 0, 1);
        let in_a_row = ep.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if probe {
            let mut d = ep.lock();
            if ep.state() == State::HalfOpen {
                self.eject(ep, &mut d, Reason::ProbeFailed, now_ms, metrics);
            }
            ep.probing.store(false, Ordering::Relaxed);
            return;
        }
        if ep.state() != State::Closed {
            return;
        }
        let reason = if cb.consecutive_failures.is_some_and(|n| in_a_row >= n) {
            Reason::Consecutive
        } else if let Some(rate) = cb.failure_rate {
            let (ok, bad) = ep.window.sum(now_ms);
            let total = ok + bad;
            if total >= u64::from(rate.min_requests) && bad * 100 >= u64::from(rate.percent) * total
            {
                Reason::Rate
            } else {
                return;
            }
        } else {
            return;
        };
        let mut d = ep.lock();
        if ep.state() != State::Closed {
            return;
        }
        if self.ejected() >= self.max_ejected() {
            // Ejecting one more would leave too few endpoints: keep serving from it.
            ep.consecutive.store(0, Ordering::Relaxed);
            metrics.circuit_refused(&self.name);
            return;
        }
        self.eject(ep, &mut d, reason, now_ms, metrics);
    }

    fn eject(
        &self,
        ep: &EndpointCircuit,
        d: &mut Detail,
        reason: Reason,
        now_ms: u64,
        metrics: &Metrics,
    ) {
        let ej = self.policy.circuit_breaker.ejection;
        // A trip long after the last recovery starts the doubling again.
        if reason != Reason::ProbeFailed
            && now_ms.saturating_sub(d.closed_at_ms) > ej.max.as_millis() as u64
        {
            d.trips = 0;
        }
        d.trips = d.trips.saturating_add(1);
        let time = ejection_time(ej.base, ej.max, d.trips);
        ep.open_until.store(now_ms + time, Ordering::Relaxed);
        ep.consecutive.store(0, Ordering::Relaxed);
        ep.set(d, State::Open, reason, now_ms, metrics);
        ep.metrics
            .set_last_trip(self.clock.unix_ms(now_ms) as f64 / 1000.0);
    }

    /// The `/circuits` view of this backend.
    pub fn to_json(&self) -> Value {
        let now = self.clock.now_ms();
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|ep| {
                let d = ep.lock();
                let state = ep.state();
                let (ok, bad) = ep.recent(now);
                json!({
                    "address": ep.addr.to_string(),
                    "zone": ep.zone.as_deref(),
                    "state": state.as_str(),
                    "reason": d.reason.map(Reason::as_str),
                    "since_unix_ms": self.clock.unix_ms(d.since_ms),
                    "next_probe_unix_ms": (state == State::Open)
                        .then(|| self.clock.unix_ms(ep.open_until.load(Ordering::Relaxed))),
                    "consecutive_failures": ep.consecutive.load(Ordering::Relaxed),
                    "trips": d.trips,
                    "recent": {
                        "success": ok,
                        "failure": bad,
                        "interval_seconds": ep.window.interval().as_secs_f64(),
                    },
                })
            })
            .collect();
        json!({
            "backend": &*self.name,
            "policy": self.policy.source.as_ref().map(|s| s.to_string()),
            "endpoints_total": self.endpoints.len(),
            "ejected": self.ejected(),
            "max_ejected": self.max_ejected(),
            "endpoints": endpoints,
        })
    }
}

/// `base` x 2^(trips-1), capped at `max`, plus up to 10 % jitter so that endpoints
/// ejected together are not probed together. In milliseconds.
fn ejection_time(base: Duration, max: Duration, trips: u32) -> u64 {
    let base = base.as_millis() as u64;
    let max = (max.as_millis() as u64).max(base);
    let doubled = base.saturating_mul(1u64 << trips.saturating_sub(1).min(30));
    let time = doubled.min(max);
    time + fastrand::u64(0..=time / 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_config::snapshot::{FailureRate, ObjectRef};

    fn circuits(n: usize, cb: CircuitBreaker, metrics: &Metrics) -> BackendCircuits {
        let clock = Clock::new();
        let name: Arc<str> = "ns/web:80".into();
        let endpoints = (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(EndpointCircuit::new(
                    addr,
                    None,
                    &cb,
                    metrics.circuit(&name, addr, None),
                    clock.now_ms(),
                ))
            })
            .collect();
        BackendCircuits {
            name,
            policy: Arc::new(BackendPolicy {
                source: Some(ObjectRef {
                    namespace: "ns".into(),
                    name: "web".into(),
                }),
                circuit_breaker: cb,
                ..BackendPolicy::default()
            }),
            endpoints,
            clock,
        }
    }

    fn fail(b: &BackendCircuits, i: usize, m: &Metrics) {
        b.record(&b.endpoints[i], true, false, b.clock.now_ms(), m);
    }

    #[tokio::test(start_paused = true)]
    async fn trips_after_consecutive_failures_then_probes_and_closes() {
        let m = Metrics::new();
        let b = circuits(3, CircuitBreaker::default(), &m);
        let ep = &b.endpoints[0];
        for _ in 0..4 {
            fail(&b, 0, &m);
        }
        assert_eq!(ep.state(), State::Closed);
        // A success in between resets the run.
        b.record(ep, false, false, b.clock.now_ms(), &m);
        for _ in 0..4 {
            fail(&b, 0, &m);
        }
        assert_eq!(ep.state(), State::Closed);
        fail(&b, 0, &m);
        assert_eq!(ep.state(), State::Open);
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::No);

        // Base ejection 5 s (+ up to 10 %).
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::No);
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::Probe);
        assert_eq!(ep.state(), State::HalfOpen);
        // Only one probe at a time.
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::No);
        b.record(ep, false, true, b.clock.now_ms(), &m);
        assert_eq!(ep.state(), State::Closed);
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::Yes);
        let text = m.encode();
        assert!(text.contains("reason=\"consecutive\"} 1"), "{text}");
        assert!(text.contains("reason=\"probe_succeeded\"} 1"), "{text}");
        assert!(
            text.contains("endpoint=\"127.0.0.1:1000\",zone=\"\",state=\"closed\"} 1"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_longer() {
        let m = Metrics::new();
        let b = circuits(3, CircuitBreaker::default(), &m);
        let ep = &b.endpoints[1];
        for _ in 0..5 {
            fail(&b, 1, &m);
        }
        tokio::time::advance(Duration::from_millis(5_600)).await;
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::Probe);
        b.record(ep, true, true, b.clock.now_ms(), &m);
        assert_eq!(ep.state(), State::Open);
        // Second trip: 10 s.
        tokio::time::advance(Duration::from_millis(9_000)).await;
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::No);
        tokio::time::advance(Duration::from_millis(2_100)).await;
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::Probe);
        assert!(m.encode().contains("reason=\"probe_failed\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_lets_another_request_probe() {
        let m = Metrics::new();
        let b = circuits(3, CircuitBreaker::default(), &m);
        let ep = &b.endpoints[0];
        for _ in 0..5 {
            fail(&b, 0, &m);
        }
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::Probe);
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::No);
        ep.abandon_probe();
        assert_eq!(ep.admit(b.clock.now_ms()), Admit::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_trips_with_enough_requests() {
        let m = Metrics::new();
        let cb = CircuitBreaker {
            consecutive_failures: None,
            failure_rate: Some(FailureRate {
                percent: 50,
                min_requests: 20,
                interval: Duration::from_secs(10),
            }),
            ..CircuitBreaker::default()
        };
        let b = circuits(2, cb, &m);
        let ep = &b.endpoints[0];
        // 9 failures and 9 successes: 50 %, but only 18 requests.
        for _ in 0..9 {
            b.record(ep, false, false, b.clock.now_ms(), &m);
            fail(&b, 0, &m);
        }
        assert_eq!(ep.state(), State::Closed);
        b.record(ep, false, false, b.clock.now_ms(), &m);
        fail(&b, 0, &m);
        assert_eq!(ep.state(), State::Open);
        assert!(m.encode().contains("reason=\"rate\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_is_capped_and_never_takes_every_endpoint() {
        let m = Metrics::new();
        let b = circuits(3, CircuitBreaker::default(), &m);
        assert_eq!(b.max_ejected(), 1);
        for i in 0..3 {
            for _ in 0..5 {
                fail(&b, i, &m);
            }
        }
        assert_eq!(b.ejected(), 1);
        assert_eq!(b.endpoints[1].state(), State::Closed);
        assert_eq!(b.endpoints[2].state(), State::Closed);

        let all = CircuitBreaker {
            ejection: tern_config::snapshot::Ejection {
                max_ejected_percent: 100,
                ..Default::default()
            },
            ..CircuitBreaker::default()
        };
        let b = circuits(2, all, &m);
        assert_eq!(b.max_ejected(), 2);
        let single = circuits(1, CircuitBreaker::default(), &m);
        assert_eq!(single.max_ejected(), 0);
    }

    #[test]
    fn ejection_time_doubles_up_to_max() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(120);
        for (trips, expect) in [
            (1, 5_000),
            (2, 10_000),
            (3, 20_000),
            (6, 120_000),
            (40, 120_000),
        ] {
            let t = ejection_time(base, max, trips);
            assert!((expect..=expect + expect / 10).contains(&t), "{trips}: {t}");
        }
    }
}
