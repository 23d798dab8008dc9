//! The in-process backplane: one unbounded inbox per shard.
//!
//! Unbounded because a publication is already bounded where it lands (each connection's
//! outbound queue); the inbox only holds what a shard has not yet looked at.

use std::sync::Arc;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::{Backplane, Publication};

pub type Inbox = UnboundedReceiver<Arc<Publication>>;

pub struct MemoryBackplane {
    inboxes: Vec<UnboundedSender<Arc<Publication>>>,
}

impl MemoryBackplane {
    /// A backplane for `shards` shards and the inbox each of them drains.
    pub fn new(shards: usize) -> (Self, Vec<Inbox>) {
        let (senders, receivers) = (0..shards).map(|_| unbounded_channel()).unzip();
        (MemoryBackplane { inboxes: senders }, receivers)
    }
}

impl Backplane for MemoryBackplane {
    fn publish(&self, shards: &[usize], publication: Arc<Publication>) {
        for &shard in shards {
            // A send fails only once that shard has stopped, when nobody is left to deliver to.
            let _ = self.inboxes[shard].send(publication.clone());
        }
    }
}
