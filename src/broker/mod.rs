//! The broker: what joins this node to the others, behind one interface ([`Broker`]).
//!
//! - [`memory::MemoryBroker`] (the default): one node. A room's stream lives in this process,
//!   which gives its messages their offsets ([`crate::rooms::stream::Stream::append`]).
//! - [`redis::RedisBroker`]: nodes joined by Redis. A room's messages get their offsets from
//!   Redis, atomically with its history and the publication to every node following the room. A
//!   node follows (SUBSCRIBEs to) a room while it has local members, and keeps a copy of the
//!   room's position and history to serve joins and recoveries without waiting.
//!
//! A broker reports what reaches this node — publications, stream messages, presence changes,
//! control messages, catch-ups — through the [`BrokerEvents`] it was given, implemented by the
//! layer above ([`crate::cluster`]); it never delivers to connections itself. Another engine
//! (NATS, Redis Cluster) is one more implementation of these two traits.
//!
//! Handlers never wait on the broker: what goes to Redis is queued to the broker's own thread,
//! and a message that cannot be queued (Redis away, or the queue full) is refused at once with
//! "Service unavailable: retry".

pub mod memory;
pub mod redis;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::base::client_id::ClientId;
use crate::protocol::{ErrorReply, RequestId};
use crate::rooms::presence::{Entry, NodesPresence, Presence};
use crate::rooms::stream::Position;
use crate::rooms::{RoomState, RoomsPage, Target};
use crate::runtime::Shared;
use crate::ws::deflate::Prepared;

/// A future a broker answers with on the calling thread.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// A future a broker answers with that any thread may await (it holds no borrow of the broker).
pub type SendFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a broker needs run besides its handle (Redis's connections), on a thread of its own
/// until the token is cancelled.
pub type BrokerThread = Box<dyn FnOnce(CancellationToken) -> LocalFuture<'static, ()> + Send>;

/// What a broker is given of its node: the shards' shared state (room directory, counters) and
/// where its events go.
#[derive(Clone)]
pub struct Host {
    pub shared: Arc<Shared>,
    pub events: Arc<dyn BrokerEvents>,
}

/// A room message could not be handed to the broker: the client is told to retry.
#[derive(Debug, PartialEq, Eq)]
pub struct Unavailable;

/// Why a room message was not published.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishError {
    /// The broker cannot take it now (Redis away or behind): retry.
    Unavailable,
    /// A new room, and the node is at `max_rooms`.
    RoomsFull,
}

/// Who published a room message through the broker, to be told what became of it.
#[derive(Debug)]
pub enum Publisher {
    /// A client: told when the message could not be published (an error reply) and, when the
    /// message had an `id`, when it was (an `ack` with its offset).
    Client(ClientId, Option<RequestId>),
    /// A server API request, waiting for the message's place in the room's stream, or the error.
    Api(oneshot::Sender<Result<Position, ErrorReply<'static>>>),
}

/// The room a message is published to: its state when the publisher holds it (a member),
/// else its name.
pub enum RoomRef<'a> {
    State(&'a Arc<RoomState>),
    Name(&'a str),
}

/// Which of a room's kept messages the server API asks for.
#[derive(Clone, Copy, Debug)]
pub struct HistoryQuery {
    /// Messages after this offset.
    pub since: u64,
    pub limit: usize,
    /// From the latest down (else from the first after `since` up).
    pub newest_first: bool,
}

/// A room's kept messages.
pub struct RoomHistory {
    /// Where the room's stream is; `None` for a room the broker holds nothing of.
    pub position: Option<Position>,
    /// Each message as members got it: JSON text, with its offset.
    pub messages: Vec<Bytes>,
    /// Records that were not wsgate's, skipped.
    pub malformed: u64,
}

/// Closing every connection of a user (on every node), with an application close code.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Disconnect {
    pub user: Arc<str>,
    /// 4000–4999.
    pub code: u16,
    pub reason: Arc<str>,
}

/// What a disconnect closed: on the other nodes (what [`Broker::control`] answers), or across the
/// cluster (what [`crate::cluster::disconnect_everywhere`] adds this node's count to).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected {
    /// Connections closed (those of nodes that did not answer in time are not in it).
    pub connections: u64,
    /// Nodes whose count is in `connections`.
    pub nodes: u32,
    /// Nodes that were told but did not answer within [`CONTROL_ANSWER_WAIT`] (they still close
    /// the user's connections; their count is missing).
    pub unanswered: u32,
}

