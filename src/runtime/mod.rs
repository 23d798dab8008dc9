//! The runtime: each shard's connections and what the shards share, with no knowledge of what
//! the connections' messages mean (that is an [`App`]'s) nor of how bytes reach the sockets (that
//! is the [`driver`]'s).
//!
//! - [`shard`]: one thread's connections in a `slab` ([`entry`]), its side of every room, its
//!   timer wheel ([`heartbeat`], [`wheel`]) and the synchronous calls a driver and an app make.
//! - [`input`]: a connection's bytes in, decoded in place and handed to its app within its limits.
//! - [`bus`]: work handed from one shard (or the broker) to others, bounded in bytes.
//! - [`counters`] and [`metrics`]: what is counted, per node and per shard.
//! - [`driver`]: the I/O (each shard's epoll loop over its connections), behind the calls above.

pub mod bus;
pub mod counters;
pub mod driver;
pub mod entry;
pub mod heartbeat;
pub mod input;
pub mod metrics;
pub mod shard;
pub mod wheel;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::base::identity::Identity;
use crate::config::Config;
use crate::conn::limits::Admission;
use crate::rooms::RoomDirectory;
use crate::ws::deflate::Deflate;

use self::bus::{Bus, Delivery, Inbox};
use self::counters::Counters;
use self::entry::ConnEntry;
use self::metrics::ShardMetrics;
use self::shard::Shard;

/// What the shards of one gateway process share: configuration, the room directory, the bus
/// between them, admission and a few gauges. Nothing here is touched per message except through
/// atomics.
pub struct Shared {
    /// This node's name among the nodes of a cluster: 8 random hex digits, new at each start.
    pub id: Arc<str>,
    pub config: Arc<Config>,
    pub rooms: RoomDirectory,
    /// Carries work between this node's shards.
    pub bus: Bus,
    /// Open WebSocket connections, one gauge per shard (each written by its shard only).
    pub connections: Box<[AtomicUsize]>,
    /// Bytes queued for writing, one gauge per shard, refreshed by each shard once per heartbeat
    /// tick (not per message).
    pub queued_bytes: Box<[AtomicUsize]>,
    /// The identity of token-less connections when `allow_anonymous` is on (shared by all).
    pub anonymous: Arc<Identity>,
    pub counters: Counters,
    /// Per-message metrics, one block per shard (each written by its shard only).
    pub metrics: Box<[ShardMetrics]>,
    pub admission: Admission,
    /// Set when shutdown begins: upgrades are refused, `/readyz` fails, connections get 1001.
    pub draining: AtomicBool,
}

impl Shared {
    /// What the shards of a node named `id` share, and each shard's inbox.
    pub fn new(
        id: Arc<str>,
        config: Arc<Config>,
        rooms: RoomDirectory,
        max_sockets: usize,
    ) -> (Self, Vec<Inbox>) {
        let (bus, inboxes) = Bus::new(config.shards, config.max_shard_inbox_bytes);
        let shared = Shared {
            id,
            rooms,
            bus,
            connections: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
            queued_bytes: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
            anonymous: Arc::new(Identity::anonymous()),
            counters: Counters::default(),
            metrics: (0..config.shards)
                .map(|_| ShardMetrics::default())
                .collect(),
            admission: Admission::new(&config, max_sockets),
            draining: AtomicBool::new(false),
            config,
        };
        (shared, inboxes)
    }

    /// Hands work to other shards' inboxes; those it cannot reach are counted.
    pub fn forward(&self, shards: &[usize], delivery: Delivery) {
        let dropped = self.bus.send(shards, delivery);
        if dropped > 0 {
            self.counters
                .inbox_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    /// Hands work to every shard of this node whatever their inboxes hold (see
    /// [`Bus::send_always`]).
    pub fn to_every_shard(&self, delivery: Delivery) {
        let all: Vec<usize> = (0..self.shards()).collect();
        self.bus.send_always(&all, delivery);
    }

    pub fn shards(&self) -> usize {
        self.connections.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Bytes queued for writing across all shards (as of each shard's last heartbeat tick).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
            .iter()
            .map(|q| q.load(Ordering::Relaxed))
            .sum()
    }

    pub fn connection_count(&self) -> usize {
        self.connections
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether `identity` is the shared identity of token-less connections.
    pub fn is_anonymous(&self, identity: &Arc<Identity>) -> bool {
        Arc::ptr_eq(identity, &self.anonymous)
    }
}

/// A connection as its upgrade admitted it: the app it speaks, who it is, the address it was
/// admitted for (per-address limits), and what the backend attached to it (JSON for its app's
/// greeting), if anything.
pub struct Newcomer<'a> {
    pub app: AppId,
    pub identity: Arc<Identity>,
    pub peer: IpAddr,
    pub data: Option<&'a RawValue>,
    /// Whether it agreed to permessage-deflate at its upgrade.
    pub deflate: Deflate,
}

impl Newcomer<'_> {
    /// A newcomer with nothing attached.
    pub fn plain(app: AppId, identity: Arc<Identity>, peer: IpAddr) -> Self {
        Newcomer {
            app,
            identity,
            peer,
            data: None,
            deflate: Deflate::OFF,
        }
    }
}

/// Which of a shard's apps a connection speaks: an index into the apps each shard was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppId(pub u8);

/// An application: what a connection's messages mean. The runtime calls it on the connection's
/// shard; a handler never awaits, holds a waker or spawns — it queues frames (through the
/// [`Shard`]), publishes, or closes, and returns.
///
/// `opened`, `message`, `refused`, `closing` and `closed` may use the shard freely (its state is
/// not borrowed then). `addressable`, `ping` and `dropped` are asked while the shard's state is
/// borrowed: they answer from the app's own state and must not touch the shard.
pub trait App {
    /// Whether this app's connections are addressable: reached by a publication to every
    /// connection ([`crate::rooms::Target::All`]), found by user (a user's disconnect), and
    /// recorded again with the broker after it lost its session records (the app records them
    /// when they open and close).
    fn addressable(&self) -> bool;

    /// A connection of this app joined the shard's slab (greet it, record it); `data` is what
    /// the backend attached to it when it connected (JSON), if anything.
    fn opened(&self, shard: &Shard, key: usize, data: Option<&RawValue>);

    /// A complete data message, within the connection's byte rate.
    fn message(&self, shard: &Shard, key: usize, text: bool, payload: &mut [u8]);

    /// A data message the connection's frame or byte rate refused (answer it, or not).
    fn refused(&self, shard: &Shard, key: usize);

    /// The connection is no longer read (it closes or vanished): what it takes part in ends.
    /// May come twice (when its close handshake begins, and when its driver lets it go).
    fn closing(&self, shard: &Shard, key: usize);

    /// The connection left the slab.
    fn closed(&self, shard: &Shard, conn: &ConnEntry);

    /// The heartbeat's ping for this app's connections, when not an RFC 6455 ping frame; asked
    /// at most once per heartbeat tick.
    fn ping(&self) -> Option<Bytes> {
        None
    }

    /// The notice that `count` broadcasts were dropped for a slow reader, once it caught up.
    fn dropped(&self, _count: u64) -> Option<Bytes> {
        None
    }
}
