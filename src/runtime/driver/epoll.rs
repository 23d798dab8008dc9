//! The epoll engine: a shard's epoll instance, and a WebSocket's socket on it ([`EpollSocket`]):
//! the file descriptor and two readiness bits, set by the loop's epoll events and cleared when a
//! call would block (and two that an end of the stream sets for good). Registered once,
//! edge-triggered, for both directions: no `epoll_ctl` per message and no readiness object.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{Context, Poll};
use std::time::Duration;

use mio::{Events, Interest, Token};

use crate::transport::Socket;

/// Epoll events taken per turn.
const EVENTS_PER_TURN: usize = 1024;

pub struct Epoll {
    poll: RefCell<mio::Poll>,
    registry: mio::Registry,
    events: RefCell<Events>,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        Ok(Epoll {
            poll: RefCell::new(poll),
            registry,
            events: RefCell::new(Events::with_capacity(EVENTS_PER_TURN)),
        })
    }

    /// The descriptor the loop waits on: readable when some socket has an event.
    pub fn fd(&self) -> RawFd {
        self.poll.borrow().as_raw_fd()
    }

    /// The socket of the connection at `key`, registered for both directions.
    pub fn socket(&self, io: std::net::TcpStream, key: usize) -> io::Result<EpollSocket> {
        let mut io = mio::net::TcpStream::from_std(io);
        let both = Interest::READABLE | Interest::WRITABLE;
        self.registry.register(&mut io, Token(key), both)?;
        Ok(EpollSocket::new(io))
    }

    /// Takes the ready events: each reaches its socket (by `socket`, which finds the open
    /// connection at a key) and `wake`s it. Returns whether there were any, and whether there
    /// were as many as fit (more may be waiting).
    pub fn take_events<'a>(
        &self,
        socket: impl Fn(usize) -> Option<&'a EpollSocket>,
        wake: impl Fn(usize),
    ) -> io::Result<(bool, bool)> {
        let mut events = self.events.borrow_mut();
        events.clear();
        match self
            .poll
            .borrow_mut()
            .poll(&mut events, Some(Duration::ZERO))
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok((false, true)),
            Err(e) => return Err(e),
        }
        let mut taken = 0;
        for event in events.iter() {
            taken += 1;
            let key = event.token().0;
            if let Some(socket) = socket(key) {
                socket.on_event(event);
                wake(key);
            }
        }
        Ok((taken > 0, taken == EVENTS_PER_TURN))
    }
}

const READABLE: u8 = 1;
const WRITABLE: u8 = 2;
/// The peer's FIN (or an error) came: never cleared, so the end is read even after a short read
/// took the last data with it in the same edge.
const READ_CLOSED: u8 = 4;
const WRITE_CLOSED: u8 = 8;

pub struct EpollSocket {
    io: mio::net::TcpStream,
    ready: Cell<u8>,
}

impl EpollSocket {
    /// A socket just registered: optimistically ready both ways (what arrived before it was
    /// registered raises no edge), until a call says otherwise.
    fn new(io: mio::net::TcpStream) -> Self {
        EpollSocket {
            io,
            ready: Cell::new(READABLE | WRITABLE),
        }
    }

    /// Takes an epoll event: errors and hang-ups make both directions ready for good (the next
    /// call reports them).
    fn on_event(&self, event: &mio::event::Event) {
        let mut ready = self.ready.get();
        if event.is_readable() {
            ready |= READABLE;
        }
        if event.is_read_closed() || event.is_error() {
            ready |= READ_CLOSED;
        }
        if event.is_writable() {
            ready |= WRITABLE;
        }
        if event.is_write_closed() || event.is_error() {
            ready |= WRITE_CLOSED;
        }
        self.ready.set(ready);
    }

    fn is(&self, bits: u8) -> bool {
        self.ready.get() & bits != 0
    }

    fn clear(&self, bit: u8) {
        self.ready.set(self.ready.get() & !bit);
    }
}

impl Socket for EpollSocket {
    fn poll_recv(&self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if !self.is(READABLE | READ_CLOSED) {
            return Poll::Pending;
        }
        loop {
            match (&self.io).read(buf) {
                Ok(n) => {
                    // A short read drained the socket: the next waits for an edge instead of a
                    // `recv` failing with EAGAIN (one system call less per message).
                    if n > 0 && n < buf.len() {
                        self.clear(READABLE);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.clear(READABLE);
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_send(&self, _: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if !self.is(WRITABLE | WRITE_CLOSED) {
            return Poll::Pending;
        }
        // `send`/`sendmsg` go straight to the socket layer; `writev` passes through the file
        // layer first (position lock, access checks, notifications): ~4% of an echo's CPU.
        let socket = socket2::SockRef::from(&self.io);
        loop {
            // No SIGPIPE for a peer that reset: the error says so.
            let sent = match bufs {
                [one] => socket.send_with_flags(one, libc::MSG_NOSIGNAL),
                _ => socket.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL),
            };
            match sent {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.clear(WRITABLE);
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_shutdown_send(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.io.shutdown(Shutdown::Write))
    }
}
