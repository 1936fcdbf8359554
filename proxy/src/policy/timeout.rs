//! Timeouts (Gateway API `timeouts`): `request` caps the whole exchange up to the
//! response headers, every attempt and backoff included; `backendRequest` caps one
//! attempt at a backend. Expiry is a 504 that names which of the two fired, so a user can
//! tell which setting to change.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

/// A limit, and the instant it runs out (the caller has read the clock already).
pub fn within(limit: Duration, now: Instant) -> (Duration, Instant) {
    (limit, now + limit)
}

/// Runs `fut` until `limit`'s deadline (no limit: as long as it takes); on expiry, the
/// error `expired` makes from the limit.
///
/// `fut` is pinned by the caller, in place: the attempt futures are several KB, and
/// moving one into a timeout wrapper copied all of it on every request (measured).
pub async fn cap<F, T, E>(
    limit: Option<(Duration, Instant)>,
    expired: fn(Duration) -> E,
    fut: Pin<&mut F>,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    match limit {
        Some((limit, deadline)) => tokio::time::timeout_at(deadline, fut)
            .await
            .unwrap_or_else(|_| Err(expired(limit))),
        None => fut.await,
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
        );
        tokio::pin!(per_try);
        let err = cap(
            Some(within(Duration::from_secs(10), Instant::now())),
            ProxyError::RequestTimeout,
            per_try,
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
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProxyError::RequestTimeout(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_waits() {
        let fut = async { Ok::<_, ProxyError>(7) };
        tokio::pin!(fut);
        assert_eq!(cap(None, ProxyError::RequestTimeout, fut).await.unwrap(), 7);
    }
}
