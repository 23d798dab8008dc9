//! Rooms: a shard-local two-way index (room → local members here, member → rooms in the
//! connection's entry) plus a process-wide directory that counts members per shard.
//!
//! The directory is only locked on join and leave. Publishing reads the per-shard counters of a
//! room the shard already holds an `Arc` to, so the per-message path takes no lock: it learns
//! which other shards have members and forwards the one encoded frame to those alone. (A shard
//! with no member of the room, e.g. sending a notice after its last member left, looks the room up
//! in the directory instead.)

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use indexmap::IndexSet;

pub const MAX_ROOM_NAME_LEN: usize = 64;

/// Room names are 1–64 characters of `A-Za-z0-9_.:-`.
pub fn is_valid_room_name(name: &str) -> bool {
    (1..=MAX_ROOM_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// A room's membership across the whole process, counted per shard.
pub struct RoomPresence {
    per_shard: Box<[AtomicU32]>,
    total: AtomicU32,
}

impl RoomPresence {
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// Shards other than `except` that have members now.
    pub fn other_shards(&self, except: usize) -> impl Iterator<Item = usize> + '_ {
        self.per_shard
            .iter()
            .enumerate()
            .filter(move |(i, n)| *i != except && n.load(Ordering::Acquire) > 0)
            .map(|(i, _)| i)
    }
}

const STRIPES: usize = 64;

type Stripe = Mutex<HashMap<Arc<str>, Arc<RoomPresence>>>;

/// Process-wide room membership, lock-striped by room name.
pub struct RoomDirectory {
    shards: usize,
    stripes: Box<[Stripe]>,
}

impl RoomDirectory {
    pub fn new(shards: usize) -> Self {
        RoomDirectory {
            shards,
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe(&self, room: &str) -> &Stripe {
        let mut h = DefaultHasher::new();
        room.hash(&mut h);
        &self.stripes[h.finish() as usize % STRIPES]
    }

    /// Counts one more member on `shard`; returns the room and its new total.
    fn join(&self, room: &Arc<str>, shard: usize) -> (Arc<RoomPresence>, u32) {
        let mut rooms = self.stripe(room).lock().unwrap_or_else(|e| e.into_inner());
        let presence = rooms.entry(room.clone()).or_insert_with(|| {
            Arc::new(RoomPresence {
                per_shard: (0..self.shards).map(|_| AtomicU32::new(0)).collect(),
                total: AtomicU32::new(0),
            })
        });
        presence.per_shard[shard].fetch_add(1, Ordering::AcqRel);
        let total = presence.total.fetch_add(1, Ordering::AcqRel) + 1;
        (presence.clone(), total)
    }

    /// Counts one member fewer on `shard`; deletes the room when it empties. Returns the new total.
    fn leave(&self, room: &str, presence: &RoomPresence, shard: usize) -> u32 {
        let mut rooms = self.stripe(room).lock().unwrap_or_else(|e| e.into_inner());
        presence.per_shard[shard].fetch_sub(1, Ordering::AcqRel);
        let total = presence.total.fetch_sub(1, Ordering::AcqRel) - 1;
        if total == 0 {
            rooms.remove(room);
        }
        total
    }

    /// A room's process-wide presence, if it has members.
    pub fn presence(&self, room: &str) -> Option<Arc<RoomPresence>> {
        let rooms = self.stripe(room).lock().unwrap_or_else(|e| e.into_inner());
        rooms.get(room).cloned()
    }

    /// Number of rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// A room as one shard sees it: its members here, and the process-wide presence.
pub struct LocalRoom {
    pub name: Arc<str>,
    /// Slab keys of this shard's members; an index set for O(1) removal and dense iteration.
    pub members: IndexSet<usize>,
    pub presence: Arc<RoomPresence>,
}

pub enum Joined {
    /// The connection was in the room already; nothing changed.
    AlreadyMember {
        total: u32,
    },
    Joined {
        name: Arc<str>,
        total: u32,
    },
}

/// One shard's rooms.
#[derive(Default)]
pub struct LocalRooms {
    rooms: HashMap<Arc<str>, LocalRoom>,
}

impl LocalRooms {
    pub fn get(&self, room: &str) -> Option<&LocalRoom> {
        self.rooms.get(room)
    }

    pub fn join(&mut self, dir: &RoomDirectory, shard: usize, room: &str, key: usize) -> Joined {
        if let Some(local) = self.rooms.get_mut(room) {
            if !local.members.insert(key) {
                return Joined::AlreadyMember {
                    total: local.presence.total(),
                };
            }
            let (_, total) = dir.join(&local.name, shard);
            return Joined::Joined {
                name: local.name.clone(),
                total,
            };
        }
        let name: Arc<str> = Arc::from(room);
        let (presence, total) = dir.join(&name, shard);
        let mut members = IndexSet::new();
        members.insert(key);
        self.rooms.insert(
            name.clone(),
            LocalRoom {
                name: name.clone(),
                members,
                presence,
            },
        );
        Joined::Joined { name, total }
    }

    /// Removes `key` from `room`; returns the members left across all shards, or `None` when
    /// the connection was not a member.
    pub fn leave(
        &mut self,
        dir: &RoomDirectory,
        shard: usize,
        room: &str,
        key: usize,
    ) -> Option<u32> {
        let local = self.rooms.get_mut(room)?;
        if !local.members.swap_remove(&key) {
            return None;
        }
        let total = dir.leave(room, &local.presence, shard);
        if local.members.is_empty() {
            self.rooms.remove(room);
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        assert!(is_valid_room_name("general"));
        assert!(is_valid_room_name("team-1_a.b:c"));
        assert!(is_valid_room_name(&"a".repeat(64)));
        for bad in ["", "has space", "ünï", "a/b", &"a".repeat(65)] {
            assert!(!is_valid_room_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn counts_across_shards_and_deletes_empty_rooms() {
        let dir = RoomDirectory::new(2);
        let (mut s0, mut s1) = (LocalRooms::default(), LocalRooms::default());
        assert!(matches!(
            s0.join(&dir, 0, "r", 1),
            Joined::Joined { total: 1, .. }
        ));
        assert!(matches!(
            s0.join(&dir, 0, "r", 1),
            Joined::AlreadyMember { total: 1 }
        ));
        assert!(matches!(
            s1.join(&dir, 1, "r", 7),
            Joined::Joined { total: 2, .. }
        ));
        let presence = s0.get("r").unwrap().presence.clone();
        assert_eq!(presence.other_shards(0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s0.leave(&dir, 0, "r", 2), None);
        assert_eq!(s1.leave(&dir, 1, "r", 7), Some(1));
        assert!(s1.get("r").is_none());
        assert_eq!(presence.other_shards(0).count(), 0);
        assert_eq!(s0.leave(&dir, 0, "r", 1), Some(0));
        assert_eq!(dir.room_count(), 0);
        assert!(dir.presence("r").is_none());
    }
}
