//! Who is in a room, across every node: per node, per user, the user's connections there.
//!
//! Each node owns its own entries and is the only writer of them; with the Redis broker it
//! publishes each change as the user's new count on that node, numbered per node and room
//! (`seq`), and the other nodes following the room apply it to their copy. A change whose number
//! is not the next one means the copy missed something: the room is synced again from Redis.
//! Counts are kept as they change, so the room's total and a user's connections are O(1) and
//! O(nodes) to read.
//!
//! A user with several connections (tabs, devices, nodes) is one presence: joined when the first
//! of them joins, left when the last leaves. Anonymous connections share one identity, so each of
//! them is its own presence (keyed by its client id).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A room's presence as the broker holds it: per live node, its last change number and its
/// entries.
pub type NodesPresence = Vec<(Arc<str>, u64, Vec<Entry>)>;

/// The most connections one node may report for one user in one room: more is not a real count
/// (a malformed record from Redis), and is refused.
pub const MAX_CONNS: u32 = 1 << 24;

/// A user's presence on one node: its connections there and its display name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The user's id; for an anonymous connection, its own (`node.client`), as anonymous
    /// connections are not one user.
    #[serde(rename = "user")]
    pub user_id: Arc<str>,
    #[serde(rename = "name")]
    pub username: Arc<str>,
    pub conns: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub anonymous: bool,
}

impl Entry {
    /// The user id clients are shown: as in its messages (`anonymous` for all anonymous
    /// connections).
    pub fn shown_id(&self) -> &str {
        if self.anonymous {
            crate::base::identity::ANONYMOUS_USER_ID
        } else {
            &self.user_id
        }
    }
}

#[derive(Default)]
struct NodeEntries {
    /// Number of the node's last change applied.
    seq: u64,
    users: HashMap<Arc<str>, Entry>,
}

impl NodeEntries {
    fn conns(&self) -> u32 {
        self.users
            .values()
            .fold(0u32, |sum, e| sum.saturating_add(e.conns))
    }
}

/// How a change from another node fits the copy.
#[derive(Debug, PartialEq, Eq)]
pub enum Fit {
    /// Applied: the user's connections across all nodes before and after.
    Applied { before: u32, after: u32 },
    /// Already applied (or older than the copy).
    Seen,
    /// A change of that node is missing: sync the room again.
    Missed,
}

/// Where a node's change numbers start in a room it (again) has presence in: above any it used
/// before, in any room, so the other nodes never take a new change for an old one (they see a
/// jump, and read the room again). One counter for the process, stepping far past what a room
/// can use before it is forgotten: never the wall clock, which can go back.
fn fresh_seq() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1 << 32);
    NEXT.fetch_add(1 << 32, Ordering::Relaxed)
}

#[derive(Default)]
pub struct Presence {
    nodes: HashMap<Arc<str>, NodeEntries>,
    /// Connections in the room across all nodes.
    total: u32,
    /// Every user, sorted by id, for `presence` pages; dropped at each change.
    sorted: Option<Vec<Entry>>,
}

impl Presence {
    /// Connections in the room across all nodes.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// The user's connections in the room across all nodes.
    pub fn user_conns(&self, user: &str) -> u32 {
        self.nodes
            .values()
            .filter_map(|n| n.users.get(user))
            .fold(0u32, |sum, e| sum.saturating_add(e.conns))
    }

    /// Changes the user's connections on `node` by `delta` (this node's own changes); returns
    /// the user's connections across all nodes before and after, and the change's number.
    pub fn change(
        &mut self,
        node: &Arc<str>,
        user_id: &Arc<str>,
        username: &Arc<str>,
        anonymous: bool,
        delta: i32,
    ) -> (u32, u32, Entry, u64) {
        let before = self.user_conns(user_id);
        self.sorted = None;
        let entries = self.nodes.entry(node.clone()).or_default();
        if entries.seq == 0 {
            entries.seq = fresh_seq();
        }
        entries.seq += 1;
        let entry = entries
            .users
            .entry(user_id.clone())
            .or_insert_with(|| Entry {
                user_id: user_id.clone(),
                username: username.clone(),
                conns: 0,
                anonymous,
            });
        entry.conns = entry.conns.saturating_add_signed(delta).min(MAX_CONNS);
        entry.username = username.clone();
        let entry = entry.clone();
        if entry.conns == 0 {
            entries.users.remove(user_id);
        }
        self.total = self.total.saturating_add_signed(delta);
        let seq = entries.seq;
        (before, self.user_conns(user_id), entry, seq)
    }

