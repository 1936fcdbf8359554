//! Backpressure: a concurrency limit with a bounded, timed queue, per backend or per
//! route, optionally adaptive. Beyond the queue a request is shed at once (503 with
//! `Retry-After`), so memory stays bounded whatever the offered load.
//!
//! Adaptive limits follow Netflix's concurrency-limits: `Gradient` compares a long-term
//! latency average with each sample and shrinks the limit as latency rises above it;
//! `AIMD` adds one while the limit is in use and cuts 10 % on a failure. Either way an
//! overloaded upstream sees its load trimmed before its latency explodes.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tern_config::snapshot::{AdaptiveAlgorithm, ConcurrencyLimit};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    QueueFull,
    QueueTimeout,
}

impl Shed {
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
        }
    }
}

pub struct Limiter {
    pub config: ConcurrencyLimit,
    /// What it limits: `namespace/service:port` or `namespace/route#rule`, as in metrics.
    pub name: Arc<str>,
    sem: Arc<Semaphore>,
    limit: AtomicU32,
    /// Permits to retire as they come back: the limit went down while they were out.
    debt: AtomicU32,
    waiting: AtomicU32,
    adaptive: Option<Mutex<Adaptive>>,
    /// The current limit, exported.
    gauge: Gauge,
    /// By [`Shed`]: queue_full, queue_timeout.
    shed: [Counter; 2],
}

struct Adaptive {
    limit: f64,
    /// Long-term latency average (microseconds).
    long_rtt: f64,
    samples: u64,
}

/// A request's place under the limit, given back on drop.
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    limiter: Arc<Limiter>,
    started: Instant,
}

/// Leaves the queue on drop, even when the waiting request is cancelled.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Limiter {
    pub fn new(config: ConcurrencyLimit, name: Arc<str>, gauge: Gauge, shed: [Counter; 2]) -> Self {
        let limit = config.max_concurrent.max(1);
        gauge.set(i64::from(limit));
        Limiter {
            adaptive: config.adaptive.map(|_| {
                Mutex::new(Adaptive {
                    limit: f64::from(limit),
                    long_rtt: 0.0,
                    samples: 0,
                })
            }),
            sem: Arc::new(Semaphore::new(limit as usize)),
            limit: AtomicU32::new(limit),
            debt: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            config,
            name,
            gauge,
            shed,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.limit()
            .saturating_sub(self.sem.available_permits() as u32)
    }

    /// A permit if one is free now (the fast path, no future). `now`: the caller's clock
    /// read, the permit's start.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        let p = self.sem.clone().try_acquire_owned().ok()?;
        Some(Permit {
            permit: Some(p),
            limiter: self.clone(),
            started: now,
        })
    }

    /// A permit now, after waiting in the queue, or the reason for shedding.
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, Shed> {
        let granted = |permit| Permit {
            permit: Some(permit),
            limiter: self.clone(),
            started: Instant::now(),
        };
        if let Some(p) = self.try_acquire(Instant::now()) {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.config.max_queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(self.shed(Shed::QueueFull));
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(self.config.queue_timeout, self.sem.clone().acquire_owned())
            .await
        {
            Ok(Ok(p)) => Ok(granted(p)),
            _ => Err(self.shed(Shed::QueueTimeout)),
        }
    }

    fn shed(&self, why: Shed) -> Shed {
        self.shed[why as usize].inc();
        why
    }

    /// Feeds one latency sample to the adaptive limit.
    fn sample(&self, rtt_us: f64, failed: bool) {
        let (Some(state), Some(cfg)) = (&self.adaptive, self.config.adaptive) else {
            return;
        };
        let new = {
            let mut a = state.lock().unwrap_or_else(|e| e.into_inner());
            a.samples += 1;
            // Long-term average: a plain mean for the first samples, then an EWMA over
            // about 600 samples (Netflix's Gradient2 window).
            let alpha = if a.samples < 10 {
                1.0 / a.samples as f64
            } else {
                2.0 / 601.0
            };
            a.long_rtt = if a.long_rtt == 0.0 {
                rtt_us
            } else {
                a.long_rtt * (1.0 - alpha) + rtt_us * alpha
            };
            let limit = a.limit;
            a.limit = match cfg.algorithm {
                AdaptiveAlgorithm::Gradient => {
                    // Recover quickly after a long overload: the long average must not
                    // stay far above the latency of an idle system.
                    if a.long_rtt / rtt_us > 2.0 {
                        a.long_rtt *= 0.95;
                    }
                    let gradient = (1.5 * a.long_rtt / rtt_us.max(1.0)).clamp(0.5, 1.0);
                    let target = limit * gradient + limit.sqrt();
                    limit * 0.8 + target * 0.2
                }
                AdaptiveAlgorithm::AIMD => {
                    if failed {
                        limit * 0.9
                    } else if f64::from(self.in_flight()) * 2.0 >= limit {
                        limit + 1.0
                    } else {
                        limit
                    }
                }
            }
            .clamp(f64::from(cfg.min_limit), f64::from(cfg.max_limit));
            a.limit.round() as u32
        };
        self.set_limit(new.max(1));
    }

    fn set_limit(&self, new: u32) {
        let old = self.limit.swap(new, Ordering::Relaxed);
        if new > old {
            let mut grow = new - old;
            // Cancel debt first: those permits simply stay in use.
            while grow > 0 {
                let debt = self.debt.load(Ordering::Relaxed);
                if debt == 0 {
                    break;
                }
                let pay = debt.min(grow);
                if self
                    .debt
                    .compare_exchange(debt, debt - pay, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    grow -= pay;
                }
            }
            self.sem.add_permits(grow as usize);
        } else if new < old {
            let shrink = (old - new) as usize;
            let forgotten = self.sem.forget_permits(shrink);
            self.debt
                .fetch_add((shrink - forgotten) as u32, Ordering::Relaxed);
        }
        self.gauge.set(i64::from(new));
    }
}

