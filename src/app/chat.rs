//! The chat application: what each client message does to rooms and who hears about it.
//!
//! Handlers run synchronously on the connection's shard. Each reply or broadcast is serialized
//! and framed once; a broadcast's one `Bytes` is then queued to every recipient.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::auth::Authenticator;
use crate::base::client_id::ClientId;
use crate::base::identity::Identity;
use crate::base::time::now_ms;
use crate::broker::{Broker, Publisher, RoomRef};
use crate::cluster;
use crate::config::{Config, HeartbeatMode};
use crate::conn::limits::{Charge, Creator, RoomCreation, Verdict};
use crate::fanout::{self, Publication};
use crate::protocol::{
    ClientMessage, ErrorReply, JsonParser, NodeClientId, PresentUser, RequestId, ServerMessage,
    Since, encode_echo,
};
use crate::rooms::stream::Position;
use crate::rooms::{Joined, RoomState, is_valid_room_name};
use crate::runtime::App;
use crate::runtime::entry::ConnEntry;
use crate::runtime::shard::Shard;
use crate::ws::frame::{self, OpCode};

/// The chat application on one shard: what it shares with the other shards' (the broker, the
/// token checker, the budget of new rooms) and the JSON parser its connections take turns using.
pub struct ChatApp {
    broker: Arc<dyn Broker>,
    auth: Arc<Authenticator>,
    room_creation: Arc<RoomCreation>,
    /// `heartbeat_mode = json`: connections are pinged with the seed's JSON ping.
    json_ping: bool,
    json: RefCell<JsonParser>,
}

impl App for ChatApp {
    fn addressable(&self) -> bool {
        true
    }

    /// Greets a new connection with its id, and records its session.
    fn opened(&self, shard: &Shard, key: usize) {
        let state = shard.state_ref();
        let conn = &state.conns[key];
        cluster::session_opened(&*self.broker, conn);
        let hello = ServerMessage::Connected {
            client_id: NodeClientId {
                node: &shard.shared.id,
                id: conn.id,
            },
            timestamp: now_ms(),
        };
        drop(state);
        shard.send(key, hello.encode());
    }

    fn message(&self, shard: &Shard, key: usize, text: bool, payload: &mut [u8]) {
        if text {
            self.on_text(shard, key, payload);
        } else {
            send_error(shard, key, ErrorReply::BinaryNotSupported, None);
        }
    }

    fn refused(&self, shard: &Shard, key: usize) {
        // Refused unread: its `id` is not known.
        send_error(shard, key, ErrorReply::RateLimited, None);
    }

    fn closing(&self, shard: &Shard, key: usize) {
        self.leave_all_rooms(shard, key);
    }

    fn closed(&self, _: &Shard, conn: &ConnEntry) {
        cluster::session_closed(&*self.broker, conn);
    }

    fn ping(&self) -> Option<Bytes> {
        self.json_ping.then(|| {
            let ping = format!(r#"{{"type":"ping","timestamp":{}}}"#, now_ms());
            frame::encode(OpCode::Text, ping.as_bytes())
        })
    }

    fn dropped(&self, count: u64) -> Option<Bytes> {
        Some(ServerMessage::Dropped { count }.encode())
    }
}

/// Answers a message (with its `id`, if it had one) with an error.
fn send_error(shard: &Shard, key: usize, error: ErrorReply<'_>, id: Option<&RequestId>) {
    shard.send(key, ServerMessage::Error { error }.encode_for(id));
}

/// What a handled message still needs.
enum Handled {
    /// Nothing: it was answered (or will be: a join waiting for its room, a chat message on its
    /// way to the broker).
    Answered,
    /// An `ack`, when it has an `id`: it has no answer of its own.
    NeedsAck,
}

/// Users in one `presence` answer, at most.
const PRESENCE_PAGE: usize = 100;

/// Who speaks in a room: the room, the speaker's connection and identity.
struct Speaker {
    room: Arc<RoomState>,
    id: ClientId,
    identity: Arc<Identity>,
}

impl ChatApp {
    pub fn new(
        config: &Config,
        broker: Arc<dyn Broker>,
        auth: Arc<Authenticator>,
        room_creation: Arc<RoomCreation>,
    ) -> Self {
        ChatApp {
            broker,
            auth,
            room_creation,
            json_ping: config.heartbeat_mode == HeartbeatMode::Json,
            json: RefCell::new(JsonParser::default()),
        }
    }

