//! A shard: one thread's share of the gateway. It owns its connections (in a `slab`), its side of
//! every room, its timer wheel and a read buffer all its connections take turns using.
//!
//! Everything here is `!Send` and lives on one thread, so the per-message path takes no lock:
//! handlers borrow the shard's state, queue frames and return. What a shard offers its driver is
//! synchronous: adopt a connection ([`Shard::register`]), feed it bytes ([`super::input`]), take
//! what is queued for it ([`ConnEntry::outbound`]), [`Shard::tick`], and release it
//! ([`Shard::unregister`]).

use std::cell::{Cell, Ref, RefCell, RefMut};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use slab::Slab;
use tracing::debug;

use crate::base::client_id::ClientId;
use crate::base::time::now_ms;
use crate::conn::limits::{Charge, RateLimiter, RateLimits, Verdict};
use crate::conn::outbound::{self, Outbound, QueueTotal};
use crate::rooms::LocalRooms;
use crate::ws::close::CloseCode;
use crate::ws::deflate::Prepared;
use crate::ws::frame;

use super::entry::ConnEntry;
use super::heartbeat::Heartbeats;
use super::metrics::ShardMetrics;
use super::wheel::Tick;
use super::{App, AppId, Newcomer, Shared};

/// Bytes read from a socket in one go. Shared by all of a shard's connections: an idle connection
/// keeps no read buffer of its own.
const READ_BUF_SIZE: usize = 64 * 1024;

/// A connection held by [`Shard::hold_while`]: let go when the hold ends however it ends (its
/// call answered, or the task dropped or unwinding), and given a turn to read what waited.
struct Hold {
    shard: Weak<Shard>,
    key: usize,
    id: ClientId,
}

impl Hold {
    /// Lets the connection go; whether it is still open (the answer is for it).
    fn release(&self, shard: &Shard) -> bool {
        let Ok(mut state) = shard.state.try_borrow_mut() else {
            return false;
        };
        match state.conns.get_mut(self.key) {
            Some(conn) if conn.id == self.id => {
                conn.held = false;
                !conn.outbound.is_closing()
            }
            _ => false,
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(shard) = self.shard.upgrade() {
            self.release(&shard);
            if let Ok(state) = shard.state.try_borrow() {
                state.queued.schedule(self.key);
            }
        }
    }
}

/// The close reason sent with 1001 at shutdown.
pub const SHUTDOWN_REASON: &str = "server shutting down";

pub struct ShardState {
    pub conns: Slab<ConnEntry>,
    pub rooms: LocalRooms,
    /// Bytes queued across all of `conns`, held against this shard's share of
    /// `max_total_queued_bytes`.
    pub queued: QueueTotal,
    /// Each user's addressable connections here, for closing them all without a scan.
    pub(crate) users: UserConnections,
    /// Generation of the next connection; makes client ids unique even when slab slots are reused.
    next_generation: u32,
}

/// Each user's addressable connections on one shard (slab keys), found without looking at every
/// connection. Anonymous connections are no one's and are not listed. One map entry per user,
/// with the usual single connection inline.
#[derive(Default)]
pub(crate) struct UserConnections(HashMap<Arc<str>, Keys>);

enum Keys {
    One(u32),
    Many(Vec<u32>),
}

impl Keys {
    fn as_slice(&self) -> &[u32] {
        match self {
            Keys::One(key) => std::slice::from_ref(key),
            Keys::Many(keys) => keys,
        }
    }
}

impl UserConnections {
    pub(crate) fn insert(&mut self, user: &Arc<str>, key: usize) {
        let key = key as u32;
        match self.0.get_mut(user) {
            None => {
                self.0.insert(user.clone(), Keys::One(key));
            }
            Some(keys @ Keys::One(_)) => {
                let first = keys.as_slice()[0];
                *keys = Keys::Many(vec![first, key]);
            }
            Some(Keys::Many(keys)) => keys.push(key),
        }
    }

    fn remove(&mut self, user: &str, key: usize) {
        let key = key as u32;
        let Some(keys) = self.0.get_mut(user) else {
            return;
        };
        let Keys::Many(many) = keys else {
            self.0.remove(user);
            return;
        };
        if let Some(at) = many.iter().position(|&k| k == key) {
            many.swap_remove(at);
        }
        if let [one] = many[..] {
            *keys = Keys::One(one);
        }
    }