impl Permit {
    /// Reports the request's latency (to its response headers, at `at`) and whether it
    /// failed.
    pub fn sample(&self, failed: bool, at: Instant) {
        let rtt = at.saturating_duration_since(self.started);
        self.limiter.sample(rtt.as_secs_f64() * 1e6, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let l = &self.limiter;
        let mut debt = l.debt.load(Ordering::Relaxed);
        while debt > 0 {
            match l
                .debt
                .compare_exchange(debt, debt - 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    // Retire this permit instead of giving it back.
                    if let Some(p) = self.permit.take() {
                        p.forget();
                    }
                    return;
                }
                Err(seen) => debt = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tern_config::snapshot::Adaptive as AdaptiveConfig;

    fn limiter(max: u32, queue: u32, adaptive: Option<AdaptiveConfig>) -> Arc<Limiter> {
        Arc::new(Limiter::new(
            ConcurrencyLimit {
                max_concurrent: max,
                max_queue: queue,
                queue_timeout: Duration::from_millis(100),
                adaptive,
            },
            "ns/r#0".into(),
            Gauge::default(),
            Default::default(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn queue_is_bounded_and_timed() {
        let l = limiter(1, 1, None);
        let first = l.acquire().await.unwrap();
        // One may wait; the next is shed at once.
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(l.acquire().await.err(), Some(Shed::QueueFull));
        // The waiter times out after 100 ms.
        assert_eq!(waiter.await.unwrap(), Err(Shed::QueueTimeout));
        drop(first);
        assert!(l.acquire().await.is_ok());
        assert_eq!(l.shed[0].get(), 1);
        assert_eq!(l.shed[1].get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_gets_the_next_free_permit() {
        let l = limiter(1, 4, None);
        let first = l.acquire().await.unwrap();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await.is_ok() })
        };
        tokio::task::yield_now().await;
        drop(first);
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn gradient_shrinks_under_rising_latency_and_grows_back() {
        let l = limiter(
            100,
            0,
            Some(AdaptiveConfig {
                algorithm: AdaptiveAlgorithm::Gradient,
                min_limit: 5,
                max_limit: 200,
            }),
        );
        for _ in 0..50 {
            l.sample(1_000.0, false);
        }
        let steady = l.limit();
        assert!(steady >= 100, "{steady}");
        // Latency x10: the limit falls.
        for _ in 0..30 {
            l.sample(10_000.0, false);
        }
        let loaded = l.limit();
        assert!(loaded < steady / 2, "{steady} -> {loaded}");
        assert!(loaded >= 5);
        for _ in 0..200 {
            l.sample(1_000.0, false);
        }
        assert!(l.limit() > loaded * 2, "{loaded} -> {}", l.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_cuts_on_failure_and_lowering_the_limit_retires_permits() {
        let l = limiter(
            10,
            0,
            Some(AdaptiveConfig {
                algorithm: AdaptiveAlgorithm::AIMD,
                min_limit: 1,
                max_limit: 20,
            }),
        );
        let held: Vec<Permit> = futures_lite_acquire(&l, 10).await;
        for _ in 0..5 {
            l.sample(1_000.0, true);
        }
        let lowered = l.limit();
        assert!(lowered < 10, "{lowered}");
        drop(held);
        // Only `lowered` permits exist now.
        let again = futures_lite_acquire(&l, lowered as usize).await;
        assert_eq!(again.len(), lowered as usize);
        assert_eq!(l.acquire().await.err(), Some(Shed::QueueFull));
    }

    async fn futures_lite_acquire(l: &Arc<Limiter>, n: usize) -> Vec<Permit> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(l.acquire().await.unwrap());
        }
        out
    }
}
