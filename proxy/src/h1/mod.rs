//! Tern's HTTP/1.1 server: a connection loop over httparse that holds no buffer while a
//! keep-alive connection is idle, reads request bodies in the connection's own task, and
//! refuses ambiguous framing outright (see [`head`]).
//!
//! The head parser and the chunked decoder also serve Tern's HTTP/1.1 client
//! (`upstream::h1`). HTTP/2 on both sides is hyper and h2.

mod body;
pub(crate) mod chunked;
mod conn;
mod date;
pub mod head;
pub(crate) mod spare;

/// Bodies (or data frames) up to about this size are copied behind their head and go in the
/// same write; larger ones are written as they are. Server and client alike.
pub(crate) const COPY_LIMIT: usize = 16 * 1024;

pub use body::{Body, BodyError};
pub(crate) use conn::reserve;
pub use conn::{Io, OnUpgrade, Service, Settings, Upgraded, serve};
pub use head::{RawHeaders, Refusal};

/// A response body that may carry its head's header lines as the upstream sent them
/// ([`RawHeaders`]): the server writes them out before the response's `HeaderMap`.
pub trait RawHead {
    /// Where the body keeps them, if it can.
    fn raw_slot(&mut self) -> Option<&mut Option<RawHeaders>> {
        None
    }

    fn take_raw_headers(&mut self) -> Option<RawHeaders> {
        self.raw_slot().and_then(Option::take)
    }

    fn raw_headers_mut(&mut self) -> Option<&mut RawHeaders> {
        self.raw_slot().and_then(Option::as_mut)
    }
}
