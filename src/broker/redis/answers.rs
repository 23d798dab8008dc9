//! The other nodes' answers to this node's disconnects: each node told to close a user's
//! connections publishes how many it closed on the asking node's channel
//! (`wsgate:answers:<node>`, `<id> <connections> <node>`), and the asker adds them up.
//!
//! Answers are expected from every node alive at the last beat, and from as many nodes as the
//! order reached (PUBLISH's count of the control channel's subscribers, the asker among them),
//! whichever says more: a node reconnecting to Redis when the order went out is alive but never
//! gets it, and a node started since the last beat is not known alive yet but gets it. A program
//! subscribed to the control channel counts as a node that does not answer. Answers that have not
//! come within [`CONTROL_ANSWER_WAIT`] (a node stopping, stalled, reconnecting, or of a version
//! that does not answer) are reported as unanswered, not waited for.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use super::envelope::parse_u64;
use crate::broker::{CONTROL_ANSWER_WAIT, Disconnected};

/// One node's answer: its name and the connections it closed.
type Answer = (Arc<str>, u64);

/// The disconnects of this node waiting for answers, by id, and whom they expect them from.
#[derive(Default)]
pub struct Answers {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, UnboundedSender<Answer>>>,
    /// The other nodes alive at the last beat.
    alive: Mutex<HashSet<Arc<str>>>,
}

impl Answers {
    /// The other nodes are now `alive` (as the last beat read them).
    pub fn alive(&self, alive: &HashSet<Arc<str>>) {
        alive.clone_into(&mut lock(&self.alive));
    }

    /// Starts waiting for the answers to a new order (its id: [`Waiter::id`]) from the nodes
    /// alive now.
    pub fn wait(self: &Arc<Self>) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answers, received) = mpsc::unbounded_channel();
        lock(&self.waiting).insert(id, answers);
        Waiter {
            id,
            expected: lock(&self.alive).clone(),
            received,
            answers: self.clone(),
        }
    }

    /// An answer came; one to an order no longer waited for is ignored. False when malformed.
    pub fn received(&self, payload: &[u8]) -> bool {
        let Some((id, answer)) = parse(payload) else {
            return false;
        };
        if let Some(answers) = lock(&self.waiting).get(&id) {
            let _ = answers.send(answer);
        }
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `node` answers to order `id`.
pub fn answer(id: u64, connections: u64, node: &str) -> String {
    format!("{id} {connections} {node}")
}

fn parse(payload: &[u8]) -> Option<(u64, Answer)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(3, ' ');
    let id = parse_u64(parts.next()?.as_bytes())?;
    let connections = parse_u64(parts.next()?.as_bytes())?;
    let node = parts.next().filter(|node| !node.is_empty())?;
    Some((id, (Arc::from(node), connections)))
}

/// One order's answers, as they come. Stops being waited for when dropped.
pub struct Waiter {
    id: u64,
    expected: HashSet<Arc<str>>,
    received: UnboundedReceiver<Answer>,
    answers: Arc<Answers>,
}

impl Waiter {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Adds up the answers that come within [`CONTROL_ANSWER_WAIT`], one per node, for an order
    /// that reached `subscribers` subscribers of the control channel (this node among them).
    pub async fn count(mut self, subscribers: u64) -> Disconnected {
        let reached = usize::try_from(subscribers.saturating_sub(1)).unwrap_or(usize::MAX);
        let mut closed = Disconnected::default();
        let mut answered = HashSet::new();
        let deadline = tokio::time::sleep(CONTROL_ANSWER_WAIT);
        tokio::pin!(deadline);
        while answered.len() < reached || !self.expected.iter().all(|n| answered.contains(n)) {
            tokio::select! {
                Some((node, connections)) = self.received.recv() => {
                    if answered.insert(node) {
                        closed.connections = closed.connections.saturating_add(connections);
                        closed.nodes += 1;
                    }
                }
                _ = &mut deadline => break,
            }
        }
        let silent_alive = self.expected.iter().filter(|n| !answered.contains(*n));
        let silent = silent_alive
            .count()
            .max(reached.saturating_sub(answered.len()));
        closed.unanswered = u32::try_from(silent).unwrap_or(u32::MAX);
        closed
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        lock(&self.answers.waiting).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> HashSet<Arc<str>> {
        names.iter().map(|&n| Arc::from(n)).collect()
    }

    #[tokio::test]
    async fn each_live_nodes_answer_is_added_up_once_and_the_silent_ones_reported() {
        let answers = Arc::new(Answers::default());
        answers.alive(&nodes(&["a", "b"]));
        let first = answers.wait();
        answers.alive(&nodes(&["a", "b", "c"]));
        let second = answers.wait();
        assert_ne!(first.id(), second.id());
        assert!(answers.received(answer(first.id(), 2, "a").as_bytes()));
        assert!(
            answers.received(answer(first.id(), 2, "a").as_bytes()),
            "a repeat"
        );
        assert!(answers.received(answer(first.id(), 3, "b").as_bytes()));
        assert!(answers.received(answer(second.id(), 7, "a").as_bytes()));
        assert!(
            answers.received(answer(999, 1, "a").as_bytes()),
            "not waited for"
        );
        for bad in [
            &b"1 2"[..],
            b"1 x a",
            b"-1 2 a",
            b" 1 2 a",
            b"1 2 ",
            b"\xff 1 a",
        ] {
            assert!(!answers.received(bad), "{}", String::from_utf8_lossy(bad));
        }
        let closed = first.count(3).await;
        assert_eq!(
            (closed.connections, closed.nodes, closed.unanswered),
            (5, 2, 0)
        );
        assert_eq!(lock(&answers.waiting).len(), 1, "the first stopped waiting");
        // b and c never answer: reported as such after the wait.
        let closed = second.count(4).await;
        assert_eq!(
            (closed.connections, closed.nodes, closed.unanswered),
            (7, 1, 2)
        );
        assert!(lock(&answers.waiting).is_empty());
        // Alone: nothing to wait for.
        answers.alive(&HashSet::new());
        assert_eq!(answers.wait().count(1).await, Disconnected::default());
        // A node not known alive yet that got the order is waited for, and counted; one more
        // subscriber than answers is one unanswered.
        let third = answers.wait();
        assert!(answers.received(answer(third.id(), 4, "new").as_bytes()));
        let closed = third.count(3).await;
        assert_eq!(
            (closed.connections, closed.nodes, closed.unanswered),
            (4, 1, 1)
        );
    }
}
