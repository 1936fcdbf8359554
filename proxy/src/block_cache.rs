//! A per-thread cache of medium-sized heap blocks, in front of the system allocator.
//!
//! Each HTTP request allocates and frees a few blocks of 1-8 KiB: the boxed state of the
//! exchange and of the handler's future (2.6 and 4.5 KiB for an outbound HTTP/1.1
//! request). glibc's own per-thread cache stops at 1,032 bytes, so these went through
//! its bins every time (~800 instructions per request in callgrind, with
//! `malloc_consolidate` now and then). Here a worker thread keeps freed blocks of each
//! size class, up to [`BUDGET`] bytes a class, and hands them out again: a pop or a push
//! on a list.
//!
//! Only threads that opt in ([`enable_on_this_thread`]: the workers, which live as long as
//! the process) keep blocks, so a thread that exits leaves none behind. On every thread,
//! sizes in the cached range are rounded up to their class, so that a block freed on a
//! worker can serve any request of its class there. The blocks kept stay allocated, as
//! glibc would keep them in its bins: a worker holds at most 1.75 MiB so (256 KiB in each
//! of seven classes), and in practice the few classes its requests use.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// Sizes above glibc's tcache, up to this, are cached.
const MIN: usize = 1024;
const MAX: usize = 8 * 1024;
/// Class width: a request is rounded up to a multiple of this.
const STEP: usize = 1024;
const CLASSES: usize = (MAX - MIN) / STEP;
/// Bytes of freed blocks a thread keeps per class: room for the requests in flight at once
/// under load (64 connections: ~50 of the largest class), not for every block a peak
/// ever freed.
const BUDGET: usize = 256 * 1024;
/// glibc's malloc alignment on 64-bit targets; stricter alignments are not cached.
const ALIGN: usize = 16;

/// The global allocator of `tern-proxy` (see the module doc).
pub struct BlockCache;

struct Cache {
    enabled: Cell<bool>,
    /// Each class's free blocks, a list linked through their first word.
    heads: [Cell<*mut u8>; CLASSES],
    counts: [Cell<u8>; CLASSES],
}

thread_local! {
    // Const-initialised and without `Drop`: reading it never allocates and never fails,
    // which an allocator needs.
    static CACHE: Cache = const {
        Cache {
            enabled: Cell::new(false),
            heads: [const { Cell::new(ptr::null_mut()) }; CLASSES],
            counts: [const { Cell::new(0) }; CLASSES],
        }
    };
}

/// Lets this thread keep freed blocks for reuse. For threads that live as long as the
/// process: the blocks a thread keeps are not freed when it exits.
pub fn enable_on_this_thread() {
    CACHE.with(|c| c.enabled.set(true));
}

/// The class of a block of `size` bytes aligned to `align`, if it is cached.
fn class_of(size: usize, align: usize) -> Option<usize> {
    (align <= ALIGN && size > MIN && size <= MAX).then(|| (size - MIN - 1) / STEP)
}

/// The bytes a block of class `class` has.
fn class_size(class: usize) -> usize {
    MIN + (class + 1) * STEP
}

/// How many freed blocks of class `class` a thread keeps.
fn depth(class: usize) -> u8 {
    (BUDGET / class_size(class)).min(usize::from(u8::MAX)) as u8
}

/// The layout the system allocator sees for `layout`: rounded up to its class.
fn system_layout(layout: Layout) -> Layout {
    match class_of(layout.size(), layout.align()) {
        // Cannot fail: a class size is a multiple of 1 KiB and `ALIGN` a power of two.
        Some(class) => Layout::from_size_align(class_size(class), ALIGN).unwrap_or(layout),
        None => layout,
    }
}

