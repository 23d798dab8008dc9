//! Fan-out: who a publication is for, and getting it there — queued to this shard's recipients,
//! handed to the other shards with recipients over the [`crate::runtime::bus`], each recipient's
//! queue bounded by the slow-consumer policy; and a room stream's messages to its members in
//! offset order, with what a member missed caught up from the history (or a `resync`).
//!
//! The other nodes are not this module's: the broker reaches them, and [`crate::cluster`] ties it
//! to what is here.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use crate::base::client_id::ClientId;
use crate::base::time::now_ms;
use crate::config::SlowConsumerPolicy;
use crate::conn::outbound::{self, QueueTotal};
use crate::protocol::{self, RequestId, ServerMessage};
use crate::rooms::presence::{Entry, NodesPresence};
use crate::rooms::stream::Position;
use crate::rooms::{Joining, PENDING, RoomState, Target};
use crate::runtime::Shared;
use crate::runtime::bus::{self, Work};
use crate::runtime::entry::ConnEntry;
use crate::runtime::shard::{Shard, ShardState};
use crate::ws::close::CloseCode;
use crate::ws::deflate::Prepared;
use crate::ws::frame::{self, OpCode};

/// One message for many recipients: framed once (and compressed at most once), the same `Bytes`
/// queued to each of them.
#[derive(Clone, Debug)]
pub struct Publication {
    pub target: Target,
    /// A complete, encoded server frame, and its compressed twin once a recipient needs it.
    pub frame: Prepared,
    /// When set, only these clients (that also match `target`) receive it.
    pub include: Option<Vec<ClientId>>,
    /// These clients do not receive it.
    pub exclude: Vec<ClientId>,
}

impl Publication {
    /// `frame` for everyone `target` names.
    pub fn to(target: Target, frame: Bytes) -> Self {
        Publication {
            target,
            frame: Prepared::new(frame),
            include: None,
            exclude: Vec::new(),
        }
    }

    pub fn to_room(room: Arc<str>, frame: Bytes) -> Self {
        Self::to(Target::Room(room), frame)
    }

    pub fn excluding(mut self, client: ClientId) -> Self {
        self.exclude.push(client);
        self
    }

    /// Whether `client`, matched by the target already, passes the include/exclude lists.
    pub fn admits(&self, client: ClientId) -> bool {
        !self.exclude.contains(&client)
            && self
                .include
                .as_ref()
                .is_none_or(|ids| ids.contains(&client))
    }
}

/// A room message with its place in the room's stream.
pub struct StreamMessage {
    pub room: Arc<RoomState>,
    pub offset: u64,
    pub frame: Prepared,
}

impl Work for Publication {
    fn frame(&self) -> &Bytes {
        self.frame.plain()
    }

    fn is_publication(&self) -> bool {
        true
    }

    fn run(&self, shard: &Shard) {
        deliver(shard, self);
    }
}

impl Work for StreamMessage {
    fn frame(&self) -> &Bytes {
        self.frame.plain()
    }

    fn is_publication(&self) -> bool {
        true
    }

    fn run(&self, shard: &Shard) {
        deliver_stream(shard, self);
    }
}

/// The node has synced the room with the broker: the joins waiting for it complete.
struct Synced(Arc<RoomState>);

impl Work for Synced {
    fn run(&self, shard: &Shard) {
        complete_joins(shard, &self.0);
    }
}

/// The room's stream started over at this offset (or lost more than its history holds): its
/// members are told to `resync`.
struct Resync(Arc<RoomState>, u64);

impl Work for Resync {
    fn run(&self, shard: &Shard) {
        resync(shard, &self.0, self.1);
    }
}

/// A frame for one client.
struct Reply {
    to: ClientId,
    frame: Bytes,
}

impl Work for Reply {
    fn frame(&self) -> &Bytes {
        &self.frame
    }

    fn run(&self, shard: &Shard) {
        let mut guard = shard.state();
        let state = &mut *guard;
        if let Some(conn) = state.conns.get_mut(self.to.key as usize)
            && conn.id == self.to
        {
            conn.outbound.push(self.frame.clone(), &mut state.queued);
        }
    }
}

