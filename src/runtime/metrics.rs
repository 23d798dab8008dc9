//! What each shard counts per message, connection and delivery, with no lock and no shared
//! atomic: each shard owns its [`ShardMetrics`] (one cache-line-aligned block per shard, written
//! by that shard's thread only, so an increment is a plain load and store); a scrape reads and
//! sums them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A counter written by one thread only (its shard's): adding is a load and a store, with no
/// locked instruction; a scrape from another thread reads a recent value.
#[derive(Default)]
pub struct LocalCounter(AtomicU64);

impl LocalCounter {
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets; a last one takes the rest.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram written by one thread only (see [`LocalCounter`]).
#[derive(Default)]
pub struct LocalHistogram {
    /// Per bucket (not cumulative), the last one past every bound.
    pub buckets: [LocalCounter; LATENCY_BUCKETS.len() + 1],
    pub sum_nanos: LocalCounter,
}

impl LocalHistogram {
    pub fn observe(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].add(1);
        self.sum_nanos
            .add(latency.as_nanos().min(u128::from(u64::MAX)) as u64);
    }
}

/// Close codes counted by value; other application codes are counted as `4xxx`, anything else
/// as `other`, and a connection that ended without a close frame (the peer vanished) as `none`.
pub const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4001];
pub const CLOSE_LABELS: [&str; CLOSE_CODES.len() + 3] = [
    "1000", "1001", "1002", "1003", "1007", "1008", "1009", "1011", "4001", "4xxx", "other", "none",
];

/// What one shard counts per message, connection and delivery.
#[derive(Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// WebSocket connections opened.
    pub accepted: LocalCounter,
    /// Data messages received (after reassembly), and bytes read from sockets.
    pub messages_received: LocalCounter,
    pub bytes_received: LocalCounter,
    /// Frames written to sockets (every kind), and bytes written.
    pub frames_sent: LocalCounter,
    pub bytes_sent: LocalCounter,
    /// Publication frames queued to recipients (one per recipient).
    pub deliveries: LocalCounter,
    /// Connections opened that agreed to permessage-deflate.
    pub compressed_connections: LocalCounter,
    /// Publication frames compressed (once per publication; see `Prepared::for_connection`).
    pub compressions: LocalCounter,
    /// Data messages that arrived compressed (and were inflated).
    pub inflated: LocalCounter,
    /// io_uring receives that found the buffer ring empty (they wait for buffers; nothing is
    /// lost).
    pub buffer_waits: LocalCounter,
    /// From a publication entering the bus to its frame queued to this shard's recipients.
    pub delivery_latency: LocalHistogram,
    closed: [LocalCounter; CLOSE_LABELS.len()],
}

impl ShardMetrics {
    /// A connection ended; `code` is the close code of the close frame it was sent, if any.
    pub fn closed(&self, code: Option<u16>) {
        let at = match code {
            None => CLOSE_LABELS.len() - 1,
            Some(code) => CLOSE_CODES.iter().position(|&c| c == code).unwrap_or(
                if (4000..=4999).contains(&code) {
                    CLOSE_CODES.len()
                } else {
                    CLOSE_CODES.len() + 1
                },
            ),
        };
        self.closed[at].add(1);
    }

    /// Connections ended with the close code of `CLOSE_LABELS[at]`.
    pub fn closed_with(&self, at: usize) -> u64 {
        self.closed[at].get()
    }
}
