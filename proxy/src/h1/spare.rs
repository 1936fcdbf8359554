//! Spare buffers, kept per thread and reused from one request to the next.
//!
//! An HTTP/1.1 exchange needs a read buffer and a write buffer on each side. Connections
//! give their buffers back when they go idle (so that 10,000 idle connections hold
//! none), which made every request allocate four buffers of 1-4 KiB. glibc serves
//! sizes over 1 KiB from its bins rather than its per-thread cache: callgrind counted
//! ~500 instructions per buffer for malloc and free. A connection going idle now hands
//! its buffers to its thread's spares, and the next request takes them from there.
//! Header maps (two allocations each, two per exchange) are recycled the same way once
//! their head has been written out.
//!
//! Bounded in bytes, not in count: [`KEEP_READ`] and [`KEEP_WRITE`] bytes of buffers per
//! thread and none larger than [`MAX_CAPACITY`], at most [`KEEP_MAPS`] maps. A worker with
//! 64 connections busy has about 128 exchanges' buffers in use at once (client side and
//! upstream side); a bound of 16 buffers freed most of them and allocated them again on
//! every request (callgrind, 64 connections: ~1,800 instructions a request in malloc and
//! free). Idle connections hold no buffer, so the spares do not grow with connections.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use bytes::BytesMut;
use http::HeaderMap;

/// Bytes of read buffers a thread keeps (128 of the usual 4 KiB): a closed-loop client on
/// 64 connections has that many requests in flight on one worker, each with a buffer on
/// both sides.
const KEEP_READ: usize = 512 * 1024;
/// Bytes of write buffers a thread keeps (each lives only until written).
const KEEP_WRITE: usize = 256 * 1024;
/// The smallest write buffer: request heads and responses with a small body share one
/// size, so a spare never needs to grow.
const MIN_WRITE: usize = 2048;
/// Larger buffers are freed: room for a head and a body small enough to be copied behind
/// it (a connection that read or wrote a large body does not leave a large spare).
const MAX_CAPACITY: usize = super::COPY_LIMIT + 4 * 1024;

/// Header maps a thread keeps (a request's and a response's per exchange in flight).
const KEEP_MAPS: usize = 128;
/// Maps grown past this many entries (a request with many headers) are freed.
const MAX_MAP_CAPACITY: usize = 64;

/// Kept buffers (or maps), each with the size it was counted at, and their total.
struct Kept<T> {
    items: Vec<(T, usize)>,
    bytes: usize,
}

impl<T> Kept<T> {
    const fn new() -> Self {
        Kept {
            items: Vec::new(),
            bytes: 0,
        }
    }

    /// Keeps `item` if `size` more bytes stay within `budget`; else it is dropped.
    fn give(&mut self, item: T, size: usize, budget: usize) {
        if self.bytes + size <= budget {
            self.bytes += size;
            self.items.push((item, size));
        }
    }

    fn remove(&mut self, i: usize) -> T {
        let (item, size) = self.items.swap_remove(i);
        self.bytes -= size;
        item
    }

