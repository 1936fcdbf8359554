//! Backpressure: a concurrency limit with a bounded, timed queue, per backend or per
//! route, optionally adaptive. Beyond the queue a request is shed at once (503 with
//! `Retry-After`), so memory stays bounded whatever the offered load.
//!
//! Adaptive limits follow Netflix's concurrency-limits: `Gradient` compares a long-term
//! latency average with each sample and shrinks the limit as latency rises above it;
//! `AIMD` adds one while the limit is in use and cuts 10 % on a failure. Either way an
//! overloaded upstream sees its load trimmed before its latency explodes.
//!
//! The count is one atomic: taking and giving back a permit is a compare-and-swap and a
//! subtraction, with no lock (a semaphore's release takes its waiters' lock every time).
//! Queued requests wait on a `Notify`, woken one per permit given back, in order.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tern_config::snapshot::{AdaptiveAlgorithm, ConcurrencyLimit};
use tokio::sync::Notify;

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
    /// Permits out. It may exceed `limit` for a while after the limit went down: no
    /// permit is taken until enough have come back.
    in_flight: AtomicU32,
    limit: AtomicU32,
    /// Requests in the queue. While any wait, a new request queues behind them rather than
    /// taking a permit that was given back for them.
    waiting: AtomicU32,
    /// Woken once per permit given back while requests wait.
    freed: Notify,
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

/// A request's place under the limit, given back on drop. (Its start time stays with the
/// request: a permit is held in the response body, moved at every level, so it is kept
/// to one pointer.)
pub struct Permit {
    limiter: Arc<Limiter>,
}

/// Leaves the queue on drop, even when the waiting request is cancelled.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(limit),
            waiting: AtomicU32::new(0),
            freed: Notify::new(),
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
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A permit if one is free now and nobody queues for it (the fast path, no future).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return None;
        }
        self.take()
    }

    /// A permit if the count is under the limit.
    fn take(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut out = self.in_flight.load(Ordering::SeqCst);
        loop {
            if out >= limit {
                return None;
            }
            // SeqCst with `waiting`: a request that queues after a permit came back sees
            // it here (see `Drop for Permit`).
            match self.in_flight.compare_exchange_weak(
                out,
                out + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    return Some(Permit {
                        limiter: self.clone(),
                    });
                }
                Err(seen) => out = seen,
            }
        }
    }

    /// A permit now, after waiting in the queue, or the reason for shedding.
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, Shed> {
        if let Some(p) = self.try_acquire() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.config.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(self.shed(Shed::QueueFull));
        }
        let _waiting = Waiting(&self.waiting);
        let deadline = Instant::now() + self.config.queue_timeout;
        loop {
            // Registered before looking: a permit given back after the look wakes it.
            let mut freed = std::pin::pin!(self.freed.notified());
            freed.as_mut().enable();
            if let Some(p) = self.take() {
                return Ok(p);
            }
            // A wake-up that loses its permit to another waiter waits again. (A
            // notification this waiter received but dropped on timing out goes on to
            // the next waiter.)
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(self.shed(Shed::QueueTimeout));
            }
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
        // Lower: permits out above it are not replaced as they come back. Higher: queued
        // requests may take the new room now.
        for _ in 0..new
            .saturating_sub(old)
            .min(self.waiting.load(Ordering::SeqCst))
        {
            self.freed.notify_one();
        }
        self.gauge.set(i64::from(new));
    }
}

impl Permit {
    /// Reports the request's latency (from `started`, when the permit was granted, to its
    /// response headers, at `at`) and whether it failed.
    pub fn sample(&self, started: Instant, failed: bool, at: Instant) {
        if self.limiter.adaptive.is_none() {
            return;
        }
        let rtt = at.saturating_duration_since(started);
        self.limiter.sample(rtt.as_secs_f64() * 1e6, failed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let l = &self.limiter;
        l.in_flight.fetch_sub(1, Ordering::SeqCst);
        // A request that queued before the subtraction is woken; one that queues after
        // it finds the room when it looks (SeqCst on both counters).
        if l.waiting.load(Ordering::SeqCst) > 0 {
            l.freed.notify_one();
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

    #[tokio::test(start_paused = true)]
    async fn freed_permits_serve_the_queue_in_order_before_newcomers() {
        let l = limiter(1, 4, None);
        let first = l.acquire().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let (l, tx) = (l.clone(), tx.clone());
            tokio::spawn(async move {
                let p = l.acquire().await.unwrap();
                assert_eq!(l.in_flight(), 1, "one permit out at a time");
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(p);
            });
            tokio::task::yield_now().await;
        }
        drop(first);
        // Given back for the queue: a request that did not wait does not take it.
        assert!(l.try_acquire().is_none());
        let mut served = Vec::new();
        for _ in 0..3 {
            served.push(rx.recv().await.unwrap());
        }
        assert_eq!(served, [0, 1, 2]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.in_flight(), 0);
        assert!(l.try_acquire().is_some());
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
