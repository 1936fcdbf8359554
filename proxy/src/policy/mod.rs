//! Per-request policies, one file each. The resilience and load-shedding work adds
//! retries, budgets, circuit breakers, rate limits and concurrency limits beside these.

pub mod timeout;
