//! A shard: one thread's share of the gateway. It owns its connections (in a `slab`), its side of
//! every room, a read buffer and a JSON parser that all its connections take turns using.
//!
//! Everything here is `!Send` and lives in one current-thread runtime, so the per-message path
//! takes no lock: handlers borrow the shard's state, queue frames and return.

use std::cell::{RefCell, RefMut};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Waker;

use bytes::{Buf, Bytes};
use slab::Slab;
use tracing::{info, warn};

use crate::auth::Identity;
use crate::backplane::{Publication, Target};
use crate::client_id::ClientId;
use crate::close::CloseCode;
use crate::config::SlowConsumerPolicy;
use crate::frame;
use crate::heartbeat::{Heartbeats, Liveness};
use crate::limits::{RateLimiter, Verdict};
use crate::node::Node;
use crate::protocol::{ErrorReply, JsonParser, ServerMessage, now_ms};
use crate::rooms::LocalRooms;

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

/// A frame waiting behind the head of a queue.
struct Queued {
    frame: Bytes,
    /// A broadcast may be dropped for a slow reader under the `drop` policy; a direct reply
    /// (an error, `room_joined`, …) never is.
    broadcast: bool,
}

/// Frames waiting to be written to one connection, and how to wake the task that writes them.
#[derive(Default)]
pub struct Outbound {
    /// The oldest queued frame, kept inline: a connection with at most one frame pending (most
    /// of them, most of the time) costs no allocation for its queue. Possibly half written, so
    /// never dropped.
    head: Option<Bytes>,
    /// Frames behind `head`; allocated only while two or more are pending (boxed: an idle
    /// connection pays one pointer for it, in every slab slot).
    #[expect(
        clippy::box_collection,
        reason = "8 bytes per idle connection instead of 32"
    )]
    rest: Option<Box<VecDeque<Queued>>>,
    /// u32 (bounded by `max_queued_bytes`, at most 1 GiB): this struct is in every slab slot.
    queued_bytes: u32,
    /// Broadcasts dropped since the reader last caught up (saturating), for its `dropped` notice.
    dropped: u16,
    waker: Option<Waker>,
    /// Our close frame is queued: nothing may follow it on the wire.
    closing: bool,
}

impl Outbound {
    /// Queues a direct frame (a reply), unless the connection is closing (then it is dropped:
    /// the peer will not read past our close frame).
    pub fn push(&mut self, frame: Bytes) {
        self.enqueue(frame, false);
    }

    /// Queues a broadcast frame.
    pub fn push_broadcast(&mut self, frame: Bytes) {
        self.enqueue(frame, true);
    }

    fn enqueue(&mut self, frame: Bytes, broadcast: bool) {
        if self.closing {
            return;
        }
        self.queued_bytes = self.queued_bytes.saturating_add(frame.len() as u32);
        if self.head.is_some() {
            let rest = self.rest.get_or_insert_default();
            rest.push_back(Queued { frame, broadcast });
            return;
        }
        self.head = Some(frame);
        if let Some(waker) = &self.waker {
            waker.wake_by_ref();
        }
    }

    /// Drops the oldest queued broadcasts until `needed` more bytes fit under `bound`; returns
    /// how many were dropped and whether the room was made.
    pub fn make_room(&mut self, needed: usize, bound: usize) -> (usize, bool) {
        let droppable: usize = self
            .rest
            .iter()
            .flat_map(|rest| rest.iter())
            .filter(|q| q.broadcast)
            .map(|q| q.frame.len())
            .sum();
        if self.queued_bytes as usize - droppable + needed > bound {
            // Even dropping every queued broadcast would not make room: keep them.
            return (0, false);
        }
        let mut dropped = 0;
        if let Some(rest) = self.rest.as_mut() {
            let mut i = 0;
            while self.queued_bytes as usize + needed > bound && i < rest.len() {
                if rest[i].broadcast {
                    let gone = rest.remove(i).expect("index in range");
                    self.queued_bytes -= gone.frame.len() as u32;
                    dropped += 1;
                } else {
                    i += 1;
                }
            }
        }
        self.note_dropped(dropped);
        (dropped, self.queued_bytes as usize + needed <= bound)
    }

