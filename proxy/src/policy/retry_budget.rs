//! The retry budget of a backend, shared by every worker: retries may be at most
//! `percent` of the requests over `interval`, plus `minRetriesPerSecond` x `interval` in
//! reserve so that a quiet backend can still retry (Finagle's definition). A total outage
//! therefore costs at most that many extra requests, never a retry storm.

use tern_config::snapshot::RetryBudget;

use crate::policy::window::Window;

pub struct Budget {
    pub settings: RetryBudget,
    /// (requests, retries).
    window: Window,
}

impl Budget {
    pub fn new(settings: RetryBudget) -> Self {
        Budget {
            settings,
            window: Window::new(settings.interval),
        }
    }

    /// Every request (first attempt) adds to the budget.
    pub fn deposit(&self, now_ms: u64) {
        self.window.add(now_ms, 1, 0);
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_withdraw(&self, now_ms: u64) -> bool {
        let (requests, retries) = self.window.sum(now_ms);
        let reserve = u64::from(self.settings.min_retries_per_second)
            * self.settings.interval.as_secs().max(1);
        let allowed = requests * u64::from(self.settings.percent) / 100 + reserve;
        if retries >= allowed {
            return false;
        }
        self.window.add(now_ms, 0, 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percent_of_requests_plus_reserve() {
        let b = Budget::new(RetryBudget {
            percent: 20,
            min_retries_per_second: 1,
            interval: Duration::from_secs(10),
        });
        for _ in 0..100 {
            b.deposit(0);
        }
        // 20 % of 100 plus 1/s x 10 s.
        let granted = (0..100).filter(|_| b.try_withdraw(1)).count();
        assert_eq!(granted, 30);
        // Once the window has moved on, the budget refills from new requests only.
        assert!(b.try_withdraw(20_000));
        for _ in 0..50 {
            b.deposit(20_000);
        }
        let granted = (0..100).filter(|_| b.try_withdraw(20_001)).count();
        assert_eq!(granted, 10 + 10 - 1);
    }

    #[test]
    fn zero_reserve_and_no_traffic_means_no_retries() {
        let b = Budget::new(RetryBudget {
            percent: 20,
            min_retries_per_second: 0,
            interval: Duration::from_secs(1),
        });
        assert!(!b.try_withdraw(0));
    }
}
