//! Round robin over the ready endpoints of each backend.
//!
//! Built once per config change: the ready endpoints of every backend are collected up
//! front so a pick is one atomic increment and an index, whatever the endpoint count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_config::Snapshot;

pub struct RoundRobin {
    /// Ready endpoint addresses, indexed by `Backend::index`.
    ready: Vec<Box<[SocketAddr]>>,
    cursors: Box<[AtomicUsize]>,
}

impl RoundRobin {
    pub fn new(snapshot: &Snapshot) -> Self {
        let ready: Vec<Box<[SocketAddr]>> = snapshot
            .backends
            .iter()
            .map(|b| {
                b.endpoints
                    .iter()
                    .filter(|e| e.ready)
                    .map(|e| e.addr)
                    .collect()
            })
            .collect();
        // Start each backend at a random offset so that sidecars restarted together do
        // not all hit the first endpoint first.
        let cursors = ready
            .iter()
            .map(|r| {
                AtomicUsize::new(if r.is_empty() {
                    0
                } else {
                    fastrand::usize(..r.len())
                })
            })
            .collect();
        RoundRobin { ready, cursors }
    }

    /// The next ready endpoint of backend `index`, or `None` when it has none.
    pub fn pick(&self, index: usize) -> Option<SocketAddr> {
        let ready = self.ready.get(index)?;
        if ready.is_empty() {
            return None;
        }
        let n = self.cursors[index].fetch_add(1, Ordering::Relaxed);
        Some(ready[n % ready.len()])
    }

    pub fn ready_count(&self, index: usize) -> usize {
        self.ready.get(index).map_or(0, |r| r.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_ready_endpoints_only() {
        let rr = RoundRobin {
            ready: vec![
                vec![
                    "127.0.0.1:1".parse().unwrap(),
                    "127.0.0.1:2".parse().unwrap(),
                ]
                .into(),
                Box::new([]),
            ],
            cursors: vec![AtomicUsize::new(0), AtomicUsize::new(0)].into(),
        };
        let picks: Vec<u16> = (0..4).map(|_| rr.pick(0).unwrap().port()).collect();
        assert_eq!(picks, [1, 2, 1, 2]);
        assert_eq!(rr.pick(1), None);
        assert_eq!(rr.pick(7), None);
    }
}