    /// Handles one text message from a chat client. Errors are answered, never fatal; a client that
    /// keeps flooding past its strikes is closed (the caller sees the connection closing).
    fn on_text(&self, shard: &Shard, key: usize, payload: &mut [u8]) {
        // The parser is lent out for the duration of the handler; handlers never parse again.
        let mut parser = self.json.borrow_mut();
        parser.parse_request(payload, |id, message| {
            // Room operations have a budget of their own: a reconnecting client rejoins all its
            // rooms at once. Everything else, malformed messages included, is a message.
            let charge = match message {
                Ok(ClientMessage::JoinRoom { .. } | ClientMessage::LeaveRoom { .. }) => {
                    Charge::RoomOp
                }
                _ => Charge::Message,
            };
            let id = id.as_ref();
            match shard.charge(key, charge) {
                Verdict::Allow => {}
                Verdict::Refuse => return send_error(shard, key, ErrorReply::RateLimited, id),
                Verdict::Close => return shard.close_flooder(key),
            }
            match message.and_then(|m| self.handle(shard, key, m, id)) {
                Ok(Handled::Answered) => {}
                Ok(Handled::NeedsAck) => {
                    if let Some(id) = id {
                        let ack = ServerMessage::Ack { id, offset: None };
                        shard.send(key, ack.encode());
                    }
                }
                Err(error) => send_error(shard, key, error, id),
            }
        });
    }

