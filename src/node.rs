//! What the shards of one gateway process share: configuration, the room directory, the
//! backplane and a few gauges. Nothing here is touched per message except through atomics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::backplane::Backplane;
use crate::config::Config;
use crate::rooms::RoomDirectory;

pub struct Node {
    pub config: Arc<Config>,
    pub rooms: RoomDirectory,
    pub backplane: Arc<dyn Backplane>,
    /// Open WebSocket connections, one gauge per shard (each written by its shard only).
    pub connections: Box<[AtomicUsize]>,
    /// Connections closed with 1008 because their outbound queue passed `max_queued_bytes`.
    pub slow_consumers: AtomicU64,
    /// Connections closed because they did not answer a ping within `heartbeat_timeout`.
    pub heartbeat_timeouts: AtomicU64,
    /// Set when shutdown begins: upgrades are refused, `/readyz` fails, connections get 1001.
    pub draining: AtomicBool,
}

impl Node {
    pub fn new(config: Arc<Config>, backplane: Arc<dyn Backplane>) -> Self {
        Node {
            rooms: RoomDirectory::new(config.shards),
            connections: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
            slow_consumers: AtomicU64::new(0),
            heartbeat_timeouts: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            config,
            backplane,
        }
    }

    pub fn shards(&self) -> usize {
        self.connections.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn connection_count(&self) -> usize {
        self.connections
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}
