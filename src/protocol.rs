//! The JSON wire protocol, free of I/O (compatible with the seed guide's chat protocol).
//!
//! Client → server: `{"type": T, "payload": {...}}`, parsed in place with simd-json into a tape
//! that the shard reuses, so parsing a message allocates nothing and copies no string.
//! Server → client: [`ServerMessage`], serialized once straight into a frame buffer.
//!
//! Every error string a client can receive is in [`ErrorReply`].

use std::fmt;

use bytes::{BufMut, Bytes};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use simd_json::prelude::*;
use simd_json::tape::Value;
use simd_json::{Buffers, Tape};

use crate::auth::AuthError;
use crate::base::client_id::ClientId;
use crate::ws::frame::{FrameBuilder, OpCode};

/// A parsed client message. Strings borrow from the (unescaped-in-place) input buffer.
#[derive(Debug)]
pub enum ClientMessage<'t, 'i> {
    JoinRoom {
        room: &'i str,
        /// Where the client was in the room's stream: it asks for what it missed since.
        since: Option<Since<'i>>,
    },
    LeaveRoom {
        room: &'i str,
    },
    Chat {
        room: &'i str,
        message: &'i str,
        /// The client's own id for the message (`messageId`): a retry with the same one is
        /// published once (see `dedup_window`).
        message_id: Option<&'i str>,
    },
    Typing {
        room: &'i str,
        is_typing: bool,
    },
    /// Sends the payload back; `None` when the message had no payload.
    Echo {
        payload: Option<Value<'t, 'i>>,
    },
    /// The seed's JSON heartbeat answer.
    Pong,
    /// A fresh token for a long-lived connection.
    Refresh {
        token: &'i str,
    },
    /// Who is in a room the client is a member of: one page of users, after the user id `after`.
    Presence {
        room: &'i str,
        after: Option<&'i str>,
    },
}

/// A client's last position in a room's stream (`join_room`'s `since`).
#[derive(Debug, PartialEq, Eq)]
pub struct Since<'i> {
    pub offset: u64,
    pub epoch: &'i str,
}

/// A client's name for one of its messages (its optional top-level `id`): echoed on the
/// message's reply or error, so clients can match answers to requests. A non-negative integer or
/// a string of at most [`MAX_REQUEST_ID_LEN`] bytes, echoed as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestId {
    Number(u64),
    Text(Box<str>),
}

/// The longest string `id`, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 64;

impl Serialize for RequestId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RequestId::Number(n) => s.serialize_u64(*n),
            RequestId::Text(t) => s.serialize_str(t),
        }
    }
}

