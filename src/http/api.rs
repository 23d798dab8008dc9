//! The server API, for backends: JSON over HTTP under `/api/`, allowed with
//! `Authorization: Bearer <api_key>`; without an `api_key` configured, the API is off (404).
//!
//! | route | body / query | answer |
//! |-------|--------------|--------|
//! | `POST /api/publish` | `{"room":R,"data":<JSON>}` | `{"room":R,"offset":N,"epoch":E}` |
//! | `POST /api/publish` | `{"room":R,"as":"chat","username":S,"data":"text"}` | the same |
//! | `POST /api/publish` | `{"user":U,"data":<JSON>}` | `{"user":U,"published":true}` |
//! | `POST /api/broadcast` | `{"data":<JSON>}` | `{"published":true}` |
//! | `POST /api/disconnect` | `{"user":U,"code":4000-4999,"reason":"…"}` | `{"disconnected":U,"connections":N,"nodes":K,"unanswered":M}` |
//! | `GET /api/nodes` | | `{"nodes":[{"node","connections","rooms","shards","engine","version","connectionsOpened","messagesReceived","deliveries","at"}]}` |
//! | `GET /api/rooms` | `?after=R&limit=N` | `{"rooms":[{"room":R,"members":N}],"next":R}` |
//! | `GET /api/rooms/{room}` | `?after=U&limit=N` | `{"room":R,"members":N,"users":[…],"next":U}` |
//! | `GET /api/history/{room}` | `?since=N&limit=M&order=oldest\|newest` | `{"room":R,"offset":N,"epoch":E,"messages":[…]}` |
//! | `GET /api/stats` | | what `/healthz` shows, with every counter |
//!
//! A publication takes the path of a chat message: serialized once, framed once; a room's gets
//! the room's next offset (from Redis, with the Redis broker, which the request waits for) and is
//! kept in its history, so members that reconnect with `since` get it too.
//!
//! Errors are `{"error": "…"}` with 400 (bad body or query), 401 (no or wrong key), 404, 405,
//! 408 (body too slow), 413 (body over `max_message_size`), 503 (Redis away or behind: retry).

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::{Body, Edge, ShardEdge, error_response, json, unauthorized};
use crate::base::time::now_ms;
use crate::broker::{Disconnect, HistoryQuery, PublishError, Publisher, RoomRef};
use crate::cluster;
use crate::config::Config;
use crate::fanout::Publication;
use crate::protocol::{ErrorReply, ServerMessage};
use crate::rooms::presence::Presence;
use crate::rooms::{Target, is_valid_room_name};
use crate::ws::frame;

/// Rooms or users per page, by default and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// How long a publication through Redis may take before the request gives up waiting (the
/// message may still be published).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a request is for the API (served by [`serve`]).
pub fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Answers one API request.
pub async fn serve(shard: Rc<ShardEdge>, req: Request<Incoming>) -> Response<Body> {
    let config = &shard.edge.shared.config;
    let Some(key) = &config.api_key else {
        return error_response(StatusCode::NOT_FOUND, "not found");
    };
    if !authorized(req.headers(), key.expose()) {
        return unauthorized(
            json!({ "error": "the server API needs Authorization: Bearer <api_key>" }),
        );
    }
    let (method, path, query) = (
        req.method().clone(),
        req.uri().path().to_owned(),
        req.uri().query().unwrap_or_default().to_owned(),
    );
    let route = path.trim_start_matches("/api/");
    let answer = match (&method, route) {
        (&Method::POST, "publish") => match read_json(&shard, req).await {
            Ok(body) => publish(&shard, body).await,
            Err(refused) => Err(refused),
        },
        (&Method::POST, "broadcast") => {
            let body = read_json(&shard, req).await;
            body.and_then(|body| broadcast(&shard, body))
        }
        (&Method::POST, "disconnect") => match read_json(&shard, req).await {
            Ok(body) => disconnect(&shard, body).await,
            Err(refused) => Err(refused),
        },
        (&Method::GET, "nodes") => nodes(&shard).await,
        (&Method::GET, "rooms") => rooms(&shard, &query).await,
        (&Method::GET, "stats") => Ok(json(StatusCode::OK, &super::stats(&shard))),
        (&Method::GET, room) if room.starts_with("rooms/") => {
            room_users(&shard, &room["rooms/".len()..], &query).await
        }
        (&Method::GET, room) if room.starts_with("history/") => {
            history(&shard, &room["history/".len()..], &query).await
        }
        (_, route)
            if matches!(
                route,
                "publish" | "broadcast" | "disconnect" | "nodes" | "rooms" | "stats"
            ) || route.starts_with("rooms/")
                || route.starts_with("history/") =>
        {
            Err(Refused(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed".into(),
            ))
        }
        _ => Err(Refused(StatusCode::NOT_FOUND, "no such API route".into())),
    };
    answer.unwrap_or_else(Refused::into_response)
}

