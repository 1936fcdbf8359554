//! Per-backend limits on connections, pending requests (waiting for a new connection)
//! and requests in flight, shared by every worker. A request over a limit is refused at
//! once (503 `overflow`) instead of queueing without bound. Each slot is a guard: it is
//! given back when dropped, wherever that happens (end of a response body, a connection
//! task ending, a cancelled request).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tern_config::snapshot::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
}

impl Limit {
    /// This limit's maximum in `limits`.
    pub fn max(self, limits: &Limits) -> u32 {
        match self {
            Limit::Connections => limits.max_connections,
            Limit::Pending => limits.max_pending_requests,
            Limit::Requests => limits.max_requests,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Pending => "pending",
            Limit::Requests => "requests",
        }
    }

    /// The BackendPolicy field that sets it, for error messages.
    pub fn field(self) -> &'static str {
        match self {
            Limit::Connections => "maxConnections",
            Limit::Pending => "maxPendingRequests",
            Limit::Requests => "maxRequests",
        }
    }
}

/// Current use of each limit; the maxima come from the policy in force.
#[derive(Debug, Default)]
pub struct Counters {
    counts: [AtomicU32; 3],
}

/// A taken slot of one limit, given back on drop.
#[derive(Debug)]
pub struct Slot {
    counters: Arc<Counters>,
    limit: Limit,
}

impl Counters {
    /// Takes a slot of `limit` if fewer than `max` are taken.
    pub fn acquire(self: &Arc<Self>, limit: Limit, max: u32) -> Option<Slot> {
        let count = &self.counts[limit as usize];
        let mut current = count.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match count.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Slot {
                        counters: self.clone(),
                        limit,
                    });
                }
                Err(seen) => current = seen,
            }
        }
    }

    pub fn in_use(&self, limit: Limit) -> u32 {
        self.counts[limit as usize].load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.counts[self.limit as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back_on_drop() {
        let c = Arc::new(Counters::default());
        let a = c.acquire(Limit::Requests, 2).unwrap();
        let _b = c.acquire(Limit::Requests, 2).unwrap();
        assert!(c.acquire(Limit::Requests, 2).is_none());
        // Other limits are counted apart.
        assert!(c.acquire(Limit::Pending, 1).is_some());
        drop(a);
        assert_eq!(c.in_use(Limit::Requests), 1);
        assert!(c.acquire(Limit::Requests, 2).is_some());
    }
}
