//! Catching a room up from Redis: its position, the messages this node missed (or its recent
//! history, at the first sync) and its presence, read in one script ([`Scripts::sync`]) and
//! applied by the node through [`crate::broker::BrokerEvents::caught_up`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, Value};
use tokio::task::JoinSet;

use super::envelope::parse_u64;
use super::keys::{ERA_KEY, NODES_KEY, Scripts};
use super::{META_TTL, empty_room_ttl};
use crate::broker::Host;
use crate::rooms::RoomState;
use crate::rooms::presence::{Entry, MAX_CONNS, NodesPresence};
use crate::rooms::stream::{Position, new_epoch};

/// A room's messages from Redis: (offset, JSON text), oldest first.
pub type History = Vec<(u64, Vec<u8>)>;

/// Why a catch-up did not complete.
#[derive(Debug)]
pub enum CatchUpError {
    Redis(RedisError),
    /// Redis has the room behind what this node saw of it, in the same epoch: it went back in
    /// time (restarted from an older snapshot, or failed over to a lagging replica). Taking its
    /// position would hand out offsets that members already had for other messages.
    WentBack(Arc<str>),
}

impl From<RedisError> for CatchUpError {
    fn from(e: RedisError) -> Self {
        CatchUpError::Redis(e)
    }
}

/// Starts catching `room` up, unless that is under way (then it runs once more when done).
pub fn catch_up(
    tasks: &mut JoinSet<Result<(), CatchUpError>>,
    conn: &MultiplexedConnection,
    scripts: &Arc<Scripts>,
    node: &Host,
    room: Arc<RoomState>,
) {
    if !room.stream().begin_catch_up() {
        return;
    }
    // Made before the task: a task dropped before it ever runs still gives the room back.
    let guard = CatchingUp(Some(room));
    node.shared
        .counters
        .broker_catch_ups
        .fetch_add(1, Ordering::Relaxed);
    let (mut conn, scripts, node) = (conn.clone(), scripts.clone(), node.clone());
    tasks.spawn(async move {
        let mut guard = guard;
        let room = guard.0.clone().expect("set above");
        loop {
            sync_once(&mut conn, &scripts, &node, &room).await?;
            if !room.stream().end_catch_up() {
                guard.0 = None;
                return Ok(());
            }
        }
    });
}

/// One read of the room from Redis, applied.
async fn sync_once(
    conn: &mut MultiplexedConnection,
    scripts: &Scripts,
    node: &Host,
    room: &Arc<RoomState>,
) -> Result<(), CatchUpError> {
    // From the offset after the node's, in its epoch; or the most recent, at the first sync. The
    // presence (a whole hash) only when needed.
    let (from, with_presence) = {
        let mut stream = room.stream();
        let with_presence = !stream.is_synced() || std::mem::take(&mut stream.presence_stale);
        (stream.is_synced().then(|| stream.position()), with_presence)
    };
    let limits = node.shared.rooms.history_limits();
    let keys = &scripts.keys;
    let reply: Value = ::redis::cmd("EVALSHA")
        .arg(&scripts.sync)
        .arg(7)
        .arg(keys.meta(&room.name))
        .arg(keys.history(&room.name))
        .arg(keys.presence(&room.name))
        .arg(NODES_KEY)
        .arg(ERA_KEY)
        .arg(keys.members(&room.name))
        .arg(keys.rooms())
        .arg(&*new_epoch())
        .arg(META_TTL.as_secs())
        .arg(from.as_ref().map_or(0, |p| p.offset + 1))
        .arg(limits.size.max(1))
        .arg(from.as_ref().map_or("", |p| &*p.epoch))
        .arg(if with_presence { "1" } else { "0" })
        .arg(keys.generation())
        .arg(empty_room_ttl(limits))
        .arg(&*room.name)
        .query_async(conn)
        .await?;
    let Some(read) = SyncReply::parse(reply, from.is_none()) else {
        return Err(RedisError::from(std::io::Error::other(
            "unexpected answer to the sync script",
        ))
        .into());
    };
    // Against where the stream was when the read was sent: what it took since may be past it.
    if let Some(had) = &from
        && had.epoch == read.position.epoch
        && read.position.offset < had.offset
    {
        return Err(CatchUpError::WentBack(room.name.clone()));
    }
    if read.malformed > 0 {
        node.shared
            .counters
            .broker_malformed
            .fetch_add(read.malformed, Ordering::Relaxed);
    }
    let presence = with_presence.then_some(read.presence);
    node.events
        .caught_up(room, read.position, read.history, presence);
    Ok(())
}

/// Gives a room back (no catch-up running) when its catch-up ends without completing.
struct CatchingUp(Option<Arc<RoomState>>);

impl Drop for CatchingUp {
    fn drop(&mut self) {
        if let Some(room) = self.0.take() {
            let mut stream = room.stream();
            while stream.end_catch_up() {}
        }
    }
}

/// What the sync script read. Entries that are not wsgate's are skipped and counted: one bad
/// record must not keep a room (or the node) from syncing.
pub struct SyncReply {
    pub position: Position,
    pub history: History,
    pub presence: NodesPresence,
    pub malformed: u64,
}

