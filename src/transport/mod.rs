//! A connection's byte stream: plain TCP, or TLS over TCP. Plain TCP keeps its fast path (one
//! `recv` into the shard's buffer per read, readiness cleared by a short read); TLS ([`tls`])
//! reads the same way into the thread's scratch buffer and decrypts there.

pub mod certificate;
pub mod tls;

use std::io::{self, IoSlice, Read};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use self::tls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session is large, and this enum is in every plain connection too.
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Reads what is available into `buf`: `Ready(Ok(0))` at EOF, `Pending` (the task woken by
    /// the socket) when nothing is.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(stream) => read_clearing_readiness(stream, cx, buf),
            Stream::Tls(stream) => stream.poll_read_plain(cx, buf),
        }
    }
}

/// One `recv` from `stream` into `buf` when it is readable: `Ready(Ok(0))` at EOF, `Pending` (the
/// task woken by the socket) when nothing is there.
fn read_clearing_readiness(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        let mut got = None;
        let tried = stream.try_io(Interest::READABLE, || {
            let n = (&*SockRef::from(stream)).read(buf)?;
            got = Some(n);
            if n > 0 && n < buf.len() {
                // A short read drained the socket. Saying "would block" makes tokio clear the
                // readiness now (as its own poll_read does), so the next read waits for epoll
                // instead of a recv that fails with EAGAIN: one syscall less per message.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (got, tried) {
            (Some(n), _) => return Poll::Ready(Ok(n)),
            // Readiness was stale: cleared, wait again.
            (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (None, Err(e)) => return Poll::Ready(Err(e)),
            (None, Ok(_)) => unreachable!("a read that returned reports its count"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => {
                let n = ready!(stream.poll_read_plain(cx, buf.initialize_unfilled()))?;
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => stream.poll_write_plain(cx, &[IoSlice::new(buf)]),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Tls(stream) => stream.poll_write_plain(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// TLS keeps records it could not send yet: flushing pushes them out.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => stream.poll_flush_plain(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => stream.poll_shutdown_plain(cx),
        }
    }
}
