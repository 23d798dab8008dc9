//! The memory broker: one node, nothing shared. A room's stream lives in this process: a
//! message gets its offset under the stream's lock and is handed to the members' shards in that
//! order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use super::{
    Broker, Disconnect, Disconnected, HistoryQuery, Host, LocalFuture, Membership, NodeStatus,
    PresenceChange, PublishError, Publisher, RoomHistory, RoomRef, SendFuture, Unavailable,
};
use crate::base::client_id::ClientId;
use crate::protocol;
use crate::rooms::presence::Presence;
use crate::rooms::stream::Position;
use crate::rooms::{RoomState, RoomsPage, Target};
use crate::ws::frame;

pub struct MemoryBroker {
    host: Host,
    /// Messages published with a dedup key within `dedup_window`.
    recent: Mutex<Recent>,
}

/// Dedup keys of recent messages: each room's key → the message's offset, and when each key
/// expires, oldest first (the window is one length for all, so expiry is in insertion order).
#[derive(Default)]
struct Recent {
    offsets: HashMap<(Arc<str>, Box<str>), u64>,
    expiries: VecDeque<(Instant, Arc<str>, Box<str>)>,
}

impl Recent {
    /// Forgets what expired by `now`.
    fn expire(&mut self, now: Instant) {
        while let Some((at, ..)) = self.expiries.front()
            && *at <= now
        {
            let (_, room, key) = self.expiries.pop_front().expect("just seen");
            self.offsets.remove(&(room, key));
        }
    }
}

impl MemoryBroker {
    pub fn new(host: Host) -> Self {
        MemoryBroker {
            host,
            recent: Mutex::default(),
        }
    }

    /// Tells the publisher of a message already published (under the same dedup key) where it is.
    fn answer(&self, from: Publisher, position: Position) {
        match from {
            Publisher::Api(answer) => {
                let _ = answer.send(Ok(position));
            }
            Publisher::Client(client, Some(request)) => {
                self.host.events.published(client, request, position.offset);
            }
            Publisher::Client(_, None) => {}
        }
    }
}

impl Broker for MemoryBroker {
    fn health(&self) -> serde_json::Value {
        serde_json::json!({"kind": "memory", "ready": true})
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn settled(&self) -> LocalFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn follow(&self, _: &Arc<RoomState>) {}

    fn last_member_left(&self, _: &Arc<str>) {}

    fn publish(
        &self,
        room: RoomRef<'_>,
        message: Vec<u8>,
        from: Publisher,
        dedup: Option<&str>,
    ) -> Result<(), PublishError> {
        let shared = &self.host.shared;
        let room = match room {
            RoomRef::State(state) => state.clone(),
            RoomRef::Name(name) => shared.rooms.for_publish(name).map_err(|_| {
                let refused = &shared.counters.rooms_refused;
                refused.fetch_add(1, Ordering::Relaxed);
                PublishError::RoomsFull
            })?,
        };
        let limits = shared.rooms.history_limits();
        let now = Instant::now();
        let mut stream = room.stream();
        // Under the stream's lock: a retry racing its first try on another shard waits for it.
        let mut recent = dedup.map(|_| self.recent.lock().unwrap_or_else(|e| e.into_inner()));
        if let (Some(recent), Some(key)) = (recent.as_deref_mut(), dedup) {
            recent.expire(now);
            let first = recent.offsets.get(&(room.name.clone(), Box::from(key)));
            if let Some(&offset) = first {
                let epoch = stream.position().epoch;
                drop(stream);
                self.answer(from, Position { offset, epoch });
                return Ok(());
            }
        }
        let (offset, frame) = stream.append(
            |offset| protocol::with_offset(&message, offset),
            limits,
            now,
        );
        if let (Some(recent), Some(key)) = (recent.as_deref_mut(), dedup) {
            let key: Box<str> = Box::from(key);
            let expires = now + shared.config.dedup_window;
            recent
                .offsets
                .insert((room.name.clone(), key.clone()), offset);
            recent.expiries.push_back((expires, room.name.clone(), key));
        }
        drop(recent);
        // Under the stream's lock: every shard's inbox gets the room's messages in order.
        self.host.events.stream_message(&room, offset, frame);
        if matches!(from, Publisher::Client(..)) {
            self.host
                .events
                .client_published(&room.name, &message, offset);
        }
        let epoch = stream.position().epoch;
        drop(stream);
        self.answer(from, Position { offset, epoch });
        Ok(())
    }

    fn share(&self, _: &Target, _: Bytes) -> bool {
        true
    }

    /// One node: this one.
    fn nodes(&self) -> LocalFuture<'_, Result<Vec<NodeStatus>, Unavailable>> {
        Box::pin(std::future::ready(Ok(vec![NodeStatus::of(
            &self.host.shared,
        )])))
    }

    /// One node: there are no others to tell.
    fn control(&self, _: &Disconnect) -> SendFuture<Result<Disconnected, Unavailable>> {
        Box::pin(std::future::ready(Ok(Disconnected::default())))
    }

    /// One node: its counts are the cluster's.
    fn presence_changed(&self, room: Arc<str>, change: PresenceChange) {
        let events = &self.host.events;
        let (room_before, room_after) = change.room;
        let occupied = room_before == 0 && room_after > 0;
        if occupied {
            let room = room.clone();
            events.membership(Membership::Room { room, occupied });
        }
        let (user_before, user_after) = change.user;
        if (user_before == 0) != (user_after == 0) {
            events.membership(Membership::User {
                room: room.clone(),
                user: change.entry,
                added: user_before == 0,
            });
        }
        if room_before > 0 && room_after == 0 {
            events.membership(Membership::Room {
                room,
                occupied: false,
            });
        }
    }

    fn session_opened(&self, _: ClientId, _: &str, _: u64) {}

    fn session_closed(&self, _: ClientId) {}

    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> LocalFuture<'_, Result<RoomsPage, Unavailable>> {
        let page = self.host.shared.rooms.page(after, limit);
        Box::pin(std::future::ready(Ok(page)))
    }

    fn history(
        &self,
        room: &str,
        query: HistoryQuery,
    ) -> LocalFuture<'_, Result<RoomHistory, Unavailable>> {
        let shared = &self.host.shared;
        let history = match shared.rooms.get(room) {
            None => RoomHistory {
                position: None,
                messages: Vec::new(),
                malformed: 0,
            },
            Some(state) => {
                let stream = state.stream();
                let limits = shared.rooms.history_limits();
                let frames = stream.kept_after(
                    query.since,
                    query.limit,
                    query.newest_first,
                    limits,
                    Instant::now(),
                );
                RoomHistory {
                    position: Some(stream.position()),
                    messages: frames
                        .iter()
                        .map(|f| frame::server_payload(f.plain()))
                        .collect(),
                    malformed: 0,
                }
            }
        };
        Box::pin(std::future::ready(Ok(history)))
    }

    fn knows_presence(&self, _: &RoomState) -> bool {
        true
    }

    fn presence(&self, _: &str) -> LocalFuture<'_, Result<Option<(Presence, u64)>, Unavailable>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}
