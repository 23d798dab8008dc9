//! A connection's byte stream: plain TCP, or TLS over TCP, over any [`Socket`]: tokio's while
//! the HTTP edge serves it, the shard's event loop's once it is a WebSocket. Plain TCP keeps its
//! fast path (one `recv` into the shard's buffer per read, readiness cleared by a short read); TLS
//! ([`tls`]) reads the same way into the thread's scratch buffer and decrypts there.

pub mod certificate;
pub mod tls;

use std::io::{self, IoSlice, Read};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use self::tls::TlsStream;

/// A non-blocking TCP socket and how its readiness is waited for. `Pending` means the socket
/// would block and whoever drives the stream is called again (through `cx`, or by its event
/// loop) once it may not.
pub trait Socket: Unpin {
    /// One `recv` into `buf`: `Ready(Ok(0))` at EOF.
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// One vectored `send`: the bytes taken.
    fn poll_send(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>>;
    /// Ends the sending side (FIN), once what was sent has left.
    fn poll_shutdown_send(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Socket for TcpStream {
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        read_clearing_readiness(self, cx, buf)
    }

    fn poll_send(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_write_ready(cx))?;
            match self.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_shutdown_send(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(self).shutdown(std::net::Shutdown::Write))
    }
}

pub enum Stream<S = TcpStream> {
    Plain(S),
    /// Boxed: a TLS session is large, and this enum is in every plain connection too.
    Tls(Box<TlsStream<S>>),
}

impl<S: Socket> Stream<S> {
    /// Reads what is available into `buf`: `Ready(Ok(0))` at EOF, `Pending` when nothing is.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(socket) => socket.poll_recv(cx, buf),
            Stream::Tls(stream) => stream.poll_read_plain(cx, buf),
        }
    }

    /// Writes (for TLS: encrypts and sends) from `bufs`: the plaintext bytes taken.
    pub fn poll_write_from(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(socket) => socket.poll_send(cx, bufs),
            Stream::Tls(stream) => stream.poll_write_plain(cx, bufs),
        }
    }

    /// Sends what the stream itself holds back (TLS records the socket did not take yet).
    pub fn poll_flush_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            Stream::Tls(stream) => stream.poll_flush_plain(cx),
        }
    }

    /// Ends the sending side (TLS: after close_notify).
    pub fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(socket) => socket.poll_shutdown_send(cx),
            Stream::Tls(stream) => stream.poll_shutdown_plain(cx),
        }
    }
}

impl<S> Stream<S> {
    /// The socket under the stream.
    pub fn socket(&self) -> &S {
        match self {
            Stream::Plain(socket) => socket,
            Stream::Tls(stream) => stream.socket(),
        }
    }

    /// The same stream over another socket: what TLS holds moves with it.
    pub fn map_socket<T>(self, move_to: impl FnOnce(S) -> io::Result<T>) -> io::Result<Stream<T>> {
        Ok(match self {
            Stream::Plain(socket) => Stream::Plain(move_to(socket)?),
            Stream::Tls(stream) => Stream::Tls(Box::new(stream.map_socket(move_to)?)),
        })
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

/// The HTTP edge's side: hyper reads and writes the stream as tokio's.
impl<S: Socket> AsyncRead for Stream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = ready!(self.get_mut().poll_read_into(cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: Socket> AsyncWrite for Stream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_from(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_from(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// TLS keeps records it could not send yet: flushing pushes them out.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_held(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_end(cx)
    }
}
