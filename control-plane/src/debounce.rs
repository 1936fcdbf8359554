//! Debouncing of published snapshots: wait for a quiet period after a change, but never
//! longer than a maximum delay from the first change of a burst.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

/// Waits for the next batch of changes on `rx`: returns once `quiet` has passed without a
/// new change, or `max_delay` after the first change, whichever comes first. Returns
/// false when the sender is gone (and nothing is left to deliver). The caller then reads
/// the latest value with `borrow_and_update`.
pub async fn next_batch<T>(
    rx: &mut watch::Receiver<T>,
    quiet: Duration,
    max_delay: Duration,
) -> bool {
    if rx.changed().await.is_err() {
        return false;
    }
    let deadline = Instant::now() + max_delay;
    loop {
        let quiet_end = (Instant::now() + quiet).min(deadline);
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The source ended: deliver what it published last.
                    return true;
                }
                if Instant::now() >= deadline {
                    return true;
                }
            }
            () = sleep_until(quiet_end) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_delivered_once_after_the_quiet_period() {
        let (tx, mut rx) = watch::channel(0u32);
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            for i in 1..=5 {
                tx.send_replace(i);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(tx);
        });
        assert!(next_batch(&mut rx, QUIET, MAX).await);
        // Last change at 120 ms, then 100 ms of quiet.
        assert_eq!(start.elapsed(), Duration::from_millis(220));
        assert_eq!(*rx.borrow_and_update(), 5);
        // Nothing more until the sender goes away.
        assert!(!next_batch(&mut rx, QUIET, MAX).await);
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_changes_is_delivered_within_the_maximum_delay() {
        let (tx, mut rx) = watch::channel(0u32);
        let start = Instant::now();
        tokio::spawn(async move {
            for i in 1..=100 {
                tx.send_replace(i);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(next_batch(&mut rx, QUIET, MAX).await);
        let first = start.elapsed();
        assert!(
            first >= MAX && first < MAX + Duration::from_millis(60),
            "{first:?}"
        );
        let seen = *rx.borrow_and_update();
        assert!((20..=22).contains(&seen), "{seen}");
        assert!(next_batch(&mut rx, QUIET, MAX).await);
        assert!(start.elapsed() <= 2 * MAX + Duration::from_millis(100));
    }
}
