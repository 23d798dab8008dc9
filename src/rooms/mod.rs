//! Rooms: a shard-local two-way index (room → local members here, member → rooms in the
//! connection's entry) plus a process-wide directory of rooms, each with its members counted per
//! shard and its [`Stream`] (offsets and history).
//!
//! The directory is only locked on join and leave. A notice (typing, a join or leave) reads the
//! per-shard counters of a room the shard already holds an `Arc` to, without locking, and forwards
//! the one encoded frame to the shards with members. A room message goes through the room's
//! stream lock, which gives it its offset and hands it to every shard with members in that order.

pub mod presence;
pub mod stream;

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use indexmap::IndexMap;

use crate::protocol::RequestId;
use crate::rooms::presence::Presence;
use crate::rooms::stream::{HistoryLimits, Position, Stream};
use crate::ws::deflate::Prepared;

pub const MAX_ROOM_NAME_LEN: usize = 64;

/// Room names are 1–64 characters of `A-Za-z0-9_.:-`.
pub fn is_valid_room_name(name: &str) -> bool {
    (1..=MAX_ROOM_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Who a publication is for.
#[derive(Clone, Debug)]
pub enum Target {
    /// Every addressable connection (the chat protocol's clients).
    All,
    /// Every member of a room.
    Room(Arc<str>),
    /// Every addressable connection of a user.
    User(Arc<str>),
}

/// A room across the whole process: its members, counted per shard, and its stream.
pub struct RoomState {
    pub name: Arc<str>,
    per_shard: Box<[AtomicU32]>,
    total: AtomicU32,
    /// The order of the room's messages, and their recent history. Publishing a message, and
    /// joining or leaving (which change who the messages go to), take this lock: the price of
    /// one order for every member. Nothing else on the per-message path does.
    pub stream: Mutex<Stream>,
    /// Who is in the room across all nodes (taken after `stream` when both are).
    pub presence: Mutex<Presence>,
}

impl RoomState {
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// Shards other than `except` that have members now.
    pub fn other_shards(&self, except: usize) -> impl Iterator<Item = usize> + '_ {
        self.shards_with_members().filter(move |&i| i != except)
    }

    /// Shards that have members now.
    pub fn shards_with_members(&self) -> impl Iterator<Item = usize> + '_ {
        self.per_shard
            .iter()
            .enumerate()
            .filter(|(_, n)| n.load(Ordering::Acquire) > 0)
            .map(|(i, _)| i)
    }

    pub fn stream(&self) -> MutexGuard<'_, Stream> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn presence(&self) -> MutexGuard<'_, Presence> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }
}

const STRIPES: usize = 64;

type Stripe = Mutex<HashMap<Arc<str>, Arc<RoomState>>>;

/// A page of rooms with their members (connections), and the room to ask for the next page
/// after, when more may follow.
#[derive(Debug, PartialEq, Eq)]
pub struct RoomsPage {
    pub rooms: Vec<(Arc<str>, u32)>,
    pub next: Option<Arc<str>>,
}

/// Process-wide rooms, lock-striped by room name. A room stays while it has members, or history
/// that is not yet expired (so clients can recover after everyone left).
pub struct RoomDirectory {
    shards: usize,
    /// Whether the rooms' streams are the broker's (Redis) rather than this node's own.
    shared: bool,
    history: HistoryLimits,
    /// Rooms held at most (`max_rooms`), and held now.
    max_rooms: usize,
    rooms: AtomicUsize,
    stripes: Box<[Stripe]>,
}

/// A new room was refused: the node holds `max_rooms` already.
#[derive(Debug, PartialEq, Eq)]
pub struct RoomsFull;

/// What joining a room found.
pub struct Joining {
    pub state: Arc<RoomState>,
    /// Members across all shards, the joining one included.
    pub total: u32,
    /// The stream's position at the join: the member gets the messages after it. `None` while
    /// the node is still syncing the room with the broker: the join completes then.
    pub position: Option<Position>,
    /// For a join with `since`: the messages after it, when all of them could be given.
    pub missed: Option<Vec<Prepared>>,
    /// This join is the one to ask the broker for the room (the first while it is unsynced).
    pub subscribe: bool,
}

impl Joining {
    /// Where a member of `state` starts, read from its locked `stream`, and what it missed since
    /// `since`.
    pub fn at(
        state: &Arc<RoomState>,
        stream: &Stream,
        since: Option<&Position>,
        history: HistoryLimits,
    ) -> Self {
        let synced = stream.is_synced();
        Joining {
            state: state.clone(),
            total: state.total(),
            position: synced.then(|| stream.position()),
            missed: since
                .filter(|_| synced)
                .and_then(|since| stream.since(since, history, Instant::now())),
            subscribe: false,
        }
    }
}

