//! What an endpoint costs right now: requests in flight and a peak-EWMA of its latency
//! (Finagle's / Linkerd's "peak EWMA": a slow response raises the estimate at once, fast
//! ones bring it down gradually), plus a back-off window after it answered 429/503 with
//! `Retry-After`. Shared by every worker: atomics only.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// How fast old latency is forgotten (the EWMA's time constant).
const DECAY_MS: f64 = 10_000.0;

#[derive(Debug, Default)]
pub struct Load {
    pending: AtomicU32,
    /// Latency estimate in microseconds (f64 bits); 0 until the first response.
    ewma: AtomicU64,
    /// When `ewma` was last updated (ms on the balancer's clock).
    stamp: AtomicU64,
    /// No new requests before this (ms), unless every other endpoint is worse off.
    backoff_until: AtomicU64,
}

/// One request in flight at an endpoint; counted until dropped.
pub struct InFlight<'a> {
    load: &'a Load,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Load {
    pub fn start(&self) -> InFlight<'_> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight { load: self }
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The latency estimate in microseconds (0: none yet).
    pub fn ewma_us(&self) -> f64 {
        f64::from_bits(self.ewma.load(Ordering::Relaxed))
    }

    /// P2C's cost: latency x (requests in flight + 1). The estimate decays with the time
    /// since it was last updated, so an endpoint avoided for being slow is tried again
    /// eventually. An endpoint never measured costs nothing while idle (new endpoints get
    /// traffic at once) and a lot while busy.
    pub fn cost(&self, now_ms: u64) -> f64 {
        let pending = f64::from(self.pending());
        let ewma = self.ewma_us();
        if ewma == 0.0 {
            return if pending == 0.0 { 0.0 } else { 1e9 + pending };
        }
        let idle = now_ms.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        ewma * (-idle / DECAY_MS).exp() * (pending + 1.0)
    }

    /// Records a response latency.
    pub fn observe(&self, rtt_us: f64, now_ms: u64) {
        let old = self.ewma_us();
        let last = self.stamp.swap(now_ms, Ordering::Relaxed);
        let new = if old == 0.0 || rtt_us > old {
            // Peak: a slower response counts in full at once.
            rtt_us
        } else if now_ms == last {
            // Within the same millisecond the weight of the past is 1 (no exp needed).
            return;
        } else {
            let elapsed = now_ms.saturating_sub(last) as f64;
            let w = (-elapsed / DECAY_MS).exp();
            old * w + rtt_us * (1.0 - w)
        };
        self.ewma.store(new.to_bits(), Ordering::Relaxed);
    }

    pub fn back_off(&self, until_ms: u64) {
        self.backoff_until.fetch_max(until_ms, Ordering::Relaxed);
    }

    pub fn backing_off(&self, now_ms: u64) -> bool {
        now_ms < self.backoff_until.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn peak_then_decay() {
        let l = Arc::new(Load::default());
        assert_eq!(l.cost(0), 0.0);
        l.observe(1_000.0, 0);
        assert_eq!(l.ewma_us(), 1_000.0);
        // A slow response counts at once.
        l.observe(10_000.0, 1);
        assert_eq!(l.ewma_us(), 10_000.0);
        // Fast ones bring it down gradually: after one time constant, ~63 % of the way.
        l.observe(1_000.0, 10_001);
        let e = l.ewma_us();
        assert!((4_000.0..4_500.0).contains(&e), "{e}");
        let busy = l.start();
        assert!(l.cost(10_001) > e * 1.9);
        // Left alone, the estimate fades.
        assert!(l.cost(60_000) < e / 10.0);
        drop(busy);
        assert_eq!(l.pending(), 0);
    }

    #[test]
    fn unmeasured_busy_endpoints_are_expensive() {
        let l = Arc::new(Load::default());
        let _busy = l.start();
        assert!(l.cost(0) > 1e8);
        l.back_off(100);
        assert!(l.backing_off(99));
        assert!(!l.backing_off(100));
    }
}
