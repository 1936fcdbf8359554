//! A connection's timer, polled only when it may have fired.
//!
//! Polling a tokio `Sleep` registers the task's waker with it again, two locked
//! instructions, even when that waker is registered already. A connection's timer (idle,
//! header, request deadline) is polled on every wake of its task, nearly always for
//! another reason. Once a poll has registered the waker, it stays registered until the
//! timer fires (which wakes the task and takes the waker) or is reset: until then, asking
//! whether it fired is a plain load.
//!
//! Only for a timer that one task polls: a poll from another task would find the first
//! task's waker registered, not its own.

use std::future::Future;
use std::ops::DerefMut;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub struct QuietSleep<P> {
    sleep: Pin<P>,
    /// A poll left this task's waker with the timer, and nothing has taken it since.
    registered: bool,
}

impl<P: DerefMut<Target = Sleep>> QuietSleep<P> {
    pub fn new(sleep: Pin<P>) -> Self {
        QuietSleep {
            sleep,
            registered: false,
        }
    }

    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        let fired = self.sleep.as_mut().poll(cx);
        self.registered = fired.is_pending();
        fired
    }

    pub fn reset(&mut self, deadline: Instant) {
        self.sleep.as_mut().reset(deadline);
        self.registered = false;
    }

    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn fires_once_registered_and_again_after_a_reset() {
        let start = Instant::now();
        let mut t = QuietSleep::new(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
        // Polled many times while waiting (as a connection's other wakes would).
        let mut polls = 0;
        poll_fn(|cx| {
            polls += 1;
            if polls < 5 {
                // Another reason to be woken: a later poll must still see the timer.
                cx.waker().wake_by_ref();
            }
            t.poll_fired(cx)
        })
        .await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(polls >= 5);
        // Reset from the past: it waits again, for the new deadline.
        t.reset(Instant::now() + Duration::from_secs(2));
        poll_fn(|cx| t.poll_fired(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        // Reset earlier while registered for a later deadline: the earlier one holds.
        t.reset(Instant::now() + Duration::from_secs(10));
        assert!(poll_fn(|cx| Poll::Ready(t.poll_fired(cx).is_pending())).await);
        t.reset(Instant::now() + Duration::from_millis(100));
        poll_fn(|cx| t.poll_fired(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(3100));
    }
}