/// Delivers to this shard's recipients, then hands the publication to the bus for the other
/// shards that have recipients.
pub fn publish(shard: &Shard, publication: Publication) {
    let mut route = shard.route.borrow_mut();
    route.clear();
    {
        let state = shard.state_ref();
        let shards = shard.shared.shards();
        match &publication.target {
            Target::Room(name) => match state.rooms.get(name) {
                Some(room) => route.extend(room.state.other_shards(shard.index)),
                // No member here (a notice after the last local member left, or a publish from a
                // non-member): ask the directory, under its lock.
                None => {
                    if let Some(state) = shard.shared.rooms.get(name) {
                        route.extend(state.other_shards(shard.index));
                    }
                }
            },
            // A user's connections may be on any shard.
            Target::All | Target::User(_) => {
                route.extend((0..shards).filter(|&s| s != shard.index));
            }
        }
    }
    if let Some(include) = &publication.include {
        route.retain(|&s| include.iter().any(|id| id.shard as usize == s));
    }
    deliver(shard, &publication);
    if !route.is_empty() {
        shard.shared.forward(&route, Arc::new(publication));
    }
}

/// Delivers a publication another node shared (`json`, its text) to this node's recipients.
pub fn publish_from_broker(shared: &Shared, target: Target, json: &[u8]) {
    let shards: Vec<usize> = match &target {
        Target::All | Target::User(_) => (0..shared.shards()).collect(),
        Target::Room(room) => match shared.rooms.get(room) {
            Some(state) => state.shards_with_members().collect(),
            None => return,
        },
    };
    if shards.is_empty() {
        return;
    }
    let publication = Publication::to(target, frame::encode(OpCode::Text, json));
    shared.forward(&shards, Arc::new(publication));
}

/// Tells this node's members of `room` who left it (`gone`) and who joined it (`came`) on other
/// nodes, as far as notices go (`presence_max_members`).
pub fn tell_presence(shared: &Shared, room: &Arc<RoomState>, gone: &[Entry], came: &[Entry]) {
    // As on the node where it happens: a room of at most `presence_max_members` connections
    // counting the one that joins or leaves.
    let total = room.presence().total();
    let max = shared.config.presence_max_members;
    let gone = if total < max { gone } else { &[] };
    let came = if total <= max { came } else { &[] };
    if gone.is_empty() && came.is_empty() {
        return;
    }
    let shards: Vec<usize> = room.shards_with_members().collect();
    let timestamp = now_ms();
    let notices = gone
        .iter()
        .map(|e| ServerMessage::UserLeft {
            room: &room.name,
            username: &e.username,
            user_id: e.shown_id(),
            timestamp,
        })
        .chain(came.iter().map(|e| ServerMessage::UserJoined {
            room: &room.name,
            username: &e.username,
            user_id: e.shown_id(),
            timestamp,
        }));
    for notice in notices {
        let publication = Publication::to_room(room.name.clone(), notice.encode());
        shared.forward(&shards, Arc::new(publication));
    }
}

/// Queues a frame for one client, whichever thread it comes from.
pub fn reply(shared: &Shared, to: ClientId, frame: Bytes) {
    let reply = Reply { to, frame };
    shared
        .bus
        .send_always(&[usize::from(to.shard)], Arc::new(reply));
}

/// Hands the stream message `offset` of `room` to the shards with members. Called under the
/// stream's lock, which keeps the offsets in order on every inbox.
pub fn forward_stream(shared: &Shared, room: &Arc<RoomState>, offset: u64, frame: Prepared) {
    let shards: Vec<usize> = room.shards_with_members().collect();
    let message = StreamMessage {
        room: room.clone(),
        offset,
        frame,
    };
    shared.forward(&shards, Arc::new(message));
}