    pub(crate) fn of(&self, user: &str) -> &[u32] {
        self.0.get(user).map_or(&[], Keys::as_slice)
    }
}

pub struct Shard {
    pub index: usize,
    pub shared: Arc<Shared>,
    /// The apps this shard's connections speak, by [`AppId`].
    apps: Box<[Box<dyn App>]>,
    state: RefCell<ShardState>,
    read_buf: RefCell<Box<[u8]>>,
    /// Scratch list of other shards a publication goes to, kept to avoid an allocation each time.
    pub(crate) route: RefCell<Vec<usize>>,
    heartbeats: RefCell<Heartbeats>,
    limits: RateLimits,
    /// This shard's share of `max_total_queued_bytes`.
    pub(crate) queue_budget: usize,
    started: std::time::Instant,
    /// The rate limiters' clock for the loop's current turn (read once per turn, not per
    /// connection or frame: a turn is short).
    turn_clock_ms: Cell<u32>,
    /// Itself, for the tasks of [`Shard::hold_while`] (which outlive a handler's borrow).
    me: Weak<Shard>,
}

impl Shard {
    /// Shard `index` of the node whose shards share `shared`, serving `apps`.
    pub fn new(index: usize, shared: Arc<Shared>, apps: Vec<Box<dyn App>>) -> Rc<Self> {
        assert!(apps.len() <= usize::from(u8::MAX), "an AppId is a u8");
        Rc::new_cyclic(|me| Shard {
            me: me.clone(),
            index,
            apps: apps.into_boxed_slice(),
            state: RefCell::new(ShardState {
                conns: Slab::new(),
                rooms: LocalRooms::default(),
                queued: QueueTotal::default(),
                users: UserConnections::default(),
                next_generation: 0,
            }),
            read_buf: RefCell::new(vec![0; READ_BUF_SIZE].into_boxed_slice()),
            route: RefCell::new(Vec::new()),
            heartbeats: RefCell::new(Heartbeats::new(&shared.config)),
            limits: RateLimits::new(&shared.config),
            queue_budget: shared.config.max_total_queued_bytes / shared.shards(),
            started: std::time::Instant::now(),
            turn_clock_ms: Cell::new(0),
            shared,
        })
    }

    pub fn state(&self) -> RefMut<'_, ShardState> {
        self.state.borrow_mut()
    }

