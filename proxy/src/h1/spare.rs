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
//! Bounded: at most [`KEEP_READ`] and [`KEEP_WRITE`] buffers per thread, and none larger than
//! [`MAX_CAPACITY`] is reused, so a worker keeps a few hundred KiB at most whatever its
//! load (typically one or two buffers of 1-4 KiB).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use bytes::BytesMut;
use http::HeaderMap;

/// Read buffers a thread keeps: a closed-loop client on 64 connections has many
/// requests in flight on one worker, each with a buffer on both sides.
const KEEP_READ: usize = 16;
/// Write buffers a thread keeps (each lives only until written).
const KEEP_WRITE: usize = 8;
/// The smallest write buffer: request heads and responses with a small body share one
/// size, so a spare never needs to grow.
const MIN_WRITE: usize = 2048;
/// Larger buffers are freed: room for a head and a body small enough to be copied behind
/// it (a connection that read or wrote a large body does not leave a large spare).
const MAX_CAPACITY: usize = super::COPY_LIMIT + 4 * 1024;

/// Header maps a thread keeps (a request's and a response's per exchange in flight).
const KEEP_MAPS: usize = 16;
/// Maps grown past this many entries (a request with many headers) are freed.
const MAX_MAP_CAPACITY: usize = 64;

thread_local! {
    static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
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
    let _ = MAPS.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP_MAPS {
            s.push(map);
        }
    });
}

/// A spare read buffer with room for `want` bytes, if this thread has one.
pub(crate) fn take_read(want: usize) -> Option<BytesMut> {
    READ.try_with(|s| {
        let mut s = s.borrow_mut();
        // Usable once nothing else refers to it: then its whole allocation is reclaimed
        // without allocating. The others stay until their last reader is done.
        let i = s.iter_mut().rposition(|b| b.try_reclaim(want))?;
        let buf = s.swap_remove(i);
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
    let _ = READ.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP_READ {
            s.push(buf);
        }
    });
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
        let _ = WRITE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP_WRITE {
                s.push(buf);
            }
        });
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

        let held: Vec<WriteBuf> = (0..KEEP_WRITE + 3).map(|_| write_buf(100)).collect();
        drop(held);
        assert_eq!(WRITE.with(|s| s.borrow().len()), KEEP_WRITE);

        let mut big = write_buf(10);
        big.reserve(MAX_CAPACITY * 2);
        let before = WRITE.with(|s| s.borrow().len());
        drop(big);
        assert_eq!(
            WRITE.with(|s| s.borrow().len()),
            before,
            "an oversized buffer was kept"
        );
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
    fn a_read_buffer_returns_only_once_nothing_refers_to_it() {
        READ.with(|s| s.borrow_mut().clear());
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
        READ.with(|s| s.borrow_mut().clear());
        let mut partial = BytesMut::with_capacity(64);
        partial.extend_from_slice(b"GE");
        give_read(partial);
        assert!(take_read(16).is_none());
    }
}