    fn handle<'i>(
        &self,
        shard: &Shard,
        key: usize,
        message: ClientMessage<'_, 'i>,
        id: Option<&RequestId>,
    ) -> Result<Handled, ErrorReply<'i>> {
        let answered = |_: ()| Handled::Answered;
        let acked = |_: ()| Handled::NeedsAck;
        match message {
            ClientMessage::JoinRoom { room, since } => {
                self.join(shard, key, room, since, id).map(answered)
            }
            ClientMessage::LeaveRoom { room } => self.leave(shard, key, room).map(acked),
            ClientMessage::Chat {
                room,
                message,
                message_id,
            } => self
                .chat(shard, key, room, message, message_id, id)
                .map(answered),
            ClientMessage::Typing { room, is_typing } => {
                self.typing(shard, key, room, is_typing).map(acked)
            }
            ClientMessage::Echo { payload } => {
                let reply = encode_echo(payload, id);
                // Numbers re-serialized can grow (`9e15` is written out): never past the size a
                // client may send.
                let max = shard.shared.config.max_message_size;
                if reply.len() > max + frame::MAX_HEADER_LEN {
                    return Err(ErrorReply::ReplyTooLarge(max));
                }
                shard.send(key, reply);
                Ok(Handled::Answered)
            }
            ClientMessage::Pong => Ok(Handled::NeedsAck),
            ClientMessage::Refresh { token } => self.refresh(shard, key, token, id).map(answered),
            ClientMessage::Presence { room, after } => {
                self.presence(shard, key, room, after, id).map(answered)
            }
        }
    }

    /// Swaps the connection's identity for the one in a fresh token of the same user. The new token
    /// rules from now on: its display name is used for what the connection sends next, and rooms its
    /// allow-list no longer covers are left (members are told as for any leave, the client gets
    /// `room_left`).
    fn refresh<'i>(
        &self,
        shard: &Shard,
        key: usize,
        token: &str,
        request: Option<&RequestId>,
    ) -> Result<(), ErrorReply<'i>> {
        let fresh = self.auth.verify(token).map_err(ErrorReply::InvalidToken)?;
        let mut guard = shard.state();
        let state = &mut *guard;
        let conn = &mut state.conns[key];
        let anonymous = shard.shared.is_anonymous(&conn.identity);
        let id = conn.id;
        if !anonymous && conn.identity.user_id != fresh.user_id {
            return Err(ErrorReply::TokenForOtherUser);
        }
        let expires_at = fresh.expires_at.unwrap_or(0);
        let previous = std::mem::replace(&mut conn.identity, Arc::new(fresh));
        if anonymous {
            state.users.insert(&conn.identity.user_id, key);
        }
        shard
            .heartbeats()
            .expire_by(key, conn.id.generation, &mut conn.liveness, expires_at);
        conn.outbound.push(
            ServerMessage::TokenRefreshed { expires_at }.encode_for(request),
            &mut state.queued,
        );
        let (kept, revoked): (Vec<_>, Vec<_>) = std::mem::take(&mut conn.rooms)
            .into_vec()
            .into_iter()
            .partition(|room| conn.identity.may_join(room));
        conn.rooms = kept.clone().into_boxed_slice();
        let fresh = conn.identity.clone();
        drop(guard);
        if anonymous {
            // Present until now as an anonymous connection, from now on as the token's user.
            let guard = shard.state_ref();
            for room in &kept {
                if let Some(local) = guard.rooms.get(room) {
                    self.change_presence(shard, &local.state, id, &previous, -1);
                    self.change_presence(shard, &local.state, id, &fresh, 1);
                }
            }
        }
        for room in revoked {
            shard.send(
                key,
                ServerMessage::RoomLeft {
                    room: &room,
                    reason: "not allowed by the refreshed token",
                }
                .encode(),
            );
            // Members knew the connection under its previous name.
            self.left_room(shard, key, room, id, &previous);
        }
        Ok(())
    }

    fn join<'i>(
        &self,
        shard: &Shard,
        key: usize,
        room: &'i str,
        since: Option<Since<'i>>,
        request: Option<&RequestId>,
    ) -> Result<(), ErrorReply<'i>> {
        if !is_valid_room_name(room) {
            return Err(ErrorReply::InvalidRoomName);
        }
        let since = since.map(|since| Position {
            offset: since.offset,
            epoch: Arc::from(since.epoch),
        });
        let config = &shard.shared.config;
        // While Redis is away a room this node does not follow could not be synced: the join would
        // wait for Redis, so it is refused instead.
        if !self.broker.is_ready()
            && !shard
                .shared
                .rooms
                .get(room)
                .is_some_and(|state| state.stream().is_synced())
        {
            return Err(ErrorReply::Unavailable);
        }
        let (name, joined_user, members, pending, id, identity) = {
            let mut guard = shard.state();
            let state = &mut *guard;
            let conn = &mut state.conns[key];
            let max_rooms = config.max_rooms_per_connection;
            if !conn.identity.may_join(room) {
                return Err(ErrorReply::RoomNotAllowed(room));
            }
            if conn.rooms.len() >= max_rooms && !conn.rooms.iter().any(|r| &**r == room) {
                return Err(ErrorReply::TooManyRooms(max_rooms));
            }
            // A room the node holds nothing of is new: it costs the user (anonymous connections:
            // their address) a room of its budget; a race with another join of it costs one more.
            let anonymous = shard.shared.is_anonymous(&conn.identity);
            let creator = Creator::of((!anonymous).then_some(&conn.identity.user_id), conn.peer);
            let creates = shard.shared.rooms.get(room).is_none();
            if creates && !self.room_creation.take(&creator) {
                let counters = &shard.shared.counters;
                counters.rooms_refused.fetch_add(1, Ordering::Relaxed);
                return Err(ErrorReply::RoomCreationLimited);
            }
            let joined = state
                .rooms
                .join(
                    &shard.shared.rooms,
                    shard.index,
                    room,
                    key,
                    since.as_ref(),
                    request,
                )
                .map_err(|_| {
                    if creates {
                        self.room_creation.give_back(&creator);
                    }
                    let counters = &shard.shared.counters;
                    counters.rooms_refused.fetch_add(1, Ordering::Relaxed);
                    ErrorReply::ServerRoomLimit
                })?;
            let (Joined::AlreadyMember(joining) | Joined::Joined(joining)) = &joined;
            if joining.subscribe {
                self.broker.follow(&joining.state);
            }
            let joined_user = match &joined {
                Joined::Joined(joining) => {
                    let (before, _) =
                        self.change_presence(shard, &joining.state, conn.id, &conn.identity, 1);
                    before == 0
                }
                Joined::AlreadyMember(_) => false,
            };
            let members = joining.state.presence().total();
            // Until the node has synced a room it did not follow, the join waits (`complete_joins`).
            fanout::answer_join(
                shard,
                conn,
                &mut state.queued,
                joining,
                members,
                since.is_some(),
                request,
            );
            let Joined::Joined(joining) = joined else {
                return Ok(());
            };
            let name = joining.state.name.clone();
            let mut rooms = std::mem::take(&mut conn.rooms).into_vec();
            rooms.push(name.clone());
            conn.rooms = rooms.into_boxed_slice();
            let pending = joining.position.is_none();
            let identity = conn.identity.clone();
            (name, joined_user, members, pending, conn.id, identity)
        };
        // This node's members are told here, other nodes' by their nodes (see `presence`). Until a
        // room is synced the count is this node's: others may be there.
        let others = members > 1 || pending;
        if joined_user && others && members <= config.presence_max_members {
            let notice = ServerMessage::UserJoined {
                room,
                username: &identity.username,
                user_id: &identity.user_id,
                timestamp: now_ms(),
            };
            fanout::publish(
                shard,
                Publication::to_room(name, notice.encode()).excluding(id),
            );
        }
        Ok(())
    }

    fn leave<'i>(&self, shard: &Shard, key: usize, room: &'i str) -> Result<(), ErrorReply<'i>> {
        if !is_valid_room_name(room) {
            return Err(ErrorReply::InvalidRoomName);
        }
        let mut state = shard.state();
        let conn = &mut state.conns[key];
        let Some(at) = conn.rooms.iter().position(|r| &**r == room) else {
            return Err(ErrorReply::NotInRoom(room));
        };
        let mut rooms = std::mem::take(&mut conn.rooms).into_vec();
        let name = rooms.swap_remove(at);
        conn.rooms = rooms.into_boxed_slice();
        let (id, identity) = (conn.id, conn.identity.clone());
        drop(state);
        self.left_room(shard, key, name, id, &identity);
        Ok(())
    }

    /// Takes a connection out of all its rooms, telling the members who stay.
    fn leave_all_rooms(&self, shard: &Shard, key: usize) {
        let (rooms, id, identity) = {
            let mut state = shard.state();
            let conn = &mut state.conns[key];
            (
                std::mem::take(&mut conn.rooms).into_vec(),
                conn.id,
                conn.identity.clone(),
            )
        };
        for room in rooms {
            self.left_room(shard, key, room, id, &identity);
        }
    }

    fn left_room(
        &self,
        shard: &Shard,
        key: usize,
        room: Arc<str>,
        id: ClientId,
        identity: &Arc<Identity>,
    ) {
        let left = shard
            .state()
            .rooms
            .leave(&shard.shared.rooms, shard.index, &room, key);
        // The connection's room list and the room index agree; should a panic in a handler ever
        // break that, clean-up goes on with the other rooms rather than panicking again.
        let Some((state, remaining_here)) = left else {
            return;
        };
        if remaining_here == 0 {
            self.broker.last_member_left(&room);
        }
        let (user_left, members) = self.change_presence(shard, &state, id, identity, -1);
        // The room's size before the leave, as for a join after it: at most `presence_max_members`.
        if user_left == 0 && members > 0 && members < shard.shared.config.presence_max_members {
            let notice = ServerMessage::UserLeft {
                room: &room,
                username: &identity.username,
                user_id: &identity.user_id,
                timestamp: now_ms(),
            };
            let frame = notice.encode();
            fanout::publish(shard, Publication::to_room(room, frame));
        }
    }

    /// Checks that `key` may speak in `room`.
    fn speaker<'i>(
        &self,
        shard: &Shard,
        key: usize,
        room: &'i str,
    ) -> Result<Speaker, ErrorReply<'i>> {
        if !is_valid_room_name(room) {
            return Err(ErrorReply::InvalidRoomName);
        }
        let state = shard.state_ref();
        let conn = &state.conns[key];
        // The connection's room list and the shard's room index agree: a member is in both.
        match state.rooms.get(room) {
            Some(local) if local.members.contains_key(&key) => Ok(Speaker {
                room: local.state.clone(),
                id: conn.id,
                identity: conn.identity.clone(),
            }),
            _ => Err(ErrorReply::NotInRoom(room)),
        }
    }

    fn chat<'i>(
        &self,
        shard: &Shard,
        key: usize,
        room: &'i str,
        message: &str,
        message_id: Option<&str>,
        id: Option<&RequestId>,
    ) -> Result<(), ErrorReply<'i>> {
        let max_chars = shard.shared.config.max_chat_message_chars;
        // Cheap bound first: a string of at most `max_chars` bytes has at most that many chars.
        if message.len() > max_chars && message.chars().count() > max_chars {
            return Err(ErrorReply::MessageTooLong(max_chars));
        }
        let speaker = self.speaker(shard, key, room)?;
        let message = ServerMessage::ChatMessage {
            room,
            username: &speaker.identity.username,
            user_id: &speaker.identity.user_id,
            message,
            timestamp: now_ms(),
        };
        // A message id is the sender's: its user's (a retry may come on another connection), or
        // for an anonymous connection, its own.
        let dedup = message_id.map(|message_id| {
            let sender = if shard.shared.is_anonymous(&speaker.identity) {
                format!("{}.{}", shard.shared.id, speaker.id)
            } else {
                speaker.identity.user_id.to_string()
            };
            // Length-prefixed: no two (sender, message id) pairs make one key.
            format!("{}:{sender}\u{1f}{message_id}", sender.len())
        });
        cluster::publish_to_stream(
            &*self.broker,
            &shard.shared,
            RoomRef::State(&speaker.room),
            message.to_json(),
            Publisher::Client(speaker.id, id.cloned()),
            dedup.as_deref(),
        )
        .map_err(|_| ErrorReply::Unavailable)
    }

    fn typing<'i>(
        &self,
        shard: &Shard,
        key: usize,
        room: &'i str,
        is_typing: bool,
    ) -> Result<(), ErrorReply<'i>> {
        let speaker = self.speaker(shard, key, room)?;
        let frame = ServerMessage::Typing {
            room,
            username: &speaker.identity.username,
            user_id: &speaker.identity.user_id,
            is_typing,
        }
        .encode();
        let publication =
            Publication::to_room(speaker.room.name.clone(), frame).excluding(speaker.id);
        let _ = cluster::share(&*self.broker, &shard.shared, &publication);
        fanout::publish(shard, publication);
        Ok(())
    }

    /// Counts one connection of `identity` more (`delta` 1) or fewer (-1) in `room`, and tells the
    /// other nodes. A user is present once whatever its connections; an anonymous connection is
    /// present as itself (anonymous connections share one identity, but are not one user). Returns the user's connections in the room across all nodes before the change
    /// (joining) or after it (leaving), and the room's connections after it.
    fn change_presence(
        &self,
        shard: &Shard,
        room: &RoomState,
        id: ClientId,
        identity: &Arc<Identity>,
        delta: i32,
    ) -> (u32, u32) {
        let node = &shard.shared;
        let anonymous = node.is_anonymous(identity);
        let user = if anonymous {
            Arc::from(format!("{}.{id}", node.id))
        } else {
            identity.user_id.clone()
        };
        let mut presence = room.presence();
        let (before, after, entry, seq) =
            presence.change(&node.id, &user, &identity.username, anonymous, delta);
        // Sent under the lock: the node's changes of a room reach Redis in their order.
        self.broker.presence_changed(room.name.clone(), entry, seq);
        (if delta > 0 { before } else { after }, presence.total())
    }

    /// Answers `presence`: one page of the room's users, across all nodes.
    fn presence<'i>(
        &self,
        shard: &Shard,
        key: usize,
        room: &'i str,
        after: Option<&str>,
        id: Option<&RequestId>,
    ) -> Result<(), ErrorReply<'i>> {
        let speaker = self.speaker(shard, key, room)?;
        let mut presence = speaker.room.presence();
        let (users, more) = presence.page(after, PRESENCE_PAGE);
        let reply = ServerMessage::Presence {
            room,
            members: presence.total(),
            users: users
                .iter()
                .map(|e| PresentUser {
                    user_id: e.shown_id(),
                    username: &e.username,
                })
                .collect(),
            next: more.then(|| users.last().map(|e| &*e.user_id)).flatten(),
        }
        .encode_for(id);
        drop(presence);
        shard.send(key, reply);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{CHAT, Node};

    #[test]
    fn a_reader_that_caught_up_is_told_how_many_broadcasts_it_missed() {
        let (node, _inboxes, _) = Node::new(Arc::new(Config::default()), 16).unwrap();
        let notice = node.shard(0).app(CHAT).dropped(70_001).expect("a notice");
        assert_eq!(&notice[2..], br#"{"type":"dropped","count":70001}"#);
    }
}
