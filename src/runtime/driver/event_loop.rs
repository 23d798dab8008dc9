//! A shard's event loop: its WebSocket connections in a slab (by the shard's key), their sockets
//! on one I/O engine of the shard's own (an io_uring ring, [`Uring`], or an epoll instance,
//! [`Epoll`]), and one task on the shard's runtime that runs turns.
//!
//! A turn takes what the engine has ready (epoll events, or io_uring completions) without
//! waiting, delivers what other shards sent (the inbox), ticks the heartbeat wheel and the close
//! deadlines, then gives each connection that was woken one bounded turn (see
//! [`Connection::poll`]): it reads into the shared buffer, handles what it read, and writes
//! everything queued for it in one vectored write (with io_uring: one send, submitted with all
//! the turn's others at its end). A busy loop yields to the runtime between turns so the HTTP
//! edge (handshakes, the API) keeps being served; an idle one waits for the engine's descriptor
//! (registered with tokio), the inbox, a timer or a wake-up.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use crate::base::client_id::ClientId;
use crate::config::{Config, Engine};
use crate::runtime::Newcomer;
use crate::runtime::bus::{Inbox, Sent};
use crate::runtime::input::Input;
use crate::runtime::shard::Shard;
use crate::runtime::wheel::Tick;
use crate::transport::Stream;

use super::connection::Connection;
use super::deliver_batch;
use super::epoll::Epoll;
use super::socket::LoopSocket;
use super::uring::{Uring, UringSocket};
use super::wake;
/// How long a busy loop runs turns before it lets the runtime's other tasks run.
const YIELD_EVERY: Duration = Duration::from_micros(250);
/// How often the shard's heap gives back what it freed (see [`crate::base::alloc`]).
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// The engine's descriptor as tokio sees it: readable when the engine has something ready.
struct EngineFd(RawFd);

impl AsRawFd for EngineFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

enum Io {
    Epoll(Epoll),
    Uring(Rc<Uring>),
}

pub struct EventLoop {
    /// Declared before `io`: deregistered from tokio before the descriptor closes.
    ready: AsyncFd<EngineFd>,
    io: Io,
    /// The connections, by the key of their entry in the shard's slab.
    conns: RefCell<Vec<Option<Connection>>>,
    /// Connections in their close handshake, by deadline (all get the same `close_timeout`, so
    /// the oldest is first).
    closing: RefCell<VecDeque<(Instant, usize, ClientId)>>,
    round: Cell<u64>,
}

impl EventLoop {
    /// A loop for the shard running on this thread (inside its runtime), on the configured
    /// engine (io_uring or epoll: [`super::choose`] resolved `auto` first).
    pub fn new(config: &Config) -> io::Result<Self> {
        let io = match config.engine {
            Engine::IoUring => Io::Uring(Rc::new(Uring::new(config.io_uring_buffers)?)),
            Engine::Epoll | Engine::Auto => Io::Epoll(Epoll::new()?),
        };
        let fd = match &io {
            Io::Epoll(epoll) => epoll.fd(),
            Io::Uring(uring) => uring.fd(),
        };
        // SAFETY: the descriptor is `io`'s, which is dropped after `ready` (field order) and
        // never replaced.
        let ready = unsafe {
            AsyncFd::register_with_interest(EngineFd(fd), tokio::io::Interest::READABLE)?
        };
        Ok(EventLoop {
            ready,
            io,
            conns: RefCell::default(),
            closing: RefCell::default(),
            round: Cell::new(0),
        })
    }

    /// Takes over a freshly upgraded connection: from now on the loop serves it. `preread` is
    /// what the HTTP layer read past the handshake. An error (the socket could not move) leaves
    /// the admission to the caller to give back.
    pub fn adopt(
        &self,
        shard: &Shard,
        stream: Stream<TcpStream>,
        preread: &[u8],
        newcomer: Newcomer<'_>,
    ) -> io::Result<()> {
        let stream = stream.map_socket(TcpStream::into_std)?;
        let (app, deflate) = (newcomer.app, newcomer.deflate);
        let key = shard.register(newcomer);
        let adopted = stream.map_socket(|io| match &self.io {
            Io::Epoll(epoll) => epoll.socket(io, key).map(LoopSocket::Epoll),
            Io::Uring(uring) => Ok(LoopSocket::Uring(UringSocket::new(
                uring.clone(),
                io.into(),
                key,
            ))),
        });
        let stream = match adopted {
            Ok(stream) => stream,
            Err(e) => {
                debug!(error = %e, "cannot register an upgraded socket");
                shard.app(app).closing(shard, key);
                shard.unregister(key);
                return Ok(());
            }
        };
        let max_message_size = shard.shared.config.max_message_size;
        let input = Input::new(app, max_message_size, deflate, preread.to_vec());
        let mut conns = self.conns.borrow_mut();
        if conns.len() <= key {
            conns.resize_with(key + 1, || None);
        }
        conns[key] = Some(Connection::new(stream, input));
        wake::schedule(key);
        Ok(())
    }

