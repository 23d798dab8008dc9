//! The broker: what joins this node to the others.
//!
//! - [`Broker::Memory`] (the default): one node. A room's stream lives in this process, which
//!   gives its messages their offsets ([`crate::stream::Stream::append`]).
//! - [`Broker::Redis`]: nodes joined by Redis. A room's messages get their offsets from Redis,
//!   atomically with its history and the publication to every node following the room
//!   ([`redis`]). A node follows (SUBSCRIBEs to) a room while it has local members, and keeps a
//!   copy of the room's position and history to serve joins and recoveries without waiting.
//!
//! Handlers never wait on the broker: what goes to Redis is queued to the broker's own thread,
//! and a message that cannot be queued (Redis away, or the queue full) is refused at once with
//! "Service unavailable: retry".

pub mod redis;

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::base::client_id::ClientId;
use crate::config::{BrokerKind, Config};
use crate::protocol::ErrorReply;
use crate::rooms::RoomState;

pub use self::redis::{Engine, RedisBroker};

pub enum Broker {
    Memory,
    Redis(RedisBroker),
}

/// A room message could not be handed to the broker: the client is told to retry.
#[derive(Debug, PartialEq, Eq)]
pub struct Unavailable;

/// Who published a room message through the broker, to be told what became of it.
#[derive(Debug)]
pub enum Publisher {
    /// A client: told only when the message could not be published (an error reply).
    Client(ClientId),
    /// A server API request, waiting for the message's offset or the error.
    Api(oneshot::Sender<Result<u64, ErrorReply<'static>>>),
}

impl Broker {
    /// The broker `config` asks for, and (for Redis) the engine to run on its own thread.
    pub fn new(config: &Config, node_id: Arc<str>) -> (Self, Option<Engine>) {
        match config.broker {
            BrokerKind::Memory => (Broker::Memory, None),
            BrokerKind::Redis => {
                let (broker, engine) = RedisBroker::new(config, node_id);
                (Broker::Redis(broker), Some(engine))
            }
        }
    }

    /// Whether room streams are the broker's rather than this node's.
    pub fn is_shared(&self) -> bool {
        matches!(self, Broker::Redis(_))
    }

    /// Whether the node can take part in rooms now (`/readyz`).
    pub fn is_ready(&self) -> bool {
        match self {
            Broker::Memory => true,
            Broker::Redis(redis) => redis.is_ready(),
        }
    }

    /// Once stopping: waits until every room message handed to the broker has been answered
    /// (published, or refused to its sender), so that connections close after their answers.
    pub async fn settled(&self) {
        if let Broker::Redis(redis) = self {
            redis.settled().await;
        }
    }

    /// The node has a first member in a room whose stream it does not follow yet.
    pub fn follow(&self, room: &Arc<RoomState>) {
        if let Broker::Redis(redis) = self {
            redis.follow(room.clone());
        }
    }

    /// The node's last member of `room` left.
    pub fn last_member_left(&self, room: &Arc<str>) {
        if let Broker::Redis(redis) = self {
            redis.last_member_left(room.clone());
        }
    }
}