/// A node as the server API lists it (`GET /api/nodes`): what it said at its last beat (every
/// 2 s in a cluster), its counters totals since it started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    /// WebSocket connections open.
    pub connections: u64,
    /// Rooms the node holds (with members, or history not yet expired).
    pub rooms: u64,
    pub shards: u64,
    pub engine: String,
    pub version: String,
    /// Totals since the node started: connections opened, messages received, publication frames
    /// queued to recipients (one per recipient).
    pub connections_opened: u64,
    pub messages_received: u64,
    pub deliveries: u64,
    /// When it said so (Unix ms).
    pub at: u64,
}

impl NodeStatus {
    /// This node's, now.
    pub fn of(shared: &Shared) -> Self {
        let total = |counter: fn(&crate::runtime::metrics::ShardMetrics) -> u64| {
            shared.metrics.iter().map(counter).sum()
        };
        NodeStatus {
            node: shared.id.to_string(),
            connections: shared.connection_count() as u64,
            rooms: shared.rooms.room_count() as u64,
            shards: shared.shards() as u64,
            engine: shared.config.engine.name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connections_opened: total(|m| m.accepted.get()),
            messages_received: total(|m| m.messages_received.get()),
            deliveries: total(|m| m.deliveries.get()),
            at: crate::base::time::now_ms(),
        }
    }
}

/// How long a disconnect waits for the other nodes' counts once they were told.
pub const CONTROL_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// A disconnect asked with a code outside 4000–4999 (the range RFC 6455 leaves to applications).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("close code {0} is not an application code (4000-4999)")]
pub struct NotAnApplicationCode(pub u16);

impl Disconnect {
    pub fn new(user: &str, code: u16, reason: &str) -> Result<Self, NotAnApplicationCode> {
        if !(4000..=4999).contains(&code) {
            return Err(NotAnApplicationCode(code));
        }
        Ok(Disconnect {
            user: Arc::from(user),
            code,
            reason: Arc::from(reason),
        })
    }
}

/// What joins this node to the others. Called from the shards (synchronously: a call queues,
/// it never waits for the network) and from the server API. Besides the events it reports, a
/// broker keeps the node's copy of what it follows up to date: the room's stream (the messages it
/// hands on, pushed before [`BrokerEvents::stream_message`]) and the other nodes' presence.
pub trait Broker: Send + Sync {
    /// `/healthz`'s view of it: its kind, whether it is ready, and what else it can say.
    fn health(&self) -> serde_json::Value;

    /// Whether the node can take part in rooms now (`/readyz`).
    fn is_ready(&self) -> bool;

    /// What the broker measures of itself, for `/metrics`: (name, help, value) of each gauge.
    fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        Vec::new()
    }

    /// Resolves once the node is stopping and every room message handed to the broker has been
    /// answered (published, or refused to its sender), so that connections close after their
    /// answers.
    fn settled(&self) -> LocalFuture<'_, ()>;

    /// The node has a first member in a room whose stream it does not follow yet.
    fn follow(&self, room: &Arc<RoomState>);

    /// The node's last member of `room` left.
    fn last_member_left(&self, room: &Arc<str>);

    /// Publishes `message` (a JSON object) on `room`'s stream: it gets the room's next offset,
    /// joins its history and comes back through [`BrokerEvents::stream_message`] (on every node
    /// following the room). The publisher is told what became of it.
    ///
    /// With `dedup` (a key naming the message, unique for its sender), a message whose key was
    /// published within `dedup_window` is not published again: its publisher is answered with the
    /// first one's offset.
    fn publish(
        &self,
        room: RoomRef<'_>,
        message: Vec<u8>,
        from: Publisher,
        dedup: Option<&str>,
    ) -> Result<(), PublishError>;

    /// Shares a publication (`payload`, its JSON text) with the other nodes' recipients of
    /// `target`. False when it could not be (counted by the caller): notices are not retried.
    fn share(&self, target: &Target, payload: Bytes) -> bool;

    /// Asks every other node to close a user's connections, and answers with how many they
    /// closed (see [`Disconnected`]); `Unavailable` when they could not be told, or may not have
    /// been (the connection to Redis failed on the way).
    fn control(&self, disconnect: &Disconnect) -> SendFuture<Result<Disconnected, Unavailable>>;

    /// A user's connections here in `room` changed (see [`PresenceChange`]). Called under the
    /// room's presence lock, so that the changes reach the broker in their order: it queues,
    /// and reports nothing from within but [`BrokerEvents::membership`].
    fn presence_changed(&self, room: Arc<str>, change: PresenceChange);

    /// A connection of this node opened: its id, its user, when (Unix ms).
    fn session_opened(&self, client: ClientId, user_id: &str, connected_at: u64);

    fn session_closed(&self, client: ClientId);

    /// The live nodes the broker joins, this one included, in name order.
    fn nodes(&self) -> LocalFuture<'_, Result<Vec<NodeStatus>, Unavailable>>;

    /// Rooms with members and their connections, across the nodes the broker joins.
    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> LocalFuture<'_, Result<RoomsPage, Unavailable>>;

    /// A room's kept messages (its history), from where its stream is kept: this node's with the
    /// memory broker, Redis's with Redis.
    fn history(
        &self,
        room: &str,
        query: HistoryQuery,
    ) -> LocalFuture<'_, Result<RoomHistory, Unavailable>>;

    /// Whether this node's copy of `room`'s presence is the whole cluster's.
    fn knows_presence(&self, room: &RoomState) -> bool;

    /// The presence of a room this node does not know (see [`Broker::knows_presence`]), and how
    /// many entries were malformed; `None` when the broker knows no more than the node.
    fn presence(&self, room: &str)
    -> LocalFuture<'_, Result<Option<(Presence, u64)>, Unavailable>>;
}