/// Applies what the broker says of a room's stream (`position`, and its history from the offset
/// after the node's, or its most recent messages, as JSON): the first sync completes the joins
/// waiting for it; messages the node missed are delivered; when the history cannot give all of
/// them, or the epoch changed, the members are told to `resync`.
pub fn catch_up_stream(
    shared: &Shared,
    room: &Arc<RoomState>,
    position: Position,
    kept: Vec<(u64, Vec<u8>)>,
    presence: Option<NodesPresence>,
) {
    let limits = shared.rooms.history_limits();
    let now = Instant::now();
    let framed: Vec<(u64, Prepared)> = kept
        .into_iter()
        .filter(|(_, json)| protocol::is_json_object(json))
        .map(|(offset, json)| (offset, Prepared::new(protocol::with_offset(&json, offset))))
        .collect();
    let mut stream = room.stream();
    let shards: Vec<usize> = room.shards_with_members().collect();
    if !stream.is_synced() {
        // Not followed any more (its last member left meanwhile): nothing to do.
        if stream.subscribing {
            room.presence()
                .replace_others(&shared.id, presence.unwrap_or_default());
            stream.reset(position, framed, limits, now);
            shared
                .bus
                .send_always(&shards, Arc::new(Synced(room.clone())));
        }
        return;
    }
    if let Some(presence) = presence {
        let (gone, came) = room.presence().replace_others(&shared.id, presence);
        tell_presence(shared, room, &gone, &came);
    }
    let have = stream.position();
    if have.epoch == position.epoch {
        if position.offset <= have.offset {
            return;
        }
        let missed: Vec<(u64, Prepared)> = framed
            .iter()
            .filter(|(offset, _)| *offset > have.offset)
            .cloned()
            .collect();
        let complete = missed.len() as u64 == position.offset - have.offset
            && missed
                .iter()
                .zip(have.offset + 1..)
                .all(|((offset, _), expected)| *offset == expected);
        if complete {
            for (offset, frame) in missed {
                stream.push(offset, frame.clone(), limits, now);
                forward_stream(shared, room, offset, frame);
            }
            return;
        }
    }
    shared.counters.resyncs.fetch_add(1, Ordering::Relaxed);
    // A stream that started over (Redis lost the room, or it expired) and whose history has all
    // of its new epoch: the members are told, then given all of it.
    let from_start = have.epoch != position.epoch
        && framed.len() as u64 == position.offset
        && framed
            .iter()
            .zip(1..)
            .all(|((offset, _), expected)| *offset == expected);
    let top = position.offset;
    if from_start {
        stream.reset(
            Position {
                offset: 0,
                ..position
            },
            Vec::new(),
            limits,
            now,
        );
        shared
            .bus
            .send_always(&shards, Arc::new(Resync(room.clone(), 0)));
        for (offset, frame) in framed {
            stream.push(offset, frame.clone(), limits, now);
            forward_stream(shared, room, offset, frame);
        }
    } else {
        stream.reset(position, framed, limits, now);
        shared
            .bus
            .send_always(&shards, Arc::new(Resync(room.clone(), top)));
    }
}

/// The room's stream starts over at `top`: members here are told to `resync` and get what
/// comes after it.
fn resync(shard: &Shard, room: &Arc<RoomState>, top: u64) {
    let mut guard = shard.state();
    let ShardState {
        conns,
        rooms,
        queued,
        ..
    } = &mut *guard;
    let Some(local) = rooms.current(room) else {
        return;
    };
    if local.delivered == PENDING {
        return;
    }
    let frame = ServerMessage::Resync { room: &room.name }.encode();
    local.delivered = top;
    for (&key, joined_at) in local.members.iter_mut() {
        if *joined_at != PENDING {
            *joined_at = top;
            conns[key].outbound.push(frame.clone(), queued);
        }
    }
}

/// Queues frames to a shard's connections within their bounds, applying the slow-consumer
/// policy to readers that are behind.
struct Queuer<'a> {
    shard: &'a Shard,
    /// Frames queued, added to the shard's metrics once, when done.
    delivered: Cell<u64>,
    max_queued: usize,
    /// A reader that keeps up may still hold this much between two of its turns: a backlog
    /// within its bound, a bound's worth of same-shard broadcasts, and one inbox batch.
    burst_cap: usize,
    over_budget: bool,
}