impl RoomDirectory {
    /// A directory for `shards` shards; `shared` when the rooms' streams are a broker's.
    pub fn new(shards: usize, shared: bool, history: HistoryLimits, max_rooms: usize) -> Self {
        RoomDirectory {
            shards,
            shared,
            history,
            max_rooms,
            rooms: AtomicUsize::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    pub fn history_limits(&self) -> HistoryLimits {
        self.history
    }

    fn stripe(&self, room: &str) -> MutexGuard<'_, HashMap<Arc<str>, Arc<RoomState>>> {
        let mut h = DefaultHasher::new();
        room.hash(&mut h);
        self.stripes[h.finish() as usize % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more member on `shard`, and reads the stream where the member starts (and what
    /// it missed since `since`), all under the stream's lock: a message is either before the join
    /// (and not the member's) or after it (and routed to its shard).
    fn join(
        &self,
        room: &str,
        shard: usize,
        since: Option<&Position>,
    ) -> Result<Joining, RoomsFull> {
        let mut rooms = self.stripe(room);
        let state = self.get_or_create(&mut rooms, room)?;
        let mut stream = state.stream();
        state.per_shard[shard].fetch_add(1, Ordering::AcqRel);
        state.total.fetch_add(1, Ordering::AcqRel);
        let mut joining = Joining::at(&state, &stream, since, self.history);
        if !stream.is_synced() && !stream.subscribing {
            stream.subscribing = true;
            joining.subscribe = true;
        }
        Ok(joining)
    }

    fn get_or_create(
        &self,
        rooms: &mut HashMap<Arc<str>, Arc<RoomState>>,
        room: &str,
    ) -> Result<Arc<RoomState>, RoomsFull> {
        if let Some(state) = rooms.get(room) {
            return Ok(state.clone());
        }
        if self.rooms.fetch_add(1, Ordering::AcqRel) >= self.max_rooms {
            self.rooms.fetch_sub(1, Ordering::AcqRel);
            return Err(RoomsFull);
        }
        let name: Arc<str> = Arc::from(room);
        let state = Arc::new(RoomState {
            name: name.clone(),
            per_shard: (0..self.shards).map(|_| AtomicU32::new(0)).collect(),
            total: AtomicU32::new(0),
            presence: Mutex::default(),
            stream: Mutex::new(if self.shared {
                Stream::unsynced()
            } else {
                Stream::new()
            }),
        });
        rooms.insert(name, state.clone());
        Ok(state)
    }

    /// A room to publish to from outside (the server API), with the memory broker: created when
    /// it has neither members nor history, so the message is kept for members who join with
    /// `since` (a room without members is forgotten when its history expires).
    pub fn for_publish(&self, room: &str) -> Result<Arc<RoomState>, RoomsFull> {
        debug_assert!(!self.shared, "with a broker, its stream gives the offsets");
        self.get_or_create(&mut self.stripe(room), room)
    }

    /// Rooms with members, sorted by name, after the name `after`: at most `limit` of them with
    /// their connections (across all nodes, as far as this node knows).
    pub fn page(&self, after: Option<&str>, limit: usize) -> RoomsPage {
        let mut rooms: Vec<Arc<RoomState>> = Vec::new();
        for stripe in &self.stripes {
            let stripe = stripe.lock().unwrap_or_else(|e| e.into_inner());
            rooms.extend(
                stripe
                    .values()
                    .filter(|state| state.total() > 0)
                    .filter(|state| after.is_none_or(|after| &*state.name > after))
                    .cloned(),
            );
        }
        rooms.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let more = rooms.len() > limit;
        rooms.truncate(limit);
        // Presence is read outside the directory's locks (never taken inside them).
        let next = more.then(|| rooms.last().map(|state| state.name.clone()));
        RoomsPage {
            rooms: rooms
                .into_iter()
                .map(|state| (state.name.clone(), state.presence().total()))
                .collect(),
            next: next.flatten(),
        }
    }

    /// Whether a room without members can be forgotten: no history left, and (with a broker)
    /// the node no longer follows it.
    fn forgettable(&self, stream: &mut Stream, now: Instant) -> bool {
        !stream.trim(self.history, now)
            && !(self.shared && (stream.is_synced() || stream.subscribing))
    }

    /// Counts one member fewer on `shard`; forgets the room when it has neither members nor
    /// history left. Returns the new total.
    fn leave(&self, state: &RoomState, shard: usize) -> u32 {
        let mut rooms = self.stripe(&state.name);
        let mut stream = state.stream();
        state.per_shard[shard].fetch_sub(1, Ordering::AcqRel);
        let total = state.total.fetch_sub(1, Ordering::AcqRel) - 1;
        if total == 0 && self.forgettable(&mut stream, Instant::now()) {
            rooms.remove(&state.name);
            self.rooms.fetch_sub(1, Ordering::AcqRel);
        }
        total
    }

    /// A room, if it has members or history.
    pub fn get(&self, room: &str) -> Option<Arc<RoomState>> {
        self.stripe(room).get(room).cloned()
    }

    /// Forgets rooms without members whose history has expired.
    pub fn sweep(&self) {
        let now = Instant::now();
        for stripe in &self.stripes {
            let mut rooms = stripe.lock().unwrap_or_else(|e| e.into_inner());
            rooms.retain(|_, state| {
                let mut stream = state.stream();
                let keep = state.total() > 0 || !self.forgettable(&mut stream, now);
                if !keep {
                    self.rooms.fetch_sub(1, Ordering::AcqRel);
                }
                keep
            });
        }
    }

    /// Number of rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| {
                let rooms = s.lock().unwrap_or_else(|e| e.into_inner());
                rooms.values().filter(|state| state.total() > 0).count()
            })
            .sum()
    }
}

/// A room as one shard sees it: its members here, and the process-wide state.
pub struct LocalRoom {
    pub name: Arc<str>,
    /// Slab keys of this shard's members, each with the stream offset it joined at (it gets the
    /// messages after it); an index map for O(1) removal and dense iteration.
    pub members: IndexMap<usize, u64>,
    pub state: Arc<RoomState>,
    /// The offset of the last stream message delivered on this shard ([`PENDING`] until the
    /// node has synced the room).
    pub delivered: u64,
    /// Joins waiting for the node's sync of the room, answered when it completes.
    pub pending: Vec<PendingJoin>,
}

/// Where a member waiting for the room's sync stands: it gets no message until then.
pub const PENDING: u64 = u64::MAX;

/// A join waiting for the node's sync of the room.
pub struct PendingJoin {
    pub key: usize,
    pub since: Option<Position>,
    /// The join's `id`, for its answer.
    pub request: Option<RequestId>,
}

pub enum Joined {
    /// The connection was in the room already; nothing changed.
    AlreadyMember(Joining),
    Joined(Joining),
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