    pub fn state_ref(&self) -> Ref<'_, ShardState> {
        self.state.borrow()
    }

    /// The app `id` names.
    pub fn app(&self, id: AppId) -> &dyn App {
        &*self.apps[usize::from(id.0)]
    }

    /// Whether connections of app `id` are addressable (see [`App::addressable`]).
    pub fn addressable(&self, id: AppId) -> bool {
        self.app(id).addressable()
    }

    pub fn heartbeats(&self) -> RefMut<'_, Heartbeats> {
        self.heartbeats.borrow_mut()
    }

    /// Notes that the peer of `key` was heard from (any frame counts for the heartbeat).
    pub fn seen(&self, key: usize) {
        let now = self.heartbeats.borrow().now();
        if let Some(conn) = self.state().conns.get_mut(key) {
            conn.liveness.last_seen = now;
        }
    }

    /// The heartbeat's tick: how often the driver calls [`Shard::tick`].
    pub fn tick_interval(&self) -> std::time::Duration {
        self.heartbeats.borrow().tick()
    }

    /// The heartbeat's turn at tick `now`: pings the idle, closes the silent and the expired
    /// (counted), and refreshes the shard's queued-bytes gauge.
    pub fn tick(&self, now: Tick) {
        let mut guard = self.state();
        let state = &mut *guard;
        self.shared.queued_bytes[self.index].store(state.queued.bytes(), Ordering::Relaxed);
        let closed =
            self.heartbeats
                .borrow_mut()
                .on_tick(now, &mut state.conns, &mut state.queued, |app| {
                    self.app(app).ping()
                });
        let counters = &self.shared.counters;
        if closed.expired_tokens > 0 {
            let expired = &counters.tokens_expired;
            expired.fetch_add(closed.expired_tokens, Ordering::Relaxed);
        }
        if closed.timed_out > 0 {
            let timeouts = &counters.heartbeat_timeouts;
            timeouts.fetch_add(closed.timed_out, Ordering::Relaxed);
        }
    }

    pub fn read_buf(&self) -> RefMut<'_, Box<[u8]>> {
        self.read_buf.borrow_mut()
    }

    /// The shared read buffer itself, for reads that borrow it only between awaits.
    pub fn read_buf_cell(&self) -> &RefCell<Box<[u8]>> {
        &self.read_buf
    }

    /// Adopts an admitted connection, and lets its app greet it.
    pub fn register(&self, newcomer: Newcomer<'_>) -> usize {
        let Newcomer {
            app,
            identity,
            peer,
            data,
            deflate,
        } = newcomer;
        let key = {
            let mut guard = self.state();
            let state = &mut *guard;
            let generation = state.next_generation;
            state.next_generation = generation.wrapping_add(1);
            let entry = state.conns.vacant_entry();
            let id = ClientId {
                shard: self.index as u16,
                key: entry.key() as u32,
                generation,
            };
            if self.addressable(app) && !self.shared.is_anonymous(&identity) {
                state.users.insert(&identity.user_id, entry.key());
            }
            let key = entry.key();
            entry.insert(ConnEntry {
                id,
                app,
                held: false,
                liveness: self
                    .heartbeats
                    .borrow_mut()
                    .watch(key, generation, identity.expires_at),
                identity,
                peer,
                limiter: RateLimiter::new(&self.limits, self.clock_ms()),
                rooms: Box::default(),
                outbound: Outbound::new(deflate),
                connected_at: (now_ms() / 1000) as u32,
            });
            key
        };
        self.app(app).opened(self, key, data);
        if self.shared.is_draining() {
            // Upgraded just as shutdown began: greet, then close at once.
            self.close(key, CloseCode::GOING_AWAY, SHUTDOWN_REASON);
        }
        self.shared.connections[self.index].fetch_add(1, Ordering::Relaxed);
        self.metrics().accepted.add(1);
        if deflate.is_on() {
            self.metrics().compressed_connections.add(1);
        }
        key
    }

    /// This shard's own metrics (written by this thread only).
    pub fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics[self.index]
    }

    /// Closes every addressable connection of `user` (anonymous connections are no one's) with
    /// `code` and `reason`, after what each has queued; returns how many were not closing yet.
    pub fn disconnect_user(&self, user: &str, code: CloseCode, reason: &str) -> u64 {
        let close = frame::encode_close(code, reason);
        let mut guard = self.state();
        let state = &mut *guard;
        let mut closed = 0;
        for &key in state.users.of(user) {
            let conn = &mut state.conns[key as usize];
            if !conn.outbound.is_closing() {
                conn.outbound.push_close(close.clone(), &mut state.queued);
                closed += 1;
            }
        }
        self.shared
            .counters
            .users_disconnected
            .fetch_add(closed, Ordering::Relaxed);
        closed
    }

    /// Removes a connection whose driver is done with it, gives back its admission, and tells
    /// its app.
    pub fn unregister(&self, key: usize) {
        let mut guard = self.state();
        let state = &mut *guard;
        let removed = state.conns.try_remove(key);
        if let Some(mut conn) = removed {
            let close_code = conn.outbound.close_code();
            self.metrics().closed(close_code);
            if self.shared.config.access_log {
                let seconds = (now_ms() / 1000).saturating_sub(u64::from(conn.connected_at));
                // No close code: the peer vanished (or hung up first) before we sent one.
                tracing::info!(
                    target: "wsgate::access",
                    client = %conn.id,
                    user = %conn.identity.user_id,
                    peer = %conn.peer,
                    seconds,
                    close_code = close_code.map_or(0, u32::from),
                    "connection closed"
                );
            }
            conn.outbound.clear(&mut state.queued);
            if self.addressable(conn.app) {
                state.users.remove(&conn.identity.user_id, key);
            }
            drop(guard);
            self.app(conn.app).closed(self, &conn);
            self.shared.connections[self.index].fetch_sub(1, Ordering::Relaxed);
            self.shared.admission.release_upgrade();
            self.shared.admission.release_socket(conn.peer);
        }
    }

    /// Charges a frame or message to the connection's rate limits. Refusals are counted (a data
    /// message in `rate_limited`, other frames in `frames_rate_limited`); `Close` is the caller's
    /// to carry out, with [`Shard::close_flooder`].
    pub fn charge(&self, key: usize, charge: Charge) -> Verdict {
        let now = self.turn_clock_ms.get();
        let verdict = self.state().conns[key]
            .limiter
            .check(&self.limits, charge, now);
        if verdict != Verdict::Allow {
            let counters = &self.shared.counters;
            let counter = match charge {
                Charge::Frame => &counters.frames_rate_limited,
                _ => &counters.rate_limited,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Whether `frames` of history may be replayed to a connection (`limiter`): charged to its
    /// replay budget as they will cost its queue (uncompressed: the most they can), counted
    /// (`replays_refused`) when refused.
    pub fn take_replay(&self, limiter: &mut RateLimiter, frames: &[Prepared]) -> bool {
        let bytes = frames.iter().map(|f| outbound::cost(f.plain())).sum();
        // The turn's clock, as every other charge (see `RateLimiter::refill`).
        let now = self.turn_clock_ms.get();
        let taken = limiter.take_replay(&self.limits, bytes, now);
        if !taken {
            self.shared
                .counters
                .replays_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Closes a connection that kept flooding past its strikes: 1008 "rate limit exceeded".
    pub fn close_flooder(&self, key: usize) {
        debug!(key, "closing (1008): rate limit exceeded");
        self.shared
            .counters
            .flood_closed
            .fetch_add(1, Ordering::Relaxed);
        self.close(key, CloseCode::POLICY_VIOLATION, "rate limit exceeded");
    }

    /// Whether a connection should stop being read: its app holds it (see
    /// [`Shard::hold_while`]), or its replies are piling up unread, past its own bound, or past
    /// nothing at all while the shard is over its memory budget.
    pub fn backlogged(&self, key: usize) -> bool {
        let state = self.state();
        let conn = &state.conns[key];
        let out = &conn.outbound;
        conn.held
            || out.queued_bytes() > self.shared.config.max_queued_bytes
            || (out.stale_bytes() > 0 && state.queued.over(self.queue_budget))
    }

    /// Whether its app holds connection `key` (see [`Shard::hold_while`]).
    pub fn is_held(&self, key: usize) -> bool {
        self.state_ref().conns[key].held
    }

    /// Stops reading connection `key` while `call` runs on this thread (an app asking its
    /// backend, say), so that its messages stay in order; then, if the connection is still open,
    /// `done` gets the result and reading resumes. Other connections are served meanwhile.
    pub fn hold_while<T: 'static>(
        &self,
        key: usize,
        call: impl Future<Output = T> + 'static,
        done: impl FnOnce(&Shard, usize, T) + 'static,
    ) {
        let id = {
            let mut state = self.state();
            let conn = &mut state.conns[key];
            conn.held = true;
            conn.id
        };
        let hold = Hold {
            shard: self.me.clone(),
            key,
            id,
        };
        tokio::task::spawn_local(async move {
            let result = call.await;
            let Some(shard) = hold.shard.upgrade() else {
                return;
            };
            if hold.release(&shard) {
                done(&shard, key, result);
            }
        });
    }

    /// A turn of the shard's loop begins: reads the rate limiters' clock for every connection it
    /// runs (a turn is bounded, so the clock is at most a turn old).
    pub fn start_turn(&self) {
        self.turn_clock_ms.set(self.clock_ms());
    }

    /// Milliseconds since the shard started: the clock of the rate limiters.
    pub fn clock_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Starts closing every connection with 1001, after what each has queued.
    pub fn close_all_going_away(&self) {
        let close = frame::encode_close(CloseCode::GOING_AWAY, SHUTDOWN_REASON);
        let mut guard = self.state();
        let state = &mut *guard;
        for (_, conn) in state.conns.iter_mut() {
            conn.outbound.push_close(close.clone(), &mut state.queued);
        }
    }

    /// Connections of this shard still open (or closing).
    pub fn connection_count(&self) -> usize {
        self.shared.connections[self.index].load(Ordering::Relaxed)
    }

    /// Queues a frame for one connection.
    pub fn send(&self, key: usize, frame: Bytes) {
        let mut guard = self.state();
        let state = &mut *guard;
        if let Some(conn) = state.conns.get_mut(key) {
            conn.outbound.push(frame, &mut state.queued);
        }
    }

    /// Queues the answer to a ping (coalesced with one still waiting).
    pub fn send_pong(&self, key: usize, frame: Bytes) {
        let mut guard = self.state();
        let state = &mut *guard;
        if let Some(conn) = state.conns.get_mut(key) {
            conn.outbound.push_pong(frame, &mut state.queued);
        }
    }

    /// Queues a close frame for one connection, after what it already has queued.
    pub fn close(&self, key: usize, code: CloseCode, reason: &str) {
        let mut guard = self.state();
        let state = &mut *guard;
        if let Some(conn) = state.conns.get_mut(key) {
            conn.outbound
                .push_close(frame::encode_close(code, reason), &mut state.queued);
        }
    }

    /// Whether the connection has queued its close frame (nothing more is read or handled).
    pub fn is_closing(&self, key: usize) -> bool {
        self.state().conns[key].outbound.is_closing()
    }
}

#[cfg(test)]
impl Shard {
    /// Empties a connection's queue as if its socket took all of it; returns each frame's opcode
    /// and payload (server frames of under 126 bytes: a 2-byte header).
    pub(crate) fn take_written(&self, key: usize) -> Vec<(u8, Vec<u8>)> {
        let mut guard = self.state();
        let state = &mut *guard;
        let out = &mut state.conns[key].outbound;
        let mut frames = Vec::new();
        while !out.is_empty() {
            let mut slices = [std::io::IoSlice::new(&[]); 16];
            let n = out.slices(&mut slices);
            let mut written = 0;
            for frame in &slices[..n] {
                frames.push((frame[0] & 0x0F, frame[2..].to_vec()));
                written += frame.len();
            }
            out.advance(written, &mut state.queued);
        }
        frames
    }
}
