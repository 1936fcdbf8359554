//! Round robin: one shared cursor per backend, so a pick is an atomic increment and, when
//! some endpoints are ejected, a short walk to the next admitted one.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Walks at most `n` positions from the cursor and returns the first index `admit`
/// accepts, with what it returned.
pub fn next<T>(
    cursor: &AtomicUsize,
    n: usize,
    mut admit: impl FnMut(usize) -> Option<T>,
) -> Option<(usize, T)> {
    if n == 0 {
        return None;
    }
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    for k in 0..n {
        let i = start.wrapping_add(k) % n;
        if let Some(t) = admit(i) {
            if k > 0 {
                // Skip what was passed over, so the next pick does not walk it again.
                cursor.fetch_add(k, Ordering::Relaxed);
            }
            return Some((i, t));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_and_skips_refused_positions() {
        let cursor = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..4).map(|_| next(&cursor, 2, Some).unwrap().0).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        let cursor = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..4)
            .map(|_| next(&cursor, 3, |i| (i != 1).then_some(())).unwrap().0)
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert!(next(&cursor, 3, |_| None::<()>).is_none());
        assert!(next(&cursor, 0, |_| Some(())).is_none());
    }
}
