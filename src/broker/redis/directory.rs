//! The server API's view of rooms across the cluster, read from Redis: which rooms have members
//! on live nodes, how many, and who is in one. Each node keeps cluster-wide presence only for the
//! rooms it follows; these reads cover the rooms it does not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisResult, Value};

use super::keys::{ERA_KEY, NODE_STATUS_KEY, NODES_KEY, Scripts};
use super::sync::{history_entry, nodes_presence};
use crate::broker::{HistoryQuery, NodeStatus, RoomHistory};
use crate::protocol;
use crate::rooms::RoomsPage;
use crate::rooms::presence::Presence;
use crate::rooms::stream::Position;
use crate::ws::frame;

/// The Redis connection the engine has now (lent to API requests: queries are multiplexed on
/// it), with its scripts.
#[derive(Clone)]
pub struct Lookup {
    commands: MultiplexedConnection,
    scripts: Arc<Scripts>,
}

/// Where the engine leaves its [`Lookup`] while connected.
#[derive(Default)]
pub struct LookupSlot(Mutex<Option<Lookup>>);

impl LookupSlot {
    pub(super) fn set(&self, lookup: Option<(MultiplexedConnection, Arc<Scripts>)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            lookup.map(|(commands, scripts)| Lookup { commands, scripts });
    }

    pub(super) fn get(&self) -> Option<Lookup> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How many rooms one page may look at, per room returned: rooms whose nodes all died are taken
/// out of the index as a page passes them, and this bounds that work in one script call.
const LOOKED_AT_PER_ROOM: usize = 10;

impl Lookup {
    /// The live nodes (by Redis's clock), with what each said of itself at its last beat, in
    /// name order. A node whose status is missing or unreadable (an older version) is left out.
    pub async fn nodes(&self) -> RedisResult<Vec<NodeStatus>> {
        type Reply = ((u64, u64), HashMap<String, String>, HashMap<String, String>);
        let ((seconds, micros), alive, statuses): Reply = ::redis::pipe()
            .cmd("TIME")
            .cmd("HGETALL")
            .arg(NODES_KEY)
            .cmd("HGETALL")
            .arg(NODE_STATUS_KEY)
            .query_async(&mut self.commands.clone())
            .await?;
        let now = seconds * 1000 + micros / 1000;
        let mut nodes: Vec<NodeStatus> = alive
            .iter()
            .filter(|(_, until)| until.parse::<u64>().is_ok_and(|until| until >= now))
            .filter_map(|(node, _)| serde_json::from_str(statuses.get(node)?).ok())
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }

    /// Rooms with members on live nodes, in name order after `after`: at most `limit`, each with
    /// its connections across the cluster, and the room to continue after when more may follow.
    pub async fn rooms(&self, after: Option<&str>, limit: usize) -> RedisResult<RoomsPage> {
        let reply: Value = ::redis::cmd("EVALSHA")
            .arg(&self.scripts.rooms_page)
            .arg(2)
            .arg(NODES_KEY)
            .arg(self.scripts.keys.rooms())
            .arg(after.unwrap_or(""))
            .arg(limit)
            .arg(limit * LOOKED_AT_PER_ROOM)
            .arg(self.scripts.keys.prefix())
            .query_async(&mut self.commands.clone())
            .await?;
        parse_rooms_page(reply).ok_or_else(|| {
            ::redis::RedisError::from(std::io::Error::other("unexpected rooms_page reply"))
        })
    }

    /// Who is in `room` on live nodes, and how many records were not wsgate's (skipped). Reads
    /// the whole room: for rooms this node does not follow.
    pub async fn presence(&self, room: &str) -> RedisResult<(Presence, u64)> {
        let fields: Vec<Value> = ::redis::cmd("EVALSHA")
            .arg(&self.scripts.presence_read)
            .arg(2)
            .arg(self.scripts.keys.presence(room))
            .arg(NODES_KEY)
            .query_async(&mut self.commands.clone())
            .await?;
        let (nodes, malformed) = nodes_presence(fields);
        let mut presence = Presence::default();
        // No node is this one's own here: every node's entries are taken.
        presence.replace_others("", nodes);
        Ok((presence, malformed))
    }
}

impl Lookup {
    /// A room's kept messages, as Redis holds them.
    pub async fn history(&self, room: &str, query: HistoryQuery) -> RedisResult<RoomHistory> {
        let keys = &self.scripts.keys;
        let reply: Value = ::redis::cmd("EVALSHA")
            .arg(&self.scripts.history)
            .arg(3)
            .arg(keys.meta(room))
            .arg(keys.history(room))
            .arg(ERA_KEY)
            .arg(keys.generation())
            .arg(query.since + 1)
            .arg(query.limit)
            .arg(if query.newest_first {
                "newest"
            } else {
                "oldest"
            })
            .query_async(&mut self.commands.clone())
            .await?;
        parse_history(reply).ok_or_else(|| {
            ::redis::RedisError::from(std::io::Error::other(
                "unexpected answer to the history script",
            ))
        })
    }
}

/// `[offset, epoch, entries]`; an empty epoch for a room Redis does not hold.
fn parse_history(reply: Value) -> Option<RoomHistory> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let [
        Value::Int(top),
        Value::BulkString(epoch),
        Value::Array(entries),
    ] = <[Value; 3]>::try_from(parts).ok()?
    else {
        return None;
    };
    if epoch.is_empty() {
        return Some(RoomHistory {
            position: None,
            messages: Vec::new(),
            malformed: 0,
        });
    }
    let mut malformed = 0;
    let messages = entries
        .into_iter()
        .filter_map(|entry| {
            let kept = history_entry(entry)
                .filter(|(_, json)| protocol::is_json_object(json))
                .map(|(offset, json)| frame::server_payload(&protocol::with_offset(&json, offset)));
            malformed += u64::from(kept.is_none());
            kept
        })
        .collect();
    Some(RoomHistory {
        position: Some(Position {
            offset: u64::try_from(top).ok()?,
            epoch: Arc::from(String::from_utf8_lossy(&epoch)),
        }),
        messages,
        malformed,
    })
}

/// `[[room, members, ...], next]`; `next` empty when no room follows.
fn parse_rooms_page(reply: Value) -> Option<RoomsPage> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let [Value::Array(flat), Value::BulkString(next)] = <[Value; 2]>::try_from(parts).ok()? else {
        return None;
    };
    let mut rooms = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(Value::BulkString(room)), Some(Value::Int(members))) =
        (flat.next(), flat.next())
    {
        rooms.push((
            Arc::from(String::from_utf8(room).ok()?),
            u32::try_from(members).unwrap_or(u32::MAX),
        ));
    }
    let next = String::from_utf8(next).ok()?;
    Some(RoomsPage {
        rooms,
        next: (!next.is_empty()).then(|| Arc::from(next)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_page_reply_is_read_whole() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"a".to_vec()),
                Value::Int(3),
                Value::BulkString(b"b".to_vec()),
                Value::Int(1),
            ]),
            Value::BulkString(b"b".to_vec()),
        ]);
        let page = parse_rooms_page(reply).unwrap();
        assert_eq!(page.rooms, [("a".into(), 3), ("b".into(), 1)]);
        assert_eq!(page.next.as_deref(), Some("b"));
        let last = Value::Array(vec![Value::Array(vec![]), Value::BulkString(Vec::new())]);
        let page = parse_rooms_page(last).unwrap();
        assert!(page.rooms.is_empty() && page.next.is_none());
        assert_eq!(parse_rooms_page(Value::Nil), None);
    }
}
