//! The other nodes' answers to this node's disconnects: each node told to close a user's
//! connections publishes how many it closed on the asking node's channel
//! (`wsgate:answers:<node>`, `<id> <connections>`), and the asker adds them up.
//!
//! How many answers to expect is what PUBLISH of the order answered: the number of subscribers
//! of the control channel, the asker among them. A node that does not answer within
//! [`CONTROL_ANSWER_WAIT`] (stopping, stalled, or of a version that does not answer) is reported
//! as unanswered, not waited for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use super::envelope::parse_u64;
use crate::broker::{CONTROL_ANSWER_WAIT, OthersClosed};

/// The disconnects of this node waiting for answers, by id.
#[derive(Default)]
pub struct Answers {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, UnboundedSender<u64>>>,
}

impl Answers {
    /// Starts waiting for answers to a new order (its id: [`Waiter::id`]).
    pub fn wait(self: &Arc<Self>) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (counts, received) = mpsc::unbounded_channel();
        self.waiting().insert(id, counts);
        Waiter {
            id,
            received,
            answers: self.clone(),
        }
    }

    /// An answer came (`<id> <connections>`); one for an order no longer waited for is
    /// ignored. False when malformed.
    pub fn received(&self, payload: &[u8]) -> bool {
        let Some((id, connections)) = parse(payload) else {
            return false;
        };
        if let Some(counts) = self.waiting().get(&id) {
            let _ = counts.send(connections);
        }
        true
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UnboundedSender<u64>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a node answers to order `id`.
pub fn answer(id: u64, connections: u64) -> String {
    format!("{id} {connections}")
}

fn parse(payload: &[u8]) -> Option<(u64, u64)> {
    let at = payload.iter().position(|&b| b == b' ')?;
    Some((parse_u64(&payload[..at])?, parse_u64(&payload[at + 1..])?))
}

/// One order's answers, as they come. Stops being waited for when dropped.
pub struct Waiter {
    id: u64,
    received: UnboundedReceiver<u64>,
    answers: Arc<Answers>,
}

impl Waiter {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Adds up the answers of `expected` nodes, those that come within [`CONTROL_ANSWER_WAIT`].
    pub async fn count(mut self, expected: u64) -> OthersClosed {
        let mut closed = OthersClosed::default();
        let deadline = tokio::time::sleep(CONTROL_ANSWER_WAIT);
        tokio::pin!(deadline);
        while u64::from(closed.answered) < expected {
            tokio::select! {
                Some(connections) = self.received.recv() => {
                    closed.connections += connections;
                    closed.answered += 1;
                }
                _ = &mut deadline => break,
            }
        }
        closed.unanswered = u32::try_from(expected).unwrap_or(u32::MAX) - closed.answered;
        closed
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.answers.waiting().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_are_added_up_and_late_or_foreign_ones_ignored() {
        let answers = Arc::new(Answers::default());
        let first = answers.wait();
        let second = answers.wait();
        assert_ne!(first.id(), second.id());
        assert!(answers.received(answer(first.id(), 2).as_bytes()));
        assert!(answers.received(answer(first.id(), 3).as_bytes()));
        assert!(answers.received(answer(second.id(), 7).as_bytes()));
        assert!(answers.received(b"999 1"), "no longer waited for");
        for bad in [&b"1"[..], b"1 x", b"-1 2", b" 1", b"1 2 3"] {
            assert!(!answers.received(bad), "{}", String::from_utf8_lossy(bad));
        }
        let closed = first.count(2).await;
        assert_eq!(
            (closed.connections, closed.answered, closed.unanswered),
            (5, 2, 0)
        );
        assert_eq!(answers.waiting().len(), 1, "the first stopped waiting");
        // One of three never answers: counted as such after the wait.
        let closed = second.count(3).await;
        assert_eq!(
            (closed.connections, closed.answered, closed.unanswered),
            (7, 1, 2)
        );
        assert!(answers.waiting().is_empty());
    }
}