/// A change of a user's connections on this node in a room.
#[derive(Debug)]
pub struct PresenceChange {
    /// The user's connections here, now `entry.conns`.
    pub entry: Entry,
    /// Numbers this node's changes of the room.
    pub seq: u64,
    /// The user's connections in the room, and the room's, before and after, as this node's
    /// copy counts them: exact with one node (with Redis, its scripts count the cluster's).
    pub user: (u32, u32),
    pub room: (u32, u32),
}

/// A change of who is in a room across the cluster: a room's first connection came or its last
/// went, or a user's. Each is decided once for the cluster (by the broker: with Redis, by the
/// script run that made it), and reported by one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// The room's first connection came (`true`), or its last went (`false`).
    Room { room: Arc<str>, occupied: bool },
    /// A user's first connection joined the room (`true`), or its last left (`false`); `user`
    /// names it (an anonymous connection is its own member).
    User {
        room: Arc<str>,
        user: Entry,
        added: bool,
    },
}

/// What a broker reports to its node, implemented by the layer above. Called on the broker's
/// own thread (or, for the memory broker, on the publishing shard); each call hands work to the
/// shards and returns.
pub trait BrokerEvents: Send + Sync {
    /// A publication another node shared (`json`, its text), for this node's recipients.
    fn publication(&self, target: Target, json: &[u8]);

    /// Message `offset` of `room`'s stream (`frame`, framed), for the room's members here.
    /// Called under the stream's lock, which keeps every shard's inbox in offset order.
    fn stream_message(&self, room: &Arc<RoomState>, offset: u64, frame: Prepared);

    /// What the broker holds of a room's stream (its position, its history from the offset
    /// after the node's or its most recent messages, as JSON) and, after a (re)subscription, of
    /// its presence: the node syncs its copy and its members.
    fn caught_up(
        &self,
        room: &Arc<RoomState>,
        position: Position,
        kept: Vec<(u64, Vec<u8>)>,
        presence: Option<NodesPresence>,
    );

    /// Members of `room` left (`gone`) or joined (`came`) on other nodes.
    fn presence(&self, room: &Arc<RoomState>, gone: &[Entry], came: &[Entry]);

    /// Another node asks for a user's connections to be closed; `closed` is told how many were
    /// (once every shard has closed its own).
    fn disconnect(&self, disconnect: Arc<Disconnect>, closed: oneshot::Sender<u64>);

    /// A client's room message (with `request`, its `id`) could not be published: it is told
    /// (`error`).
    fn refused(&self, client: ClientId, request: Option<RequestId>, error: ErrorReply<'static>);

    /// A client's room message with an `id` was published at `offset`: it is told.
    fn published(&self, client: ClientId, request: RequestId, offset: u64);

    /// The broker lost (or never had) the node's sessions: they are recorded again.
    fn sessions_lost(&self);

    /// Who is in a room changed (see [`Membership`]); reported by one node of the cluster. Must
    /// not take a room's locks (it may be called under one).
    fn membership(&self, change: Membership);

    /// A client's room message (`json`) was published at `offset`: reported by the sender's node
    /// only (the others get it as a stream message).
    fn client_published(&self, room: &Arc<str>, json: &[u8], offset: u64);
}