    /// Takes what the engine has ready: each event or completion reaches its socket and gives
    /// it a turn. Returns whether there was any, and whether more may be waiting.
    fn take_ready(&self) -> io::Result<(bool, bool)> {
        let conns = self.conns.borrow();
        match &self.io {
            Io::Epoll(epoll) => {
                epoll.take_events(|key| socket_at(&conns, key)?.epoll(), wake::schedule)
            }
            Io::Uring(uring) => Ok((
                uring.complete(|key| socket_at(&conns, key)?.uring(), wake::schedule),
                false,
            )),
        }
    }

    /// io_uring receives that found the buffer ring empty since the last call.
    fn take_buffer_waits(&self) -> u64 {
        match &self.io {
            Io::Uring(uring) => uring.take_buffer_waits(),
            Io::Epoll(_) => 0,
        }
    }

    /// The end of a turn: with io_uring, what the turn queued is submitted. Returns whether
    /// completions wait for the next turn.
    fn end_turn(&self, now: Instant) -> bool {
        let Io::Uring(uring) = &self.io else {
            return false;
        };
        let conns = self.conns.borrow();
        uring.end_turn(
            now.into_std(),
            |key| socket_at(&conns, key)?.uring(),
            wake::schedule,
        )
    }

    /// One round: every connection scheduled so far gets one turn.
    fn run_round(&self, shard: &Shard, keys: &mut Vec<u32>) -> bool {
        wake::take_round(keys);
        let round = self.round.get() + 1;
        self.round.set(round);
        for &key in keys.iter() {
            self.poll_connection(shard, key as usize, round);
        }
        !keys.is_empty()
    }

    fn poll_connection(&self, shard: &Shard, key: usize, round: u64) {
        let mut conns = self.conns.borrow_mut();
        let Some(Some(conn)) = conns.get_mut(key) else {
            return;
        };
        if conn.round == round {
            return;
        }
        conn.round = round;
        let was_closing = conn.is_closing();
        let waker = wake::waker(key);
        let mut cx = Context::from_waker(&waker);
        let polled = catch_unwind(AssertUnwindSafe(|| conn.poll(shard, key, &mut cx)));
        let done = match polled {
            Ok(Poll::Pending) => {
                if !was_closing && conn.is_closing() {
                    let id = shard.state_ref().conns[key].id;
                    let deadline = Instant::now() + shard.shared.config.close_timeout;
                    self.closing.borrow_mut().push_back((deadline, key, id));
                }
                false
            }
            Ok(Poll::Ready(())) => true,
            Err(_) => {
                // The panic was reported by the hook; only this connection ends.
                error!(key, "a connection's turn panicked: dropping it");
                true
            }
        };
        if done {
            let conn = conns[key].take();
            drop(conns);
            if let Some(conn) = conn {
                finish(shard, key, conn);
            }
        }
    }

    /// Drops the connections whose close handshake outlived `close_timeout`; returns the next
    /// deadline.
    fn expire_closes(&self, shard: &Shard, now: Instant) -> Option<Instant> {
        loop {
            let (deadline, key, id) = *self.closing.borrow().front()?;
            if deadline > now {
                return Some(deadline);
            }
            self.closing.borrow_mut().pop_front();
            let same = shard.state_ref().conns.get(key).is_some_and(|c| c.id == id);
            let conn = same
                .then(|| self.conns.borrow_mut().get_mut(key).and_then(Option::take))
                .flatten();
            if let Some(conn) = conn {
                finish(shard, key, conn);
            }
        }
    }

    /// Drops every connection left (at the end of a drain).
    fn finish_all(&self, shard: &Shard) {
        let conns = std::mem::take(&mut *self.conns.borrow_mut());
        for (key, conn) in conns.into_iter().enumerate() {
            if let Some(conn) = conn {
                finish(shard, key, conn);
            }
        }
    }
}

/// The socket of the open connection at `key`, if there is one.
fn socket_at(conns: &[Option<Connection>], key: usize) -> Option<&LoopSocket> {
    conns.get(key)?.as_ref().map(|conn| conn.stream.socket())
}

/// A connection leaves: its app is told, its slab entry goes, and its socket closes (leaving the
/// epoll set with it). A handler that panics here (state left inconsistent by an earlier panic)
/// costs this connection only, not the shard.
fn finish(shard: &Shard, key: usize, conn: Connection) {
    let told = catch_unwind(AssertUnwindSafe(|| conn.release(shard, key)));
    let unregistered = catch_unwind(AssertUnwindSafe(|| shard.unregister(key)));
    if told.is_err() || unregistered.is_err() {
        error!(key, "releasing a connection panicked");
    }
}