/// Every error a client can be sent, with its exact wording. None of them closes the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum ErrorReply<'a> {
    /// Not JSON, not an object, or no string `type`.
    InvalidFormat,
    UnknownType(&'a str),
    /// A payload field is missing or has the wrong type.
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
    InvalidRoomName,
    NotInRoom(&'a str),
    TooManyRooms(usize),
    MessageTooLong(usize),
    BinaryNotSupported,
    /// The token's room allow-list does not cover the room.
    RoomNotAllowed(&'a str),
    InvalidToken(AuthError),
    /// A refresh token names another user than the connection's.
    TokenForOtherUser,
    /// Over the connection's message or byte rate.
    RateLimited,
    /// Joining a new room, with the node holding `max_rooms` already.
    ServerRoomLimit,
    /// Joining a new room, with the user's or the address's `room_creation_rate` spent.
    RoomCreationLimited,
    /// An answer (an echo) would be bigger than `max_message_size`.
    ReplyTooLarge(usize),
    /// A room message could not be handed to the broker (Redis away, or behind): not sent.
    Unavailable,
    /// The connection to Redis failed while a room message was on its way: it may have been
    /// published (then it arrives like any other) or not.
    MaybeUnavailable,
    /// The backend's proxy refused it, in the backend's words.
    Denied(&'a str),
    /// The backend's proxy did not answer (and refuses on failure): nothing was done.
    BackendUnavailable,
}

/// Unknown types are echoed back in the error, cut to this many characters.
const MAX_ECHOED_TYPE_CHARS: usize = 64;

impl fmt::Display for ErrorReply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorReply::InvalidFormat => f.write_str("Invalid message format"),
            ErrorReply::UnknownType(t) => {
                let cut = t
                    .char_indices()
                    .nth(MAX_ECHOED_TYPE_CHARS)
                    .map_or(t.len(), |(i, _)| i);
                write!(f, "Unknown message type: {}", &t[..cut])
            }
            ErrorReply::InvalidField { field, expected } => {
                write!(f, "Invalid payload: '{field}' must be {expected}")
            }
            ErrorReply::InvalidRoomName => f.write_str(
                "Invalid room name (1-64 characters of A-Z, a-z, 0-9, '_', '.', ':', '-')",
            ),
            ErrorReply::NotInRoom(room) => write!(f, "Not a member of room: {room}"),
            ErrorReply::TooManyRooms(max) => {
                write!(f, "Room limit reached (max {max} rooms per connection)")
            }
            ErrorReply::MessageTooLong(max) => {
                write!(f, "Message too long (max {max} characters)")
            }
            ErrorReply::BinaryNotSupported => {
                f.write_str("Binary messages are not supported: send JSON text")
            }
            ErrorReply::RoomNotAllowed(room) => write!(f, "Not allowed to join room: {room}"),
            ErrorReply::InvalidToken(e) => write!(f, "Invalid token: {}", e.message()),
            ErrorReply::RateLimited => f.write_str("Rate limit exceeded: slow down"),
            ErrorReply::ServerRoomLimit => {
                f.write_str("Room limit reached on this server: try an existing room")
            }
            ErrorReply::RoomCreationLimited => {
                f.write_str("Too many new rooms: join an existing room or retry later")
            }
            ErrorReply::ReplyTooLarge(max) => write!(f, "Reply too large (max {max} bytes)"),
            ErrorReply::Unavailable => f.write_str("Service unavailable: retry"),
            ErrorReply::MaybeUnavailable => {
                f.write_str("Service unavailable: the message may or may not have been sent")
            }
            ErrorReply::Denied(message) => f.write_str(message),
            ErrorReply::BackendUnavailable => {
                f.write_str("Service unavailable: the backend did not answer (retry)")
            }
            ErrorReply::TokenForOtherUser => {
                f.write_str("Invalid token: it is for another user than this connection's")
            }
        }
    }
}

impl Serialize for ErrorReply<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A client id with its node's name, as clients see it.
#[derive(Debug)]
pub struct NodeClientId<'a> {
    pub node: &'a str,
    pub id: ClientId,
}

impl fmt::Display for NodeClientId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node, self.id)
    }
}

impl Serialize for NodeClientId<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for ClientId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A user in a `presence` page.
#[derive(Serialize, Debug)]
pub struct PresentUser<'a> {
    #[serde(rename = "userId")]
    pub user_id: &'a str,
    pub username: &'a str,
}

/// Every `type` a client may send, as [`read_message`] knows them.
pub const CLIENT_MESSAGE_TYPES: [&str; 8] = [
    "join_room",
    "leave_room",
    "chat_message",
    "typing",
    "echo",
    "pong",
    "refresh",
    "presence",
];

/// Reads a message's `id`, if it has one.
pub fn read_request_id<'i>(tape: &Tape<'i>) -> Result<Option<RequestId>, ErrorReply<'i>> {
    let Some(id) = tape.as_value().get("id").filter(|id| !id.is_null()) else {
        return Ok(None);
    };
    if let Some(n) = id.as_u64() {
        return Ok(Some(RequestId::Number(n)));
    }
    match id.into_string() {
        Some(text) if (1..=MAX_REQUEST_ID_LEN).contains(&text.len()) => {
            Ok(Some(RequestId::Text(text.into())))
        }
        _ => Err(ErrorReply::InvalidField {
            field: "id",
            expected: "a non-negative integer or a string of 1-64 bytes",
        }),
    }
}

