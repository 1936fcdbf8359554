//! A plaintext TCP connection read and written with raw `recvfrom`/`sendto` system calls.
//!
//! glibc's `recv` and `send` are thread cancellation points: in a process with more than
//! one thread (tern-proxy always has its main thread and a worker) each call brackets the
//! system call with two atomic read-modify-writes on the thread's cancellation state.
//! Rust never cancels threads, so that bookkeeping buys nothing; a single-threaded nginx
//! worker skips it. Calling `syscall(2)` directly makes the same system calls without it.
//! Used on the hot HTTP/1.1 paths (the server's plaintext connections and the upstream
//! client); everything else keeps tokio's `TcpStream` as it is.
//!
//! Readiness works as in tokio's own `TcpStream`: a read or write that moves fewer bytes
//! than asked for drained the socket (or filled its buffer), so the readiness is dropped
//! and the next call waits for the runtime instead of making a system call that would
//! find nothing.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

pub struct Tcp(TcpStream);

impl Tcp {
    pub fn new(stream: TcpStream) -> Self {
        Tcp(stream)
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.0
    }

    /// One read or write (`call`) when the runtime says `interest` may make progress.
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        interest: Interest,
        len: usize,
        call: impl Fn(RawFd) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let fd = self.0.as_raw_fd();
        loop {
            if interest == Interest::READABLE {
                ready!(self.0.poll_read_ready(cx))?;
            } else {
                ready!(self.0.poll_write_ready(cx))?;
            }
            let mut done = None;
            let result = self.0.try_io(interest, || {
                let n = call(fd)?;
                done = Some(n);
                if n > 0 && n < len {
                    // Short: `try_io` forgets the readiness when told "would block".
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match (done, result) {
                (Some(n), _) => return Poll::Ready(Ok(n)),
                // Nothing there after all: readiness cleared, wait again.
                (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (None, Err(e)) => return Poll::Ready(Err(e)),
                (None, Ok(())) => unreachable!("try_io returned Ok without running the call"),
            }
        }
    }
}

/// `r` as a byte count, or the `errno` it stands for.
fn outcome(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[allow(unsafe_code)]
fn recv(fd: RawFd, buf: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `len` bytes of writes (the caller's unfilled buffer);
    // no address is asked for.
    let r = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf,
            len,
            0,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    outcome(r)
}

#[allow(unsafe_code)]
fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for its length; no address is given. MSG_NOSIGNAL: a
    // closed peer is an EPIPE error, not a signal (as std's `send` does).
    let r = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf.as_ptr(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        )
    };
    outcome(r)
}

impl AsyncRead for Tcp {
    #[allow(unsafe_code)]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: the system call only writes into the unfilled part, and exactly the
        // `n` bytes it reports are marked initialised.
        let unfilled = unsafe { buf.unfilled_mut() };
        let (ptr, len) = (unfilled.as_mut_ptr().cast::<u8>(), unfilled.len());
        let n = ready!(self.poll_io(cx, Interest::READABLE, len, |fd| recv(fd, ptr, len)))?;
        // SAFETY: the system call wrote these `n` bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, Interest::WRITABLE, buf.len(), |fd| send(fd, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (Tcp, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (Tcp::new(c.unwrap()), s.unwrap().0)
    }

    #[tokio::test]
    async fn reads_and_writes_what_the_peer_sees() {
        let (mut t, mut peer) = pair().await;
        t.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");

        peer.write_all(b"pong!").await.unwrap();
        let mut buf = [0u8; 64];
        let n = t.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong!");
    }

    #[tokio::test]
    async fn a_read_after_a_short_one_waits_for_more_data() {
        let (mut t, mut peer) = pair().await;
        peer.write_all(b"first").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(t.read(&mut buf).await.unwrap(), 5);
        // The short read dropped the readiness: the next read waits, then gets what the
        // peer sends later.
        let later = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            peer.write_all(b"second").await.unwrap();
            peer
        };
        let (n, _peer) = tokio::join!(t.read(&mut buf), later);
        assert_eq!(&buf[..n.unwrap()], b"second");
    }

    #[tokio::test]
    async fn end_of_stream_reads_zero() {
        let (mut t, peer) = pair().await;
        drop(peer);
        let mut buf = [0u8; 8];
        assert_eq!(t.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        let (mut t, peer) = pair().await;
        drop(peer);
        // The first write may still be accepted; a later one sees the reset or EPIPE.
        let mut failed = false;
        for _ in 0..100 {
            if t.write_all(&[0u8; 4096]).await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(failed, "writes to a closed peer kept succeeding");
    }

    #[tokio::test]
    async fn a_large_write_completes_while_the_peer_reads() {
        let (mut t, mut peer) = pair().await;
        let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        t.write_all(&data).await.unwrap();
        t.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), expected);
    }
}