    /// Broadcasts dropped since the reader last caught up.
    pub fn dropped_before(&self) -> usize {
        self.dropped as usize
    }

    /// Counts broadcasts the reader will not get.
    pub fn note_dropped(&mut self, n: usize) {
        self.dropped = self.dropped.saturating_add(n.min(u16::MAX as usize) as u16);
    }

    /// Queues our close frame: the last frame this connection will send. Always wakes the task,
    /// which may be asleep on a full socket, so it starts the (time-bounded) close.
    pub fn push_close(&mut self, frame: Bytes) {
        self.push(frame);
        self.closing = true;
        if let Some(waker) = &self.waker {
            waker.wake_by_ref();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes as usize
    }

    /// Fills `slices` with the front of the queue, for one vectored write.
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let rest = self
            .rest
            .iter()
            .flat_map(|rest| rest.iter().map(|q| &q.frame));
        let mut n = 0;
        for (slot, frame) in slices.iter_mut().zip(self.head.iter().chain(rest)) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        n
    }

    /// Drops `written` bytes from the front of the queue.
    pub fn advance(&mut self, mut written: usize) {
        self.queued_bytes = self.queued_bytes.saturating_sub(written as u32);
        while let Some(front) = self.head.as_mut() {
            if front.len() > written {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.head = self
                .rest
                .as_mut()
                .and_then(|rest| rest.pop_front())
                .map(|q| q.frame);
        }
        debug_assert_eq!(written, 0, "wrote more than was queued");
        // Give a burst's queue back: an idle connection keeps no allocation.
        self.rest = None;
        if self.dropped > 0 {
            // Caught up: tell the reader what it missed.
            let notice = ServerMessage::Dropped {
                count: self.dropped,
            };
            self.dropped = 0;
            self.push(notice.encode());
        }
    }

    /// Who to wake when a frame arrives in an empty queue.
    pub fn set_waker(&mut self, waker: &Waker) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.waker = Some(waker.clone());
        }
    }

    /// Forgets the waker while the connection's own task runs: frames it queues for itself are
    /// flushed before it sleeps, and waking it would only poll it once more for nothing.
    pub fn clear_waker(&mut self) {
        self.waker = None;
    }
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
}

pub struct ShardState {
    pub conns: Slab<ConnEntry>,
    pub rooms: LocalRooms,
    /// Generation of the next connection; makes client ids unique even when slab slots are reused.
    next_generation: u32,
}

pub struct Shard {
    pub index: usize,
    pub node: Arc<Node>,
    state: RefCell<ShardState>,
    read_buf: RefCell<Box<[u8]>>,
    json: RefCell<JsonParser>,
    /// Scratch list of other shards a publication goes to, kept to avoid an allocation each time.
    route: RefCell<Vec<usize>>,
    heartbeats: RefCell<Heartbeats>,
    started: std::time::Instant,
}

impl Shard {
    pub fn new(index: usize, node: Arc<Node>) -> Self {
        Shard {
            index,
            state: RefCell::new(ShardState {
                conns: Slab::new(),
                rooms: LocalRooms::default(),
                next_generation: 0,
            }),
            read_buf: RefCell::new(vec![0; READ_BUF_SIZE].into_boxed_slice()),
            json: RefCell::new(JsonParser::default()),
            route: RefCell::new(Vec::new()),
            heartbeats: RefCell::new(Heartbeats::new(&node.config)),
            started: std::time::Instant::now(),
            node,
        }
    }

    pub fn state(&self) -> RefMut<'_, ShardState> {
        self.state.borrow_mut()
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

