//! Per-request policies, one file each, in the order a request meets them: timeouts,
//! retries (with their budget), then, per attempt, limits and the endpoint's circuit
//! breaker. Rate limits and concurrency limits come beside these.

pub mod breaker;
pub mod concurrency;
pub mod limits;
pub mod rate_limit;
pub mod retry;
pub mod retry_budget;
pub mod timeout;
pub mod window;