    /// The one given back last (the likeliest to be in cache).
    fn pop(&mut self) -> Option<T> {
        let last = self.items.len().checked_sub(1)?;
        Some(self.remove(last))
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    #[cfg(test)]
    fn clear(&mut self) {
        *self = Kept::new();
    }
}

thread_local! {
    static READ: RefCell<Kept<BytesMut>> = const { RefCell::new(Kept::new()) };
    static WRITE: RefCell<Kept<Vec<u8>>> = const { RefCell::new(Kept::new()) };
    /// Counted one each: [`KEEP_MAPS`] is a count.
    static MAPS: RefCell<Kept<HeaderMap>> = const { RefCell::new(Kept::new()) };
}

/// An empty header map with room for `n` entries: a spare one when this thread has
/// one (a map is two allocations, and every exchange parses two heads).
pub(crate) fn take_map(n: usize) -> HeaderMap {
    match MAPS.try_with(|s| s.borrow_mut().pop()).ok().flatten() {
        Some(mut map) => {
            map.reserve(n);
            map
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Takes back a header map that is done with (its head was written out).
pub(crate) fn give_map(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > MAX_MAP_CAPACITY {
        return;
    }
    // Drops the values (and with them the last references to their read buffer),
    // keeps the allocations.
    map.clear();
    let _ = MAPS.try_with(|s| s.borrow_mut().give(map, 1, KEEP_MAPS));
}

/// A spare read buffer with room for `want` bytes, if this thread has one.
pub(crate) fn take_read(want: usize) -> Option<BytesMut> {
    READ.try_with(|s| {
        let mut s = s.borrow_mut();
        // Usable once nothing else refers to it: then its whole allocation is reclaimed
        // without allocating. The others stay until their last reader is done.
        let i = s.items.iter_mut().rposition(|(b, _)| b.try_reclaim(want))?;
        let buf = s.remove(i);
        (buf.capacity() <= MAX_CAPACITY).then_some(buf)
    })
    .ok()
    .flatten()
}

/// Takes an idle connection's read buffer (when it holds no unread bytes). The last
/// body chunk or a request's header values may still point into it: it is reused only
/// after they are gone, and freed when they go if it was not.
pub(crate) fn give_read(buf: BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let size = buf.capacity();
    let _ = READ.try_with(|s| s.borrow_mut().give(buf, size, KEEP_READ));
}

/// A write buffer with room for at least `capacity` bytes, which goes back to this
/// thread's spares when dropped.
pub(crate) fn write_buf(capacity: usize) -> WriteBuf {
    let spare = WRITE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
    let mut buf = spare.unwrap_or_default();
    buf.reserve(capacity.max(MIN_WRITE));
    WriteBuf(buf)
}

/// A `Vec<u8>` that returns to its thread's spares when dropped.
#[derive(Debug, Default)]
pub(crate) struct WriteBuf(Vec<u8>);

impl Deref for WriteBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for WriteBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for WriteBuf {
    fn drop(&mut self) {
        let capacity = self.0.capacity();
        if capacity == 0 || capacity > MAX_CAPACITY {
            return;
        }
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        let _ = WRITE.try_with(|s| s.borrow_mut().give(buf, capacity, KEEP_WRITE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_buffers_are_reused_and_bounded() {
        let first = write_buf(1500);
        let ptr = first.as_ptr();
        drop(first);
        let again = write_buf(1000);
        assert_eq!(again.as_ptr(), ptr, "the spare was not reused");
        assert!(again.is_empty() && again.capacity() >= 1500);
        drop(again);

        // Kept up to the byte budget: more buffers than fit are freed.
        let fit = KEEP_WRITE / MIN_WRITE;
        let held: Vec<WriteBuf> = (0..fit + 3).map(|_| write_buf(100)).collect();
        assert!(held.iter().all(|b| b.capacity() == MIN_WRITE));
        drop(held);
        let kept = || WRITE.with(|s| (s.borrow().items.len(), s.borrow().bytes));
        assert_eq!(kept(), (fit, KEEP_WRITE));
        // Taking one gives its bytes back to the budget.
        let one = write_buf(100);
        assert_eq!(kept(), (fit - 1, KEEP_WRITE - MIN_WRITE));
        drop(one);
        assert_eq!(kept(), (fit, KEEP_WRITE));

        WRITE.with(|s| *s.borrow_mut() = Kept::new());
        let mut big = write_buf(10);
        big.reserve(MAX_CAPACITY * 2);
        drop(big);
        assert_eq!(kept(), (0, 0), "an oversized buffer was kept");
    }

    #[test]
    fn header_maps_come_back_empty_with_their_room() {
        MAPS.with(|s| s.borrow_mut().clear());
        let mut map = take_map(8);
        map.insert("x-a", http::HeaderValue::from_static("1"));
        let room = map.capacity();
        give_map(map);
        let again = take_map(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);

        let mut big = HeaderMap::with_capacity(MAX_MAP_CAPACITY * 2);
        big.insert("x-a", http::HeaderValue::from_static("1"));
        give_map(big);
        assert!(
            MAPS.with(|s| s.borrow().is_empty()),
            "an oversized map was kept"
        );
    }

    #[test]
    fn read_buffers_are_kept_up_to_their_byte_budget() {
        READ.with(|s| *s.borrow_mut() = Kept::new());
        let fit = KEEP_READ / 4096;
        for _ in 0..fit + 5 {
            give_read(BytesMut::with_capacity(4096));
        }
        let kept = || READ.with(|s| (s.borrow().items.len(), s.borrow().bytes));
        assert_eq!(kept(), (fit, KEEP_READ));
        // Taking one makes room for one more.
        let one = take_read(4096).expect("a spare");
        assert_eq!(kept(), (fit - 1, KEEP_READ - 4096));
        give_read(one);
        give_read(BytesMut::with_capacity(4096));
        assert_eq!(kept(), (fit, KEEP_READ));
        READ.with(|s| *s.borrow_mut() = Kept::new());
    }

    #[test]
    fn a_read_buffer_returns_only_once_nothing_refers_to_it() {
        READ.with(|s| *s.borrow_mut() = Kept::new());
        // A header value still points into the buffer: not taken.
        let mut held = BytesMut::with_capacity(4096);
        held.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = held.split_to(held.len()).freeze();
        give_read(held);
        assert!(take_read(4096).is_none());
        drop(head);

        let mut buf = BytesMut::with_capacity(4096);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let start = buf.as_ptr();
        drop(buf.split_to(buf.len()).freeze());
        give_read(buf);
        let reused = take_read(4096).expect("the buffer was not kept");
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), 4096);
        assert_eq!(reused.as_ptr(), start, "not the same allocation");
        // The first one waited in the spares until its header value was dropped.
        assert!(take_read(4096).is_some());

        // Bytes still unread: dropped, not kept.
        READ.with(|s| *s.borrow_mut() = Kept::new());
        let mut partial = BytesMut::with_capacity(64);
        partial.extend_from_slice(b"GE");
        give_read(partial);
        assert!(take_read(16).is_none());
    }
}