    pub fn json(&self) -> RefMut<'_, JsonParser> {
        self.json.borrow_mut()
    }

    /// Adds a connection admitted for `peer`; chat clients are greeted with their id.
    pub fn register(&self, endpoint: Endpoint, identity: Arc<Identity>, peer: IpAddr) -> usize {
        let mut state = self.state();
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
            limiter: RateLimiter::new(&self.node.config, self.clock_ms()),
            rooms: Box::default(),
            outbound: Outbound::default(),
        };
        if endpoint == Endpoint::Chat {
            conn.outbound.push(
                ServerMessage::Connected {
                    client_id: id,
                    timestamp: now_ms(),
                }
                .encode(),
            );
        }
        if self.node.is_draining() {
            // Upgraded just as shutdown began: greet, then close at once.
            conn.outbound
                .push_close(frame::encode_close(CloseCode::GOING_AWAY, SHUTDOWN_REASON));
        }
        let key = entry.key();
        entry.insert(conn);
        self.node.connections[self.index].fetch_add(1, Ordering::Relaxed);
        key
    }

    /// Removes a connection whose task has ended, and gives back its admission.
    pub fn unregister(&self, key: usize) {
        let removed = self.state().conns.try_remove(key);
        if let Some(conn) = removed {
            self.node.connections[self.index].fetch_sub(1, Ordering::Relaxed);
            self.node.admission.release(conn.peer);
        }
    }

    /// Runs an inbound message of `len` bytes past the connection's rate limit.
    pub fn rate_check(&self, key: usize, len: usize) -> Verdict {
        let now = self.clock_ms();
        let verdict = self.state().conns[key]
            .limiter
            .check(&self.node.config, len, now);
        if !matches!(verdict, Verdict::Allow) {
            self.node
                .counters
                .rate_limited
                .fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Milliseconds since the shard started: the clock of the rate limiters.
    pub fn clock_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Starts closing every connection with 1001, after what each has queued.
    pub fn close_all_going_away(&self) {
        let close = frame::encode_close(CloseCode::GOING_AWAY, SHUTDOWN_REASON);
        for (_, conn) in self.state().conns.iter_mut() {
            conn.outbound.push_close(close.clone());
        }
    }

    /// Connections of this shard still open (or closing).
    pub fn connection_count(&self) -> usize {
        self.node.connections[self.index].load(Ordering::Relaxed)
    }

    /// Queues a frame for one connection.
    pub fn send(&self, key: usize, frame: Bytes) {
        if let Some(conn) = self.state().conns.get_mut(key) {
            conn.outbound.push(frame);
        }
    }

    /// Queues a close frame for one connection, after what it already has queued.
    pub fn close(&self, key: usize, code: CloseCode, reason: &str) {
        if let Some(conn) = self.state().conns.get_mut(key) {
            conn.outbound.push_close(frame::encode_close(code, reason));
        }
    }

    pub fn send_error(&self, key: usize, error: ErrorReply<'_>) {
        self.send(key, ServerMessage::Error { error }.encode());
    }

    /// Delivers to this shard's recipients, then hands the publication to the backplane for the
    /// other shards that have recipients.
    pub fn publish(&self, publication: Publication) {
        let mut route = self.route.borrow_mut();
        route.clear();
        {
            let state = self.state.borrow();
            let shards = self.node.shards();
            match &publication.target {
                Target::Room(name) => match state.rooms.get(name) {
                    Some(room) => route.extend(room.presence.other_shards(self.index)),
                    // No member here (a notice after the last local member left, or a publish
                    // from a non-member): ask the directory, under its lock.
                    None => {
                        if let Some(presence) = self.node.rooms.presence(name) {
                            route.extend(presence.other_shards(self.index));
                        }
                    }
                },
                Target::All => route.extend((0..shards).filter(|&s| s != self.index)),
            }
        }
        if let Some(include) = &publication.include {
            route.retain(|&s| include.iter().any(|id| id.shard as usize == s));
        }
        self.deliver(&publication);
        if !route.is_empty() {
            self.node.backplane.publish(&route, Arc::new(publication));
        }
    }

    /// Queues the publication's frame to each matching connection of this shard.
    pub fn deliver(&self, publication: &Publication) {
        let mut state = self.state();
        let ShardState { conns, rooms, .. } = &mut *state;
        let max_queued = self.node.config.max_queued_bytes;
        let queue_to = |conn: &mut ConnEntry| {
            if !publication.admits(conn.id) || conn.outbound.is_closing() {
                return;
            }
            let frame = &publication.frame;
            let queued = conn.outbound.queued_bytes();
            // A frame bigger than the bound still goes to a reader that has caught up: the bound
            // is on backlog.
            if queued == 0 || queued + frame.len() <= max_queued {
                conn.outbound.push_broadcast(frame.clone());
                return;
            }
            // A reader this far behind would make the shard buffer without bound.
            match self.node.config.slow_consumer_policy {
                SlowConsumerPolicy::Close => {
                    warn!(client = %conn.id, queued = conn.outbound.queued_bytes(), "closing slow consumer");
                    self.node
                        .counters
                        .slow_consumers
                        .fetch_add(1, Ordering::Relaxed);
                    conn.outbound.push_close(frame::encode_close(
                        CloseCode::POLICY_VIOLATION,
                        "slow consumer",
                    ));
                }
                SlowConsumerPolicy::Drop => {
                    let (dropped, fits) = conn.outbound.make_room(frame.len(), max_queued);
                    let dropped = if fits {
                        conn.outbound.push_broadcast(frame.clone());
                        dropped
                    } else {
                        conn.outbound.note_dropped(1);
                        dropped + 1
                    };
                    if conn.outbound.dropped_before() == dropped {
                        // Logged when a reader starts dropping, not per message.
                        info!(client = %conn.id, "slow consumer: dropping broadcasts");
                    }
                    self.node
                        .counters
                        .dropped_messages
                        .fetch_add(dropped as u64, Ordering::Relaxed);
                }
            }
        };
        match (&publication.target, &publication.include) {
            (Target::All, Some(include)) => {
                for id in include.iter().filter(|id| id.shard as usize == self.index) {
                    if let Some(conn) = conns.get_mut(id.key as usize)
                        && conn.id == *id
                        && conn.endpoint == Endpoint::Chat
                    {
                        queue_to(conn);
                    }
                }
            }
            (Target::All, None) => {
                for (_, conn) in conns.iter_mut() {
                    if conn.endpoint == Endpoint::Chat {
                        queue_to(conn);
                    }
                }
            }
            (Target::Room(name), _) => {
                if let Some(room) = rooms.get(name) {
                    for &key in &room.members {
                        queue_to(&mut conns[key]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_is_fifo_across_partial_writes_and_frees_its_queue_when_drained() {
        let mut out = Outbound::default();
        for frame in ["ab", "cde", "f"] {
            out.push(Bytes::from_static(frame.as_bytes()));
        }
        assert_eq!(out.queued_bytes(), 6);
        out.advance(3); // "ab" and the "c" of "cde"
        let mut slices = [IoSlice::new(&[]); 4];
        let n = out.slices(&mut slices);
        let pending: Vec<&[u8]> = slices[..n].iter().map(|s| &**s).collect();
        assert_eq!(pending, vec![&b"de"[..], &b"f"[..]]);
        out.advance(3);
        assert!(out.is_empty());
        assert_eq!(out.queued_bytes(), 0);
        assert!(out.rest.is_none());
    }

    #[test]
    fn make_room_drops_only_broadcasts_and_only_when_that_is_enough() {
        let frame = |n: usize| Bytes::from(vec![0u8; n]);
        let mut out = Outbound::default();
        out.push(frame(10)); // head: never dropped
        out.push_broadcast(frame(30));
        out.push(frame(20)); // a direct reply: never dropped
        out.push_broadcast(frame(30));
        assert_eq!(out.queued_bytes(), 90);
        // Needing 90 more under a bound of 100: even dropping both broadcasts leaves 30 + 90.
        assert_eq!(out.make_room(90, 100), (0, false));
        assert_eq!(out.queued_bytes(), 90, "nothing dropped for nothing");
        // Needing 40: dropping the oldest broadcast (30) is enough.
        assert_eq!(out.make_room(40, 100), (1, true));
        assert_eq!(out.queued_bytes(), 60);
        assert_eq!(out.dropped_before(), 1);
    }
}
