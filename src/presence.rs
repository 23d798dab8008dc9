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

use serde::{Deserialize, Serialize};

/// A user's presence on one node: its connections there and its display name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(rename = "user")]
    pub user_id: Arc<str>,
    #[serde(rename = "name")]
    pub username: Arc<str>,
    pub conns: u32,
}

#[derive(Default)]
struct NodeEntries {
    /// Number of the node's last change applied.
    seq: u64,
    users: HashMap<Arc<str>, Entry>,
}

/// A user id and its display name.
pub type UserAndName = (Arc<str>, Arc<str>);

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
/// before in that room (a millisecond clock, scaled), so the other nodes never take a new change
/// for an old one. They see a jump, and read the room again.
fn fresh_seq() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms << 10
}

#[derive(Default)]
pub struct Presence {
    nodes: HashMap<Arc<str>, NodeEntries>,
    /// Connections in the room across all nodes.
    total: u32,
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
            .map(|e| e.conns)
            .sum()
    }

    /// Changes the user's connections on `node` by `delta` (this node's own changes); returns
    /// the user's connections across all nodes before and after, and the change's number.
    pub fn change(
        &mut self,
        node: &Arc<str>,
        user_id: &Arc<str>,
        username: &Arc<str>,
        delta: i32,
    ) -> (u32, u32, Entry, u64) {
        let before = self.user_conns(user_id);
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
            });
        entry.conns = entry.conns.saturating_add_signed(delta);
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
        let entries = self.nodes.entry(node.clone()).or_default();
        entries.seq = seq;
        let had = entries.users.get(&entry.user_id).map_or(0, |e| e.conns);
        self.total = self.total - had + entry.conns;
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

    /// Replaces what the copy holds of other nodes than `own` with `nodes` (as read from Redis:
    /// each node's last change number and entries). Returns the users who were in the room and
    /// no longer are, and those who were not and now are.
    pub fn replace_others(
        &mut self,
        own: &str,
        nodes: Vec<(Arc<str>, u64, Vec<Entry>)>,
    ) -> (Vec<Entry>, Vec<Entry>) {
        let before = self.users_now();
        self.nodes.retain(|node, _| &**node == own);
        for (node, seq, entries) in nodes {
            if &*node == own {
                continue;
            }
            let users = entries
                .into_iter()
                .filter(|e| e.conns > 0)
                .map(|e| (e.user_id.clone(), e))
                .collect();
            self.nodes.insert(node, NodeEntries { seq, users });
        }
        self.total = self
            .nodes
            .values()
            .flat_map(|n| n.users.values())
            .map(|e| e.conns)
            .sum();
        self.changes_since(&before)
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
        if let Some(old) = self.nodes.remove(node) {
            self.total -= old.users.values().map(|e| e.conns).sum::<u32>();
        }
        let users: HashMap<Arc<str>, Entry> = entries
            .into_iter()
            .filter(|e| e.conns > 0)
            .map(|e| (e.user_id.clone(), e))
            .collect();
        self.total += users.values().map(|e| e.conns).sum::<u32>();
        self.nodes.insert(node.clone(), NodeEntries { seq, users });
        self.changes_since(&before)
    }

    /// Forgets a node that died; returns the users no longer in the room.
    pub fn remove_node(&mut self, node: &str) -> Vec<Entry> {
        let Some(entries) = self.nodes.remove(node) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for entry in entries.users.into_values() {
            self.total -= entry.conns;
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

    /// One page of the room's users (one line per user, whatever their connections), sorted by
    /// user id, after `after`: at most `limit`, and whether more follow.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<UserAndName>, bool) {
        let everyone = self.everyone();
        let mut users: Vec<UserAndName> = everyone
            .into_iter()
            .filter(|(user, _)| after.is_none_or(|after| &***user > after))
            .map(|(user, e)| (user.clone(), e.username.clone()))
            .collect();
        users.sort_unstable();
        let more = users.len() > limit;
        users.truncate(limit);
        (users, more)
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
        }
    }

    #[test]
    fn a_user_is_present_once_whatever_its_connections_and_nodes() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut p = Presence::default();
        let (alice, name): (Arc<str>, Arc<str>) = ("alice".into(), "Alice".into());
        assert_eq!(p.change(&a, &alice, &name, 1).0, 0, "first: joined");
        assert_eq!(p.change(&a, &alice, &name, 1).0, 1, "second tab: not again");
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
        let (_, after, _, _) = p.change(&a, &alice, &name, -1);
        assert_eq!(after, 2);
        p.change(&a, &alice, &name, -1);
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
    fn a_dead_node_takes_its_users_with_it_and_pages_are_sorted() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut p = Presence::default();
        p.apply(&b, 1, entry("zed", 2));
        p.apply(&b, 2, entry("amy", 1));
        p.change(&a, &"amy".into(), &"Amy".into(), 1);
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
        let ids: Vec<&str> = page.iter().map(|(u, _)| &**u).collect();
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
