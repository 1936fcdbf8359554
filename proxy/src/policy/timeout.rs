//! Timeouts (Gateway API `timeouts`): `request` caps the whole exchange up to the
//! response headers, `backendRequest` caps one attempt at a backend. Expiry is a 504.

use std::future::Future;

use tern_config::snapshot::Timeouts;

use crate::rescue::ProxyError;

/// Runs one attempt under both timeouts. The tighter one fires first and names itself in
/// the error, so a user can tell which setting to change.
pub async fn run<F, T>(timeouts: Timeouts, attempt: F) -> Result<T, ProxyError>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    let attempt = async {
        match timeouts.backend_request {
            Some(limit) => tokio::time::timeout(limit, attempt)
                .await
                .unwrap_or(Err(ProxyError::BackendTimeout(limit))),
            None => attempt.await,
        }
    };
    match timeouts.request {
        Some(limit) => tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or(Err(ProxyError::RequestTimeout(limit))),
        None => attempt.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn slow() -> Result<u8, ProxyError> {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(1)
    }

    #[tokio::test(start_paused = true)]
    async fn backend_timeout_fires_first() {
        let t = Timeouts {
            request: Some(Duration::from_secs(10)),
            backend_request: Some(Duration::from_secs(2)),
        };
        let err = run(t, slow()).await.unwrap_err();
        assert!(matches!(err, ProxyError::BackendTimeout(d) if d == Duration::from_secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn request_timeout_caps_everything() {
        let t = Timeouts {
            request: Some(Duration::from_secs(1)),
            backend_request: None,
        };
        let err = run(t, slow()).await.unwrap_err();
        assert!(matches!(err, ProxyError::RequestTimeout(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeouts_waits() {
        let r = run(Timeouts::default(), async { Ok::<_, ProxyError>(7) }).await;
        assert_eq!(r.unwrap(), 7);
    }
}