/// Reads one message out of a parsed tape.
pub fn read_message<'t, 'i>(tape: &'t Tape<'i>) -> Result<ClientMessage<'t, 'i>, ErrorReply<'i>> {
    let root = tape.as_value();
    let Some(kind) = root.get("type").and_then(|t| t.into_string()) else {
        return Err(ErrorReply::InvalidFormat);
    };
    let payload = root.get("payload");
    let field = |name: &'static str| payload.and_then(|p| p.get(name));
    let string = |name: &'static str| {
        field(name)
            .and_then(|v| v.into_string())
            .ok_or(ErrorReply::InvalidField {
                field: name,
                expected: "a string",
            })
    };
    Ok(match kind {
        "join_room" => ClientMessage::JoinRoom {
            room: string("room")?,
            since: match field("since") {
                None => None,
                Some(since) => Some(Since {
                    offset: since.get("offset").and_then(|v| v.as_u64()).ok_or(
                        ErrorReply::InvalidField {
                            field: "since",
                            expected: "{offset, epoch} from a message or room_joined",
                        },
                    )?,
                    epoch: since.get("epoch").and_then(|v| v.into_string()).ok_or(
                        ErrorReply::InvalidField {
                            field: "since",
                            expected: "{offset, epoch} from a message or room_joined",
                        },
                    )?,
                }),
            },
        },
        "leave_room" => ClientMessage::LeaveRoom {
            room: string("room")?,
        },
        "chat_message" => ClientMessage::Chat {
            room: string("room")?,
            message: string("message")?,
            message_id: match field("messageId") {
                None => None,
                Some(id) => Some(
                    id.into_string()
                        .filter(|id| (1..=MAX_REQUEST_ID_LEN).contains(&id.len()))
                        .ok_or(ErrorReply::InvalidField {
                            field: "messageId",
                            expected: "a string of 1-64 bytes",
                        })?,
                ),
            },
        },
        "typing" => ClientMessage::Typing {
            room: string("room")?,
            is_typing: field("isTyping").and_then(|v| v.as_bool()).ok_or(
                ErrorReply::InvalidField {
                    field: "isTyping",
                    expected: "a boolean",
                },
            )?,
        },
        "echo" => ClientMessage::Echo { payload },
        "pong" => ClientMessage::Pong,
        "refresh" => ClientMessage::Refresh {
            token: string("token")?,
        },
        "presence" => ClientMessage::Presence {
            room: string("room")?,
            after: match field("after") {
                None => None,
                Some(after) => Some(after.into_string().ok_or(ErrorReply::InvalidField {
                    field: "after",
                    expected: "a string (the `next` of the previous page)",
                })?),
            },
        },
        other => return Err(ErrorReply::UnknownType(other)),
    })
}

/// A shard's reusable simd-json state: parsing a message allocates only when a message is larger
/// than any seen before.
#[derive(Default)]
pub struct JsonParser {
    buffers: Buffers,
    tape: Option<Tape<'static>>,
}

impl JsonParser {
    /// Parses `input` in place (simd-json overwrites it) and hands the message to `f`.
    pub fn parse<R>(
        &mut self,
        input: &mut [u8],
        f: impl for<'t, 'i> FnOnce(Result<ClientMessage<'t, 'i>, ErrorReply<'i>>) -> R,
    ) -> R {
        self.parse_request(input, |_, message| f(message))
    }

    /// [`JsonParser::parse`], with the message's `id` (`None` for a message that has none or
    /// is not JSON; a malformed `id` makes the message an error).
    pub fn parse_request<R>(
        &mut self,
        input: &mut [u8],
        f: impl for<'t, 'i> FnOnce(
            Option<RequestId>,
            Result<ClientMessage<'t, 'i>, ErrorReply<'i>>,
        ) -> R,
    ) -> R {
        let mut tape = self.tape.take().unwrap_or_else(Tape::null).reset();
        let result = match simd_json::fill_tape(input, &mut self.buffers, &mut tape) {
            Ok(()) => match read_request_id(&tape) {
                Ok(id) => f(id, read_message(&tape)),
                Err(error) => f(None, Err(error)),
            },
            Err(_) => f(None, Err(ErrorReply::InvalidFormat)),
        };
        self.tape = Some(tape.reset());
        result
    }
}

/// Server → client messages. Field names and order follow the seed protocol exactly.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Connected {
        /// `<node>.<shard>.<slot>.<generation>`: unique across the nodes of a cluster.
        #[serde(rename = "clientId")]
        client_id: NodeClientId<'a>,
        timestamp: u64,
        /// What the backend's connect proxy attached for the client, if anything.
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawValue>,
    },
    RoomJoined {
        room: &'a str,
        members: u32,
        /// The room's stream position at the join: the member gets the messages after it.
        offset: u64,
        epoch: &'a str,
        /// Only for a join with `since`: whether every missed message follows.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// One page of a room's users (`next`: ask again with it as `after` for the next page).
    Presence {
        room: &'a str,
        /// Connections in the room, across all nodes.
        members: u32,
        users: Vec<PresentUser<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        next: Option<&'a str>,
    },
    UserJoined {
        room: &'a str,
        username: &'a str,
        /// Tells users apart when display names collide.
        #[serde(rename = "userId")]
        user_id: &'a str,
        timestamp: u64,
    },
    UserLeft {
        room: &'a str,
        username: &'a str,
        /// Tells users apart when display names collide.
        #[serde(rename = "userId")]
        user_id: &'a str,
        timestamp: u64,
    },
    ChatMessage {
        room: &'a str,
        username: &'a str,
        #[serde(rename = "userId")]
        user_id: &'a str,
        message: &'a str,
        timestamp: u64,
    },
    Typing {
        room: &'a str,
        username: &'a str,
        #[serde(rename = "userId")]
        user_id: &'a str,
        #[serde(rename = "isTyping")]
        is_typing: bool,
    },
    Error {
        error: ErrorReply<'a>,
        /// The backend's code for a refusal of its own ([`ErrorReply::Denied`]), if it gave one.
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    },
    /// Broadcasts this reader missed while it was too slow (`drop` policy).
    Dropped { count: u64 },
    /// Messages of the room were lost on their way to this member and are no longer in the
    /// history: its view of the room must be refreshed.
    Resync { room: &'a str },
    /// The connection was taken out of a room it did not ask to leave.
    RoomLeft { room: &'a str, reason: &'a str },
    /// What a backend published through the server API: to a room's members (`room`), or to
    /// every chat client.
    Publication {
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        data: &'a serde_json::Value,
        timestamp: u64,
    },
    /// What a backend published to this connection's user: every connection of the user, on
    /// every node, gets it.
    User {
        data: &'a serde_json::Value,
        timestamp: u64,
    },
    /// Answer to a message with an `id` that has no answer of its own (`leave_room`, `typing`,
    /// `pong`), and to a `chat_message` with an `id` once published, with its offset.
    Ack {
        id: &'a RequestId,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// Answer to `refresh`: the connection now runs on the new token.
    TokenRefreshed {
        #[serde(rename = "expiresAt")]
        expires_at: u64,
    },
}

impl ServerMessage<'_> {
    /// Serializes and frames the message once; the result can be queued to any number of clients.
    pub fn encode(&self) -> Bytes {
        self.encode_for(None)
    }

    /// Serializes and frames the message as the answer to a client message with `id` (which it
    /// carries last, as `"id"`), or as [`ServerMessage::encode`] without one.
    pub fn encode_for(&self, id: Option<&RequestId>) -> Bytes {
        let mut frame = FrameBuilder::with_capacity(128);
        serde_json::to_writer(frame.payload().writer(), self)
            .expect("serializing to memory cannot fail");
        if let Some(id) = id {
            append_id(frame.payload(), id);
        }
        frame.finish(OpCode::Text)
    }

    /// The message as JSON, for a room's stream, which frames it once it has its offset.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing to memory cannot fail")
    }
}