/// Whether the request carries `Authorization: Bearer <key>`, compared in constant time (for
/// keys of the configured length).
pub fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.len() == key.len()
        && given
            .iter()
            .zip(key.as_bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// A refused API request: its status and what the error body says.
struct Refused(StatusCode, String);

impl Refused {
    fn into_response(self) -> Response<Body> {
        error_response(self.0, &self.1)
    }
}

type Answer = Result<Response<Body>, Refused>;

fn bad_request(problem: impl std::fmt::Display) -> Refused {
    Refused(StatusCode::BAD_REQUEST, problem.to_string())
}

fn unavailable(problem: impl std::fmt::Display) -> Refused {
    Refused(StatusCode::SERVICE_UNAVAILABLE, problem.to_string())
}

/// Reads a JSON body of at most `max_message_size` bytes, within `handshake_timeout`.
async fn read_json<T: for<'de> Deserialize<'de>>(
    shard: &ShardEdge,
    req: Request<Incoming>,
) -> Result<T, Refused> {
    let config = &shard.edge.shared.config;
    let limit = config.max_message_size;
    let too_large = || {
        Refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over max_message_size ({limit} bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let reading = Limited::new(req.into_body(), limit).collect();
    let body: Bytes = match tokio::time::timeout(config.handshake_timeout, reading).await {
        Err(_) => {
            return Err(Refused(
                StatusCode::REQUEST_TIMEOUT,
                "body not received within handshake_timeout".into(),
            ));
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => return Err(bad_request(format!("cannot read the body: {e}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    serde_json::from_slice(&body).map_err(|e| bad_request(format!("invalid body: {e}")))
}

#[derive(Deserialize)]
struct PublishBody {
    room: Option<String>,
    user: Option<String>,
    data: Value,
    /// `"chat"`: to a room, as a chat message from `username` (`data`: its text), which pages
    /// render like any other.
    #[serde(rename = "as")]
    shape: Option<String>,
    username: Option<String>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

/// The `userId` of a chat-shaped publication that names none.
const BACKEND_USER_ID: &str = "server";
/// A chat-shaped publication's `username` and `userId`, at most.
const MAX_SENDER_CHARS: usize = 64;

/// A user id in a publication, at most (ids come from tokens; this bounds what crosses Redis).
const MAX_USER_ID_LEN: usize = 256;

async fn publish(shard: &ShardEdge, body: PublishBody) -> Answer {
    let room = match (body.room.as_deref(), body.user.as_deref()) {
        (Some(room), None) => room,
        (None, Some(_)) if body.shape.is_some() => {
            return Err(bad_request("as: \"chat\" is for rooms"));
        }
        (None, Some(user)) => return publish_to_user(shard, user, &body.data),
        _ => return Err(bad_request("give either room or user")),
    };
    if !is_valid_room_name(room) {
        return Err(bad_request(ErrorReply::InvalidRoomName));
    }
    let node = &shard.edge;
    let message = match body.shape.as_deref() {
        None => ServerMessage::Publication {
            room: Some(room),
            data: &body.data,
            timestamp: now_ms(),
        }
        .to_json(),
        Some("chat") => chat_shaped(&node.shared.config, room, &body)?,
        Some(_) => return Err(bad_request("as: \"chat\", or leave it out")),
    };
    let (reply, answer) = oneshot::channel();
    let published = cluster::publish_to_stream(
        &*node.broker,
        &node.shared,
        RoomRef::Name(room),
        message,
        Publisher::Api(reply),
        None,
    );
    match published {
        Ok(()) => {}
        Err(PublishError::RoomsFull) => {
            return Err(unavailable("room limit reached (max_rooms)"));
        }
        Err(PublishError::Unavailable) => return Err(unavailable(ErrorReply::Unavailable)),
    }
    let position = match tokio::time::timeout(PUBLISH_TIMEOUT, answer).await {
        Ok(Ok(Ok(position))) => position,
        Ok(Ok(Err(error))) => return Err(unavailable(error)),
        // Dropped unanswered (the node is stopping), or Redis is slow.
        Ok(Err(_)) | Err(_) => return Err(unavailable(ErrorReply::MaybeUnavailable)),
    };
    Ok(json(
        StatusCode::OK,
        &json!({ "room": room, "offset": position.offset, "epoch": &*position.epoch }),
    ))
}

/// A room publication in the shape of a chat message: from `username` (and `userId`, by
/// default "server"), with `data` as its text, held to the chat's limits.
fn chat_shaped(config: &Config, room: &str, body: &PublishBody) -> Result<Vec<u8>, Refused> {
    let sender = |name: &str, value: Option<&str>| match value {
        Some(v) if (1..=MAX_SENDER_CHARS).contains(&v.chars().count()) => Ok(v.to_owned()),
        _ => Err(bad_request(format!(
            "{name}: 1 to {MAX_SENDER_CHARS} characters (as: \"chat\")"
        ))),
    };
    let username = sender("username", body.username.as_deref())?;
    let user_id = sender(
        "userId",
        Some(body.user_id.as_deref().unwrap_or(BACKEND_USER_ID)),
    )?;
    let Some(text) = body.data.as_str() else {
        return Err(bad_request(
            "data: the message's text, a string (as: \"chat\")",
        ));
    };
    let max = config.max_chat_message_chars;
    if text.chars().count() > max {
        return Err(bad_request(ErrorReply::MessageTooLong(max)));
    }
    Ok(ServerMessage::ChatMessage {
        room,
        username: &username,
        user_id: &user_id,
        message: text,
        timestamp: now_ms(),
    }
    .to_json())
}

/// Publishes to every addressable connection of `user`, on every node (nothing is kept: a user
/// not connected now never gets it).
fn publish_to_user(shard: &ShardEdge, user: &str, data: &Value) -> Answer {
    if !(1..=MAX_USER_ID_LEN).contains(&user.len()) {
        return Err(bad_request(format!("user: 1 to {MAX_USER_ID_LEN} bytes")));
    }
    let node = &shard.edge;
    let frame = ServerMessage::User {
        data,
        timestamp: now_ms(),
    }
    .encode();
    publish_everywhere(node, Target::User(Arc::from(user)), frame)?;
    Ok(json(
        StatusCode::OK,
        &json!({ "user": user, "published": true }),
    ))
}

#[derive(Deserialize)]
struct BroadcastBody {
    data: Value,
}

fn broadcast(shard: &ShardEdge, body: BroadcastBody) -> Answer {
    let node = &shard.edge;
    // Refused whole rather than delivered on this node only.
    if !node.broker.is_ready() {
        return Err(unavailable(ErrorReply::Unavailable));
    }
    let frame = ServerMessage::Publication {
        room: None,
        data: &body.data,
        timestamp: now_ms(),
    }
    .encode();
    publish_everywhere(node, Target::All, frame)?;
    Ok(json(StatusCode::OK, &json!({ "published": true })))
}

/// Publishes `frame` to `target` on every node: 503 (delivered nowhere) when the other nodes
/// cannot be reached.
fn publish_everywhere(node: &Edge, target: Target, frame: Bytes) -> Result<(), Refused> {
    let publication = Publication::to(target, frame);
    if cluster::publish_from_outside(&*node.broker, &node.shared, publication) {
        Ok(())
    } else {
        Err(unavailable(ErrorReply::Unavailable))
    }
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
    #[serde(default = "default_disconnect_code")]
    code: u16,
    #[serde(default)]
    reason: String,
}

fn default_disconnect_code() -> u16 {
    4000
}

async fn disconnect(shard: &ShardEdge, body: DisconnectBody) -> Answer {
    let node = &shard.edge;
    if body.reason.len() > frame::MAX_CLOSE_REASON {
        return Err(bad_request(format!(
            "reason: at most {} bytes (it goes in the close frame)",
            frame::MAX_CLOSE_REASON
        )));
    }
    let disconnect = Disconnect::new(&body.user, body.code, &body.reason).map_err(bad_request)?;
    if !node.broker.is_ready() {
        return Err(unavailable(ErrorReply::Unavailable));
    }
    let closed = cluster::disconnect_everywhere(&*node.broker, &node.shared, Arc::new(disconnect))
        .await
        .map_err(unavailable)?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "disconnected": body.user,
            "connections": closed.connections,
            "nodes": closed.nodes,
            "unanswered": closed.unanswered,
        }),
    ))
}

/// `after` and `limit` from a query string.
fn page_query(query: &str) -> Result<(Option<String>, usize), Refused> {
    let mut after = None;
    let mut limit = PAGE;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| bad_request(format!("{name}: not UTF-8")))?;
        match name {
            "after" => after = Some(value.into_owned()),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| bad_request(format!("limit: 1 to {MAX_PAGE}")))?;
            }
            _ => return Err(bad_request(format!("unknown query parameter {name}"))),
        }
    }
    Ok((after, limit))
}

/// The live nodes, each as it said at its last beat (this one, now, on its own).
async fn nodes(shard: &ShardEdge) -> Answer {
    let nodes = shard
        .edge
        .broker
        .nodes()
        .await
        .map_err(|_| unavailable(ErrorReply::Unavailable))?;
    Ok(json(StatusCode::OK, &json!({ "nodes": nodes })))
}

/// Rooms with members and their connections: this node's directory on one node; with Redis,
/// the cluster's rooms index (a node knows only the rooms it has members in).
async fn rooms(shard: &ShardEdge, query: &str) -> Answer {
    let (after, limit) = page_query(query)?;
    let page = shard
        .edge
        .broker
        .rooms(after.as_deref(), limit)
        .await
        .map_err(|_| unavailable(ErrorReply::Unavailable))?;
    let rooms: Vec<Value> = page
        .rooms
        .iter()
        .map(|(room, members)| json!({ "room": &**room, "members": members }))
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "rooms": rooms, "next": page.next.as_deref() }),
    ))
}

