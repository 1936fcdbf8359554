//! HTTP/1.1 request framing guard.
//!
//! hyper resolves a request that carries both `Content-Length` and `Transfer-Encoding` by
//! dropping the length (RFC 9112 §6.3 allows it), and it counts the request head only
//! approximately against its buffer limit. Tern refuses both outright: a conflicting
//! framing is a smuggling attempt, and the head limit is a documented promise. hyper
//! does not expose the original head, so this wrapper follows the raw request stream of
//! a connection (heads, then bodies by their framing) and records the first bad request
//! by its position on the connection; the handler for that request answers 400 or 431.
//!
//! Cost: a scan of each head for its end and two header names, plus chunk-size lines
//! of chunked bodies; body bytes are skipped by count. The wrapper stops following the
//! stream (and judges nothing more) after an upgrade or CONNECT, or anything it cannot
//! parse, which hyper answers with a 400 anyway.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the guard found wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Both `Content-Length` and `Transfer-Encoding`.
    Conflict,
    /// The request head is larger than the limit.
    TooLarge,
}

/// Shared between the wrapped stream (writer) and the connection's service (reader).
#[derive(Debug)]
pub struct Findings {
    /// Position on the connection (0-based) of the first bad request, `u64::MAX` if none.
    bad_index: AtomicU64,
    verdict: AtomicU8,
}

impl Default for Findings {
    fn default() -> Self {
        Findings {
            bad_index: AtomicU64::new(u64::MAX),
            verdict: AtomicU8::new(0),
        }
    }
}

impl Findings {
    /// The verdict on the request at `index` of this connection.
    pub fn verdict(&self, index: u64) -> Verdict {
        if self.bad_index.load(Ordering::Acquire) != index {
            return Verdict::Ok;
        }
        match self.verdict.load(Ordering::Relaxed) {
            1 => Verdict::Conflict,
            2 => Verdict::TooLarge,
            _ => Verdict::Ok,
        }
    }

    fn record(&self, index: u64, verdict: Verdict) {
        let v = match verdict {
            Verdict::Ok => return,
            Verdict::Conflict => 1,
            Verdict::TooLarge => 2,
        };
        // Only the first bad request counts: the connection closes after its answer.
        if self.bad_index.load(Ordering::Relaxed) == u64::MAX {
            self.verdict.store(v, Ordering::Relaxed);
            self.bad_index.store(index, Ordering::Release);
        }
    }
}

#[derive(Debug)]
enum State {
    Head,
    Body(u64),
    ChunkSize {
        size: u64,
        digits: bool,
        in_ext: bool,
    },
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers {
        line_empty: bool,
    },
    /// No longer following the stream.
    Off,
}

/// Follows a stream of HTTP/1.1 requests.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    head: Vec<u8>,
    index: u64,
    max_head: usize,
    findings: Arc<Findings>,
}