impl SyncReply {
    /// `newest_first`: the history was read from the end (a first sync).
    pub fn parse(reply: Value, newest_first: bool) -> Option<Self> {
        let Value::Array(parts) = reply else {
            return None;
        };
        let [top, epoch, history, presence, deleted] = <[Value; 5]>::try_from(parts).ok()?;
        let (Value::Int(top), Value::BulkString(epoch), Value::Int(deleted)) =
            (top, epoch, deleted)
        else {
            return None;
        };
        let (Value::Array(history), Value::Array(presence)) = (history, presence) else {
            return None;
        };
        let mut malformed = 0;
        let mut kept: History = history
            .into_iter()
            .filter_map(|entry| {
                let parsed = history_entry(entry);
                malformed += u64::from(parsed.is_none());
                parsed
            })
            .collect();
        if newest_first {
            kept.reverse();
        }
        let (presence, bad) = nodes_presence(presence);
        Some(SyncReply {
            position: Position {
                // The script reads offsets as counts (a bad one starts the room over).
                offset: u64::try_from(top).unwrap_or(0),
                // Only compared: one that is not UTF-8 (not wsgate's) still compares.
                epoch: Arc::from(String::from_utf8_lossy(&epoch)),
            },
            history: kept,
            presence,
            // Fields the script deleted as not wsgate's, and entries skipped here.
            malformed: malformed + bad + u64::try_from(deleted).unwrap_or(0),
        })
    }
}

/// A history entry: `[<offset>-0, ["m", <JSON>]]`.
pub(super) fn history_entry(entry: Value) -> Option<(u64, Vec<u8>)> {
    let Value::Array(entry) = entry else {
        return None;
    };
    let [Value::BulkString(id), Value::Array(fields)] = <[Value; 2]>::try_from(entry).ok()? else {
        return None;
    };
    let offset = parse_u64(id.strip_suffix(b"-0")?)?;
    let [_, Value::BulkString(json)] = <[Value; 2]>::try_from(fields).ok()? else {
        return None;
    };
    Some((offset, json))
}

/// Each node's presence in a room from the flat fields of its presence hash (`#<node>` → its
/// last change number, `<node>\x1f<user>` → an entry); returns it and how many fields were not
/// wsgate's.
pub(super) fn nodes_presence(fields: Vec<Value>) -> (NodesPresence, u64) {
    let mut nodes: HashMap<Arc<str>, (u64, Vec<Entry>)> = HashMap::new();
    let mut malformed = 0;
    let mut fields = fields.into_iter();
    while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
        let (Value::BulkString(field), Value::BulkString(value)) = (field, value) else {
            malformed += 1;
            continue;
        };
        let parsed = match field.strip_prefix(b"#") {
            Some(node) => std::str::from_utf8(node)
                .ok()
                .zip(parse_u64(&value))
                .map(|(node, seq)| nodes.entry(Arc::from(node)).or_default().0 = seq),
            None => presence_entry(&field, &value)
                .map(|(node, entry)| nodes.entry(node).or_default().1.push(entry)),
        };
        malformed += u64::from(parsed.is_none());
    }
    let nodes = nodes
        .into_iter()
        .map(|(node, (seq, entries))| (node, seq, entries))
        .collect();
    (nodes, malformed)
}

/// A presence field and its value: the node, and the user's entry there.
fn presence_entry(field: &[u8], value: &[u8]) -> Option<(Arc<str>, Entry)> {
    let at = field.iter().position(|&b| b == 0x1f)?;
    let node = std::str::from_utf8(&field[..at]).ok()?;
    let entry: Entry = serde_json::from_slice(value).ok()?;
    (entry.conns <= MAX_CONNS).then(|| (Arc::from(node), entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(offset: &str, json: &str) -> Value {
        Value::Array(vec![
            bulk(&format!("{offset}-0")),
            Value::Array(vec![bulk("m"), bulk(json)]),
        ])
    }

    #[test]
    fn answers_are_read_oldest_first_and_bad_records_are_skipped_and_counted() {
        let reply = Value::Array(vec![
            Value::Int(7),
            bulk("abc"),
            Value::Array(vec![
                entry("7", "{}"),
                entry("x", "{}"),
                entry("6", "{\"a\":1}"),
            ]),
            Value::Array(vec![
                bulk("#n1"),
                bulk("3"),
                bulk("n1\x1fbob"),
                bulk(r#"{"user":"bob","name":"Bob","conns":2}"#),
                bulk("n1\x1fmallory"),
                bulk("not json"),
                bulk("#n2"),
                bulk("many"),
                bulk("n1\x1fhuge"),
                bulk(r#"{"user":"huge","name":"H","conns":4294967295}"#),
            ]),
            Value::Int(2),
        ]);
        let read = SyncReply::parse(reply, true).unwrap();
        assert_eq!(read.position.offset, 7);
        assert_eq!(&*read.position.epoch, "abc");
        assert_eq!(
            read.history,
            vec![(6, b"{\"a\":1}".to_vec()), (7, b"{}".to_vec())]
        );
        assert_eq!(read.presence.len(), 1);
        let (node, seq, entries) = &read.presence[0];
        assert_eq!((&**node, *seq, entries.len()), ("n1", 3, 1));
        assert_eq!(
            read.malformed, 6,
            "two deleted by the script, a history id, an entry, a number, a count"
        );
        assert!(SyncReply::parse(Value::Int(1), false).is_none());
    }
}