/// Whether `json` is a JSON object with at least one field, exactly as a node serializes one
/// (what [`with_offset`] takes). Messages from the broker are checked with it once per node, not
/// per recipient: whatever else is on wsgate's channels never reaches a client.
pub fn is_json_object(json: &[u8]) -> bool {
    json.first() == Some(&b'{')
        && json.last() == Some(&b'}')
        && json[1..].trim_ascii_start().first() == Some(&b'"')
        // serde_json skips ignored strings without checking them: UTF-8 is checked first.
        && std::str::from_utf8(json).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok()
}

/// Frames a room message (a JSON object) with its stream offset added as its last field.
pub fn with_offset(message: &[u8], offset: u64) -> Bytes {
    let (close, fields) = message.split_last().expect("a JSON object");
    debug_assert_eq!(*close, b'}');
    let mut frame = FrameBuilder::with_capacity(message.len() + 32);
    let out = frame.payload();
    out.extend_from_slice(fields);
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    out.put_u8(b'}');
    frame.finish(OpCode::Text)
}

/// Frames `{"type":"echo","payload":…}` with the payload re-serialized from the tape.
pub fn encode_echo(payload: Option<Value<'_, '_>>, id: Option<&RequestId>) -> Bytes {
    let mut frame = FrameBuilder::with_capacity(64);
    let out = frame.payload();
    out.extend_from_slice(br#"{"type":"echo","payload":"#);
    match payload {
        Some(value) => value
            .write(&mut out.writer())
            .expect("serializing to memory cannot fail"),
        None => out.extend_from_slice(b"null"),
    }
    out.put_u8(b'}');
    if let Some(id) = id {
        append_id(out, id);
    }
    frame.finish(OpCode::Text)
}

/// Adds `"id":…` as the last field of the JSON object in `out`.
fn append_id(out: &mut bytes::BytesMut, id: &RequestId) {
    debug_assert_eq!(out.last(), Some(&b'}'));
    out.truncate(out.len() - 1);
    out.extend_from_slice(br#","id":"#);
    serde_json::to_writer(out.writer(), id).expect("serializing to memory cannot fail");
    out.put_u8(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_objects_with_fields_pass_for_the_broker() {
        assert!(is_json_object(br#"{"type":"chat_message","n":1}"#));
        for bad in [
            &b"{}"[..],
            b"{ }",
            b"[1]",
            b"{\"a\":1",
            b"{\"a\":1}}",
            b"{\"a\":\"\xff\"}",
            b"",
        ] {
            assert!(!is_json_object(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    fn parse_debug(json: &str) -> String {
        let mut input = json.as_bytes().to_vec();
        JsonParser::default().parse(&mut input, |r| match r {
            Ok(m) => format!("{m:?}"),
            Err(e) => format!("error: {e}"),
        })
    }

    #[test]
    fn reads_every_client_message() {
        assert_eq!(
            parse_debug(r#"{"type":"join_room","payload":{"room":"lobby"}}"#),
            r#"JoinRoom { room: "lobby", since: None }"#
        );
        assert_eq!(
            parse_debug(r#"{"payload":{"room":"a\"b","message":"hi\n"},"type":"chat_message"}"#),
            r#"Chat { room: "a\"b", message: "hi\n", message_id: None }"#
        );
        assert_eq!(
            parse_debug(
                r#"{"type":"chat_message","payload":{"room":"r","message":"m","messageId":"k"}}"#
            ),
            r#"Chat { room: "r", message: "m", message_id: Some("k") }"#
        );
        assert_eq!(
            parse_debug(r#"{"type":"typing","payload":{"room":"r","isTyping":true}}"#),
            r#"Typing { room: "r", is_typing: true }"#
        );
        assert_eq!(parse_debug(r#"{"type":"pong"}"#), "Pong");
    }

    #[test]
    fn every_listed_type_is_read_and_no_other() {
        for kind in CLIENT_MESSAGE_TYPES {
            let json = format!(r#"{{"type":"{kind}"}}"#);
            assert!(
                !parse_debug(&json).starts_with("error: Unknown message type"),
                "{kind}"
            );
        }
        assert!(parse_debug(r#"{"type":"dance"}"#).starts_with("error: Unknown message type"));
    }

    #[test]
    fn errors_name_the_problem() {
        for bad in [
            "",
            "nope",
            "[1]",
            r#"{"type":5}"#,
            r#"{"payload":{}}"#,
            "{\"type\":\"x\"",
        ] {
            assert_eq!(parse_debug(bad), "error: Invalid message format", "{bad:?}");
        }
        assert_eq!(
            parse_debug(r#"{"type":"dance"}"#),
            "error: Unknown message type: dance"
        );
        assert_eq!(
            parse_debug(r#"{"type":"join_room","payload":{"room":7}}"#),
            "error: Invalid payload: 'room' must be a string"
        );
        assert_eq!(
            parse_debug(r#"{"type":"typing","payload":{"room":"r","isTyping":"yes"}}"#),
            "error: Invalid payload: 'isTyping' must be a boolean"
        );
        assert_eq!(
            parse_debug(r#"{"type":"chat_message"}"#),
            "error: Invalid payload: 'room' must be a string"
        );
    }

    #[test]
    fn echo_reserializes_the_payload() {
        let mut input = br#"{"type":"echo","payload":{"a":[1,2.5,"x\u00e9"],"b":null}}"#.to_vec();
        let frame = JsonParser::default().parse(&mut input, |r| match r {
            Ok(ClientMessage::Echo { payload }) => encode_echo(payload, None),
            other => panic!("{other:?}"),
        });
        let json: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type":"echo","payload":{"a":[1,2.5,"xé"],"b":null}})
        );
    }

    #[test]
    fn server_messages_match_the_seed_shape() {
        let frame = ServerMessage::ChatMessage {
            room: "r",
            username: "Anonymous",
            user_id: "anonymous",
            message: "hi \"there\"",
            timestamp: 5,
        }
        .encode();
        assert_eq!(frame[0], 0x81);
        assert_eq!(
            &frame[2..],
            br#"{"type":"chat_message","room":"r","username":"Anonymous","userId":"anonymous","message":"hi \"there\"","timestamp":5}"#
        );
        let err = ServerMessage::Error {
            error: ErrorReply::MessageTooLong(1000),
            code: None,
        }
        .encode();
        assert_eq!(
            &err[2..],
            br#"{"type":"error","error":"Message too long (max 1000 characters)"}"#
        );
    }
}