    /// Applies another node's change number `seq`: the user's connections there are now
    /// `entry.conns`.
    pub fn apply(&mut self, node: &Arc<str>, seq: u64, entry: Entry) -> Fit {
        let known = self.nodes.get(node).map_or(0, |n| n.seq);
        if seq <= known {
            return Fit::Seen;
        }
        if seq != known + 1 {
            return Fit::Missed;
        }
        let before = self.user_conns(&entry.user_id);
        self.sorted = None;
        let entries = self.nodes.entry(node.clone()).or_default();
        entries.seq = seq;
        let had = entries.users.get(&entry.user_id).map_or(0, |e| e.conns);
        self.total = self.total.saturating_sub(had).saturating_add(entry.conns);
        if entry.conns == 0 {
            entries.users.remove(&entry.user_id);
        } else {
            entries.users.insert(entry.user_id.clone(), entry.clone());
        }
        Fit::Applied {
            before,
            after: self.user_conns(&entry.user_id),
        }
    }

    /// Takes what Redis holds of the other nodes than `own` (`nodes`: each node's last change
    /// number and entries), where it is newer than the copy. Nodes Redis does not list are left
    /// as they are: a node's death is the beats' to tell. Returns the users who were in the room
    /// and no longer are, and those who were not and now are.
    pub fn replace_others(
        &mut self,
        own: &str,
        nodes: Vec<(Arc<str>, u64, Vec<Entry>)>,
    ) -> (Vec<Entry>, Vec<Entry>) {
        let before = self.users_now();
        for (node, seq, entries) in nodes {
            if &*node == own || self.nodes.get(&node).is_some_and(|n| n.seq >= seq) {
                continue;
            }
            self.set_node(node, seq, entries);
        }
        self.changes_since(&before)
    }

    /// Replaces the copy's entries of `node`.
    fn set_node(&mut self, node: Arc<str>, seq: u64, entries: Vec<Entry>) {
        self.sorted = None;
        if let Some(old) = self.nodes.remove(&node) {
            self.total = self.total.saturating_sub(old.conns());
        }
        let users: HashMap<Arc<str>, Entry> = entries
            .into_iter()
            .filter(|e| e.conns > 0)
            .map(|e| (e.user_id.clone(), e))
            .collect();
        let entries = NodeEntries { seq, users };
        self.total = self.total.saturating_add(entries.conns());
        self.nodes.insert(node, entries);
    }

    /// Every user in the room now, once, owned (to compare with after a change).
    fn users_now(&self) -> HashMap<Arc<str>, Entry> {
        self.everyone()
            .into_iter()
            .map(|(user, e)| (user.clone(), e.clone()))
            .collect()
    }

    /// The users gone since `before`, and those new.
    fn changes_since(&self, before: &HashMap<Arc<str>, Entry>) -> (Vec<Entry>, Vec<Entry>) {
        let after = self.everyone();
        let gone = before
            .iter()
            .filter(|(user, _)| !after.contains_key(*user))
            .map(|(_, e)| e.clone())
            .collect();
        let came = after
            .iter()
            .filter(|(user, _)| !before.contains_key(**user))
            .map(|(_, e)| (*e).clone())
            .collect();
        (gone, came)
    }

    /// Replaces everything the copy holds of `node` with `entries` (its whole presence, change
    /// number `seq`), unless the copy is newer. Returns the users no longer in the room, and
    /// those new in it.
    pub fn replace_node(
        &mut self,
        node: &Arc<str>,
        seq: u64,
        entries: Vec<Entry>,
    ) -> (Vec<Entry>, Vec<Entry>) {
        if self.nodes.get(node).is_some_and(|n| n.seq >= seq) {
            return (Vec::new(), Vec::new());
        }
        let before = self.users_now();
        self.set_node(node.clone(), seq, entries);
        self.changes_since(&before)
    }

    /// Forgets a node that died; returns the users no longer in the room.
    pub fn remove_node(&mut self, node: &str) -> Vec<Entry> {
        let Some(entries) = self.nodes.remove(node) else {
            return Vec::new();
        };
        self.sorted = None;
        let mut gone = Vec::new();
        for entry in entries.users.into_values() {
            self.total = self.total.saturating_sub(entry.conns);
            if self.user_conns(&entry.user_id) == 0 {
                gone.push(entry);
            }
        }
        gone
    }

    /// The node's own entries, for publishing them whole (after a reconnect).
    pub fn own(&self, node: &str) -> (u64, Vec<Entry>) {
        self.nodes.get(node).map_or((0, Vec::new()), |n| {
            (n.seq, n.users.values().cloned().collect())
        })
    }

    /// A change number for a room this node has no copy of (above all it used before).
    pub fn fresh_seq() -> u64 {
        fresh_seq()
    }

    /// Bumps the node's own change number (for a whole re-publication) and returns it.
    pub fn next_seq(&mut self, node: &Arc<str>) -> u64 {
        let entries = self.nodes.entry(node.clone()).or_default();
        if entries.seq == 0 {
            entries.seq = fresh_seq();
        }
        entries.seq += 1;
        entries.seq
    }

