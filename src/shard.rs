//! A shard: one thread's share of the gateway. It owns its connections (in a `slab`), its side of
//! every room, a read buffer and a JSON parser that all its connections take turns using.
//!
//! Everything here is `!Send` and lives in one current-thread runtime, so the per-message path
//! takes no lock: handlers borrow the shard's state, queue frames and return.

use std::cell::{Cell, Ref, RefCell, RefMut};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use slab::Slab;
use tracing::debug;

use crate::base::client_id::ClientId;
use crate::base::identity::Identity;
use crate::base::time::now_ms;
use crate::broker::Broker;
use crate::heartbeat::{Heartbeats, Liveness};
use crate::limits::{Charge, RateLimiter, RateLimits, Verdict};
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::outbound::{self, Outbound, QueueTotal};
use crate::protocol::{ErrorReply, JsonParser, NodeClientId, ServerMessage};
use crate::rooms::LocalRooms;
use crate::routing::Disconnect;
use crate::ws::close::CloseCode;
use crate::ws::frame;

/// Bytes read from a socket in one go. Shared by all of a shard's connections: an idle connection
/// keeps no read buffer of its own.
const READ_BUF_SIZE: usize = 64 * 1024;

/// The close reason sent with 1001 at shutdown.
pub const SHUTDOWN_REASON: &str = "server shutting down";

/// Which protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The JSON chat protocol (`/ws`, `/`).
    Chat,
    /// Raw echo of every message (`/echo`): the RFC 6455 conformance target.
    Echo,
}

/// One connection's entry in the shard's slab: what other connections' handlers may touch.
/// The socket itself and the frame decoder stay in the connection's task.
pub struct ConnEntry {
    pub id: ClientId,
    pub endpoint: Endpoint,
    /// Who is connected, from the token (shared: no copy per connection).
    pub identity: Arc<Identity>,
    /// The address admitted (per-IP limits), given back when the connection ends.
    pub peer: IpAddr,
    pub limiter: RateLimiter,
    /// Rooms this connection is in (the other half of the room index). A boxed slice, not a
    /// `Vec`: it changes only on join and leave, and is in every slab slot.
    pub rooms: Box<[Arc<str>]>,
    pub outbound: Outbound,
    pub liveness: Liveness,
    /// When it connected (Unix seconds), for its session record.
    pub connected_at: u32,
}

pub struct ShardState {
    pub conns: Slab<ConnEntry>,
    pub rooms: LocalRooms,
    /// Bytes queued across all of `conns`, held against this shard's share of
    /// `max_total_queued_bytes`.
    pub queued: QueueTotal,
    /// Each user's chat connections here, for closing them all without a scan.
    pub(crate) users: UserConnections,
    /// Generation of the next connection; makes client ids unique even when slab slots are reused.
    next_generation: u32,
}

/// Each user's chat connections on one shard (slab keys), found without looking at every
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

    fn of(&self, user: &str) -> &[u32] {
        self.0.get(user).map_or(&[], Keys::as_slice)
    }
}

pub struct Shard {
    pub index: usize,
    pub node: Arc<Node>,
    state: RefCell<ShardState>,
    read_buf: RefCell<Box<[u8]>>,
    json: RefCell<JsonParser>,
    /// Scratch list of other shards a publication goes to, kept to avoid an allocation each time.
    pub(crate) route: RefCell<Vec<usize>>,
    heartbeats: RefCell<Heartbeats>,
    limits: RateLimits,
    /// This shard's share of `max_total_queued_bytes`.
    pub(crate) queue_budget: usize,
    started: std::time::Instant,
    /// The rate limiters' clock for the current connection's turn (read once per turn, not per
    /// frame: a turn is short).
    turn_clock_ms: Cell<u32>,
}

impl Shard {
    pub fn new(index: usize, node: Arc<Node>) -> Self {
        Shard {
            index,
            state: RefCell::new(ShardState {
                conns: Slab::new(),
                rooms: LocalRooms::default(),
                queued: QueueTotal::default(),
                users: UserConnections::default(),
                next_generation: 0,
            }),
            read_buf: RefCell::new(vec![0; READ_BUF_SIZE].into_boxed_slice()),
            json: RefCell::new(JsonParser::default()),
            route: RefCell::new(Vec::new()),
            heartbeats: RefCell::new(Heartbeats::new(&node.config)),
            limits: RateLimits::new(&node.config),
            queue_budget: node.config.max_total_queued_bytes / node.shards(),
            started: std::time::Instant::now(),
            turn_clock_ms: Cell::new(0),
            node,
        }
    }