/// The room a path names (percent-encoded), if its name is valid.
fn room_in_path(room: &str) -> Result<Cow<'_, str>, Refused> {
    let room = percent_encoding::percent_decode_str(room)
        .decode_utf8()
        .map_err(|_| bad_request(ErrorReply::InvalidRoomName))?;
    if !is_valid_room_name(&room) {
        return Err(bad_request(ErrorReply::InvalidRoomName));
    }
    Ok(room)
}

/// Who is in a room: the room's presence as this node holds it — cluster-wide for the rooms it
/// follows with Redis — or, for a room it does not follow, as Redis holds it.
async fn room_users(shard: &ShardEdge, room: &str, query: &str) -> Answer {
    let room = room_in_path(room)?;
    let (after, limit) = page_query(query)?;
    let page = |presence: &mut Presence| {
        let (users, more) = presence.page(after.as_deref(), limit);
        let next = more
            .then(|| users.last().map(|e| e.user_id.clone()))
            .flatten();
        let users: Vec<Value> = users
            .iter()
            .map(|e| json!({ "userId": e.shown_id(), "username": &*e.username }))
            .collect();
        (presence.total(), users, next)
    };
    let node = &shard.edge;
    let local = node
        .shared
        .rooms
        .get(&room)
        .filter(|state| node.broker.knows_presence(state));
    let (members, users, next) = match local {
        Some(state) => page(&mut state.presence()),
        None => match node.broker.presence(&room).await {
            Ok(None) => (0, Vec::new(), None),
            Ok(Some((mut presence, malformed))) => {
                node.shared
                    .counters
                    .broker_malformed
                    .fetch_add(malformed, std::sync::atomic::Ordering::Relaxed);
                page(&mut presence)
            }
            Err(_) => return Err(unavailable(ErrorReply::Unavailable)),
        },
    };
    Ok(json(
        StatusCode::OK,
        &json!({ "room": &*room, "members": members, "users": users, "next": next.as_deref() }),
    ))
}