#[allow(unsafe_code)]
// SAFETY (the impl): every block handed out comes from `System` with a layout at least as
// large and as aligned as the one asked for (its class's), and every block given back
// goes to `System` with that same class layout, or to this thread's list, from which it
// is handed out again only for a request of the same class. A listed block is owned by
// the list alone: its first word (it is at least 1 KiB and 16-byte aligned) links to the
// next.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(class) = class_of(layout.size(), layout.align()) {
            let cached = CACHE.with(|c| {
                let head = c.heads[class].get();
                if head.is_null() {
                    return head;
                }
                // SAFETY: a listed block's first word is the next block (see above).
                let next = unsafe { head.cast::<*mut u8>().read() };
                c.heads[class].set(next);
                c.counts[class].set(c.counts[class].get() - 1);
                head
            });
            if !cached.is_null() {
                return cached;
            }
        }
        // SAFETY: the layout has a non-zero size (as ours does).
        unsafe { System.alloc(system_layout(layout)) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if let Some(class) = class_of(layout.size(), layout.align()) {
            let kept = CACHE.with(|c| {
                let count = c.counts[class].get();
                if !c.enabled.get() || count >= depth(class) {
                    return false;
                }
                // SAFETY: the block is ours now, and large and aligned enough for a word.
                unsafe { block.cast::<*mut u8>().write(c.heads[class].get()) };
                c.heads[class].set(block);
                c.counts[class].set(count + 1);
                true
            });
            if kept {
                return;
            }
        }
        // SAFETY: `block` came from `System` with this (rounded) layout.
        unsafe { System.dealloc(block, system_layout(layout)) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = system_layout(layout);
        let new = class_of(new_size, layout.align()).map_or(new_size, class_size);
        if new == old.size() {
            // Same class: the block already has the room.
            return block;
        }
        // SAFETY: `block` came from `System` with `old`; `new` is non-zero.
        unsafe { System.realloc(block, old, new) }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    #[test]
    fn sizes_above_tcache_round_up_to_their_class() {
        assert_eq!(class_of(1024, 8), None, "glibc caches these itself");
        assert_eq!(class_of(1025, 8), Some(0));
        assert_eq!(class_size(0), 2048);
        assert_eq!(class_of(2048, 8), Some(0));
        assert_eq!(class_of(2049, 8), Some(1));
        assert_eq!(class_of(4520, 8), Some(3));
        assert_eq!(class_size(3), 5120);
        assert_eq!(class_of(8192, 8), Some(CLASSES - 1));
        assert_eq!(class_size(CLASSES - 1), 8192);
        assert_eq!(class_of(8193, 8), None);
        assert_eq!(
            class_of(2000, 64),
            None,
            "stricter alignments go to the system"
        );
    }

    #[test]
    fn a_freed_block_is_reused_on_a_caching_thread_only() {
        std::thread::spawn(|| {
            let a = BlockCache;
            // SAFETY: each block is freed once, with the layout it was allocated with.
            unsafe {
                // Not enabled: nothing is kept.
                let p = a.alloc(layout(3000));
                a.dealloc(p, layout(3000));
                assert_eq!(
                    CACHE.with(|c| c.counts[class_of(3000, 8).unwrap()].get()),
                    0
                );

                enable_on_this_thread();
                let p = a.alloc(layout(3000));
                p.write_bytes(0xab, 3000);
                a.dealloc(p, layout(3000));
                // Another size of the same class gets the same block, with its room.
                let q = a.alloc(layout(2500));
                assert_eq!(p, q);
                q.write_bytes(0xcd, class_size(1));
                a.dealloc(q, layout(2500));

                // At most a budget's worth kept per class; the rest go back to the system.
                let class = class_of(6000, 8).unwrap();
                let depth = depth(class);
                assert_eq!(usize::from(depth), BUDGET / 6144);
                let blocks: Vec<_> = (0..depth + 3).map(|_| a.alloc(layout(6000))).collect();
                for &b in &blocks {
                    a.dealloc(b, layout(6000));
                }
                assert_eq!(CACHE.with(|c| c.counts[class].get()), depth);
                let again: Vec<_> = (0..depth).map(|_| a.alloc(layout(6000))).collect();
                assert!(again.iter().all(|b| blocks.contains(b)));
                assert_eq!(CACHE.with(|c| c.counts[class].get()), 0);
                for b in again {
                    a.dealloc(b, layout(6000));
                }
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes() {
        let a = BlockCache;
        // SAFETY: each block is used within its size and freed once with its last layout.
        unsafe {
            let p = a.alloc(layout(100));
            for i in 0..100 {
                p.add(i).write(i as u8);
            }
            // Into the cached range, within a class (same block), out of it again.
            let p = a.realloc(p, layout(100), 1500);
            let same = a.realloc(p, layout(1500), 2048);
            assert_eq!(p, same);
            let p = a.realloc(same, layout(2048), 7000);
            let p = a.realloc(p, layout(7000), 20_000);
            for i in 0..100 {
                assert_eq!(p.add(i).read(), i as u8);
            }
            let p = a.realloc(p, layout(20_000), 3000);
            for i in 0..100 {
                assert_eq!(p.add(i).read(), i as u8);
            }
            a.dealloc(p, layout(3000));
        }
    }
}
