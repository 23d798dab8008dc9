//! Backplanes carry a publication from the shard where it starts to every other place that has
//! recipients for it. The handlers only ever call [`crate::shard::Shard::publish`]; which
//! backplane runs underneath is chosen at start-up.
//!
//! - [`memory::MemoryBackplane`] (the default): the shards of this process, over one inbox each.
//! - A Redis backplane (pub/sub across nodes) implements the same trait.

pub mod memory;

use std::sync::Arc;

use bytes::Bytes;

use crate::client_id::ClientId;

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

/// Moves publications between shards (and, for networked backplanes, between nodes).
pub trait Backplane: Send + Sync + 'static {
    /// Hands `publication` to each shard in `shards` for local delivery there. The origin shard
    /// has already delivered to its own clients and is never in `shards`. Returns how many of
    /// those shards it could not be handed to (their inboxes were full), for the caller to count.
    fn publish(&self, shards: &[usize], publication: Arc<Publication>) -> usize;
}
