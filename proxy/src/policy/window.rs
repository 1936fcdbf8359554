//! Two counts over a sliding time window (successes and failures, requests and retries),
//! kept in buckets of atomics so every worker can record without a lock.
//!
//! Time is milliseconds since an origin chosen by the owner (a `tokio::time::Instant`, so
//! tests can run on a paused clock). A bucket that comes round again is reset by the
//! first writer that notices; a count racing with that reset may be lost, which is fine
//! for thresholds over hundreds of requests.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: u64 = 10;

pub struct Window {
    buckets: [Bucket; BUCKETS as usize],
    bucket_ms: u64,
}

#[derive(Default)]
struct Bucket {
    /// Which bucket period this holds, plus one (0: never written).
    epoch: AtomicU64,
    a: AtomicU32,
    b: AtomicU32,
}

impl Window {
    pub fn new(interval: Duration) -> Self {
        let ms = interval
            .as_millis()
            .clamp(BUCKETS as u128, u64::MAX as u128) as u64;
        Window {
            buckets: Default::default(),
            bucket_ms: ms / BUCKETS,
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.bucket_ms * BUCKETS)
    }

    pub fn add(&self, now_ms: u64, a: u32, b: u32) {
        let epoch = now_ms / self.bucket_ms + 1;
        let bucket = &self.buckets[(epoch % BUCKETS) as usize];
        let seen = bucket.epoch.load(Ordering::Relaxed);
        if seen != epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            bucket.a.store(0, Ordering::Relaxed);
            bucket.b.store(0, Ordering::Relaxed);
        }
        if a > 0 {
            bucket.a.fetch_add(a, Ordering::Relaxed);
        }
        if b > 0 {
            bucket.b.fetch_add(b, Ordering::Relaxed);
        }
    }

    /// Both counts over the last interval (the current, partial bucket included).
    pub fn sum(&self, now_ms: u64) -> (u64, u64) {
        let current = now_ms / self.bucket_ms + 1;
        let oldest = current.saturating_sub(BUCKETS - 1);
        let (mut a, mut b) = (0, 0);
        for bucket in &self.buckets {
            let epoch = bucket.epoch.load(Ordering::Relaxed);
            if epoch >= oldest && epoch <= current {
                a += u64::from(bucket.a.load(Ordering::Relaxed));
                b += u64::from(bucket.b.load(Ordering::Relaxed));
            }
        }
        (a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expire_after_the_interval() {
        let w = Window::new(Duration::from_secs(10));
        w.add(0, 1, 0);
        w.add(500, 2, 1);
        w.add(5_000, 0, 3);
        assert_eq!(w.sum(5_000), (3, 4));
        // At 10.5 s the first second's bucket has left the window.
        assert_eq!(w.sum(10_500), (0, 3));
        assert_eq!(w.sum(15_000), (0, 0));
    }

    #[test]
    fn a_reused_bucket_starts_from_zero() {
        let w = Window::new(Duration::from_secs(1));
        w.add(0, 5, 5);
        w.add(1_000, 1, 0); // same slot, next round
        assert_eq!(w.sum(1_000), (1, 0));
    }
}