    pub fn get_mut(&mut self, room: &str) -> Option<&mut LocalRoom> {
        self.rooms.get_mut(room)
    }

    /// This shard's side of `room`, if it still is that room: not one of the same name that the
    /// shard forgot and joined anew since (whose stream started over).
    pub fn current(&mut self, room: &Arc<RoomState>) -> Option<&mut LocalRoom> {
        self.rooms
            .get_mut(&room.name)
            .filter(|local| Arc::ptr_eq(&local.state, room))
    }

    pub fn join(
        &mut self,
        dir: &RoomDirectory,
        shard: usize,
        room: &str,
        key: usize,
        since: Option<&Position>,
        request: Option<&RequestId>,
    ) -> Result<Joined, RoomsFull> {
        if let Some(local) = self.rooms.get(room)
            && local.members.contains_key(&key)
        {
            let joining = {
                let stream = local.state.stream();
                Joining::at(&local.state, &stream, since, dir.history)
            };
            if joining.position.is_none() {
                // Answered with the first when the sync completes, as a join.
                self.rooms
                    .get_mut(room)
                    .expect("found")
                    .pending
                    .push(PendingJoin {
                        key,
                        since: since.cloned(),
                        request: request.cloned(),
                    });
            }
            return Ok(Joined::AlreadyMember(joining));
        }
        let joining = dir.join(room, shard, since)?;
        let local = self
            .rooms
            .entry(joining.state.name.clone())
            .or_insert_with(|| LocalRoom {
                name: joining.state.name.clone(),
                members: IndexMap::new(),
                state: joining.state.clone(),
                delivered: joining.position.as_ref().map_or(PENDING, |p| p.offset),
                pending: Vec::new(),
            });
        match &joining.position {
            Some(position) => {
                local.members.insert(key, position.offset);
            }
            None => {
                local.members.insert(key, PENDING);
                local.pending.push(PendingJoin {
                    key,
                    since: since.cloned(),
                    request: request.cloned(),
                });
            }
        }
        Ok(Joined::Joined(joining))
    }