/// What a loop keeps between turns.
pub struct Turns<'a> {
    event_loop: &'a EventLoop,
    shard: &'a Shard,
    inbox: &'a mut Inbox,
    inbox_open: bool,
    batch: Vec<Sent>,
    keys: Vec<u32>,
    started: Instant,
    next_tick: Instant,
    next_collect: Instant,
}

impl<'a> Turns<'a> {
    pub fn new(event_loop: &'a EventLoop, shard: &'a Shard, inbox: &'a mut Inbox) -> Self {
        // Frames queued for a parked connection give it a turn.
        shard.state().queued.set_wake(wake::schedule);
        let started = Instant::now();
        Turns {
            event_loop,
            shard,
            inbox,
            inbox_open: true,
            batch: Vec::new(),
            keys: Vec::new(),
            started,
            next_tick: started + shard.tick_interval(),
            next_collect: started + COLLECT_EVERY,
        }
    }

    /// Runs turns until `done` says so (asked between turns), `deadline` passes, or `shutdown`
    /// is cancelled.
    pub async fn run_until(
        &mut self,
        done: impl Fn(&Shard) -> bool,
        deadline: Option<Instant>,
        shutdown: Option<&CancellationToken>,
    ) {
        let mut yielded = Instant::now();
        loop {
            if done(self.shard) || shutdown.is_some_and(CancellationToken::is_cancelled) {
                return;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return;
            }
            let (busy, next_timer) = self.turn(now);
            if busy {
                // The runtime's other tasks (the HTTP edge) get their turn at least every
                // `YIELD_EVERY`, not after every turn: a yield costs the runtime's `epoll_wait`,
                // which a busy loop of small turns would pay once per few messages.
                if now - yielded >= YIELD_EVERY {
                    tokio::task::yield_now().await;
                    yielded = Instant::now();
                }
                continue;
            }
            let wake_at = [Some(next_timer), deadline].into_iter().flatten().min();
            self.wait(wake_at.unwrap_or(next_timer), shutdown).await;
        }
    }

    /// One turn, then the runtime's.
    pub async fn turn_once(&mut self) {
        self.turn(Instant::now());
        tokio::task::yield_now().await;
    }

    /// Delivers a batch of what waits in the inbox; false when nothing did.
    pub fn deliver_inbox(&mut self) -> bool {
        self.inbox.try_recv_batch(&mut self.batch);
        let delivered = !self.batch.is_empty();
        deliver_batch(self.shard, &mut self.batch);
        delivered
    }

    /// One turn; returns whether it found work (another may find more at once) and when the
    /// next timer is due.
    fn turn(&mut self, now: Instant) -> (bool, Instant) {
        let lp = self.event_loop;
        let (ready, more_ready) = match lp.take_ready() {
            Ok(taken) => taken,
            Err(e) => {
                error!(error = %e, "taking the engine's events failed");
                (false, false)
            }
        };
        self.shard
            .metrics()
            .buffer_waits
            .add(lp.take_buffer_waits());
        let delivered = self.deliver_inbox();
        if now >= self.next_tick {
            let tick = self.shard.tick_interval();
            let ticks = (now - self.started).as_nanos() / tick.as_nanos();
            self.shard.tick(ticks as Tick);
            self.next_tick = self.started + tick * (ticks as u32 + 1);
            if now >= self.next_collect {
                crate::base::alloc::release_freed_pages();
                self.next_collect = now + COLLECT_EVERY;
            }
        }
        let next_close = lp.expire_closes(self.shard, now);
        // One clock read for the rate limiters per turn, not per connection.
        self.shard.start_turn();
        let ran = lp.run_round(self.shard, &mut self.keys);
        let completed = lp.end_turn(now);
        let next_timer = next_close.map_or(self.next_tick, |c| c.min(self.next_tick));
        (
            ready || more_ready || delivered || ran || completed,
            next_timer,
        )
    }

    /// Waits for the engine, the inbox, a wake-up, `until`, or `shutdown`.
    async fn wait(&mut self, until: Instant, shutdown: Option<&CancellationToken>) {
        let cancelled = async {
            match shutdown {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = cancelled => {}
            ready = self.event_loop.ready.readable() => {
                // Cleared before the turn takes the events: any event after that raises
                // the descriptor again.
                if let Ok(mut guard) = ready {
                    guard.clear_ready();
                }
            }
            more = self.inbox.recv_batch(&mut self.batch), if self.inbox_open => {
                self.inbox_open = more;
                deliver_batch(self.shard, &mut self.batch);
            }
            () = wake::scheduled() => {}
            () = tokio::time::sleep_until(until) => {}
        }
    }

    /// Drops every connection still open.
    pub fn finish_all(&self) {
        self.event_loop.finish_all(self.shard);
    }
}