    pub fn state(&self) -> RefMut<'_, ShardState> {
        self.state.borrow_mut()
    }

    pub fn state_ref(&self) -> Ref<'_, ShardState> {
        self.state.borrow()
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

    pub fn read_buf(&self) -> RefMut<'_, Box<[u8]>> {
        self.read_buf.borrow_mut()
    }

    /// The shared read buffer itself, for reads that borrow it only between awaits.
    pub fn read_buf_cell(&self) -> &RefCell<Box<[u8]>> {
        &self.read_buf
    }

    pub fn json(&self) -> RefMut<'_, JsonParser> {
        self.json.borrow_mut()
    }

    /// Adds a connection admitted for `peer`; chat clients are greeted with their id.
    pub fn register(&self, endpoint: Endpoint, identity: Arc<Identity>, peer: IpAddr) -> usize {
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
        let mut conn = ConnEntry {
            id,
            endpoint,
            liveness: self
                .heartbeats()
                .watch(entry.key(), generation, identity.expires_at),
            identity,
            peer,
            limiter: RateLimiter::new(&self.limits, self.clock_ms()),
            rooms: Box::default(),
            outbound: Outbound::default(),
            connected_at: (now_ms() / 1000) as u32,
        };
        if endpoint == Endpoint::Chat {
            if !Arc::ptr_eq(&conn.identity, &self.node.anonymous) {
                state.users.insert(&conn.identity.user_id, entry.key());
            }
            self.session_opened(&conn);
            let hello = ServerMessage::Connected {
                client_id: NodeClientId {
                    node: &self.node.id,
                    id,
                },
                timestamp: now_ms(),
            };
            conn.outbound.push(hello.encode(), &mut state.queued);
        }
        if self.node.is_draining() {
            // Upgraded just as shutdown began: greet, then close at once.
            let close = frame::encode_close(CloseCode::GOING_AWAY, SHUTDOWN_REASON);
            conn.outbound.push_close(close, &mut state.queued);
        }
        let key = entry.key();
        entry.insert(conn);
        self.node.connections[self.index].fetch_add(1, Ordering::Relaxed);
        self.metrics().accepted.add(1);
        key
    }

    /// This shard's own metrics (written by this thread only).
    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.index]
    }

    /// The id clients see: with the node's name.
    pub fn client_id(&self, id: ClientId) -> String {
        NodeClientId {
            node: &self.node.id,
            id,
        }
        .to_string()
    }

    /// Records a chat connection's session in Redis (with the Redis broker).
    fn session_opened(&self, conn: &ConnEntry) {
        if let Broker::Redis(redis) = &self.node.broker {
            let connected_at = u64::from(conn.connected_at) * 1000;
            redis.session_opened(
                self.client_id(conn.id),
                &conn.identity.user_id,
                connected_at,
            );
        }
    }

    /// Closes every chat connection of a user (anonymous connections are no one's), after what
    /// each has queued.
    pub fn disconnect_user(&self, disconnect: &Disconnect) {
        let close = frame::encode_close(CloseCode(disconnect.code), &disconnect.reason);
        let mut guard = self.state();
        let state = &mut *guard;
        let mut closed = 0;
        for &key in state.users.of(&disconnect.user) {
            let conn = &mut state.conns[key as usize];
            if !conn.outbound.is_closing() {
                conn.outbound.push_close(close.clone(), &mut state.queued);
                closed += 1;
            }
        }
        self.node
            .counters
            .users_disconnected
            .fetch_add(closed, Ordering::Relaxed);
    }

    /// Records every chat connection's session again (Redis lost them, or was away).
    pub fn resend_sessions(&self) {
        let state = self.state_ref();
        for (_, conn) in state.conns.iter() {
            if conn.endpoint == Endpoint::Chat {
                self.session_opened(conn);
            }
        }
    }

    /// Removes a connection whose task has ended, and gives back its admission.
    pub fn unregister(&self, key: usize) {
        let mut guard = self.state();
        let state = &mut *guard;
        let removed = state.conns.try_remove(key);
        if let Some(mut conn) = removed {
            self.metrics().closed(conn.outbound.close_code());
            conn.outbound.clear(&mut state.queued);
            if conn.endpoint == Endpoint::Chat {
                state.users.remove(&conn.identity.user_id, key);
            }
            drop(guard);
            if let Broker::Redis(redis) = &self.node.broker
                && conn.endpoint == Endpoint::Chat
            {
                redis.session_closed(self.client_id(conn.id));
            }
            self.node.connections[self.index].fetch_sub(1, Ordering::Relaxed);
            self.node.admission.release_upgrade();
            self.node.admission.release_socket(conn.peer);
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
            let counters = &self.node.counters;
            let counter = match charge {
                Charge::Frame => &counters.frames_rate_limited,
                _ => &counters.rate_limited,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Whether `frames` of history may be replayed to a connection (`limiter`): charged to its
    /// replay budget as they will cost its queue, counted (`replays_refused`) when refused.
    pub fn take_replay(&self, limiter: &mut RateLimiter, frames: &[Bytes]) -> bool {
        let bytes = frames.iter().map(outbound::cost).sum();
        // The turn's clock, as every other charge (see `RateLimiter::refill`).
        let now = self.turn_clock_ms.get();
        let taken = limiter.take_replay(&self.limits, bytes, now);
        if !taken {
            self.node
                .counters
                .replays_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Closes a connection that kept flooding past its strikes: 1008 "rate limit exceeded".
    pub fn close_flooder(&self, key: usize) {
        debug!(key, "closing (1008): rate limit exceeded");
        self.node
            .counters
            .flood_closed
            .fetch_add(1, Ordering::Relaxed);
        self.close(key, CloseCode::POLICY_VIOLATION, "rate limit exceeded");
    }

    /// Whether a connection should stop being read: its replies are piling up unread, past its
    /// own bound, or past nothing at all while the shard is over its memory budget.
    pub fn backlogged(&self, key: usize) -> bool {
        let state = self.state();
        let out = &state.conns[key].outbound;
        out.queued_bytes() > self.node.config.max_queued_bytes
            || (out.stale_bytes() > 0 && state.queued.over(self.queue_budget))
    }

    /// A connection's turn begins: reads the rate limiters' clock for it.
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
        self.node.connections[self.index].load(Ordering::Relaxed)
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

    pub fn send_error(&self, key: usize, error: ErrorReply<'_>) {
        self.send(key, ServerMessage::Error { error }.encode());
    }
}
