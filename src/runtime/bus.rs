//! The bus between the shards of one process: one inbox per shard, bounded in bytes.
//!
//! A shard stalled for a while (by a burst of work, or an attack) must not make the others
//! buffer for it without bound: past `max_shard_inbox_bytes` a publication is dropped for that
//! shard, and the caller counts it. A shard takes its inbox in batches (bounded in count and
//! bytes), so a burst costs one wake-up and one write per recipient, not one per publication.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use bytes::Bytes;

use crate::conn::outbound;

use super::shard::Shard;

/// Publications taken from an inbox in one go, at most.
const BATCH_PUBLICATIONS: usize = 64;
/// Frame bytes taken from an inbox in one go, at most (one publication may exceed it alone).
pub const BATCH_BYTES: usize = 256 * 1024;

/// Work for a shard, handed over the bus: a publication to deliver to its recipients there, a
/// reply for one of its connections, an order to close a user's connections, …
pub trait Work: Send + Sync {
    /// The frame it queues (the same `Bytes` for every recipient), if any.
    fn frame(&self) -> &Bytes {
        &NO_FRAME
    }

    /// Whether it is a publication, timed in the delivery latency metric.
    fn is_publication(&self) -> bool {
        false
    }

    /// Carries it out on `shard`.
    fn run(&self, shard: &Shard);
}

/// The frame of work that queues none.
pub static NO_FRAME: Bytes = Bytes::new();

/// What travels to a shard over the bus: one allocation, shared by every shard it goes to.
pub type Delivery = Arc<dyn Work>;

/// What a waiting delivery is charged against its inbox: its frame as queued, plus the
/// publication or stream message around it.
fn cost(delivery: &Delivery) -> usize {
    outbound::cost(delivery.frame()) + 64
}

/// A delivery, with when it was handed to the bus (for the delivery latency metric).
pub type Sent = (Delivery, Instant);

/// One shard's side of the bus.
pub struct Inbox {
    receiver: UnboundedReceiver<Sent>,
    /// Bytes waiting, shared with the senders.
    pending: Arc<AtomicUsize>,
}

impl Inbox {
    /// Waits for publications and moves the next batch of them into `batch`. Returns false once
    /// every sender is gone and the inbox is empty.
    pub async fn recv_batch(&mut self, batch: &mut Vec<Sent>) -> bool {
        let Some(first) = self.receiver.recv().await else {
            return false;
        };
        self.take(first, batch);
        self.try_recv_batch(batch);
        true
    }

    /// Moves what is waiting (up to a batch) into `batch` without waiting.
    pub fn try_recv_batch(&mut self, batch: &mut Vec<Sent>) {
        let mut bytes: usize = batch.iter().map(|(d, _)| d.frame().len()).sum();
        while batch.len() < BATCH_PUBLICATIONS && bytes < BATCH_BYTES {
            let Ok(next) = self.receiver.try_recv() else {
                return;
            };
            bytes += next.0.frame().len();
            self.take(next, batch);
        }
    }

    fn take(&self, sent: Sent, batch: &mut Vec<Sent>) {
        // From here the publication is the shard's to deliver: its space is given back.
        self.pending.fetch_sub(cost(&sent.0), Ordering::AcqRel);
        batch.push(sent);
    }
}

pub struct Bus {
    inboxes: Vec<(UnboundedSender<Sent>, Arc<AtomicUsize>)>,
    /// Deliveries dropped for each shard (its inbox was full).
    dropped: Box<[AtomicU64]>,
    max_pending: usize,
}

impl Bus {
    /// A bus for `shards` shards, each inbox holding at most `max_pending` bytes, and the inbox
    /// each shard drains.
    pub fn new(shards: usize, max_pending: usize) -> (Self, Vec<Inbox>) {
        let (inboxes, receivers) = (0..shards)
            .map(|_| {
                let (sender, receiver) = unbounded_channel();
                let pending = Arc::new(AtomicUsize::new(0));
                ((sender, pending.clone()), Inbox { receiver, pending })
            })
            .unzip();
        (
            Bus {
                inboxes,
                dropped: (0..shards).map(|_| AtomicU64::new(0)).collect(),
                max_pending,
            },
            receivers,
        )
    }
}

impl Bus {
    /// Hands `delivery` to each shard in `shards` to run there. Returns how many of them
    /// it could not be handed to (their inboxes were full), for the caller to count.
    pub fn send(&self, shards: &[usize], delivery: Delivery) -> usize {
        let cost = cost(&delivery);
        let now = Instant::now();
        let mut dropped = 0;
        for &shard in shards {
            let (sender, pending) = &self.inboxes[shard];
            if pending.fetch_add(cost, Ordering::AcqRel) + cost > self.max_pending {
                pending.fetch_sub(cost, Ordering::AcqRel);
                self.dropped[shard].fetch_add(1, Ordering::Relaxed);
                dropped += 1;
                continue;
            }
            // A send fails only once that shard has stopped, when nobody is left to deliver to.
            if sender.send((delivery.clone(), now)).is_err() {
                pending.fetch_sub(cost, Ordering::AcqRel);
            }
        }
        dropped
    }

    /// Hands `delivery` to each shard in `shards` whatever their inboxes hold: for the few small
    /// deliveries that must not be lost (a room's sync, a resync, a reply), bounded by the
    /// number of rooms and clients rather than by traffic.
    pub fn send_always(&self, shards: &[usize], delivery: Delivery) {
        let cost = cost(&delivery);
        let now = Instant::now();
        for &shard in shards {
            let (sender, pending) = &self.inboxes[shard];
            pending.fetch_add(cost, Ordering::AcqRel);
            if sender.send((delivery.clone(), now)).is_err() {
                pending.fetch_sub(cost, Ordering::AcqRel);
            }
        }
    }

    /// Deliveries dropped for each shard so far.
    pub fn dropped_by_shard(&self) -> Vec<u64> {
        self.dropped
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Frame(Bytes);

    impl Work for Frame {
        fn frame(&self) -> &Bytes {
            &self.0
        }

        fn run(&self, _: &Shard) {}
    }

    fn publication(len: usize) -> Delivery {
        Arc::new(Frame(Bytes::from(vec![0; len])))
    }
    #[tokio::test]
    async fn a_full_inbox_refuses_and_batches_are_bounded() {
        let one = cost(&publication(1000));
        let (bus, mut inboxes) = Bus::new(2, 100 * one);
        for _ in 0..150 {
            bus.send(&[1], publication(1000));
        }
        // Shard 1's inbox took 100; shard 0's is untouched.
        assert_eq!(bus.send(&[0, 1], publication(1000)), 1);
        let mut batch = Vec::new();
        assert!(inboxes[1].recv_batch(&mut batch).await);
        assert_eq!(batch.len(), BATCH_PUBLICATIONS);
        // Taking a batch makes room again.
        assert_eq!(bus.send(&[1], publication(1000)), 0);
        batch.clear();
        inboxes[1].try_recv_batch(&mut batch);
        assert_eq!(batch.len(), 37);
        // A batch stops once it holds its bound in bytes.
        let (bus, mut inboxes) = Bus::new(1, usize::MAX / 2);
        for _ in 0..10 {
            bus.send(&[0], publication(100_000));
        }
        batch.clear();
        inboxes[0].try_recv_batch(&mut batch);
        assert_eq!(batch.len(), BATCH_BYTES.div_ceil(100_000));
    }
}