impl Tracker {
    pub fn new(max_head: usize, findings: Arc<Findings>) -> Self {
        Tracker {
            state: State::Head,
            head: Vec::new(),
            index: 0,
            max_head,
            findings,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head => data = self.feed_head(data),
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkSize {
                    size,
                    digits,
                    in_ext,
                } => {
                    let b = data[0];
                    data = &data[1..];
                    if b == b'\n' {
                        if !*digits {
                            self.state = State::Off;
                        } else if *size == 0 {
                            self.state = State::Trailers { line_empty: true };
                        } else {
                            self.state = State::ChunkData(*size);
                        }
                    } else if *in_ext || b == b';' || b == b' ' || b == b'\t' || b == b'\r' {
                        *in_ext = true;
                    } else if let Some(d) = (b as char).to_digit(16) {
                        match size.checked_mul(16) {
                            Some(s) => {
                                *size = s + u64::from(d);
                                *digits = true;
                            }
                            None => self.state = State::Off,
                        }
                    } else {
                        self.state = State::Off;
                    }
                }
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::ChunkDataEnd(2);
                    }
                }
                State::ChunkDataEnd(left) => {
                    // The CRLF after a chunk's data.
                    data = &data[1..];
                    *left -= 1;
                    if *left == 0 {
                        self.state = State::ChunkSize {
                            size: 0,
                            digits: false,
                            in_ext: false,
                        };
                    }
                }
                State::Trailers { line_empty } => {
                    let b = data[0];
                    data = &data[1..];
                    match b {
                        b'\n' if *line_empty => self.state = State::Head,
                        b'\n' => *line_empty = true,
                        b'\r' => {}
                        _ => *line_empty = false,
                    }
                }
            }
        }
    }

    /// Accumulates a request head; returns the bytes after it.
    fn feed_head<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        // Empty lines before a request line are ignored (RFC 9112 §2.2).
        let mut data = data;
        if self.head.is_empty() {
            let skip = data
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count();
            data = &data[skip..];
            if data.is_empty() {
                return data;
            }
        }
        // Common case: the whole head arrived in one read; judge it in place.
        if self.head.is_empty() {
            if let Some(end) = find_head_end(data) {
                self.on_head(&data[..end]);
                return &data[end..];
            }
            self.head.extend_from_slice(data);
            self.check_partial();
            return &[];
        }
        let prev = self.head.len();
        let from = prev.saturating_sub(3);
        self.head.extend_from_slice(data);
        match find_head_end(&self.head[from..]) {
            Some(end) => {
                let end = from + end;
                let consumed = end - prev;
                let head = std::mem::take(&mut self.head);
                self.on_head(&head[..end]);
                // Reuse the buffer's allocation for the next head.
                self.head = head;
                self.head.clear();
                &data[consumed..]
            }
            None => {
                self.check_partial();
                &[]
            }
        }
    }

    /// A head still without its end is already too large: judge it now.
    fn check_partial(&mut self) {
        if self.head.len() > self.max_head {
            self.findings.record(self.index, Verdict::TooLarge);
            self.state = State::Off;
        }
    }

    fn on_head(&mut self, head: &[u8]) {
        let index = self.index;
        self.index += 1;
        if head.len() > self.max_head {
            self.findings.record(index, Verdict::TooLarge);
            self.state = State::Off;
            return;
        }
        let mut lines = head.split(|b| *b == b'\n');
        let request_line = lines.next().unwrap_or_default();
        if request_line.starts_with(b"CONNECT ") {
            self.state = State::Off;
            return;
        }
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut upgrade = false;
        for line in lines {
            // Only three names matter; most lines are rejected on their first byte.
            if !matches!(
                line.first().map(u8::to_ascii_lowercase),
                Some(b'c' | b't' | b'u')
            ) {
                continue;
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"content-length") {
                match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                    // Invalid or conflicting lengths: hyper refuses the request.
                    _ => {
                        self.state = State::Off;
                        return;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let last = value
                    .rsplit(|b| *b == b',')
                    .next()
                    .map(trim)
                    .unwrap_or_default();
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                upgrade = true;
            }
        }
        if length.is_some() && chunked.is_some() {
            self.findings.record(index, Verdict::Conflict);
            self.state = State::Off;
            return;
        }
        self.state = match (chunked, length) {
            (Some(true), _) => State::ChunkSize {
                size: 0,
                digits: false,
                in_ext: false,
            },
            (Some(false), _) => State::Off,
            (None, Some(n)) if n > 0 => State::Body(n),
            (None, _) => State::Head,
        };
        if upgrade {
            // After a successful upgrade the bytes are no longer HTTP.
            self.state = State::Off;
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    // Built once: constructing a searcher per call costs more than the search.
    static END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    END.find(buf).map(|p| p + 4)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// A stream whose reads are followed by a [`Tracker`].
pub struct Guarded<T> {
    inner: T,
    tracker: Tracker,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, tracker: Tracker) -> Self {
        Guarded { inner, tracker }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.tracker.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Arc<Findings>, u64) {
        let findings = Arc::new(Findings::default());
        let mut t = Tracker::new(1024, findings.clone());
        for c in chunks {
            t.feed(c);
        }
        (findings, t.index)
    }

    #[test]
    fn follows_pipelined_requests_with_bodies() {
        let (f, n) = run(&[
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            b"lo\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"GET /d HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]);
        assert_eq!(n, 4);
        for i in 0..3 {
            assert_eq!(f.verdict(i), Verdict::Ok);
        }
        assert_eq!(f.verdict(3), Verdict::Conflict);
    }

    #[test]
    fn head_split_across_reads_and_body_that_looks_like_headers() {
        let (f, n) = run(&[
            b"POST /a HTTP/1.1\r\nContent-Len",
            b"gth: 40\r",
            b"\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ]);
        assert_eq!(n, 2);
        assert_eq!(f.verdict(0), Verdict::Ok);
        assert_eq!(f.verdict(1), Verdict::Ok);
    }

    #[test]
    fn oversized_head_is_flagged_even_without_its_end() {
        let big = vec![b'a'; 2000];
        let (f, _) = run(&[b"GET / HTTP/1.1\r\nx: ", &big]);
        assert_eq!(f.verdict(0), Verdict::TooLarge);
    }

    #[test]
    fn stops_following_after_upgrade() {
        let (f, n) = run(&[
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"\x81\x05Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]);
        assert_eq!(n, 1);
        assert_eq!(f.verdict(1), Verdict::Ok);
    }
}