/// `since`, `limit` and `order` from a history query string.
fn history_query(query: &str) -> Result<HistoryQuery, Refused> {
    let mut asked = HistoryQuery {
        since: 0,
        limit: PAGE,
        newest_first: false,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "since" => {
                asked.since = value
                    .parse()
                    .map_err(|_| bad_request("since: an offset (a non-negative integer)"))?;
            }
            "limit" => {
                asked.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| bad_request(format!("limit: 1 to {MAX_PAGE}")))?;
            }
            "order" => {
                asked.newest_first = match value {
                    "oldest" => false,
                    "newest" => true,
                    _ => return Err(bad_request("order: oldest or newest")),
                };
            }
            _ => return Err(bad_request(format!("unknown query parameter {name}"))),
        }
    }
    Ok(asked)
}

/// A room's kept messages after `since` (its last `history_size`, for `history_ttl`), each as
/// members got it, with where the room's stream is (`offset`, `epoch`; `epoch` null for a room
/// nothing is kept of): from this node with the memory broker, from Redis with Redis.
async fn history(shard: &ShardEdge, room: &str, query: &str) -> Answer {
    let room = room_in_path(room)?;
    let asked = history_query(query)?;
    let node = &shard.edge;
    let kept = node
        .broker
        .history(&room, asked)
        .await
        .map_err(|_| unavailable(ErrorReply::Unavailable))?;
    if kept.malformed > 0 {
        let malformed = &node.shared.counters.broker_malformed;
        malformed.fetch_add(kept.malformed, std::sync::atomic::Ordering::Relaxed);
    }
    let messages: Vec<Value> = kept
        .messages
        .iter()
        .filter_map(|json| serde_json::from_slice(json).ok())
        .collect();
    let (offset, epoch) = kept
        .position
        .as_ref()
        .map_or((0, None), |p| (p.offset, Some(&*p.epoch)));
    Ok(json(
        StatusCode::OK,
        &json!({ "room": &*room, "offset": offset, "epoch": epoch, "messages": messages }),
    ))
}
