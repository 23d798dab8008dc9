//! The chat application: what each client message does to rooms and who hears about it.
//!
//! Handlers run synchronously on the connection's shard. Each reply or broadcast is serialized
//! and framed once; a broadcast's one `Bytes` is then queued to every recipient.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::auth::Authenticator;
use crate::backend::proxy::{Proxy, Refusal};
use crate::backend::{Event, ProxyKind};
use crate::base::client_id::ClientId;
use crate::base::identity::Identity;
use crate::base::time::now_ms;
use crate::broker::{Broker, PresenceChange, Publisher, RoomRef};
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
use crate::ws::close::CloseCode;
use crate::ws::frame::{self, OpCode};

/// The chat application on one shard: its handlers (`Chat`), the JSON parser its connections
/// take turns using, and its proxies to the backend (join, publish), if configured.
pub struct ChatApp {
    chat: Rc<Chat>,
    json: RefCell<JsonParser>,
    join_proxy: Option<Rc<Proxy>>,
    publish_proxy: Option<Rc<Proxy>>,
}

/// The chat handlers, and what they share with the other shards' (the broker, the token checker,
/// the budget of new rooms). Shared with the tasks that wait for the backend's answers.
struct Chat {
    broker: Arc<dyn Broker>,
    auth: Arc<Authenticator>,
    room_creation: Arc<RoomCreation>,
    /// `heartbeat_mode = json`: connections are pinged with the seed's JSON ping.
    json_ping: bool,
}

impl App for ChatApp {
    fn addressable(&self) -> bool {
        true
    }

