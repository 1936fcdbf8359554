//! Timeouts (Gateway API `timeouts`): `request` caps the whole exchange up to the
//! response headers, every attempt and backoff included; `backendRequest` caps one
//! attempt at a backend. Expiry is a 504 that names which of the two fired, so a user can
//! tell which setting to change.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::quiet::QuietSleep;

/// A limit, and the instant it runs out (the caller has read the clock already).
pub fn within(limit: Duration, now: Instant) -> (Duration, Instant) {
    (limit, now + limit)
}

/// One timer for the request deadlines of an HTTP/1.1 connection, whose requests come one
/// at a time. A timer per request is registered in the runtime's timer wheel and taken
/// out again (~500 instructions a request, measured). This one is moved only when a
/// deadline comes earlier than the one it is set for; a later deadline is only noted,
/// and the timer moves to it when it fires early (a reset is a few locked instructions,
/// on every request otherwise). Made on the first request with a deadline. Owned by the
/// connection and lent to one request at a time, so it needs no lock.
#[derive(Default)]
pub struct ConnTimer(Option<Armed>);

struct Armed {
    timer: QuietSleep<Box<Sleep>>,
    /// The current request's deadline (the timer may be set earlier).
    deadline: Instant,
}

impl ConnTimer {
    fn arm(&mut self, deadline: Instant) {
        match self.0.as_mut() {
            Some(a) => {
                a.deadline = deadline;
                if deadline < a.timer.deadline() {
                    a.timer.reset(deadline);
                }
            }
            None => {
                self.0 = Some(Armed {
                    timer: QuietSleep::new(Box::pin(tokio::time::sleep_until(deadline))),
                    deadline,
                })
            }
        }
    }

    /// Whether the deadline `arm` set has passed (else the task is woken when it does).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(a) = self.0.as_mut() else {
            return true;
        };
        while a.timer.poll_fired(cx).is_ready() {
            if a.timer.deadline() >= a.deadline {
                return true;
            }
            // Fired for an earlier request's deadline: on to this one's.
            let deadline = a.deadline;
            a.timer.reset(deadline);
        }
        false
    }
}

/// Runs `fut` until `limit`'s deadline (no limit: as long as it takes); on expiry, the
/// error `expired` makes from the limit. With `timer` (an HTTP/1.1 connection's, see
/// [`ConnTimer`]) the deadline is kept there; else a timer of its own.
///
/// `fut` is pinned by the caller, in place: the attempt futures are several KB, and
/// moving one into a timeout wrapper copied all of it on every request (measured).
pub async fn cap<F, T, E>(
    limit: Option<(Duration, Instant)>,
    expired: fn(Duration) -> E,
    mut fut: Pin<&mut F>,
    timer: Option<&mut ConnTimer>,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    match (limit, timer) {
        (Some((limit, deadline)), Some(timer)) => {
            timer.arm(deadline);
            poll_fn(|cx| {
                if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                    return Poll::Ready(v);
                }
                if timer.poll_expired(cx) {
                    return Poll::Ready(Err(expired(limit)));
                }
                Poll::Pending
            })
            .await
        }
        (Some((limit, deadline)), None) => tokio::time::timeout_at(deadline, fut)
            .await
            .unwrap_or_else(|_| Err(expired(limit))),
        (None, _) => fut.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rescue::ProxyError;

    async fn slow() -> Result<u8, ProxyError> {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(1)
    }

    #[tokio::test(start_paused = true)]
    async fn the_tighter_timeout_fires_and_names_itself() {
        let inner = slow();
        tokio::pin!(inner);
        let per_try = cap(
            Some(within(Duration::from_secs(2), Instant::now())),
            ProxyError::BackendTimeout,
            inner,
            None,
        );
        tokio::pin!(per_try);
        let err = cap(
            Some(within(Duration::from_secs(10), Instant::now())),
            ProxyError::RequestTimeout,
            per_try,
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProxyError::BackendTimeout(d) if d == Duration::from_secs(2)));

        let fut = slow();
        tokio::pin!(fut);
        let err = cap(
            Some(within(Duration::from_secs(1), Instant::now())),
            ProxyError::RequestTimeout,
            fut,
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProxyError::RequestTimeout(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connections_timer_caps_each_of_its_requests() {
        let mut timer = ConnTimer::default();
        // Quick requests: each answers before its deadline, which moves later each time.
        for _ in 0..3 {
            let quick = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, ProxyError>(1)
            };
            tokio::pin!(quick);
            let limit = Some(within(Duration::from_secs(1), Instant::now()));
            let got = cap(limit, ProxyError::RequestTimeout, quick, Some(&mut timer));
            assert_eq!(got.await.unwrap(), 1);
        }
        // A slow one times out at its own deadline, not an earlier request's.
        let started = Instant::now();
        let fut = slow();
        tokio::pin!(fut);
        let limit = Some(within(Duration::from_secs(1), started));
        let err = cap(limit, ProxyError::RequestTimeout, fut, Some(&mut timer))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::RequestTimeout(d) if d == Duration::from_secs(1)));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        // After one that expired, the next request's deadline holds again: a shorter
        // one first, then one with room.
        let fut = slow();
        tokio::pin!(fut);
        let started = Instant::now();
        let limit = Some(within(Duration::from_millis(200), started));
        assert!(
            cap(limit, ProxyError::RequestTimeout, fut, Some(&mut timer))
                .await
                .is_err()
        );
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        let quick = async { Ok::<_, ProxyError>(2) };
        tokio::pin!(quick);
        let limit = Some(within(Duration::from_secs(5), Instant::now()));
        let got = cap(limit, ProxyError::RequestTimeout, quick, Some(&mut timer));
        assert_eq!(got.await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_moves_the_timer_back() {
        let mut timer = ConnTimer::default();
        let quick = async { Ok::<_, ProxyError>(1) };
        tokio::pin!(quick);
        let limit = Some(within(Duration::from_secs(5), Instant::now()));
        let got = cap(limit, ProxyError::RequestTimeout, quick, Some(&mut timer));
        assert_eq!(got.await.unwrap(), 1);
        // The timer is set for 5 s; this request's deadline is sooner and holds.
        let started = Instant::now();
        let fut = slow();
        tokio::pin!(fut);
        let limit = Some(within(Duration::from_millis(100), started));
        assert!(
            cap(limit, ProxyError::RequestTimeout, fut, Some(&mut timer))
                .await
                .is_err()
        );
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_waits() {
        let fut = async { Ok::<_, ProxyError>(7) };
        tokio::pin!(fut);
        assert_eq!(
            cap(None, ProxyError::RequestTimeout, fut, None)
                .await
                .unwrap(),
            7
        );
    }
}