    /// Removes `key` from `room`; returns the room and the members left on this node (across
    /// its shards), or `None` when the connection was not a member.
    pub fn leave(
        &mut self,
        dir: &RoomDirectory,
        shard: usize,
        room: &str,
        key: usize,
    ) -> Option<(Arc<RoomState>, u32)> {
        let local = self.rooms.get_mut(room)?;
        local.members.swap_remove(&key)?;
        local.pending.retain(|p| p.key != key);
        let total = dir.leave(&local.state, shard);
        let state = local.state.clone();
        if local.members.is_empty() {
            self.rooms.remove(room);
        }
        Some((state, total))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

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

    const NO_HISTORY: HistoryLimits = HistoryLimits {
        size: 0,
        ttl: std::time::Duration::from_secs(60),
    };

    fn joined_total(joined: Result<Joined, RoomsFull>) -> (bool, u32) {
        match joined.unwrap() {
            Joined::Joined(j) => (true, j.total),
            Joined::AlreadyMember(j) => (false, j.total),
        }
    }

    #[test]
    fn counts_across_shards_and_deletes_empty_rooms() {
        let dir = RoomDirectory::new(2, false, NO_HISTORY, 10);
        let (mut s0, mut s1) = (LocalRooms::default(), LocalRooms::default());
        assert_eq!(
            joined_total(s0.join(&dir, 0, "r", 1, None, None)),
            (true, 1)
        );
        assert_eq!(
            joined_total(s0.join(&dir, 0, "r", 1, None, None)),
            (false, 1)
        );
        assert_eq!(
            joined_total(s1.join(&dir, 1, "r", 7, None, None)),
            (true, 2)
        );
        let state = s0.get("r").unwrap().state.clone();
        assert_eq!(state.other_shards(0).collect::<Vec<_>>(), vec![1]);
        assert!(s0.leave(&dir, 0, "r", 2).is_none());
        assert_eq!(s1.leave(&dir, 1, "r", 7).map(|(_, n)| n), Some(1));
        assert!(s1.get("r").is_none());
        assert_eq!(state.other_shards(0).count(), 0);
        assert_eq!(s0.leave(&dir, 0, "r", 1).map(|(_, n)| n), Some(0));
        assert_eq!(dir.room_count(), 0);
        assert!(dir.get("r").is_none());
    }

    #[test]
    fn a_room_with_history_outlives_its_members_until_the_history_expires() {
        let history = HistoryLimits {
            size: 10,
            ttl: std::time::Duration::from_millis(50),
        };
        let dir = RoomDirectory::new(1, false, history, 10);
        let mut s0 = LocalRooms::default();
        s0.join(&dir, 0, "r", 1, None, None).unwrap();
        let state = s0.get("r").unwrap().state.clone();
        state
            .stream()
            .append(|o| Bytes::from(o.to_string()), history, Instant::now());
        s0.leave(&dir, 0, "r", 1);
        assert_eq!(dir.room_count(), 0, "no members");
        // Rejoining within the TTL: the same stream, and what was missed.
        let since = Position {
            offset: 0,
            epoch: state.stream().position().epoch,
        };
        let Ok(Joined::Joined(joining)) = s0.join(&dir, 0, "r", 2, Some(&since), None) else {
            panic!("a new member");
        };
        assert_eq!(joining.position.unwrap().offset, 1);
        let missed = Prepared::new(Bytes::from("1"));
        assert_eq!(joining.missed, Some(vec![missed]));
        s0.leave(&dir, 0, "r", 2);
        std::thread::sleep(std::time::Duration::from_millis(60));
        dir.sweep();
        assert!(dir.get("r").is_none(), "expired history: forgotten");
    }

    #[test]
    fn new_rooms_are_refused_past_the_node_cap_and_places_come_back() {
        let dir = RoomDirectory::new(1, false, NO_HISTORY, 2);
        let mut s0 = LocalRooms::default();
        s0.join(&dir, 0, "a", 1, None, None).unwrap();
        s0.join(&dir, 0, "b", 1, None, None).unwrap();
        assert!(matches!(
            s0.join(&dir, 0, "c", 1, None, None),
            Err(RoomsFull)
        ));
        // Joining a room that exists is not a new room.
        s0.join(&dir, 0, "a", 2, None, None).unwrap();
        s0.leave(&dir, 0, "b", 1);
        s0.join(&dir, 0, "c", 1, None, None).unwrap();
    }
}
