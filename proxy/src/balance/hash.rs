//! Consistent hashing for affinity: the same key reaches the same endpoint, and removing
//! one of N endpoints moves only about 1/N of the keys. Two tables, as in Envoy:
//! a ring (Karger et al., with virtual nodes) and Maglev (Google's lookup table: faster,
//! more even, slightly more disruption on change).
//!
//! Hashes are deterministic (no per-process seed): every sidecar maps a key the same way.

use std::hash::Hasher;
use std::net::SocketAddr;

use rustc_hash::FxHasher;

/// Virtual nodes per endpoint on the ring.
const RING_REPLICAS: usize = 160;
/// Maglev table size: a prime well above the endpoint count.
const MAGLEV_SIZE: usize = 65_537;

/// A stable 64-bit hash of `bytes` (FxHash, then a splitmix64 finaliser for spread).
pub fn key_hash(bytes: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(bytes);
    mix(h.finish())
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn endpoint_hash(addr: &SocketAddr, seed: u64) -> u64 {
    let mut h = FxHasher::default();
    h.write(addr.to_string().as_bytes());
    h.write_u64(seed);
    mix(h.finish())
}

pub enum Table {
    /// (point, endpoint index), sorted by point.
    Ring(Box<[(u64, u32)]>),
    /// Slot -> endpoint index.
    Maglev(Box<[u32]>),
}

impl Table {
    pub fn ring(endpoints: &[SocketAddr]) -> Table {
        let mut points: Vec<(u64, u32)> = endpoints
            .iter()
            .enumerate()
            .flat_map(|(i, a)| {
                (0..RING_REPLICAS).map(move |r| (endpoint_hash(a, r as u64), i as u32))
            })
            .collect();
        points.sort_unstable();
        Table::Ring(points.into())
    }

    pub fn maglev(endpoints: &[SocketAddr]) -> Table {
        let n = endpoints.len();
        if n == 0 {
            return Table::Maglev(Box::new([]));
        }
        let m = MAGLEV_SIZE as u64;
        // Each endpoint's preference list is offset + j * skip (mod M).
        let prefs: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|a| {
                let offset = endpoint_hash(a, 0xa11ce) % m;
                let skip = endpoint_hash(a, 0xb0b) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = prefs[i];
                let mut slot = ((offset + next[i] * skip) % m) as usize;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_SIZE {
                    break 'fill;
                }
            }
        }
        Table::Maglev(table.into())
    }

    /// Endpoint indices for `hash`, in the order to try them: the owner first, then (if
    /// it cannot take the request) the next distinct ones.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let (ring, maglev): (&[(u64, u32)], &[u32]) = match self {
            Table::Ring(r) => (r, &[]),
            Table::Maglev(t) => (&[], t),
        };
        let ring_start = ring.partition_point(|(p, _)| *p < hash);
        let ring_iter =
            (0..ring.len()).map(move |k| ring[(ring_start + k) % ring.len()].1 as usize);
        // Maglev's fallback: rehash, as Envoy does, a few times.
        let maglev_iter = (0..if maglev.is_empty() { 0 } else { 8 }).map(move |k| {
            let h = if k == 0 { hash } else { mix(hash ^ k as u64) };
            maglev[(h % maglev.len() as u64) as usize] as usize
        });
        ring_iter.chain(maglev_iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| {
                format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    fn owners(t: &Table, keys: &[u64]) -> Vec<usize> {
        keys.iter()
            .map(|k| t.candidates(*k).next().unwrap())
            .collect()
    }

    fn check_consistency(build: fn(&[SocketAddr]) -> Table) {
        let n = 10;
        let all = addrs(n);
        let keys: Vec<u64> = (0..20_000u32).map(|i| key_hash(&i.to_le_bytes())).collect();
        let before = owners(&build(&all), &keys);
        // Same input, same answer (deterministic across sidecars).
        assert_eq!(before, owners(&build(&all), &keys));
        // Spread: every endpoint owns a fair share.
        for e in 0..n {
            let share = before.iter().filter(|o| **o == e).count() as f64 / keys.len() as f64;
            assert!((0.05..0.15).contains(&share), "endpoint {e}: {share}");
        }
        // Remove endpoint 3: keys it did not own stay where they were.
        let mut fewer = all.clone();
        fewer.remove(3);
        let after = owners(&build(&fewer), &keys);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| {
                let a_addr = fewer[**a];
                all[**b] != a_addr
            })
            .count() as f64
            / keys.len() as f64;
        // About 1/N of the keys (those of the removed endpoint), with some slack.
        assert!(moved < 1.5 / n as f64, "moved {moved}");
        assert!(moved > 0.5 / n as f64, "moved {moved}");
    }

    #[test]
    fn ring_is_consistent() {
        check_consistency(Table::ring);
    }

    #[test]
    fn maglev_is_consistent() {
        check_consistency(Table::maglev);
    }

    #[test]
    fn candidates_fall_through_to_other_endpoints() {
        let t = Table::ring(&addrs(3));
        let mut seen: Vec<usize> = t.candidates(42).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, [0, 1, 2]);
    }
}
