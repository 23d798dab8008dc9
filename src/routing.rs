//! Routing: who a publication is for, and getting it there — queued to this shard's recipients,
//! handed to the other shards with recipients over the [`crate::bus`], each recipient's queue
//! bounded by the slow-consumer policy.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tracing::debug;

use crate::bus;
use crate::client_id::ClientId;
use crate::close::CloseCode;
use crate::config::SlowConsumerPolicy;
use crate::frame;
use crate::outbound;
use crate::shard::{ConnEntry, Endpoint, Shard, ShardState};

/// Who a publication is for.
#[derive(Clone, Debug)]
pub enum Target {
    /// Every client on a chat endpoint.
    All,
    /// Every member of a room.
    Room(Arc<str>),
}

/// One message for many recipients: framed once, the same `Bytes` queued to each of them.
#[derive(Clone, Debug)]
pub struct Publication {
    pub target: Target,
    /// A complete, encoded server frame.
    pub frame: Bytes,
    /// When set, only these clients (that also match `target`) receive it.
    pub include: Option<Vec<ClientId>>,
    /// These clients do not receive it.
    pub exclude: Vec<ClientId>,
}

impl Publication {
    pub fn to_room(room: Arc<str>, frame: Bytes) -> Self {
        Publication {
            target: Target::Room(room),
            frame,
            include: None,
            exclude: Vec::new(),
        }
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

/// Delivers to this shard's recipients, then hands the publication to the bus for the
/// other shards that have recipients.
pub fn publish(shard: &Shard, publication: Publication) {
    let mut route = shard.route.borrow_mut();
    route.clear();
    {
        let state = shard.state_ref();
        let shards = shard.node.shards();
        match &publication.target {
            Target::Room(name) => match state.rooms.get(name) {
                Some(room) => route.extend(room.presence.other_shards(shard.index)),
                // No member here (a notice after the last local member left, or a publish
                // from a non-member): ask the directory, under its lock.
                None => {
                    if let Some(presence) = shard.node.rooms.presence(name) {
                        route.extend(presence.other_shards(shard.index));
                    }
                }
            },
            Target::All => route.extend((0..shards).filter(|&s| s != shard.index)),
        }
    }
    if let Some(include) = &publication.include {
        route.retain(|&s| include.iter().any(|id| id.shard as usize == s));
    }
    deliver(shard, &publication);
    if !route.is_empty() {
        shard.node.forward(&route, Arc::new(publication));
    }
}

/// Queues the publication's frame to each matching connection of this shard.
pub fn deliver(shard: &Shard, publication: &Publication) {
    let mut guard = shard.state();
    let ShardState {
        conns,
        rooms,
        queued,
        ..
    } = &mut *guard;
    let max_queued = shard.node.config.max_queued_bytes;
    // A reader that keeps up may still hold this much between two of its turns: a backlog
    // within its bound, a bound's worth of same-shard broadcasts, and one inbox batch.
    let burst_cap = 2 * max_queued + bus::BATCH_BYTES;
    let over_budget = queued.bytes() > shard.queue_budget;
    let counters = &shard.node.counters;
    let mut queue_to = |conn: &mut ConnEntry| {
        if !publication.admits(conn.id) || conn.outbound.is_closing() {
            return;
        }
        let frame = &publication.frame;
        let out = &mut conn.outbound;
        let charge = outbound::cost(frame);
        // A reader is slow by what it was given a chance to take and did not (stale bytes);
        // a burst queued while it had no turn to write is the gateway's backlog, bounded
        // separately. A reader that has caught up always gets the frame, even one bigger
        // than the bound: the bound is on backlog.
        let slow = !out.is_empty()
            && (out.stale_bytes() + charge > max_queued
                || out.queued_bytes() + charge > burst_cap
                || (over_budget && out.stale_bytes() > 0));
        if !slow {
            out.push_broadcast(frame.clone(), queued);
            return;
        }
        if over_budget {
            counters.memory_pressure.fetch_add(1, Ordering::Relaxed);
        }
        match shard.node.config.slow_consumer_policy {
            SlowConsumerPolicy::Close => {
                debug!(client = %conn.id, queued = out.queued_bytes(), "closing slow consumer");
                counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
                let close = frame::encode_close(CloseCode::POLICY_VIOLATION, "slow consumer");
                out.push_close(close, queued);
            }
            SlowConsumerPolicy::Drop => {
                let (mut dropped, fits) = if over_budget {
                    // Out of memory: nothing more for readers that are behind.
                    (0, false)
                } else {
                    out.make_room(charge, max_queued, queued)
                };
                if fits {
                    out.push_broadcast(frame.clone(), queued);
                } else {
                    out.note_dropped(1);
                    dropped += 1;
                }
                counters
                    .dropped_messages
                    .fetch_add(dropped, Ordering::Relaxed);
            }
        }
    };
    match (&publication.target, &publication.include) {
        (Target::All, Some(include)) => {
            for id in include.iter().filter(|id| id.shard as usize == shard.index) {
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
