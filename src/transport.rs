//! A connection's byte stream: plain TCP, or TLS over TCP. Plain TCP keeps its fast path (one
//! `recv` into the shard's buffer per read, readiness cleared by a short read); TLS goes through
//! tokio-rustls.

use std::io::{self, IoSlice, Read};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session is large, and this enum is in every plain connection too.
    Tls(Box<TlsStream<TcpStream>>),
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
            Stream::Plain(stream) => loop {
                ready!(stream.poll_read_ready(cx))?;
                let mut got = None;
                let tried = stream.try_io(Interest::READABLE, || {
                    let n = (&*SockRef::from(&*stream)).read(buf)?;
                    got = Some(n);
                    if n > 0 && n < buf.len() {
                        // A short read drained the socket. Saying "would block" makes tokio
                        // clear the readiness now (as its own poll_read does), so the next read
                        // waits for epoll instead of a recv that fails with EAGAIN: one syscall
                        // less per message.
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
            },
            Stream::Tls(stream) => {
                let mut read = ReadBuf::new(buf);
                ready!(Pin::new(stream.as_mut()).poll_read(cx, &mut read))?;
                Poll::Ready(Ok(read.filled().len()))
            }
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
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
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
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// TLS keeps records it could not send yet: flushing pushes them out.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