impl<'a> Queuer<'a> {
    fn new(shard: &'a Shard, queued: &QueueTotal) -> Self {
        let max_queued = shard.shared.config.max_queued_bytes;
        Queuer {
            shard,
            delivered: Cell::new(0),
            max_queued,
            burst_cap: 2 * max_queued + bus::BATCH_BYTES,
            over_budget: queued.over(shard.queue_budget),
        }
    }

    fn queue(&self, conn: &mut ConnEntry, frame: &Prepared, queued: &mut QueueTotal) {
        if conn.outbound.is_closing() {
            return;
        }
        let out = &mut conn.outbound;
        let frame = &frame.for_connection(out.deflate(), || {
            self.shard.metrics().compressions.add(1);
        });
        let charge = outbound::cost(frame);
        // A reader is slow by what it was given a chance to take and did not (stale bytes); a
        // burst queued while it had no turn to write is the gateway's backlog, bounded separately.
        // A reader that has caught up always gets the frame, even one bigger than the bound: the
        // bound is on backlog.
        let slow = !out.is_empty()
            && (out.stale_bytes() + charge > self.max_queued
                || out.queued_bytes() + charge > self.burst_cap
                || (self.over_budget && out.stale_bytes() > 0));
        if !slow {
            out.push_broadcast(frame.clone(), queued);
            self.delivered.set(self.delivered.get() + 1);
            return;
        }
        let counters = &self.shard.shared.counters;
        if self.over_budget {
            counters.memory_pressure.fetch_add(1, Ordering::Relaxed);
        }
        match self.shard.shared.config.slow_consumer_policy {
            SlowConsumerPolicy::Close => {
                debug!(client = %conn.id, queued = out.queued_bytes(), "closing slow consumer");
                counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
                let close = frame::encode_close(CloseCode::POLICY_VIOLATION, "slow consumer");
                out.push_close(close, queued);
            }
            SlowConsumerPolicy::Drop => {
                let (mut dropped, fits) = if self.over_budget {
                    // Out of memory: nothing more for readers that are behind.
                    (0, false)
                } else {
                    out.make_room(charge, self.max_queued, queued)
                };
                if fits {
                    out.push_broadcast(frame.clone(), queued);
                    self.delivered.set(self.delivered.get() + 1);
                } else {
                    out.note_dropped(1);
                    dropped += 1;
                }
                counters
                    .dropped_messages
                    .fetch_add(dropped, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Queuer<'_> {
    fn drop(&mut self) {
        self.shard.metrics().deliveries.add(self.delivered.get());
    }
}

/// Queues the publication's frame to each matching connection of this shard.
pub fn deliver(shard: &Shard, publication: &Publication) {
    let mut guard = shard.state();
    let ShardState {
        conns,
        rooms,
        queued,
        users,
        ..
    } = &mut *guard;
    let queuer = Queuer::new(shard, queued);
    let mut queue_to = |conn: &mut ConnEntry| {
        if publication.admits(conn.id) {
            queuer.queue(conn, &publication.frame, queued);
        }
    };
    match (&publication.target, &publication.include) {
        (Target::All, Some(include)) => {
            for id in include.iter().filter(|id| id.shard as usize == shard.index) {
                if let Some(conn) = conns.get_mut(id.key as usize)
                    && conn.id == *id
                    && shard.addressable(conn.app)
                {
                    queue_to(conn);
                }
            }
        }
        (Target::All, None) => {
            for (_, conn) in conns.iter_mut() {
                if shard.addressable(conn.app) {
                    queue_to(conn);
                }
            }
        }
        (Target::User(user), _) => {
            for &key in users.of(user) {
                queue_to(&mut conns[key as usize]);
            }
        }
        (Target::Room(name), _) => {
            if let Some(room) = rooms.get(name) {
                // Members whose join waits for the room's sync get nothing before `room_joined`.
                for (&key, &joined_at) in &room.members {
                    if joined_at != PENDING {
                        queue_to(&mut conns[key]);
                    }
                }
            }
        }
    }
}

/// Queues a stream message to this shard's members of its room that joined before it. Messages
/// lost on the way (a full inbox) are taken from the room's history first; when the history no
/// longer has them, the members are told to `resync`.
fn deliver_stream(shard: &Shard, message: &StreamMessage) {
    let mut guard = shard.state();
    let ShardState {
        conns,
        rooms,
        queued,
        ..
    } = &mut *guard;
    // Not for a room of that name this shard has since forgotten (its stream started over).
    let Some(local) = rooms.current(&message.room) else {
        return;
    };
    if message.offset <= local.delivered {
        // From before this shard's members joined.
        return;
    }
    let queuer = Queuer::new(shard, queued);
    // Queues `frame`, offset `offset`, to the members that joined before it.
    let mut to_members = |offset: u64, frame: &Prepared| {
        for (&key, &joined_at) in &local.members {
            if offset > joined_at {
                queuer.queue(&mut conns[key], frame, queued);
            }
        }
    };
    let first_lost = local.delivered + 1;
    if message.offset > first_lost {
        let last_lost = message.offset - 1;
        let limits = shard.shared.rooms.history_limits();
        let lost = message
            .room
            .stream()
            .range(first_lost, last_lost, limits, Instant::now());
        match lost {
            Some(frames) => {
                for (offset, frame) in (first_lost..).zip(&frames) {
                    to_members(offset, frame);
                }
            }
            None => {
                shard
                    .shared
                    .counters
                    .resyncs
                    .fetch_add(1, Ordering::Relaxed);
                let resync = Prepared::new(
                    ServerMessage::Resync {
                        room: &message.room.name,
                    }
                    .encode(),
                );
                // Only those that joined before a lost message lost anything.
                to_members(last_lost, &resync);
            }
        }
    }
    to_members(message.offset, &message.frame);
    local.delivered = message.offset;
}

/// Answers a join with `room_joined` and what the client missed (before anything after its
/// join: never a partial replay) — unless the join waits for the room's sync. What it missed is
/// replayed within the connection's replay budget ([`Shard::take_replay`]); past it the join
/// says `recovered: false`, as when the history no longer has it.
pub fn answer_join(
    shard: &Shard,
    conn: &mut ConnEntry,
    queued: &mut QueueTotal,
    joining: &Joining,
    members: u32,
    since: bool,
    request: Option<&RequestId>,
) {
    let Some(position) = &joining.position else {
        return;
    };
    let missed = joining
        .missed
        .as_deref()
        .filter(|missed| shard.take_replay(&mut conn.limiter, missed));
    let reply = ServerMessage::RoomJoined {
        room: &joining.state.name,
        members,
        offset: position.offset,
        epoch: &position.epoch,
        recovered: since.then_some(missed.is_some()),
    };
    conn.outbound.push(reply.encode_for(request), queued);
    for frame in missed.into_iter().flatten() {
        let compressing = || shard.metrics().compressions.add(1);
        conn.outbound.push_prepared(frame, compressing, queued);
    }
}

/// The node has synced `room` with the broker: answers this shard's joins that waited for it.
fn complete_joins(shard: &Shard, room: &Arc<RoomState>) {
    let mut guard = shard.state();
    let ShardState {
        conns,
        rooms,
        queued,
        ..
    } = &mut *guard;
    let Some(local) = rooms.current(room) else {
        return;
    };
    if local.pending.is_empty() {
        return;
    }
    let history = shard.shared.rooms.history_limits();
    let stream = room.stream();
    let members = room.presence().total();
    for join in std::mem::take(&mut local.pending) {
        let joining = Joining::at(room, &stream, join.since.as_ref(), history);
        let Some(position) = &joining.position else {
            // Unsynced again (not possible while the room has members): the join waits on.
            local.pending.push(join);
            continue;
        };
        if local.delivered == PENDING {
            local.delivered = position.offset;
        }
        if let Some(joined_at) = local.members.get_mut(&join.key) {
            if *joined_at == PENDING {
                *joined_at = position.offset;
            }
            let conn = &mut conns[join.key];
            let since = join.since.is_some();
            answer_join(
                shard,
                conn,
                queued,
                &joining,
                members,
                since,
                join.request.as_ref(),
            );
        }
    }
}