    /// Nodes with entries in the room.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<str>> {
        self.nodes.keys()
    }

    /// One page of the room's users (one entry per user, whatever their connections and nodes),
    /// sorted by user id, after the user id `after`: at most `limit`, and whether more follow.
    /// The sorted list is kept until the next change, so pages cost a binary search, not a sort.
    pub fn page(&mut self, after: Option<&str>, limit: usize) -> (Vec<Entry>, bool) {
        if self.sorted.is_none() {
            let mut users: Vec<Entry> = self.everyone().into_values().cloned().collect();
            users.sort_unstable_by(|a, b| a.user_id.cmp(&b.user_id));
            self.sorted = Some(users);
        }
        let sorted = self.sorted.as_deref().unwrap_or_default();
        let start = after.map_or(0, |after| sorted.partition_point(|e| &*e.user_id <= after));
        let end = start.saturating_add(limit).min(sorted.len());
        (sorted[start..end].to_vec(), end < sorted.len())
    }

    /// Every user in the room, once.
    fn everyone(&self) -> HashMap<&Arc<str>, &Entry> {
        self.nodes.values().flat_map(|n| n.users.iter()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str, conns: u32) -> Entry {
        Entry {
            user_id: user.into(),
            username: format!("{user}!").into(),
            conns,
            anonymous: false,
        }
    }

    #[test]
    fn a_user_is_present_once_whatever_its_connections_and_nodes() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut p = Presence::default();
        let (alice, name): (Arc<str>, Arc<str>) = ("alice".into(), "Alice".into());
        assert_eq!(p.change(&a, &alice, &name, false, 1).0, 0, "first: joined");
        assert_eq!(
            p.change(&a, &alice, &name, false, 1).0,
            1,
            "second tab: not again"
        );
        assert_eq!(
            p.apply(&b, 1, entry("alice", 1)),
            Fit::Applied {
                before: 2,
                after: 3
            }
        );
        assert_eq!(p.total(), 3);
        assert_eq!(p.apply(&b, 1, entry("alice", 1)), Fit::Seen);
        assert_eq!(p.apply(&b, 3, entry("alice", 0)), Fit::Missed);
        let (_, after, _, _) = p.change(&a, &alice, &name, false, -1);
        assert_eq!(after, 2);
        p.change(&a, &alice, &name, false, -1);
        assert_eq!(
            p.apply(&b, 2, entry("alice", 0)),
            Fit::Applied {
                before: 1,
                after: 0
            }
        );
        assert_eq!(p.total(), 0);
        assert_eq!(p.page(None, 10).0.len(), 0);
    }

    #[test]
    fn a_snapshot_older_than_the_copy_does_not_undo_what_the_copy_applied() {
        let b: Arc<str> = "b".into();
        let mut p = Presence::default();
        p.apply(&b, 1, entry("x", 1));
        p.apply(&b, 2, entry("y", 1));
        // Read from Redis before change 2 arrived: y is not in it.
        let (gone, came) = p.replace_others("a", vec![(b.clone(), 1, vec![entry("x", 1)])]);
        assert!(gone.is_empty() && came.is_empty());
        assert_eq!(p.user_conns("y"), 1);
        // A newer one wins, and says who changed.
        let (gone, came) = p.replace_others("a", vec![(b.clone(), 3, vec![entry("z", 2)])]);
        let ids = |v: &[Entry]| v.iter().map(|e| e.user_id.to_string()).collect::<Vec<_>>();
        let mut gone = ids(&gone);
        gone.sort();
        assert_eq!(
            (gone, ids(&came)),
            (vec!["x".into(), "y".into()], vec!["z".into()])
        );
        assert_eq!(p.total(), 2);
        // Counts that cannot be real never overflow.
        p.apply(&b, 4, entry("huge", u32::MAX));
        p.apply(&"c".into(), 1, entry("huge", u32::MAX));
        assert_eq!(p.user_conns("huge"), u32::MAX);
    }

    #[test]
    fn a_dead_node_takes_its_users_with_it_and_pages_are_sorted() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut p = Presence::default();
        p.apply(&b, 1, entry("zed", 2));
        p.apply(&b, 2, entry("amy", 1));
        p.change(&a, &"amy".into(), &"Amy".into(), false, 1);
        assert_eq!(p.total(), 4);
        let gone = p.remove_node("b");
        assert_eq!(gone, vec![entry("zed", 2)], "amy is still on node a");
        assert_eq!(p.total(), 1);
        let (gone, came) = p.replace_others(
            "a",
            vec![("b".into(), 7, vec![entry("bob", 1), entry("cat", 1)])],
        );
        assert!(gone.is_empty());
        assert_eq!(came.len(), 2);
        let (page, more) = p.page(None, 2);
        let ids: Vec<&str> = page.iter().map(|e| &*e.user_id).collect();
        assert_eq!((ids, more), (vec!["amy", "bob"], true));
        let (page, more) = p.page(Some("bob"), 2);
        assert_eq!((page.len(), more), (1, false));
        assert_eq!(
            p.apply(&b, 8, entry("bob", 0)),
            Fit::Applied {
                before: 1,
                after: 0
            }
        );
    }
}
