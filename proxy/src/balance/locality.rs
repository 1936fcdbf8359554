//! Locality tiers: the caller's zone, then its region, then everywhere.
//!
//! A tier is healthy when at least `minHealthyPercent` of its own endpoints (ready ones
//! and not-ready ones alike in the denominator) are ready and not ejected. Requests go to
//! the caller's zone while it is healthy; else to the zone and the rest of the region
//! while the rest of the region is healthy; else everywhere. Candidate sets nest, so
//! spilling over keeps the healthy local endpoints in use. The choice is cached for
//! 100 ms: a trip or recovery moves traffic within that time, and a request does not
//! scan every endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use tern_config::snapshot::{Endpoint, Locality};

pub const TIER_NAMES: [&str; 3] = ["zone", "region", "remote"];

const RECHECK_MS: u64 = 100;

pub struct Tiers {
    /// Candidate sets, as indices into the ready endpoints: zone, zone + region, all.
    sets: [Box<[u32]>; 3],
    /// Endpoints of each tier (not set: tiers are disjoint), ready or not.
    totals: [u32; 3],
    /// The tier of each ready endpoint (0 zone, 1 region, 2 remote).
    pub tier_of: Box<[u8]>,
    min_healthy_percent: u32,
    /// (checked at ms << 2) | chosen set.
    choice: AtomicU64,
}

/// Where the sidecar runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    pub zone: Option<String>,
    pub region: Option<String>,
}

fn tier(place: &Place, e: &Endpoint) -> u8 {
    let same_region = match (&place.region, &e.region) {
        (Some(a), Some(b)) => a.as_str() == &**b,
        // Unknown regions: a zone match alone decides.
        _ => true,
    };
    if same_region && place.zone.is_some() && place.zone.as_deref() == e.zone.as_deref() {
        0
    } else if place.region.is_some() && place.region.as_deref() == e.region.as_deref() {
        1
    } else {
        2
    }
}

impl Tiers {
    /// `all`: every endpoint of the backend; `ready`: the indices in `all` of the ready
    /// ones, in the order the balancer holds them.
    pub fn new(all: &[Endpoint], ready: &[usize], place: &Place, locality: Locality) -> Self {
        let of = |e: &Endpoint| if locality.enabled { tier(place, e) } else { 2 };
        let tier_of: Box<[u8]> = ready.iter().map(|&i| of(&all[i])).collect();
        let mut totals = [0u32; 3];
        for e in all {
            totals[of(e) as usize] += 1;
        }
        let sets = [0u8, 1, 2].map(|level| {
            tier_of
                .iter()
                .enumerate()
                .filter(|(_, t)| **t <= level)
                .map(|(i, _)| i as u32)
                .collect::<Box<[u32]>>()
        });
        Tiers {
            sets,
            totals,
            tier_of,
            min_healthy_percent: locality.min_healthy_percent,
            choice: AtomicU64::new(u64::MAX),
        }
    }

    /// The candidate set of `level` (0 zone, 1 zone + region, 2 all).
    pub fn set(&self, level: usize) -> &[u32] {
        &self.sets[level.min(2)]
    }

    /// Whether there is any choice to make (endpoints in more than one tier).
    fn has_choice(&self) -> bool {
        (0..2).any(|l| !self.sets[l].is_empty() && self.sets[l].len() < self.sets[2].len())
    }

    /// The candidate set to balance over now, and its level.
    pub fn active(&self, now_ms: u64, healthy: impl Fn(usize) -> bool) -> (&[u32], usize) {
        if !self.has_choice() {
            return (&self.sets[2], 2);
        }
        let cached = self.choice.load(Ordering::Relaxed);
        if cached != u64::MAX && now_ms.saturating_sub(cached >> 2) < RECHECK_MS {
            let level = (cached & 3) as usize;
            return (&self.sets[level], level);
        }
        let level = (0..2)
            .find(|&level| {
                let own = self.sets[level]
                    .iter()
                    .filter(|&&i| self.tier_of[i as usize] as usize == level);
                let ok = own.filter(|&&i| healthy(i as usize)).count() as u64;
                ok > 0
                    && ok * 100
                        >= u64::from(self.min_healthy_percent) * u64::from(self.totals[level])
            })
            .unwrap_or(2);
        self.choice
            .store((now_ms << 2) | level as u64, Ordering::Relaxed);
        (&self.sets[level], level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ep(port: u16, zone: &str, region: &str, ready: bool) -> Endpoint {
        Endpoint {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            ready,
            zone: Some(Arc::from(zone)),
            region: Some(Arc::from(region)),
            identity: None,
        }
    }

    fn place() -> Place {
        Place {
            zone: Some("a1".into()),
            region: Some("a".into()),
        }
    }

    #[test]
    fn zone_then_region_then_everywhere() {
        let all = vec![
            ep(1, "a1", "a", true),
            ep(2, "a1", "a", true),
            ep(3, "a2", "a", true),
            ep(4, "b1", "b", true),
        ];
        let ready: Vec<usize> = (0..4).collect();
        let t = Tiers::new(&all, &ready, &place(), Locality::default());
        assert_eq!(&*t.tier_of, &[0, 0, 1, 2]);
        let (set, level) = t.active(0, |_| true);
        assert_eq!((set, level), (&[0u32, 1][..], 0));
        // One of two zone endpoints ejected: 50 % < 70 %, spill to the region (whose
        // healthy zone endpoint stays in use).
        let (set, level) = t.active(1_000, |i| i != 0);
        assert_eq!((set, level), (&[0u32, 1, 2][..], 1));
        // Cached within 100 ms.
        assert_eq!(t.active(1_050, |_| true).1, 1);
        // Zone and region down: everywhere.
        assert_eq!(t.active(2_000, |i| i == 3).1, 2);
        // Recovery brings traffic back.
        assert_eq!(t.active(3_000, |_| true).1, 0);
    }

    #[test]
    fn not_ready_endpoints_count_against_their_tier() {
        let all = vec![
            ep(1, "a1", "a", true),
            ep(2, "a1", "a", false),
            ep(3, "b1", "b", true),
        ];
        let ready = vec![0, 2];
        let t = Tiers::new(&all, &ready, &place(), Locality::default());
        // 1 of 2 zone endpoints ready: 50 %.
        assert_eq!(t.active(0, |_| true).1, 2);
    }

    #[test]
    fn no_place_or_disabled_means_one_tier() {
        let all = vec![ep(1, "a1", "a", true), ep(2, "b1", "b", true)];
        let ready = vec![0, 1];
        let t = Tiers::new(&all, &ready, &Place::default(), Locality::default());
        assert_eq!(t.active(0, |_| true), (&[0u32, 1][..], 2));
        let off = Locality {
            enabled: false,
            ..Locality::default()
        };
        let t = Tiers::new(&all, &ready, &place(), off);
        assert_eq!(t.active(0, |_| true).1, 2);
    }
}