    /// Greets a new connection with its id (and what the backend attached for it), and records
    /// its session.
    fn opened(&self, shard: &Shard, key: usize, data: Option<&RawValue>) {
        let state = shard.state_ref();
        let conn = &state.conns[key];
        cluster::session_opened(&*self.chat.broker, conn);
        let hello = ServerMessage::Connected {
            client_id: NodeClientId {
                node: &shard.shared.id,
                id: conn.id,
            },
            timestamp: now_ms(),
            data,
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
        self.chat.leave_all_rooms(shard, key);
    }

    fn closed(&self, _: &Shard, conn: &ConnEntry) {
        cluster::session_closed(&*self.chat.broker, conn);
    }

    fn ping(&self) -> Option<Bytes> {
        self.chat.json_ping.then(|| {
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
    let error = ServerMessage::Error { error, code: None };
    shard.send(key, error.encode_for(id));
}

/// Answers a message the backend refused: its error (with its code), a close, or "unavailable".
fn send_refusal(shard: &Shard, key: usize, refusal: Refusal, id: Option<&RequestId>) {
    match refusal {
        Refusal::Deny { code, message } => {
            let error = ErrorReply::Denied(&message);
            shard.send(key, ServerMessage::Error { error, code }.encode_for(id));
        }
        Refusal::Disconnect { code, reason } => shard.close(key, CloseCode(code), &reason),
        Refusal::Unavailable => send_error(shard, key, ErrorReply::BackendUnavailable, id),
    }
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
    /// The chat app of a shard, with the shard's `[join, publish]` proxies (if configured).
    pub fn new(
        config: &Config,
        broker: Arc<dyn Broker>,
        auth: Arc<Authenticator>,
        room_creation: Arc<RoomCreation>,
        [join_proxy, publish_proxy]: [Option<Rc<Proxy>>; 2],
    ) -> Self {
        ChatApp {
            chat: Rc::new(Chat {
                broker,
                auth,
                room_creation,
                json_ping: config.heartbeat_mode == HeartbeatMode::Json,
            }),
            json: RefCell::new(JsonParser::default()),
            join_proxy,
            publish_proxy,
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
        let chat = &self.chat;
        match message {
            ClientMessage::JoinRoom { room, since } => match &self.join_proxy {
                Some(proxy) if chat.check_join(shard, key, room)? => {
                    self.join_if_allowed(proxy, shard, key, room, since, id);
                    Ok(Handled::Answered)
                }
                _ => chat.join(shard, key, room, since, id).map(answered),
            },
            ClientMessage::LeaveRoom { room } => chat.leave(shard, key, room).map(acked),
            ClientMessage::Chat {
                room,
                message,
                message_id,
            } => match &self.publish_proxy {
                Some(proxy) => {
                    chat.check_chat(shard, key, room, message)?;
                    // Not worth asking the backend about what could not be published.
                    if !chat.broker.is_ready() {
                        return Err(ErrorReply::Unavailable);
                    }
                    self.chat_if_allowed(proxy, shard, key, room, message, message_id, id);
                    Ok(Handled::Answered)
                }
                None => chat
                    .chat(shard, key, room, message, message_id, id)
                    .map(answered),
            },
            ClientMessage::Typing { room, is_typing } => {
                chat.typing(shard, key, room, is_typing).map(acked)
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
            ClientMessage::Refresh { token } => chat.refresh(shard, key, token, id).map(answered),
            ClientMessage::Presence { room, after } => {
                chat.presence(shard, key, room, after, id).map(answered)
            }
        }
    }

    /// Asks the join proxy, then joins if the backend allows it. The connection's next messages
    /// wait for the answer (a chat message right after a join finds the join done).
    fn join_if_allowed(
        &self,
        proxy: &Rc<Proxy>,
        shard: &Shard,
        key: usize,
        room: &str,
        since: Option<Since<'_>>,
        id: Option<&RequestId>,
    ) {
        let event = self.chat.event(shard, key, ProxyKind::Join, room, None);
        let (chat, proxy) = (self.chat.clone(), proxy.clone());
        let room = room.to_owned();
        let since = since.map(|since| (since.offset, since.epoch.to_owned()));
        let id = id.cloned();
        let asked = async move { proxy.ask(event).await };
        shard.hold_while(key, asked, move |shard, key, answer| {
            let id = id.as_ref();
            let joined = answer.map(|_| {
                let since = since.as_ref().map(|(offset, epoch)| Since {
                    offset: *offset,
                    epoch,
                });
                chat.join(shard, key, &room, since, id)
            });
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(error)) => send_error(shard, key, error, id),
                Err(refusal) => send_refusal(shard, key, refusal, id),
            }
        });
    }

    /// Asks the publish proxy, then publishes the message (or the backend's text in its place)
    /// if the backend allows it. The connection's next messages wait for the answer, so its
    /// messages keep their order.
    #[allow(clippy::too_many_arguments)]
    fn chat_if_allowed(
        &self,
        proxy: &Rc<Proxy>,
        shard: &Shard,
        key: usize,
        room: &str,
        message: &str,
        message_id: Option<&str>,
        id: Option<&RequestId>,
    ) {
        let said = Some((message, message_id));
        let event = self.chat.event(shard, key, ProxyKind::Publish, room, said);
        let (chat, proxy) = (self.chat.clone(), proxy.clone());
        let (room, message) = (room.to_owned(), message.to_owned());
        let message_id = message_id.map(str::to_owned);
        let id = id.cloned();
        let asked = async move { proxy.ask(event).await };
        shard.hold_while(key, asked, move |shard, key, answer| {
            let id = id.as_ref();
            // The backend's text is published as it gave it (not held to the client's limit).
            let published = answer.map(|allowed| {
                let text = allowed.message.as_deref().unwrap_or(&message);
                let speaker = chat.speaker(shard, key, &room)?;
                chat.publish_chat(shard, &speaker, &room, text, message_id.as_deref(), id)
            });
            match published {
                Ok(Ok(())) => {}
                Ok(Err(error)) => send_error(shard, key, error, id),
                Err(refusal) => send_refusal(shard, key, refusal, id),
            }
        });
    }
}

impl Chat {
    /// What a proxy is told of an event of connection `key` in `room` (with the text and
    /// message id of a chat message).
    fn event(
        &self,
        shard: &Shard,
        key: usize,
        kind: ProxyKind,
        room: &str,
        said: Option<(&str, Option<&str>)>,
    ) -> Vec<u8> {
        let state = shard.state_ref();
        let conn = &state.conns[key];
        let mut event = Event::new(kind, &shard.shared.id, &conn.identity, conn.peer);
        event.client = Some(NodeClientId {
            node: &shard.shared.id,
            id: conn.id,
        });
        event.room = Some(room);
        if let Some((message, message_id)) = said {
            event.message = Some(message);
            event.message_id = message_id;
        }
        event.to_json()
    }

    /// What the gateway checks itself before a join of `room` (the name, Redis, the token's room
    /// patterns, the connection's room limit); whether it makes the connection a new member
    /// (what the join proxy is asked about).
    fn check_join<'i>(
        &self,
        shard: &Shard,
        key: usize,
        room: &'i str,
    ) -> Result<bool, ErrorReply<'i>> {
        if !is_valid_room_name(room) {
            return Err(ErrorReply::InvalidRoomName);
        }
        if self.cannot_sync(shard, room) {
            return Err(ErrorReply::Unavailable);
        }
        let state = shard.state_ref();
        let conn = &state.conns[key];
        if !conn.identity.may_join(room) {
            return Err(ErrorReply::RoomNotAllowed(room));
        }
        if conn.rooms.iter().any(|r| &**r == room) {
            return Ok(false);
        }
        let max_rooms = shard.shared.config.max_rooms_per_connection;
        if conn.rooms.len() >= max_rooms {
            return Err(ErrorReply::TooManyRooms(max_rooms));
        }
        Ok(true)
    }

    /// Whether a join of `room` would have to wait for Redis while it is away (a room this node
    /// does not follow must be synced first): such joins are refused instead.
    fn cannot_sync(&self, shard: &Shard, room: &str) -> bool {
        !self.broker.is_ready()
            && !shard
                .shared
                .rooms
                .get(room)
                .is_some_and(|state| state.stream().is_synced())
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
                    // The user first: the room is never seen empty in between.
                    self.change_presence(shard, &local.state, id, &fresh, 1);
                    self.change_presence(shard, &local.state, id, &previous, -1);
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
        self.check_join(shard, key, room)?;
        let since = since.map(|since| Position {
            offset: since.offset,
            epoch: Arc::from(since.epoch),
        });
        let config = &shard.shared.config;
        let (name, joined_user, members, pending, id, identity) = {
            let mut guard = shard.state();
            let state = &mut *guard;
            let conn = &mut state.conns[key];
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

    /// Checks that `key` may send `message` to `room`: its length, and that it is a member.
    fn check_chat<'i>(
        &self,
        shard: &Shard,
        key: usize,
        room: &'i str,
        message: &str,
    ) -> Result<Speaker, ErrorReply<'i>> {
        let max_chars = shard.shared.config.max_chat_message_chars;
        // Cheap bound first: a string of at most `max_chars` bytes has at most that many chars.
        if message.len() > max_chars && message.chars().count() > max_chars {
            return Err(ErrorReply::MessageTooLong(max_chars));
        }
        self.speaker(shard, key, room)
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
        let speaker = self.check_chat(shard, key, room, message)?;
        self.publish_chat(shard, &speaker, room, message, message_id, id)
    }

    /// Publishes a chat message of `speaker`'s to `room` (checked already).
    fn publish_chat<'i>(
        &self,
        shard: &Shard,
        speaker: &Speaker,
        room: &str,
        message: &str,
        message_id: Option<&str>,
        id: Option<&RequestId>,
    ) -> Result<(), ErrorReply<'i>> {
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
        let room_before = presence.total();
        let (before, after, entry, seq) =
            presence.change(&node.id, &user, &identity.username, anonymous, delta);
        let change = PresenceChange {
            entry,
            seq,
            user: (before, after),
            room: (room_before, presence.total()),
        };
        // Sent under the lock: the node's changes of a room reach Redis in their order.
        self.broker.presence_changed(room.name.clone(), change);
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
